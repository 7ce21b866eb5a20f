"""confide.enclave.flow.driver: the record codec both sides share, and run(ctx) (the fixed driver the
sandbox child runs, compiled there as "<function>") called in this process, checked against the
sandboxed run of the same source; malformed records and operators fail with a named error."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.enclave.flow import driver
from confide.enclave.flow.emitter import _parse_keyed, _parse_output
from confide.enclave.flow.task import DRIVER_SOURCE
from confide.enclave.sandbox import SandboxLimits, Zygote, make_input_memfd
from confide.enclave.sandbox.context import Context

MODULE = """\
def words(line):
    return line.split()
def one(w):
    return (w, 1)
def add(a, b):
    return a + b
def is_long(w):
    return len(w) > 3
def upper_all(it):
    for x in it:
        yield x.upper()
def first(r):
    return r[0]
def ident(x):
    return x
"""


class Special(int):
    pass


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        -2.5,
        "t",
        (1, "a"),
        [1, [2]],
        {"a": 1, "b": [None]},
        {"$x": 1},
        {1: "one", (2, 3): b"x"},
        b"\x00\xff",
        ((), [], {}),
    ],
)
def test_codec_round_trips(value: Any) -> None:
    assert driver.dec(json.loads(json.dumps(driver.enc(value)))) == value


def test_subclasses_encode_as_their_base_and_other_types_are_refused() -> None:
    assert driver.enc(Special(5)) == 5 and type(driver.dec(driver.enc(Special(5)))) is int
    with pytest.raises(TypeError, match="cannot hold a set value"):
        driver.enc({1, 2})
    with pytest.raises(TypeError, match="cannot hold a object value"):
        driver.enc(object())


def test_equal_keys_have_one_canonical_encoding() -> None:
    assert driver.key_json(1) == driver.key_json(1.0) == driver.key_json(True)
    assert driver.key_json((1, {"b": 2.0, "a": [True]})) == driver.key_json((1.0, {"a": [1], "b": 2}))
    assert driver.key_json("1") != driver.key_json(1)
    assert driver.key_json(1.5) == "1.5"


def _frames(*batches: list[Any]) -> bytes:
    out = io.BytesIO()
    for b in batches:
        driver.write_frame(out, [driver.enc(x) for x in b])
    return out.getvalue()


def test_frames_split_back() -> None:
    data = _frames([1, 2], [], ["x"])
    assert [json.loads(bytes(p)) for p in driver.iter_frames(data)] == [[1, 2], [], ["x"]]


def call(params: dict[str, Any], inputs: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    full = {"module": MODULE, "combine": "concat", "how": "inner", "keyed": None, "text": False, **params}
    driver.run(Context(full, {k: io.BytesIO(v) for k, v in inputs.items()}, {"out": out}))  # type: ignore[dict-item]
    return out.getvalue()


def records(data: bytes, keyed: str | None = None) -> list[Any]:
    """The driver's output records; on a keyed output each one's key encoding is checked too."""
    if keyed:
        keys, recs = _parse_keyed(data, where="t")
        got = [driver.dec(json.loads(r)) for r in recs]
        assert keys == [driver.key_json(x[0] if keyed == "pair" else x).encode() for x in got]
        return got
    return [driver.dec(x) for x in _parse_output(data, keyed=None, where="t")]


RAW = {"name": "in", "kind": "raw", "format": "text"}
TEXT = b"the quick brown fox\r\njumps over the lazy dog\nthe end\n"


def test_word_count_chain() -> None:
    chain = [
        {"op": "flat_map", "fn": "words"},
        {"op": "map", "fn": "one"},
        {"op": "reduce_local", "fn": "add"},
    ]
    got = dict(records(call({"inputs": [RAW], "chain": chain, "keyed": "pair"}, {"in": TEXT}), keyed="pair"))
    assert got["the"] == 3 and got["end"] == 1 and got["dog"] == 1 and len(got) == 9


def test_operators() -> None:
    def chain(*ops: dict[str, Any]) -> list[Any]:
        return records(
            call({"inputs": [RAW], "chain": [{"op": "flat_map", "fn": "words"}, *ops]}, {"in": TEXT})
        )

    assert chain({"op": "filter", "fn": "is_long"}) == ["quick", "brown", "jumps", "over", "lazy"]
    assert chain({"op": "map_partitions", "fn": "upper_all"})[:2] == ["THE", "QUICK"]
    assert chain({"op": "distinct_local"}, {"op": "count_local"}) == [9]
    assert chain({"op": "key_by", "fn": "first"})[0] == ("t", "the")
    assert chain({"op": "key_by", "fn": "first"}, {"op": "sort_local", "ascending": True})[:2] == [
        "brown",
        "dog",
    ]
    assert chain({"op": "key_by", "fn": "first"}, {"op": "sort_local", "ascending": False})[0] == "the"
    grouped = dict(chain({"op": "key_by", "fn": "first"}, {"op": "group_local"}))
    assert grouped["t"] == ["the", "the", "the"]
    again = dict(chain({"op": "map", "fn": "one"}, {"op": "group_local"}, {"op": "group_concat"}))
    assert again["the"] == [1, 1, 1]
    assert (
        chain({"op": "map", "fn": "one"}, {"op": "map", "fn": "first"}, {"op": "distinct_local"})[0] == "the"
    )
    sums = records(
        call(
            {"inputs": [{**RAW, "format": "jsonl"}], "chain": [{"op": "sum_local"}]}, {"in": b"1\n\n2\n39\n"}
        )
    )
    assert sums == [42]


def test_text_sink_and_frames_of_many_records() -> None:
    data = b"".join(b"%d\n" % i for i in range(driver.FRAME_RECORDS + 5))
    out = call({"inputs": [RAW], "chain": [], "text": True}, {"in": data})
    assert len(list(driver.iter_frames(out))) == 2
    assert records(out)[-1] == str(driver.FRAME_RECORDS + 4)
    nums = call({"inputs": [{**RAW, "format": "jsonl"}], "chain": [], "text": True}, {"in": b"1\n[2]\n"})
    assert records(nums) == ["1", "(2,)"]  # a JSON array is a tuple record


def test_csv_sources_with_and_without_names() -> None:
    csv_raw = b'a,b\n1,x\n2,"y,z"\n'
    rows = records(
        call({"inputs": [{**RAW, "format": "csv", "skip_header": True}], "chain": []}, {"in": csv_raw})
    )
    assert rows == [("1", "x"), ("2", "y,z")]
    named = {**RAW, "format": "csv", "skip_header": True, "csv_names": ["a", "b"]}
    assert records(call({"inputs": [named], "chain": []}, {"in": csv_raw})) == [
        {"a": "1", "b": "x"},
        {"a": "2", "b": "y,z"},
    ]
    with pytest.raises(ValueError, match="CSV row has 3 fields, the header 2"):
        call({"inputs": [named], "chain": []}, {"in": b"a,b\n1,2,3\n"})
    assert call({"inputs": [RAW], "chain": []}, {"in": b""}) == b""


def test_joins_of_two_record_streams() -> None:
    left = _frames([("k1", 1), ("k2", 2)], [("k3", 3)])
    right = _frames([("k1", "a"), ("k1", "b"), ("k3", "c")])
    ins = [{"name": "l", "kind": "records"}, {"name": "r", "kind": "records"}]
    inner = records(
        call({"inputs": ins, "combine": "join", "how": "inner", "chain": []}, {"l": left, "r": right})
    )
    assert inner == [("k1", (1, "a")), ("k1", (1, "b")), ("k3", (3, "c"))]
    outer = records(
        call({"inputs": ins, "combine": "join", "how": "left", "chain": []}, {"l": left, "r": right})
    )
    assert ("k2", (2, None)) in outer and len(outer) == 4
    concat = records(
        call({"inputs": ins, "chain": [], "keyed": "self"}, {"l": left, "r": right}), keyed="self"
    )
    assert len(concat) == 6


@pytest.mark.parametrize(
    ("params", "inputs", "error", "message"),
    [
        (
            {"inputs": [RAW], "chain": [{"op": "group_local"}]},
            {"in": TEXT},
            TypeError,
            "group_by_key needs (key, value) pairs",
        ),
        (
            {"inputs": [RAW], "chain": [{"op": "reduce_local", "fn": "add"}]},
            {"in": TEXT},
            TypeError,
            "reduce_by_key needs",
        ),
        ({"inputs": [RAW], "chain": [{"op": "group_concat"}]}, {"in": TEXT}, TypeError, "group_by_key needs"),
        (
            {"inputs": [RAW], "chain": [{"op": "sort_local", "ascending": True}]},
            {"in": TEXT},
            TypeError,
            "sort_by needs",
        ),
        ({"inputs": [RAW], "chain": [], "keyed": "pair"}, {"in": TEXT}, TypeError, "a keyed exchange needs"),
        ({"inputs": [RAW], "chain": [{"op": "eval"}]}, {"in": TEXT}, ValueError, "unknown operator 'eval'"),
        (
            {"inputs": [{**RAW, "format": "xml"}], "chain": []},
            {"in": TEXT},
            ValueError,
            "unknown source format 'xml'",
        ),
        ({"inputs": [RAW], "chain": []}, {"in": b"\xff\n"}, UnicodeDecodeError, "utf-8"),
        ({"inputs": [{**RAW, "format": "jsonl"}], "chain": []}, {"in": b"{\n"}, ValueError, "Expecting"),
    ],
)
def test_malformed_records_and_operators_fail_named(
    params: dict[str, Any], inputs: dict[str, bytes], error: type[BaseException], message: str
) -> None:
    with pytest.raises(error) as info:
        call(params, inputs)
    assert message in str(info.value)


def test_join_needs_pairs_on_both_sides() -> None:
    ins = [{"name": "l", "kind": "records"}, {"name": "r", "kind": "records"}]
    with pytest.raises(TypeError, match="join needs"):
        call({"inputs": ins, "combine": "join", "chain": []}, {"l": _frames([("k", 1)]), "r": _frames(["x"])})
    with pytest.raises(TypeError, match="join needs"):
        call({"inputs": ins, "combine": "join", "chain": []}, {"l": _frames(["x"]), "r": _frames([("k", 1)])})


def test_no_module_means_no_functions() -> None:
    assert records(call({"module": "", "inputs": [RAW], "chain": [{"op": "count_local"}]}, {"in": TEXT})) == [
        3
    ]


# -- the same source in the sandbox --------------------------------------------------------------
class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote.start(preimport=())
    yield z
    z.close()


def test_in_process_matches_the_sandboxed_driver(zygote: Zygote) -> None:
    params = {
        "module": MODULE,
        "inputs": [RAW],
        "combine": "concat",
        "how": "inner",
        "chain": [
            {"op": "flat_map", "fn": "words"},
            {"op": "map", "fn": "one"},
            {"op": "reduce_local", "fn": "add"},
        ],
        "keyed": "pair",
        "text": False,
    }
    fd = make_input_memfd(TEXT)
    sink = _Sink()
    try:
        result = zygote.run(
            DRIVER_SOURCE,
            params=params,
            inputs={"in": fd},
            outputs={"out": sink},
            limits=SandboxLimits(wall_seconds=30.0),
        )  # type: ignore[dict-item]
    finally:
        os.close(fd)
    assert result.ok, result
    assert bytes(sink.data) == call(params, {"in": TEXT})


_KEYS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.tuples(inner, inner) | st.lists(inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(_KEYS)
def test_key_encodings_fast_paths_equal_the_canonical_form(key: Any) -> None:
    """key_json's and canonical_encoded's int and str fast paths give the full canonical form."""
    full = json.dumps(
        driver._canon(driver.enc(key)), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert driver.key_json(key) == full == driver.canonical_encoded(driver.enc(key))
    assert driver.record_json(driver.enc(key)) == json.dumps(
        driver.enc(key), separators=(",", ":"), ensure_ascii=False
    )
