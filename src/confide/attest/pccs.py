"""DCAP collateral from a PCCS (Intel's Provisioning Certificate Caching Service), cached on disk.

There is no default service: a verifier uses a PCCS only when its URL is configured (`confide verify
--pccs URL` or `CONFIDE_PCCS_URL`). dcap-qvl's own client fetches the collateral (PCK CRL, TCB info,
QE identity, root CA CRL and their issuer chains, from the Intel PCS v4 API the PCCS serves); this
module only adds a cache and clear errors.

Cache: one JSON file per (PCCS URL, TEE, FMSPC, PCK CA) under the cache directory, holding the
collateral and its validity window (the latest issue date to the earliest next-update among the
TCB info, QE identity and CRLs). A lookup at time `at` uses the cached copy only when `at` lies in
that window; otherwise it fetches again and replaces the file (written to a temporary file, then
renamed). A damaged cache file is ignored and replaced. The collateral is authenticated when it is
used (dcap-qvl checks every signature and chain up to the pinned Intel root), so the cache need not
be trusted: tampering with it can make verification fail, never pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dcap_qvl  # type: ignore[import-untyped]

from confide.attest.anchors import utc_iso
from confide.attest.sgx_dcap import collateral_validity
from confide.enclave.errors import EvidenceError, FormatError

__all__ = ["CACHE_FORMAT", "PCCS_URL_ENV", "PccsClient", "pccs_from_env"]

CACHE_FORMAT = "confide-pccs-cache-v1"
PCCS_URL_ENV = "CONFIDE_PCCS_URL"
DEFAULT_TIMEOUT_SECONDS = 30.0
_WHERE = "pccs"


def _check_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise FormatError(f"PCCS URL must be http(s)://host[:port][/path], got {url!r}", where=_WHERE)
    return url.strip().rstrip("/")


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from synchronous code, inside or outside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass(frozen=True)
class QuoteKey:
    tee: str  # "sgx" | "tdx"
    fmspc: str  # upper-case hex, as the PCS API spells it
    ca: str  # "processor" | "platform"
    embeds_pck_chain: bool


class PccsClient:
    """Fetches DCAP collateral for a quote from one PCCS, with an on-disk cache (optional)."""

    def __init__(
        self, url: str, *, cache_dir: Path | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> None:
        self.url = _check_url(url)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.timeout = float(timeout)
        self.fetches = 0  # how many times the PCCS was asked (the cache's effect, for callers and tests)

    # -- public ---------------------------------------------------------------------------------

    def collateral(self, quote: bytes, *, at: int) -> bytes:
        """Collateral JSON (dcap-qvl's QuoteCollateralV3 layout) valid at `at` for this quote."""
        key = self._key(quote)
        cached = self._load(key, at) if key.embeds_pck_chain else None
        if cached is not None:
            return cached
        doc = self._fetch(quote)
        valid_from, valid_until = collateral_validity(doc)
        if key.embeds_pck_chain:
            # The PCK chain is per platform and the quote carries it: keep the cache per FMSPC.
            doc.pop("pck_certificate_chain", None)
            self._store(key, doc, valid_from, valid_until)
        return json.dumps(doc).encode()

    def cache_path(self, quote: bytes) -> Path | None:
        """Where the collateral for this quote is cached (None without a cache directory)."""
        return self._path(self._key(quote))

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _key(quote: bytes) -> QuoteKey:
        try:
            parsed = dcap_qvl.parse_quote(bytes(quote))
            tee = "tdx" if parsed.is_tdx() else "sgx"
            fmspc = str(parsed.fmspc()).upper()
            ca = str(parsed.ca())
            embeds = parsed.cert_chain_pem_bytes() is not None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # ValueError from the parser; a Rust panic is a BaseException
            raise EvidenceError(
                f"cannot read FMSPC and PCK CA from the quote to fetch its collateral: {' '.join(str(e).split())}",
                where=_WHERE,
            ) from e
        if len(fmspc) != 12 or any(c not in "0123456789ABCDEF" for c in fmspc):
            raise EvidenceError(f"quote has a malformed FMSPC {fmspc!r}", where=_WHERE)
        if ca not in ("processor", "platform"):
            raise EvidenceError(f"quote's PCK certificate names an unknown CA {ca!r}", where=_WHERE)
        return QuoteKey(tee=tee, fmspc=fmspc, ca=ca, embeds_pck_chain=embeds)

    def _fetch(self, quote: bytes) -> dict[str, Any]:
        async def fetch() -> Any:
            return await asyncio.wait_for(dcap_qvl.get_collateral(self.url, bytes(quote)), self.timeout)

        self.fetches += 1
        try:
            col = _run(fetch())
            doc = json.loads(col.to_json())
        except TimeoutError:
            raise EvidenceError(
                f"PCCS {self.url} did not answer within {self.timeout:g} s", where=_WHERE
            ) from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # dcap-qvl raises ValueError for HTTP and parse failures
            raise EvidenceError(
                f"cannot fetch collateral from PCCS {self.url}: {' '.join(str(e).split())}", where=_WHERE
            ) from e
        if not isinstance(doc, dict):
            raise EvidenceError(f"PCCS {self.url} returned collateral that is not an object", where=_WHERE)
        return doc

    def _load(self, key: QuoteKey, at: int) -> bytes | None:
        path = self._path(key)
        if path is None:
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if (
                entry.get("format") != CACHE_FORMAT
                or entry.get("url") != self.url
                or entry.get("fmspc") != key.fmspc
                or entry.get("tee") != key.tee
                or entry.get("ca") != key.ca
            ):
                return None
            valid_from, valid_until = entry["valid_from"], entry["valid_until"]
            collateral = entry["collateral"]
            if not (
                isinstance(valid_from, int) and isinstance(valid_until, int) and isinstance(collateral, dict)
            ):
                return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # missing or damaged: fetch again
        if not valid_from <= at <= valid_until:
            return None
        return json.dumps(collateral).encode()

    def _path(self, key: QuoteKey) -> Path | None:
        if self.cache_dir is None:
            return None
        ident = f"{self.url}\0{key.tee}\0{key.fmspc}\0{key.ca}".encode()
        return self.cache_dir / f"{key.tee}-{key.fmspc.lower()}-{hashlib.sha256(ident).hexdigest()[:16]}.json"

    def _store(
        self, key: QuoteKey, doc: dict[str, Any], valid_from: int | None, valid_until: int | None
    ) -> None:
        path = self._path(key)
        if path is None or valid_from is None or valid_until is None:
            return
        entry = {
            "format": CACHE_FORMAT,
            "url": self.url,
            "tee": key.tee,
            "fmspc": key.fmspc,
            "ca": key.ca,
            "fetched_at": int(time.time()),
            "valid_from": valid_from,
            "valid_until": valid_until,
            "valid": f"{utc_iso(valid_from)} … {utc_iso(valid_until)}",
            "collateral": doc,
        }
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pccs-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(entry, fh)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise FormatError(f"cannot write the PCCS cache ({e.strerror or e})", where=str(path)) from e


def pccs_from_env(url: str | None, *, cache_dir: Path | None) -> PccsClient | None:
    """A client for `url`, else for $CONFIDE_PCCS_URL, else None (no PCCS is used by default)."""
    chosen = url or os.environ.get(PCCS_URL_ENV, "").strip()
    return PccsClient(chosen, cache_dir=cache_dir) if chosen else None
