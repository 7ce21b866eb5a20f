"""A worker's memory budget (issue 8): a keyed stage whose partition is four times the budget spills
to sealed files, runs per sub-partition, gives the same result as without a budget, and never holds
more than the budget in clear; a union's consumer over the budget runs in pieces with the same
result (and refuses a map_partitions, naming the budget); a host that tampers with or swaps the
spill files is refused; nothing is left on disk."""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.errors import IntegrityError
from confide.enclave.flow import FlowIntegrityError, FlowTaskError
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Flow, LocalEngine, open_result, seal_text
from flow_support import FUNCTIONS, enclave_identity, make_enclave, recipient, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

BUDGET = 48 << 10
EXTRA = """
def kv(line):
    a, b = line.split()
    return (a, int(b))

def left_side(line):
    a, b = line.split()
    return (a, "L" + b)

def right_side(line):
    a, b = line.split()
    return (a, "R" + b)

def by_key(pair):
    return pair[0]

def count_all(it):
    yield sum(1 for _ in it)

def small(pair):
    return pair[1] < 50
"""
LINES = [f"key{(i * 7919) % 3000:05d}-ünï {i % 97}" for i in range(12000)]  # ~4x the budget per bucket


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, enclave_identity: Identity) -> Path:
    return seal_text(
        tmp_path_factory.mktemp("spill") / "kv.sealed", LINES, [enclave_identity.public], chunk_size=1 << 14
    )


def _run(
    enclave: Any, build: Any, data: Path, out: Path, recipient: Identity, partitions: int | None = None
) -> list[Any]:
    flow = Flow(FUNCTIONS + EXTRA)
    action = build(flow, flow.text(data, partitions=partitions)).save("o")
    flow.run(action, engine=LocalEngine([enclave]), recipients=[recipient.public], out_dir=out)
    return open_result(out, "o", recipient)


JOBS = {
    "reduce_by_key": lambda f, t: t.map("kv").reduce_by_key("add", 1),
    "group_by_key": lambda f, t: t.map("kv").group_by_key(1),
    "distinct": lambda f, t: t.map("kv").distinct(1),
    "aggregate_by_key": lambda f, t: t.map("kv").aggregate_by_key(0, "add", "add", 1),
    "join": lambda f, t: t.map("left_side").join(t.map("right_side"), num_partitions=1),
    "left join": lambda f, t: t.map("left_side").join(t.filter("is_long").map("right_side"), "left", 1),
}


def _canonical(name: str, rows: list[Any]) -> Any:
    if name == "group_by_key":
        return sorted((k, sorted(vs)) for k, vs in rows)
    return sorted(rows, key=repr)


@pytest.mark.parametrize("name", list(JOBS))
def test_a_partition_four_times_the_budget_spills_and_gives_the_same_result(
    name: str, data: Path, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    free = make_enclave(zygote, enclave_identity)
    want = _run(free, JOBS[name], data, tmp_path / "free", recipient)
    assert free.last_task["subpartitions"] == 1 and free.last_task["held_bytes"] > 4 * BUDGET
    spill_dir = tmp_path / "spill"
    tight = make_enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=spill_dir)
    got = _run(tight, JOBS[name], data, tmp_path / "tight", recipient)
    assert _canonical(name, got) == _canonical(name, want)
    stats = tight.last_task
    assert stats["subpartitions"] >= 8 and stats["spilled_bytes"] > 4 * BUDGET
    assert 0 < stats["held_bytes"] <= BUDGET
    assert list(spill_dir.iterdir()) == []  # every spill file deleted


