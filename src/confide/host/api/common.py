"""Limits and patterns shared by the platform API's modules."""

from __future__ import annotations

import logging

MAX_LONG_POLL_S = 30.0
MAX_CACHED_PARTIES = 100_000
LONG_POLL_SLICE_S = 0.25  # re-read the database this often (changes by other server processes)

log = logging.getLogger("confide.host")

MAX_JSON_BYTES = 4 << 20
NONCE_PURGE_INTERVAL_S = 60.0
BLOB_PATH = "/v1/blobs"
HEX32 = r"^[0-9a-f]{32}$"
HEX64 = r"^[0-9a-f]{64}$"
FINGERPRINT = r"^[0-9a-f]{4}(-[0-9a-f]{4}){7}$"  # 128 bits (confide.enclave.keys.FINGERPRINT_RE)
MAX_INT64 = (1 << 63) - 1  # the database's BIGINT
MAX_SCHEMA_DEPTH = 16  # a dataset's schema is echoed back: keep it shallow enough to serialise
PARTY_SCOPE_KEY = "confide.party"
