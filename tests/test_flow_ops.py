"""Every dataflow operator against plain Python on generated data (empty partitions, skew, unicode),
run for real: each task is a sandboxed run of the driver with the job's function module."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Dataset, Flow, FlowError, LocalEngine, open_result, seal_text
from confide.flow.api import _Node
from flow_support import FUNCTIONS, enclave_identity, make_enclave, recipient, run_and_open, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

AGG_FUNCTIONS = """
def word_len(w):
    return (w, len(w))

def sum_count(acc, v):
    return (acc[0] + v, acc[1] + 1)

def merge_sum_count(a, b):
    return (a[0] + b[0], a[1] + b[1])

def append(acc, v):
    acc.append(v)
    return acc

def concat(a, b):
    return a + b

def tally(acc, v):
    acc["n"] += 1
    acc["max"] = v if acc["max"] is None else max(acc["max"], v)
    return acc

def merge_tally(a, b):
    top = [m for m in (a["max"], b["max"]) if m is not None]
    return {"n": a["n"] + b["n"], "max": max(top) if top else None}
"""

VOCAB = ["the", "cat", "sat", "mat", "ünïcödé", "日本語", "naïve", "zebra", "a", "émoji😀", "x" * 40]


def gen_lines(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 17 == 0:
            lines.append("")  # empty lines
        else:
            # skew: "the" is most of the words
            k = rng.randint(1, 9)
            lines.append(" ".join("the" if rng.random() < 0.5 else rng.choice(VOCAB) for _ in range(k)))
    return lines


@pytest.fixture(scope="module")
def engine(zygote: Zygote, enclave_identity: Identity) -> LocalEngine:
    return LocalEngine([make_enclave(zygote, enclave_identity)])


def test_narrow_wide_and_actions_match_plain_python(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    lines = gen_lines(1, 400)
    path = seal_text(tmp_path / "in.sealed", lines, [enclave_identity.public], chunk_size=1024)
    flow = Flow(FUNCTIONS)
    # more partitions than chunks: some partitions are empty
    text = flow.text(path, partitions=5)
    words = text.flat_map("words")
    pairs = words.map("one")
    actions = {
        "lines": text,
        "mapped": text.map("upper"),
        "parts": text.map_partitions("upper_all"),
        "long": words.filter("is_long"),
        "keyed": words.key_by("first_char").group_by_key(3),
        "wc": pairs.reduce_by_key("add", 3),
        "distinct": words.distinct(2),
        "sorted": words.sort_by("length"),
        "sorted_desc": words.sort_by("neg_len", ascending=False),
        "union": text.union(text.map("upper")),
    }
    res = run_and_open(flow, actions, engine, recipient, tmp_path / "out")
    all_words = [w for ln in lines for w in ln.split()]
    assert res["lines"] == lines
    assert res["mapped"] == [ln.upper() for ln in lines]
    assert res["parts"] == [ln.upper() for ln in lines]
    assert res["long"] == [w for w in all_words if len(w) > 3]
    groups = defaultdict(list)
    for w in all_words:
        groups[w[:1]].append(w)
    assert {k: sorted(v) for k, v in res["keyed"]} == {k: sorted(v) for k, v in groups.items()}
    assert len(res["keyed"]) == len(groups)
    assert dict(res["wc"]) == dict(Counter(all_words)) and len(res["wc"]) == len(set(all_words))
    assert sorted(res["distinct"]) == sorted(set(all_words)) and len(res["distinct"]) == len(set(all_words))
    assert res["sorted"] == sorted(all_words, key=len)
    assert res["sorted_desc"] == sorted(all_words, key=lambda w: -len(w), reverse=True)
    assert res["union"] == lines + [ln.upper() for ln in lines]


def test_aggregate_and_fold_by_key_match_plain_python(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    lines = gen_lines(3, 400)  # skewed ("the" is half the words), unicode, empty lines
    pub = [enclave_identity.public]
    path = seal_text(tmp_path / "in.sealed", lines, pub, chunk_size=1024)
    empty = seal_text(tmp_path / "empty.sealed", "", pub, chunk_size=1024)
    flow = Flow(FUNCTIONS + AGG_FUNCTIONS)
    words = flow.text(path, partitions=5).flat_map("words")  # more partitions than chunks: some empty
    lens = words.map("word_len")
    one_part = flow.text(path, partitions=1).flat_map("words").map("one")
    actions = {
        "sum_count": lens.aggregate_by_key((0, 0), "sum_count", "merge_sum_count", 3),
        "lists": lens.aggregate_by_key([], "append", "concat"),  # a mutable zero: a fresh copy per key
        "tally": lens.aggregate_by_key({"n": 0, "max": None}, "tally", "merge_tally", 2),
        "fold": words.map("one").fold_by_key(0, "add", 3),
        "zero_once": one_part.fold_by_key(1000, "add"),  # one map task: the zero is added once per key
        "empty": flow.text(empty, partitions=3).flat_map("words").map("one").fold_by_key(0, "add"),
    }
    res = run_and_open(flow, actions, engine, recipient, tmp_path / "out")
    all_words = [w for ln in lines for w in ln.split()]
    counts = Counter(all_words)
    by_word: dict[str, list[int]] = defaultdict(list)
    for w in all_words:
        by_word[w].append(len(w))
    assert counts["the"] > len(all_words) // 3 and "日本語" in counts
    assert dict(res["sum_count"]) == {w: (sum(v), len(v)) for w, v in by_word.items()}
    assert {k: sorted(v) for k, v in res["lists"]} == {w: sorted(v) for w, v in by_word.items()}
    assert dict(res["tally"]) == {w: {"n": len(v), "max": max(v)} for w, v in by_word.items()}
    assert dict(res["fold"]) == dict(counts)
    assert dict(res["zero_once"]) == {w: n + 1000 for w, n in counts.items()}
    for name in ("sum_count", "lists", "tally", "fold"):
        assert len(res[name]) == len(counts), name  # one record per key
    assert res["empty"] == []


@pytest.mark.parametrize(
    ("zero", "error"),
    [
        ({"$l": 5}, "not a record"),
        ({"$d": [[{"$l": []}, 1]]}, "not a record"),  # an unhashable dict key
        ({"$x": 1}, "not a record"),
        ({"$b": "!!"}, "not a record"),
        ({"$d": [["a", 1]]}, "not a record"),  # not the canonical encoding
        ("x" * 70_000, "over 65536 bytes"),
    ],
)
def test_hostile_aggregate_zero_is_refused(zero: object, error: str, recipient: Identity) -> None:
    from confide.enclave.flow import FlowFormatError
    from confide.enclave.flow.plan import parse_plan

    flow = Flow(FUNCTIONS + AGG_FUNCTIONS)
    flow._inputs["in0"] = {"path": "-", "spec": {"header_sha256": "0" * 64, "format": "text",
                                               "csv_header": False, "partitions": 1}}  # fmt: skip
    ds = Dataset(flow, _Node("source", args={"input": "in0", "partitions": 1}))
    desc = flow.describe([ds.map("word_len").fold_by_key(0, "add").save("x")], [recipient.public])
    (op,) = [op for st in desc["stages"] for op in st["chain"] if op["op"] == "aggregate_local"]
    assert parse_plan(desc).stages[0].chain[-1]["zero"] == 0
    op["zero"] = zero
    with pytest.raises(FlowFormatError, match=rf"stage 0: chain\[1\]: field 'zero' (is )?{error}"):
        parse_plan(desc)
    with pytest.raises(FlowError, match="zero value cannot be a record"):
        ds.fold_by_key(object(), "add")


def test_count_joins_csv_and_json_lines(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    rng = random.Random(2)
    people = [{"id": str(i), "name": rng.choice(VOCAB) + str(i)} for i in range(60)]
    csv_text = "id,name\n" + "".join(f"{p['id']},{p['name']}\n" for p in people)
    orders = [[str(rng.randint(0, 80)), {"amount": rng.randint(1, 9), "tags": ["ü", i]}] for i in range(150)]
    orders.append(["7", None])  # skew and odd values
    jsonl = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in orders)
    pub = [enclave_identity.public]
    p_csv = seal_text(tmp_path / "people.sealed", csv_text, pub, chunk_size=1024)
    p_json = seal_text(tmp_path / "orders.sealed", jsonl, pub, chunk_size=1024)
    flow = Flow(FUNCTIONS)
    people_ds = flow.csv(p_csv).map("pair_id")
    orders_ds = flow.json_lines(p_json).map("pair_first")
    actions = {
        "people": flow.csv(p_csv),
        "inner": orders_ds.join(people_ds, num_partitions=3),
        "left": orders_ds.join(people_ds, how="left"),
    }
    saved = [ds.save(name) for name, ds in actions.items()]
    saved.append(flow.json_lines(p_json).count("n_orders"))
    saved.append(flow.text(p_csv, partitions=4).filter("is_long").count("n_empty_filter"))
    flow.run(*saved, engine=engine, recipients=[recipient.public], out_dir=tmp_path / "out")
    out = tmp_path / "out"
    assert open_result(out, "people", recipient) == people
    names = {p["id"]: p["name"] for p in people}
    plain_orders = [(o[0], json.loads(json.dumps(o[1]))) for o in orders]

    def norm(v):  # JSON arrays are tuples in the dataflow, lists inside dicts are lists
        return json.dumps(v, sort_keys=True)

    inner = [(k, (v, names[k])) for k, v in plain_orders if k in names]
    left = [(k, (v, names.get(k))) for k, v in plain_orders]
    assert sorted(map(norm, open_result(out, "inner", recipient))) == sorted(map(norm, inner))
    assert sorted(map(norm, open_result(out, "left", recipient))) == sorted(map(norm, left))
    assert open_result(out, "n_orders", recipient) == [len(orders)]
    assert open_result(out, "n_empty_filter", recipient) == [
        sum(1 for ln in csv_text.splitlines() if len(ln) > 3)
    ]


def test_empty_input_and_text_sink(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    empty = seal_text(tmp_path / "empty.sealed", "", [enclave_identity.public], chunk_size=1024)
    flow = Flow(FUNCTIONS)
    ds = flow.text(empty, partitions=3)
    saved = [
        ds.flat_map("words").map("one").reduce_by_key("add").save("wc"),
        ds.count("n"),
        flow.text(empty).map("length").save("lens", format="text"),
    ]
    flow.run(*saved, engine=engine, recipients=[recipient.public], out_dir=tmp_path / "out")
    assert open_result(tmp_path / "out", "wc", recipient) == []
    assert open_result(tmp_path / "out", "n", recipient) == [0]
    assert open_result(tmp_path / "out", "lens", recipient) == []


def test_lines_spanning_chunks_are_read_once(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    # lines longer than a chunk, a line ending exactly on a chunk boundary, no final newline
    lines = ["é" * 700, "b" * 1023, "c" * 2500, "short", "d" * 1000]
    data = "\n".join(lines)  # no trailing newline
    path = seal_text(tmp_path / "long.sealed", data, [enclave_identity.public], chunk_size=1024)
    for parts in (1, 2, 3, 7, 9):
        flow = Flow(FUNCTIONS)
        res = run_and_open(
            flow, {"l": flow.text(path, partitions=parts)}, engine, recipient, tmp_path / f"o{parts}"
        )
        assert res["l"] == lines, parts


def test_user_function_error_names_stage_and_partition_not_data(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    from confide.enclave.flow import FlowTaskError

    path = seal_text(tmp_path / "in.sealed", ["alpha beta"], [enclave_identity.public], chunk_size=1024)
    flow = Flow(FUNCTIONS)
    with pytest.raises(FlowTaskError, match=r"stage 0 partition 0: .*exception \(KeyError\)") as info:
        run_and_open(flow, {"x": flow.text(path).map("boom")}, engine, recipient, tmp_path / "out")
    assert "secret" not in str(info.value) and "alpha" not in str(info.value)


def test_functions_must_be_named_in_the_module() -> None:
    flow = Flow(FUNCTIONS)
    with pytest.raises(FlowError, match="lambda"):
        flow.fn_name(lambda x: x)
    with pytest.raises(FlowError, match="not defined"):
        flow.fn_name("nope")