def test_the_reduce_result_is_the_plain_one(
    data: Path, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    tight = make_enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    got = dict(_run(tight, JOBS["reduce_by_key"], data, tmp_path / "o", recipient))
    want: defaultdict[str, int] = defaultdict(int)
    for line in LINES:
        k, v = line.split()
        want[k] += int(v)
    assert got == dict(want) and Counter(type(k) for k in got) == Counter({str: 3000})


def _union(build_rest: Any) -> Any:
    def job(f: Any, t: Any) -> Any:
        return build_rest(t.map("kv").union(t.map("kv")))

    return job


UNION_JOBS = {  # a union's consumer (it reads unkeyed, forward exchanges) over the budget
    "map_filter_sink": _union(lambda u: u.filter("small").map("by_key")),
    "then_reduce_by_key": _union(lambda u: u.map("by_key").map("one").reduce_by_key("add", 2)),
}


@pytest.mark.parametrize("name", ["map_filter_sink", "then_reduce_by_key"])
def test_a_unions_consumer_over_the_budget_runs_in_pieces_with_the_same_result(
    name: str, data: Path, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """A union's consumer needs no other record than its own: over the budget it opens its batches
    in order and runs a quarter of the budget at a time (no spill file), the map-side combiner of a
    following reduce_by_key included; the result is the unbudgeted one."""
    job = UNION_JOBS[name]
    want = _run(make_enclave(zygote, enclave_identity), job, data, tmp_path / "free", recipient, 1)
    tight = make_enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    seen: list[tuple[int, dict[str, int]]] = []
    run_task = tight.run_task

    def watch(ticket: bytes, stage: int, *a: Any, **k: Any) -> Any:
        out = run_task(ticket, stage, *a, **k)
        seen.append((stage, dict(tight.last_task)))
        return out

    tight.run_task = watch  # type: ignore[method-assign]
    got = _run(tight, job, data, tmp_path / "o", recipient, 1)
    assert Counter(map(repr, got)) == Counter(map(repr, want)) and len(want) > 100
    consumer = [t for stage, t in seen if stage == 2]  # stages 0 and 1: the union's two sides
    assert len(consumer) == 2 and all(t["subpartitions"] > 4 and t["spilled_bytes"] == 0 for t in consumer)
    assert max(t["held_bytes"] for t in consumer) <= BUDGET
    assert not list((tmp_path / "s").glob("*"))


def test_a_unions_consumer_that_needs_its_whole_partition_is_refused_naming_the_budget(
    data: Path, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """Run piece by piece, a map_partitions would see pieces, not its partition: refused, naming
    stage, partition, the operator and the budget, before a batch is opened; no output."""
    tight = make_enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    job = _union(lambda u: u.map_partitions("count_all"))
    assert _run(make_enclave(zygote, enclave_identity), job, data, tmp_path / "free", recipient, 1) == [
        len(LINES),
        len(LINES),
    ]
    with pytest.raises(FlowTaskError, match="map_partitions") as err:
        _run(tight, job, data, tmp_path / "o", recipient, 1)
    assert "stage 2 partition" in str(err.value) and f"budget of {BUDGET} bytes" in str(err.value)
    assert not (tmp_path / "o" / "o.manifest.cnfseal").exists()
    assert not list((tmp_path / "s").glob("*"))


def test_map_partitions_after_a_spilled_keyed_stage_is_refused_before_anything_spills(
    data: Path, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """A keyed stage over the budget runs once per sub-partition: a map_partitions in it would see
    sub-partitions, not its partition (here it would count each sub-partition's records). Never a
    different answer: the task is refused, naming stage, partition and budget, before it spills."""

    def job(f: Any, t: Any) -> Any:
        return t.map("kv").reduce_by_key("add", 1).map_partitions("count_all")

    want = _run(make_enclave(zygote, enclave_identity), job, data, tmp_path / "free", recipient)
    assert want == [3000]
    tight = make_enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    with pytest.raises(FlowTaskError, match="map_partitions") as err:
        _run(tight, job, data, tmp_path / "o", recipient)
    msg = str(err.value)
    assert "stage 1 partition 0" in msg and f"budget of {BUDGET} bytes" in msg
    assert "more partitions or the worker more memory" in msg
    assert not (tmp_path / "o" / "o.manifest.cnfseal").exists()
    assert not (tmp_path / "s").exists()  # refused before any spill file (or its folder) was made


SPILLABLE = {  # what may follow a keyed stage's per-key operators in a spilled task
    "reduce, then per-record operators": lambda f, t: t.map("kv").reduce_by_key("add", 1).filter("small"),
    "reduce, then another reduce's map side": lambda f, t: (
        t.map("kv").reduce_by_key("add", 1).map("by_key").map("one").reduce_by_key("add", 1)
    ),
    "join, then count's map side": lambda f, t: (
        t.map("left_side").join(t.map("right_side"), num_partitions=1).count("o")
    ),
}


@pytest.mark.parametrize("name", list(SPILLABLE))
def test_per_record_operators_and_a_combiner_after_a_keyed_stage_still_spill(
    name: str, data: Path, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """What runs per sub-partition gives the partition's result: per-record operators, and a
    shuffle's map-side combiner at the stage's end (the next stage combines the sub-partitions)."""

    def run(enclave: Any, out: Path) -> list[Any]:
        flow = Flow(FUNCTIONS + EXTRA)
        ds = SPILLABLE[name](flow, flow.text(data))
        action = ds if ds._node.kind == "sink" else ds.save("o")
        flow.run(action, engine=LocalEngine([enclave]), recipients=[recipient.public], out_dir=out)
        return open_result(out, "o", recipient)

    want = run(make_enclave(zygote, enclave_identity), tmp_path / "free")
    tight = make_enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    spilled: list[int] = []
    run_task = tight.run_task

    def recording(*args: Any, **kw: Any) -> Any:
        tight.last_task = {}
        out = run_task(*args, **kw)
        spilled.append(tight.last_task.get("subpartitions", 0))
        return out

    tight.run_task = recording  # type: ignore[method-assign]
    got = run(tight, tmp_path / "tight")
    assert sorted(got, key=repr) == sorted(want, key=repr)
    assert max(spilled) >= 8  # the keyed stage spilled
    assert list((tmp_path / "s").iterdir()) == []


def test_a_sort_over_the_budget_fits_when_range_partitioned(
    tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """12,000 pairs (~270 KB encoded) under a 192 KiB budget: in one partition the sort spills (an
    external merge sort, tests/test_flow_sort_spill.py); in 30 ranges (the map side in 4 KiB
    chunks) nothing spills: a routing task holds one map task's pairs and every map task's sample
    (60 keys per range in all), a sorting task its range."""
    budget = 4 * BUDGET
    tight = make_enclave(zygote, enclave_identity, memory_budget=budget, spill_dir=tmp_path / "s")
    lines = [f"{(i * 7919) % 3000:04d} {i % 97}" for i in range(12000)]
    small = seal_text(tmp_path / "kv.sealed", lines, [enclave_identity.public], chunk_size=1 << 12)

    def sort(n: int, out: Path) -> list[Any]:
        flow = Flow(FUNCTIONS + EXTRA)
        action = flow.text(small).map("kv").sort_by("by_key", num_partitions=n).save("o")
        flow.run(action, engine=LocalEngine([tight]), recipients=[recipient.public], out_dir=out)
        return open_result(out, "o", recipient)

    pairs = [(a, int(b)) for a, b in (ln.split() for ln in lines)]
    assert sort(1, tmp_path / "one") == sorted(pairs, key=lambda kv: kv[0])
    assert tight.last_task["runs"] >= 2 and tight.last_task["spilled_bytes"] > budget
    assert sort(30, tmp_path / "ranges") == sorted(pairs, key=lambda kv: kv[0])
    assert tight.last_task["subpartitions"] == 1 and 0 < tight.last_task["held_bytes"] <= budget // 2


class _TamperingHost:
    """The host under the enclave: it rewrites a spill file between its writing and its reading."""

    @staticmethod
    def flip(blob: bytes) -> bytes:
        return blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:]


@pytest.mark.parametrize("attack", ["flip", "swap"])
def test_a_host_that_tampers_with_spill_files_is_refused(
    attack: str, data: Path, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    tight = make_enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    seen: list[Path] = []

    def hostile(path: Path) -> io.BytesIO:
        seen.append(path)
        if attack == "flip":
            return io.BytesIO(_TamperingHost.flip(path.read_bytes()))
        others = sorted(p for p in path.parent.iterdir() if p != path)
        return io.BytesIO(others[0].read_bytes())  # another sub-partition's file, under the same key

    tight._open_spill = hostile  # type: ignore[method-assign,assignment]
    with pytest.raises((IntegrityError, FlowIntegrityError)) as err:
        _run(tight, JOBS["group_by_key"], data, tmp_path / "o", recipient)
    assert seen and ("swapped" in str(err.value) if attack == "swap" else "authentication" in str(err.value))
    assert not list((tmp_path / "s").glob("*"))
