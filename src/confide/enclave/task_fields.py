"""Limits, formats and strict field checks shared by the multi-party objects (functions,
dataset key envelopes, manifests, approvals, receipts): everything they parse may be hostile."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .encoding import canonical_json, get_typed, json_depth, parse_json_object
from .errors import FormatError
from .keys import FINGERPRINT_RE

FUNCTION_FORMAT = "confide-function-v1"
DATASET_KEY_FORMAT = "confide-dataset-key-v1"
TASK_FORMAT = "confide-task-v1"
APPROVAL_FORMAT = "confide-approval-v2"  # v2: max_runs
RECEIPT_FORMAT = "confide-task-receipt-v2"  # v2: run, max_runs
DATASET_KEY_PURPOSE = "dataset-key"
FUNCTION_SOURCE_PURPOSE = "function-source"

FUNCTION_KINDS = ("builtin", "python")
# what the sandbox offers
PROVIDED_REQUIREMENTS = (
    "cryptography",
    "duckdb",
    "numpy",
    "onnxruntime",
    "opendp",
    "pandas",
    "scikit-learn",
    "xgboost",
)
RECEIPT_CHECKS = ("approval", "manifest", "function", "input", "output", "cohort", "runs", "privacy", "run")
ERROR_OUTPUT = "_error"  # the extra output carrying a failed function's (sealed) error text

MAX_NAME_LEN = 64
MAX_VERSION_LEN = 32
MAX_DESCRIPTION_LEN = 4096
MAX_IDENTITY_LINE_LEN = 512
MAX_INPUTS = 64
MAX_OUTPUTS = 32
MAX_PARTICIPANTS = 64
MAX_RECIPIENTS = 64
MAX_REQUIREMENTS = 16
MAX_PARAMS_BYTES = 64 << 10
MAX_PARAMS_DEPTH = 16
MAX_MANIFEST_BYTES = 256 << 10
MAX_APPROVAL_BYTES = 4 << 10
MAX_ENVELOPE_BYTES = 4 << 10
MAX_SOURCE_BYTES = 1 << 20
MAX_RECEIPT_BYTES = 256 << 10
MAX_OUTPUT_BYTES = 1 << 40
MAX_ERROR_MESSAGE_LEN = 2048
MAX_RUNS = 1_000_000  # the most runs one approval may allow
DEFAULT_MAX_RUNS = 3  # an approval's default: a run and the platform's retries after a lost worker
DEFAULT_MAX_OUTPUT_BYTES = 64 << 20

IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
FUNCTION_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
FINGERPRINT_WHAT = "a 128-bit key fingerprint (8 groups of 4 hex digits: xxxx-xxxx-...-xxxx)"
HEX32_RE = re.compile(r"[0-9a-f]{32}")
HEX64_RE = re.compile(r"[0-9a-f]{64}")

BUILTINS_DIR = Path(__file__).resolve().parent / "builtins"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- field checks (hostile input) -----------------------------------------------------------------


def as_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"must be a JSON object, got {type(value).__name__}", where=where)
    return value


def load_object(data: str | bytes | Mapping[str, Any], cap: int, where: str) -> dict[str, Any]:
    """A JSON object from text (size-capped, strictly parsed) or an already parsed mapping."""
    if isinstance(data, Mapping):
        obj = dict(data)
    else:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        if not isinstance(data, bytes):
            raise FormatError(f"must be JSON text, got {type(data).__name__}", where=where)
        if len(data) > cap:
            raise FormatError(f"{len(data)} bytes exceeds the {cap}-byte limit", where=where)
        obj = parse_json_object(data, where=where)
    try:
        size = len(canonical_json(obj))  # what gets hashed and signed must encode (no lone surrogates)
        json.dumps(obj, allow_nan=False)  # and be standard JSON: 1e400 parses as infinity
    except (UnicodeEncodeError, RecursionError, ValueError, TypeError):
        raise FormatError(
            "holds text that is not valid Unicode, a number out of range, or nesting too deep", where=where
        ) from None
    if size > cap:
        raise FormatError(f"{size} bytes exceeds the {cap}-byte limit", where=where)
    return obj


def text_field(obj: Mapping[str, Any], key: str, where: str, *, max_len: int) -> str:
    value = get_typed(obj, key, str, where=where)
    if len(value) > max_len:
        raise FormatError(f"field {key!r} longer than {max_len} characters", where=where)
    return value


def pattern_field(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], what: str, where: str) -> str:
    value = get_typed(obj, key, str, where=where)
    if not pattern.fullmatch(value):
        raise FormatError(f"field {key!r} must be {what}, got {value[:80]!r}", where=where)
    return value


def identifier(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not IDENT_RE.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise FormatError(
            f"{what} {shown!r} must be an identifier (letters, digits, _; at most {MAX_NAME_LEN})",
            where=where,
        )
    return value


MAX_PARTY_NAME_LEN = 128  # the registration limit (confide.client.api_auth.MAX_NAME_LEN)


def party_name(value: Any, where: str) -> str:
    """A participant's display name: free text ("Hospital A"), bounded, printable (no control,
    format or bidirectional-override characters that could disguise a name in a review), without
    surrounding spaces. Only a label: manifests name parties by key fingerprint."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_PARTY_NAME_LEN
        or not value.isprintable()
        or value != value.strip()
    ):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise FormatError(
            f"participant name {shown!r} must be 1..{MAX_PARTY_NAME_LEN} printable characters "
            "without surrounding spaces",
            where=where,
        )
    return value


def fingerprint_field(obj: Mapping[str, Any], key: str, where: str) -> str:
    return pattern_field(obj, key, FINGERPRINT_RE, FINGERPRINT_WHAT, where)


def fingerprint_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not FINGERPRINT_RE.fullmatch(value):
        raise FormatError(f"must be {FINGERPRINT_WHAT}", where=where)
    return value


def hex_field(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], where: str) -> str:
    digits = 64 if pattern is HEX64_RE else 32
    return pattern_field(obj, key, pattern, f"{digits} lowercase hex digits", where)


def int_field(obj: Mapping[str, Any], key: str, where: str, *, low: int, high: int) -> int:
    value = get_typed(obj, key, int, where=where)
    if not low <= value <= high:
        raise FormatError(f"field {key!r} must be within {low}..{high}, got {value}", where=where)
    return value


def list_field(obj: Mapping[str, Any], key: str, where: str, *, low: int, high: int) -> list[Any]:
    value = get_typed(obj, key, list, where=where)
    if not low <= len(value) <= high:
        raise FormatError(f"field {key!r} must hold {low}..{high} entries, got {len(value)}", where=where)
    return value


def check_unique(values: Sequence[str], what: str, where: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise FormatError(f"{what} {v!r} appears twice", where=where)
        seen.add(v)


def params_value(value: Any, where: str) -> dict[str, Any]:
    params = as_object(value, where)
    if json_depth(params, MAX_PARAMS_DEPTH + 1) > MAX_PARAMS_DEPTH:
        raise FormatError(f"nested deeper than {MAX_PARAMS_DEPTH} levels", where=where)
    size = len(canonical_json(params))
    if size > MAX_PARAMS_BYTES:
        raise FormatError(f"{size} bytes exceeds the {MAX_PARAMS_BYTES}-byte limit", where=where)
    return params
