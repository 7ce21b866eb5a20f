"""The fixed driver a dataflow task runs in the sandbox child, and the record codec both sides share.

The enclave side imports this module for the codec (``enc``/``dec``/``key_bytes``/frames); the same
file is also read as text and sent to the zygote as a run's source, so it imports only the
standard library and is self-contained. In the child, ``run(ctx)`` compiles the user's function
module (its source comes from the sealed job description, never from the engine), reads the
task's decrypted records from ``ctx.inputs``, applies the stage's operators and writes the result
records to ``ctx.outputs["out"]``. Whatever the child writes is hostile to the enclave side, which
parses it strictly.

Records are Python values encoded as tagged JSON: None, bool, int, float, str as themselves, a
tuple as a JSON array, a list as ``{"$l": [...]}``, bytes as ``{"$b": base64}``, a dict with str
keys not starting with "$" as an object, any other dict as ``{"$d": [[k, v], ...]}``. A frame is a
4-byte big-endian length and a JSON array of encoded records; on a keyed (hash) output it is
instead ``u32 n | u32 keys length | keys | records``: n key encodings (key_json, the canonical
encoding of each record's key) joined by newlines, then the n encoded records joined by newlines
(compact JSON never holds a raw newline), so the enclave side buckets the records and seals their
bytes without decoding and encoding them again.
"""

from __future__ import annotations

import base64
import csv
import itertools
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

FRAME = struct.Struct(">I")
KEYED = struct.Struct(">II")  # a keyed frame's record count and the length of its keys
FRAME_RECORDS = 2048  # records per frame the driver writes
MAX_FRAME = 64 << 20
_TAGS = ("$l", "$d", "$b")


# ---- codec ------------------------------------------------------------------------------------------


_SCALARS = frozenset((str, int, float, bool, type(None)))


def enc(v: Any) -> Any:
    t = type(v)
    if t is str or t is int or t is float or t is bool or v is None:
        return v
    if t is tuple:  # most records: a tuple of scalars, encoded without a call per field
        return [x if type(x) in _SCALARS else enc(x) for x in v]
    if t is list:
        return {"$l": [enc(x) for x in v]}
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in v):
            return {k: enc(x) for k, x in v.items()}
        return {"$d": [[enc(k), enc(x)] for k, x in v.items()]}
    if t is bytes:
        return {"$b": base64.b64encode(v).decode("ascii")}
    for base in (bool, int, float, str, tuple, list, dict, bytes):  # subclasses: as the base type
        if isinstance(v, base):
            return enc(base(v))  # type: ignore[call-arg,arg-type]
    raise TypeError(f"a dataflow record cannot hold a {t.__name__} value")


def dec(j: Any) -> Any:
    t = type(j)
    if t is list:
        return tuple([dec(x) for x in j])
    if t is dict:
        if len(j) == 1:
            ((k, x),) = j.items()
            if k == "$l":
                return [dec(y) for y in x]
            if k == "$d":
                return {dec(a): dec(b) for a, b in x}
            if k == "$b":
                return base64.b64decode(x)
        return {k: dec(x) for k, x in j.items()}
    return j


def _canon(j: Any) -> Any:
    """Equal Python keys get equal encodings: True == 1 == 1.0 in a dict, so they bucket together."""
    t = type(j)
    if t is bool:
        return int(j)
    if t is float and j.is_integer():
        return int(j)
    if t is list:
        return [_canon(x) for x in j]
    if t is dict:
        return {k: _canon(x) for k, x in j.items()}
    return j


_STR_JSON = json.JSONEncoder(ensure_ascii=False).encode


def key_json(key: Any) -> str:
    """The canonical encoding of a key (what the enclave's PRF is applied to). An int or str key,
    the common case, takes a fast path with the same result (json writes an int as int.__repr__)."""
    t = type(key)
    if t is int:
        return int.__repr__(key)
    if t is str:
        return _STR_JSON(key)
    return canonical_encoded(enc(key))


