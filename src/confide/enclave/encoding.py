"""Small, strict encoding helpers shared by every format (canonical JSON, base64, hex)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import FormatError


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8. Used for everything that is signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json_object(data: bytes | str, *, where: str) -> dict[str, Any]:
    """Parse hostile JSON that must be an object; duplicate keys and NaN/Infinity are rejected."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        obj = json.loads(data, object_pairs_hook=no_duplicates, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"not valid JSON ({exc})", where=where) from None
    if not isinstance(obj, dict):
        raise FormatError(f"expected a JSON object, got {type(obj).__name__}", where=where)
    return obj


def check_fields(
    obj: Mapping[str, Any], *, required: Iterable[str], optional: Iterable[str] = (), where: str
) -> None:
    """Fail closed on missing and unknown fields."""
    required = set(required)
    allowed = required | set(optional)
    missing = sorted(required - obj.keys())
    if missing:
        raise FormatError(f"missing field(s) {', '.join(missing)}", where=where)
    unknown = sorted(set(obj.keys()) - allowed)
    if unknown:
        raise FormatError(f"unknown field(s) {', '.join(unknown)}", where=where)


def get_typed(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...], *, where: str) -> Any:
    value = obj[key]
    # bool is an int subclass: never accept it where an int is wanted
    if isinstance(value, bool) and typ in (int, (int,)):
        raise FormatError(f"field {key!r} must be an integer, got a boolean", where=where)
    if not isinstance(value, typ):
        want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise FormatError(f"field {key!r} must be {want}, got {type(value).__name__}", where=where)
    return value


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, *, field: str, where: str, length: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"field {field!r} must be base64 text", where=where)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError(f"field {field!r} is not valid base64", where=where) from None
    if length is not None and len(raw) != length:
        raise FormatError(f"field {field!r} must decode to {length} bytes, got {len(raw)}", where=where)
    return raw


def hexd(text: Any, *, field: str, where: str, length: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"field {field!r} must be hex text", where=where)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise FormatError(f"field {field!r} is not valid hex", where=where) from None
    if length is not None and len(raw) != length:
        raise FormatError(f"field {field!r} must be {length} bytes of hex, got {len(raw)}", where=where)
    return raw


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value (objects and arrays), counted no further than `limit` levels."""
    if isinstance(value, dict):
        items: list[Any] = list(value.values())
    elif isinstance(value, list):
        items = value
    else:
        return 0
    if limit <= 0:
        return 1
    return 1 + max((json_depth(v, limit - 1) for v in items), default=0)
