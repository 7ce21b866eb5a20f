"""The built-ins psi and join-aggregate, called as run(ctx) in this process (their code runs in the
sandbox child, compiled as "<function>", where no coverage tool can see it), with the sandboxed run
of the same source checked to give the same bytes. Hostile parameters and inputs from a party fail
with the built-in's own error naming what and where."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.builtins import join_aggregate, psi
from confide.enclave.sandbox import SandboxLimits, Zygote, make_input_memfd
from confide.enclave.sandbox.context import Context

BUILTINS = Path(join_aggregate.__file__).parent
LIMITS = SandboxLimits(wall_seconds=60.0, cpu_seconds=30)

A = b"id,age,city,score\n Ann ,30,Oslo,1.5\nbob,40,Oslo,2\ncarl,50,Rome,\ndora,61,Rome,4.25\n,70,Oslo,9\n"
B = b"\xef\xbb\xbfpid,visits\nANN,3\nBob,1\nbob,2\ndora,5\neve,7\n"


class _Out(io.BytesIO):
    pass


def call(
    module: Any, params: dict[str, Any], inputs: dict[str, bytes], outputs: tuple[str, ...]
) -> dict[str, bytes]:
    outs = {name: _Out() for name in outputs}
    module.run(Context(dict(params), {k: io.BytesIO(v) for k, v in inputs.items()}, dict(outs)))  # type: ignore[arg-type]
    return {name: o.getvalue() for name, o in outs.items()}


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote.start()  # the pre-imports of the platform's zygote (DEFAULT_PREIMPORT)
    yield z
    z.close()


def sandboxed(
    z: Zygote, module: Any, params: dict[str, Any], inputs: dict[str, bytes], outputs: tuple[str, ...]
) -> tuple[str, dict[str, bytes]]:
    fds = {name: make_input_memfd(data) for name, data in inputs.items()}
    sinks = {name: _Sink() for name in outputs}
    try:
        source = Path(module.__file__).read_text(encoding="utf-8")
        result = z.run(source, params=params, inputs=fds, outputs=sinks, limits=LIMITS)  # type: ignore[arg-type]
    finally:
        for fd in fds.values():
            import os

            os.close(fd)
    return result.category, {name: bytes(s.data) for name, s in sinks.items()}


# -- psi ---------------------------------------------------------------------------------------------
PSI = {"column": {"a": "id", "b": "pid"}}
PSI_OUTS = ("size", "intersection", "members_a", "members_b")


def test_psi_normalises_ids_and_reports_size_members_and_intersection() -> None:
    out = call(psi, PSI, {"a": A, "b": B}, PSI_OUTS)
    assert json.loads(out["size"]) == {"size": 3, "inputs": ["a", "b"], "hashed": False}
    assert out["intersection"] == b"id\nann\nbob\ndora\n"
    assert out["members_a"] == b"member\n1\n1\n0\n1\n0\n"  # the empty id is never a member
    assert out["members_b"] == b"member\n1\n1\n1\n1\n0\n"


def test_psi_hashed_ids() -> None:
    import hashlib

    out = call(psi, {**PSI, "hash": True}, {"a": A, "b": B}, ("intersection",))
    want = sorted(hashlib.sha256(s.encode()).hexdigest() for s in ("ann", "bob", "dora"))
    assert out["intersection"].decode().split() == ["id", *want]


def test_psi_in_process_matches_the_sandboxed_run(zygote: Zygote) -> None:
    category, got = sandboxed(zygote, psi, PSI, {"a": A, "b": B}, PSI_OUTS)
    assert category == "ok"
    assert got == call(psi, PSI, {"a": A, "b": B}, PSI_OUTS)


@pytest.mark.parametrize(
    ("params", "inputs", "outputs", "message"),
    [
        (PSI, {"a": A}, ("size",), "needs two or more inputs, got 1"),
        ({**PSI, "salt": "x"}, {"a": A, "b": B}, ("size",), "unknown parameter(s) salt"),
        ({}, {"a": A, "b": B}, ("size",), "parameter 'column'"),
        ({"column": ""}, {"a": A, "b": B}, ("size",), "parameter 'column'"),
        ({"column": {"a": "id"}}, {"a": A, "b": B}, ("size",), "but the task's inputs are ['a', 'b']"),
        ({"column": {"a": "id", "b": "pid", "c": "x"}}, {"a": A, "b": B}, ("size",), "column names inputs"),
        ({**PSI, "hash": "yes"}, {"a": A, "b": B}, ("size",), "hash must be true or false"),
        ({**PSI, "max_id_chars": True}, {"a": A, "b": B}, ("size",), "max_id_chars must be an integer"),
        ({**PSI, "max_id_chars": 0}, {"a": A, "b": B}, ("size",), "max_id_chars must be an integer"),
        ({**PSI, "max_id_chars": 3}, {"a": A, "b": B}, ("size",), "data row 1: an id of 5 characters"),
        (PSI, {"a": A, "b": B}, ("members_c",), "output 'members_c' is not size, intersection"),
        (PSI, {"a": A, "b": B}, ("all",), "output 'all' is not size"),
        ({"column": "id"}, {"a": A, "b": B}, ("size",), "input 'b' has no column 'id'"),
        (PSI, {"a": b"id\nok\n\xff\n", "b": B}, ("size",), "input 'a' is not UTF-8 text (byte 6, line 3)"),
        (PSI, {"a": b"", "b": B}, ("size",), "input 'a' is not a readable CSV file"),
        (PSI, {"a": b'id\nok\n"open\n', "b": B}, ("size",), "input 'a', column 'id': not a readable CSV"),
    ],
)
def test_psi_refuses_hostile_parameters_and_inputs(
    params: dict[str, Any], inputs: dict[str, bytes], outputs: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        call(psi, params, inputs, outputs)
    assert str(info.value).startswith("psi: ") and message in str(info.value)


# -- join-aggregate ----------------------------------------------------------------------------------
JA = {
    "key": {"a": "id", "b": "pid"},
    "k": 2,
    "group_by": ["city"],
    "aggregates": [
        {"op": "count", "as": "rows"},
        {"op": "count", "column": "score", "as": "scored"},
        {"op": "sum", "column": "visits", "as": "visits"},
        {"op": "avg", "column": "age", "as": "age"},
        {"op": "min", "column": "score", "as": "lo"},
        {"op": "max", "column": "a.score", "as": "hi"},
    ],
    "avg_places": 2,
}


def test_join_aggregate_joins_groups_and_suppresses_small_cohorts() -> None:
    out = call(join_aggregate, JA, {"a": A, "b": B}, ("result", "report"))
    # Oslo: ann (1 row), bob (2 rows: Bob, bob) -> 3 joined rows of 2 keys; Rome: only dora -> suppressed
    assert out["result"] == b"city,rows,scored,visits,age,lo,hi\nOslo,3,3,6,36.67,1.5,2\n"
    assert json.loads(out["report"]) == {
        "function": "join-aggregate",
        "version": "1",
        "k": 2,
        "groups": 1,
        "suppressed_groups": 1,
    }


def test_join_aggregate_defaults_one_group_and_an_empty_join() -> None:
    out = call(join_aggregate, {"key": "id", "k": 2}, {"a": A}, ("result", "report"))
    assert out["result"] == b"count\n4\n"  # the row with an empty key joins nothing
    none = call(
        join_aggregate,
        {"key": {"a": "id", "b": "pid"}, "k": 2},
        {"a": A, "b": b"pid\nzed\n"},
        ("result", "report"),
    )
    assert none["result"] == b"count\n"
    assert json.loads(none["report"])["groups"] == 0


def test_join_aggregate_in_process_matches_the_sandboxed_run(zygote: Zygote) -> None:
    category, got = sandboxed(zygote, join_aggregate, JA, {"a": A, "b": B}, ("result", "report"))
    assert category == "ok"
    assert got == call(join_aggregate, JA, {"a": A, "b": B}, ("result", "report"))


def _ja(**kw: Any) -> dict[str, Any]:
    return {**JA, **kw}


@pytest.mark.parametrize(
    ("params", "inputs", "message"),
    [
        (JA, {}, "needs at least one input"),
        (_ja(limit=1), {"a": A, "b": B}, "unknown parameter(s) limit"),
        (_ja(key=None), {"a": A, "b": B}, "parameter 'key'"),
        (_ja(key={"a": "id"}), {"a": A, "b": B}, "key names inputs ['a']"),
        ({"key": "id"}, {"a": A}, "parameter 'k'"),
        (_ja(k=1), {"a": A, "b": B}, "k must be an integer of at least 2"),
        (_ja(k=True), {"a": A, "b": B}, "k must be an integer of at least 2"),
        (_ja(k=10**9 + 1), {"a": A, "b": B}, "k must be at most 10^9"),
        (_ja(group_by="city"), {"a": A, "b": B}, "group_by must be a list"),
        (_ja(group_by=["city", "city"]), {"a": A, "b": B}, "group_by names a column twice"),
        (_ja(aggregates=[]), {"a": A, "b": B}, "aggregates must be a non-empty list"),
        (_ja(aggregates=["count"]), {"a": A, "b": B}, "aggregates[0] must be an object"),
        (_ja(aggregates=[{"op": "median", "column": "age"}]), {"a": A, "b": B}, "op 'median' is not one of"),
        (_ja(aggregates=[{"op": "sum"}]), {"a": A, "b": B}, "aggregates[0]: sum needs a column"),
        (_ja(aggregates=[{"op": "sum", "column": 3}]), {"a": A, "b": B}, "column must be a column reference"),
        (
            _ja(aggregates=[{"op": "sum", "column": "age", "as": ""}]),
            {"a": A, "b": B},
            "as must be a non-empty",
        ),
        (
            _ja(
                aggregates=[
                    {"op": "sum", "column": "age", "as": "x"},
                    {"op": "max", "column": "age", "as": "x"},
                ]
            ),
            {"a": A, "b": B},
            "output column names repeat",
        ),
        (_ja(avg_places=-1), {"a": A, "b": B}, "avg_places must be an integer"),
        (_ja(max_field_chars=0), {"a": A, "b": B}, "max_field_chars must be an integer"),
        (_ja(max_field_chars=3), {"a": A, "b": B}, "a field of 4 characters (max_field_chars is 3)"),
        (_ja(group_by=["town"]), {"a": A, "b": B}, "no input has a column 'town'"),
        (_ja(group_by=["score"]), {"a": A, "b": A.replace(b"id,", b"pid,")}, "column 'score' is in inputs"),
        (_ja(key="id"), {"a": A, "b": B}, "input 'b' has no key column 'id'"),
        (JA, {"a": A.replace(b"30", b"thirty"), "b": B}, "'thirty' is not a number"),
        (JA, {"a": A, "b": b"pid,visits\n\xc3(\n"}, "input 'b' is not UTF-8 text"),
        (JA, {"a": A, "b": b""}, "input 'b' is not a readable CSV file"),
    ],
)
def test_join_aggregate_refuses_hostile_parameters_and_inputs(
    params: dict[str, Any], inputs: dict[str, bytes], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        call(join_aggregate, params, inputs, ("result", "report"))
    assert str(info.value).startswith("join-aggregate: ") and message in str(info.value)


def test_the_sandboxed_run_gives_the_same_error(zygote: Zygote) -> None:
    category, _ = sandboxed(zygote, join_aggregate, _ja(k=1), {"a": A, "b": B}, ("result", "report"))
    assert category == "exception"