def canonical_encoded(j: Any) -> str:
    """key_json of an already encoded key (the enclave side routes encoded records by key); an int
    or str key takes key_json's fast path (the same result)."""
    t = type(j)
    if t is int:
        return int.__repr__(j)
    if t is str:
        return _STR_JSON(j)
    return json.dumps(_canon(j), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _record_encoder() -> Callable[[Any], str]:
    """Compact JSON of one encoded record, as json.dumps(separators=(",", ":"), ensure_ascii=False)
    writes it, without building an encoder per call (json's own C encoder, when it has one)."""
    from json import encoder as je

    make = getattr(je, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C accelerator
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def refuse(o: Any) -> Any:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    c = make(None, refuse, je.encode_basestring, None, ":", ",", False, False, True)
    join = "".join
    return lambda o: join(c(o, 0))


record_json = _record_encoder()


def write_keyed_frame(out: BinaryIO, keys: list[str], records: list[Any]) -> None:
    """A keyed output's frame: the records' key encodings and their encoded records (see above)."""
    kb = "\n".join(keys).encode("utf-8")
    rb = "\n".join([record_json(r) for r in records]).encode("utf-8")
    out.write(FRAME.pack(8 + len(kb) + len(rb)) + KEYED.pack(len(keys), len(kb)) + kb + rb)


def write_frame(out: BinaryIO, items: list[Any]) -> None:
    data = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    out.write(FRAME.pack(len(data)) + data)


def iter_frames(data: bytes | memoryview) -> Iterator[bytes | memoryview]:
    """Split trusted framed bytes (made by the enclave side) into frame payloads."""
    view = memoryview(data)
    off = 0
    while off < len(view):
        (n,) = FRAME.unpack_from(view, off)
        yield view[off + 4 : off + 4 + n]
        off += 4 + n


# ---- sources ----------------------------------------------------------------------------------------


def _lines(raw: bytes) -> Iterator[str]:
    if not raw:
        return
    text = raw.decode("utf-8")
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    for line in parts:
        yield line[:-1] if line.endswith("\r") else line


def _cell(v: Any) -> Any:
    """A Parquet cell as a record value: Decimal as its exact text, dates and times in ISO 8601."""
    if v is None or type(v) in (str, int, float, bool, bytes):
        return v
    if isinstance(v, list):
        return [_cell(x) for x in v]
    if isinstance(v, dict):
        return {k: _cell(x) for k, x in v.items()}
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)  # decimal.Decimal, datetime.timedelta


def _parquet_rows(raw: bytes, spec: dict[str, Any]) -> Iterator[Any]:
    """The rows of this partition's row groups as dicts by column name. The file is plain Parquet or
    a PME dataset decrypted here with the master keys sealed in it (enclave/parquet_keys, which the
    flow zygotes pre-import: the child cannot import Confide's modules itself)."""
    from confide.enclave import parquet_keys

    part, parts = spec["row_groups"]
    table = parquet_keys.read_dataset(raw, name=spec["input"], row_groups=(part, parts))
    for batch in table.to_batches(max_chunksize=FRAME_RECORDS):
        for row in batch.to_pylist():
            yield {k: _cell(v) for k, v in row.items()}


def _source(raw: bytes, spec: dict[str, Any]) -> Iterator[Any]:
    fmt = spec["format"]
    if fmt == "parquet":
        yield from _parquet_rows(raw, spec)
        return
    lines = _lines(raw)
    if spec.get("skip_header"):
        next(lines, None)
    if fmt == "text":
        yield from lines
    elif fmt == "jsonl":
        for line in lines:
            if line.strip():
                yield dec(json.loads(line))
    elif fmt == "csv":
        names = spec.get("csv_names")
        for row in csv.reader(lines):
            if names is None:
                yield tuple(row)
            else:
                if len(row) != len(names):
                    raise ValueError(f"CSV row has {len(row)} fields, the header {len(names)}")
                yield dict(zip(names, row, strict=True))
    else:
        raise ValueError(f"unknown source format {fmt!r}")


def _records(fh: BinaryIO, expect: int | None = None) -> Iterator[Any]:
    """The records of a task's framed input; with `expect` (the enclave's authenticated count of
    them), read to the end, a different number fails the run: a record of the previous task's
    output that held several JSON values (its bytes are sealed unparsed) is not taken as several."""
    data = fh.read()
    n = 0
    for payload in iter_frames(data):
        for j in json.loads(bytes(payload)):
            n += 1
            yield dec(j)
    if expect is not None and n != expect:
        raise ValueError(f"the input holds {n} records where the enclave counted {expect}")


# ---- operators --------------------------------------------------------------------------------------


def _pair(x: Any, op: str) -> tuple[Any, Any]:
    if type(x) is not tuple or len(x) != 2:
        raise TypeError(f"{op} needs (key, value) pairs, got {type(x).__name__}")
    return x


def _reduce(it: Iterable[Any], fn: Callable[[Any, Any], Any]) -> Iterator[Any]:
    acc: dict[Any, Any] = {}
    for x in it:
        if type(x) is not tuple or len(x) != 2:  # _pair's check, inline: once per record
            _pair(x, "reduce_by_key")
        k, v = x
        acc[k] = fn(acc[k], v) if k in acc else v
    yield from acc.items()


def _aggregate(it: Iterable[Any], zero: Any, fn: Callable[[Any, Any], Any]) -> Iterator[Any]:
    """Map side of aggregate_by_key: fn(acc, v) per key from a fresh copy of the zero value."""
    acc: dict[Any, Any] = {}
    for x in it:
        k, v = _pair(x, "aggregate_by_key")
        acc[k] = fn(acc[k] if k in acc else dec(zero), v)
    yield from acc.items()


def _group(it: Iterable[Any]) -> Iterator[Any]:
    acc: dict[Any, list[Any]] = {}
    for x in it:
        k, v = _pair(x, "group_by_key")
        acc.setdefault(k, []).append(v)
    yield from acc.items()


def _group_concat(it: Iterable[Any]) -> Iterator[Any]:
    """Second phase of group_by_key: the map side already grouped values into lists."""
    acc: dict[Any, list[Any]] = {}
    for x in it:
        k, vs = _pair(x, "group_by_key")
        acc.setdefault(k, []).extend(vs)
    yield from acc.items()


def _distinct(it: Iterable[Any]) -> Iterator[Any]:
    seen: dict[Any, None] = {}
    for x in it:
        seen.setdefault(x, None)
    yield from seen


def _sort(it: Iterable[Any], ascending: bool) -> Iterator[Any]:
    pairs = [_pair(x, "sort_by") for x in it]
    pairs.sort(key=lambda p: p[0], reverse=not ascending)
    for _, x in pairs:
        yield x


def range_bounds(samples: Iterable[Any], buckets: int) -> list[Any]:
    """At most buckets - 1 increasing keys cutting the weighted sample into equal shares (Spark's
    RangePartitioner.determineBounds): each map task's sample is (its record count, its sampled
    keys), each key weighing count / len(keys). A key that spans several shares is one boundary."""
    weighted: list[tuple[Any, float]] = []
    for count, keys in samples:
        if keys:
            w = count / len(keys)
            weighted.extend((k, w) for k in keys)
    weighted.sort(key=lambda t: t[0])
    step = sum(w for _, w in weighted) / buckets
    bounds: list[Any] = []
    cum, target = 0.0, step
    for k, w in weighted:
        if len(bounds) >= buckets - 1:
            break
        cum += w
        if cum >= target and (not bounds or k > bounds[-1]):
            bounds.append(k)
            target += step
    return bounds


def _route(it: Iterable[Any], bounds: list[Any], buckets: int, ascending: bool) -> Iterator[tuple[int, Any]]:
    """(bucket, (key, record)): bucket i of an ascending sort holds keys in (bounds[i-1], bounds[i]]."""
    import bisect

    for x in it:
        k, _ = _pair(x, "sort_by")
        b = bisect.bisect_left(bounds, k)
        yield (b if ascending else buckets - 1 - b), x


def _join(left: Iterable[Any], right: Iterable[Any], how: str) -> Iterator[Any]:
    table: dict[Any, list[Any]] = {}
    for x in right:
        k, w = _pair(x, "join")
        table.setdefault(k, []).append(w)
    for x in left:
        k, v = _pair(x, "join")
        matches = table.get(k)
        if matches:
            for w in matches:
                yield (k, (v, w))
        elif how == "left":
            yield (k, (v, None))


def _apply(op: dict[str, Any], it: Iterable[Any], fns: dict[str, Any]) -> Iterable[Any]:
    kind = op["op"]
    fn: Any = fns[op["fn"]] if "fn" in op else None
    if kind == "map":
        return map(fn, it)
    if kind == "flat_map":
        return itertools.chain.from_iterable(map(fn, it))
    if kind == "filter":
        return filter(fn, it)
    if kind == "map_partitions":
        return fn(iter(it))
    if kind == "key_by":
        return ((fn(x), x) for x in it)
    if kind == "reduce_local":
        return _reduce(it, fn)
    if kind == "aggregate_local":
        return _aggregate(it, op["zero"], fn)
    if kind == "group_local":
        return _group(it)
    if kind == "group_concat":
        return _group_concat(it)
    if kind == "distinct_local":
        return _distinct(it)
    if kind == "sort_local":
        return _sort(it, bool(op["ascending"]))
    if kind == "count_local":
        return iter([sum(1 for _ in it)])
    if kind == "sum_local":
        return iter([sum(it)])
    raise ValueError(f"unknown operator {kind!r}")


def _load_module(source: str) -> dict[str, Any]:
    import builtins

    namespace: dict[str, Any] = {"__name__": "__flow_functions__", "__builtins__": builtins}
    exec(compile(source, "<flow functions>", "exec", dont_inherit=True), namespace)
    return namespace


def run(ctx: Any) -> None:
    p = ctx.params
    fns = _load_module(p["module"]) if p["module"] else {}
    streams: list[Iterable[Any]] = []
    samples: list[Any] = []
    for spec in p["inputs"]:
        fh = ctx.inputs[spec["name"]]
        if spec["kind"] == "samples":  # a range sort's routing stage: every map task's sample
            samples.extend(_records(fh))
            continue
        streams.append(
            _source(fh.read(), spec) if spec["kind"] == "raw" else _records(fh, spec.get("records"))
        )
    if p["combine"] == "join":
        it: Iterable[Any] = _join(streams[0], streams[1], p["how"])
    else:
        it = (x for s in streams for x in s)
    for op in p["chain"]:
        it = _apply(op, it, fns)
    out = ctx.outputs["out"]
    ranges = p.get("range")
    if ranges is not None:  # a range sort's routing stage: [bucket, (key, record)] per record
        n = ranges["buckets"]
        bounds = range_bounds(samples, n)
        batch_r: list[Any] = []
        for b, x in _route(it, bounds, n, ranges["ascending"]):
            batch_r.append([b, enc(x)])
            if len(batch_r) >= FRAME_RECORDS:
                write_frame(out, batch_r)
                batch_r = []
        if batch_r:
            write_frame(out, batch_r)
        return
    keyed = p["keyed"]  # None, "pair" (key = record[0]) or "self" (key = the record)
    if keyed is not None:
        keys: list[str] = []
        recs: list[Any] = []
        for x in it:
            keys.append(key_json(_pair(x, "a keyed exchange")[0] if keyed == "pair" else x))
            recs.append(enc(x))
            if len(recs) >= FRAME_RECORDS:
                write_keyed_frame(out, keys, recs)
                keys, recs = [], []
        if recs:
            write_keyed_frame(out, keys, recs)
        return
    text = p.get("text", False)
    batch: list[Any] = []
    for x in it:
        if text:
            batch.append(x if type(x) is str else str(x))
        else:
            batch.append(enc(x))
        if len(batch) >= FRAME_RECORDS:
            write_frame(out, batch)
            batch = []
    if batch:
        write_frame(out, batch)
