"""Tasks for the ``ordered-set-join`` built-in, and the words an approver reads about what one
releases to whom. The helper only builds the manifest; the enclave enforces the rules (membership
bits only to their input's owner, sorted inputs, the columns the manifest lists)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from confide.enclave.errors import ConfideError
from confide.enclave.manifest import Manifest

if TYPE_CHECKING:
    from confide.client.sdk import Client

NAME = "ordered-set-join"
OUTPUTS = ("size", "members", "joined")


def ordered_set_join(
    client: Client,
    *,
    inputs: Mapping[str, str],
    column: str | Mapping[str, str],
    outputs: Sequence[str] = ("size",),
    columns: Sequence[str] = (),
    recipients: Sequence[str] | None = None,
    max_id_chars: int | None = None,
    **task: Any,
) -> str:
    """Create an ``ordered-set-join`` task over `inputs` (input name -> dataset reference, two or
    more, each sorted by its normalised id: strip, NFC, casefold, code point order); returns the task
    id. `column`: the id column (one name, or input name -> name). `outputs`: any of ``size`` and
    ``joined`` (sealed to `recipients`, default this client) and ``members`` (``members_<input>``
    for every input, each sealed to that input's owner only). `columns`: ``input.column`` cells that
    ``joined`` carries next to each id. ``size`` is padded to 256 bytes and ``joined`` to a power of
    two unless `pad` says otherwise. Other keywords go to ``Client.create_task``."""
    wanted = list(outputs)
    bad = sorted(set(wanted) - set(OUTPUTS)) or (["(none)"] if not wanted else [])
    if bad:
        raise ConfideError(f"{NAME} outputs must be some of {', '.join(OUTPUTS)}, got {bad}", where=NAME)
    if len(inputs) < 2:
        raise ConfideError(f"{NAME} needs two or more inputs, got {len(inputs)}", where=NAME)
    if columns and "joined" not in wanted:
        raise ConfideError("columns are what the joined output carries: ask for joined too", where=NAME)
    to = list(recipients) if recipients is not None else [client.fingerprint]
    outs: dict[str, Sequence[str]] = {o: to for o in ("size", "joined") if o in wanted}
    if "members" in wanted:
        for n, ref in inputs.items():
            outs[f"members_{n}"] = [client._dataset_pin(ref, f"input {n!r}").owner]
    params: dict[str, Any] = {"column": column if isinstance(column, str) else dict(column)}
    if columns:
        params["columns"] = list(columns)
    if max_id_chars is not None:
        params["max_id_chars"] = max_id_chars
    pad = {o: p for o, p in (("size", 256), ("joined", "pow2")) if o in outs}
    task["pad"] = {**pad, **dict(task.get("pad") or {})}
    return client.create_task(function=NAME, inputs=inputs, outputs=outs, params=params, **task)


def describe(m: Manifest, clean: Callable[[str], str] = str) -> list[str]:
    """Lines for the approval text of an ordered-set-join task: what each output releases."""
    fn = m.function
    if fn.kind != "builtin" or fn.name != NAME:
        return []
    p = m.params
    inputs = [i.name for i in m.inputs]
    owner = {i.name: clean(m.name_of(i.owner)) for i in m.inputs}
    to = {o.name: ", ".join(clean(m.name_of(r)) for r in o.recipients) for o in m.outputs}
    col = p.get("column")
    ids = (
        f"column {col!r} of every input"
        if isinstance(col, str)
        else ", ".join(f"{v!r} of {n}" for n, v in sorted(col.items()))
        if isinstance(col, dict)
        else f"{col!r} (not a column name: the enclave will refuse the task)"
    )
    lines = [
        f"What leaves ({NAME}, enforced in the enclave):",
        f"  ids: {clean(ids)}; normalised in the enclave (stripped, NFC, case-folded); each input must "
        "be sorted by them, strictly ascending, or the task fails naming the input and line",
    ]
    if "size" in to:
        lines.append(f"  size -> {to['size']}: one number, how many ids are in all of {', '.join(inputs)}")
    for n in inputs:
        if f"members_{n}" in to:
            lines.append(
                f"  members_{n} -> {to[f'members_{n}']}: for each row of {n}, one bit: is its id in "
                "every other input"
            )
    if "joined" in to:
        refs = p.get("columns") or []
        lines.append(f"  joined -> {to['joined']}: every id in all inputs (normalised), and with it:")
        if not isinstance(refs, list):
            lines.append(f"    {clean(repr(refs))} (not a list: the enclave will refuse the task)")
        for n in inputs:
            mine = [r.partition(".")[2] for r in refs if isinstance(r, str) and r.partition(".")[0] == n]
            shown = ", ".join(clean(c) for c in mine) if mine else "no column"
            lines.append(f"    from {n} (of {owner[n]}): {shown}")
    lines.append(
        "  nothing else leaves the enclave on success; the host sees each output's size unless "
        "padded, and a failure says which input was out of order to the error's recipients"
    )
    return lines


__all__ = ["describe", "ordered_set_join"]
