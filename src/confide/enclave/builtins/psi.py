"""Built-in psi v1: private set intersection of two or more inputs' id columns.

Inputs: two or more UTF-8 CSV files with a header. Params: ``column`` (required: the id column's
name, one for every input, or an object input name -> column name), ``hash`` (default false: when
true, ids leave as the SHA-256 hex of their normalised form, unsalted), ``max_id_chars`` (1024: a
longer id is an error). Ids are normalised inside the enclave: surrounding whitespace stripped,
Unicode NFC, then case-folded; an id that is empty after that is no id (never a member).
Outputs, whichever of these the manifest names (the enclave refuses any other):
``size`` (JSON {"size": n, "inputs": [names]}: how many distinct normalised ids are in every
input), ``members_<input>`` (a CSV with one column ``member``, 1 or 0 per data row of <input>, in
its row order; the manifest must seal it to that input's owner only), ``intersection`` (a CSV with
one column ``id``: the distinct normalised ids, or their hashes, in every input, sorted).
Runs in the sandbox; the sandbox zygote provides pandas.
"""

import hashlib
import io
import json
from typing import Any

NAME = "psi"
MEMBERS = "members_"
DEFAULT_MAX_ID = 1024


def _fail(message: str) -> None:
    raise ValueError(f"{NAME}: {message}")


def _params(given: dict[str, Any], inputs: list[str]) -> dict[str, Any]:
    unknown = sorted(set(given) - {"column", "hash", "max_id_chars"})
    if unknown:
        _fail(f"unknown parameter(s) {', '.join(unknown)}")
    column = given.get("column")
    if isinstance(column, str) and column:
        columns = {name: column for name in inputs}
    elif isinstance(column, dict) and all(isinstance(v, str) and v for v in column.values()):
        missing = sorted(set(inputs) - set(column))
        extra = sorted(set(column) - set(inputs))
        if missing or extra:
            _fail(f"column names inputs {sorted(column)}, but the task's inputs are {inputs}")
        columns = dict(column)
    else:
        _fail("parameter 'column' (the id column: a name, or input name -> name) is required")
    hashed = given.get("hash", False)
    if not isinstance(hashed, bool):
        _fail(f"hash must be true or false, got {hashed!r}")
    max_id = given.get("max_id_chars", DEFAULT_MAX_ID)
    if isinstance(max_id, bool) or not isinstance(max_id, int) or not 1 <= max_id <= 1 << 20:
        _fail(f"max_id_chars must be an integer in 1..{1 << 20}, got {max_id!r}")
    return {"columns": columns, "hash": hashed, "max_id": max_id}


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        _fail(f"input {name!r} is not UTF-8 text (byte {exc.start}, line {line})")
    raise AssertionError


def read_ids(pd: Any, name: str, raw: bytes, column: str, max_id: int) -> Any:
    """The input's id column as strings (one per data row, "" for an empty cell)."""
    text = _text(name, raw)
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        header = pd.read_csv(io.StringIO(text), nrows=0, dtype=str)
    except Exception as exc:
        _fail(f"input {name!r} is not a readable CSV file ({str(exc)[:200]})")
    columns = [str(c) for c in header.columns]
    if column not in columns:
        _fail(f"input {name!r} has no column {column!r} (its header: {columns[:20]})")
    try:
        frame = pd.read_csv(
            io.StringIO(text), usecols=[column], dtype=str, keep_default_na=False, na_filter=False
        )
    except Exception as exc:
        _fail(f"input {name!r}, column {column!r}: not a readable CSV file ({str(exc)[:200]})")
    ids = frame[column]
    if len(ids):
        lengths = ids.str.len()
        longest = int(lengths.max())
        if longest > max_id:
            row = int(lengths.to_numpy().argmax()) + 1
            _fail(
                f"input {name!r}, column {column!r}, data row {row}: an id of {longest} characters "
                f"(max_id_chars is {max_id})"
            )
    return ids


def normalise(ids: Any, hashed: bool) -> Any:
    """strip, NFC, casefold; then optionally SHA-256 hex of the UTF-8 bytes ("" stays "")."""
    out = ids.str.strip().str.normalize("NFC").str.casefold()
    if hashed:
        out = out.map(lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest() if s else "")
    return out


def run(ctx: Any) -> None:
    import pandas as pd  # only inside the sandbox child, never in the enclave process

    inputs = sorted(ctx.inputs)
    if len(inputs) < 2:
        _fail(f"needs two or more inputs, got {len(inputs)}")
    p = _params(dict(ctx.params), inputs)
    wanted = sorted(ctx.outputs)
    for out in wanted:
        if out in ("size", "intersection"):
            continue
        if not (out.startswith(MEMBERS) and out[len(MEMBERS) :] in ctx.inputs):
            _fail(f"output {out!r} is not size, intersection or members_<input>")
    norm: dict[str, Any] = {}
    common: set[str] | None = None
    for name in inputs:
        col = p["columns"][name]
        ids = normalise(read_ids(pd, name, ctx.inputs[name].read(), col, p["max_id"]), p["hash"])
        norm[name] = ids
        present = set(ids.tolist())
        present.discard("")
        common = present if common is None else common & present
    assert common is not None
    if "size" in ctx.outputs:
        body = {"size": len(common), "inputs": inputs, "hashed": p["hash"]}
        ctx.outputs["size"].write(json.dumps(body, sort_keys=True).encode() + b"\n")
    if "intersection" in ctx.outputs:
        table = pd.DataFrame({"id": sorted(common)})
        ctx.outputs["intersection"].write(table.to_csv(index=False, lineterminator="\n").encode())
    for name in inputs:
        out = f"{MEMBERS}{name}"
        if out in ctx.outputs:
            bits = norm[name].isin(common).astype("int8")
            table = pd.DataFrame({"member": bits})
            ctx.outputs[out].write(table.to_csv(index=False, lineterminator="\n").encode())
