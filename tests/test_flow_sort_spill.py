"""A sort over the memory budget (issue 8): a sorting task whose partition is four times the budget
sorts externally (sorted runs spilled as sealed files, merged streaming) and gives exactly
sorted() and the unbudgeted result (ascending, descending, duplicate keys: stable, unicode keys),
holding no more than the budget in clear; a sort's routing task over the budget routes piece by
piece; a host that flips, swaps, drops or truncates a run file is refused; nothing is left on disk,
after success or failure."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.errors import IntegrityError
from confide.enclave.flow import FlowEnclave, FlowIntegrityError, FlowTaskError
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.enclave.sealed_file import TAG_LEN, SealedReader
from confide.flow import Flow, LocalEngine, ShufflePadding, open_result, seal_text
from flow_support import enclave_identity, make_enclave, recipient, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

BUDGET = 48 << 10
FUNCTIONS = """
def by_k(r):
    return r["k"]

def tag(r):
    return (r["k"], r["i"])

def one(r):
    return (r["k"], 1)

def add(a, b):
    return a + b

def count_all(it):
    yield sum(1 for _ in it)
"""
WORDS = ["äpfel", "zürich", "ñandú", "日本語", "ελλάδα", "apple", "Zebra", "émile", "ø", "🙂smile"]


def _records(seed: int, n: int, key: Callable[[random.Random], Any]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"k": key(rng), "i": i} for i in range(n)]


DATA = {
    "ints": _records(1, 8000, lambda r: r.randrange(1_000_000)),
    "duplicates": _records(2, 10000, lambda r: r.randrange(7)),
    "unicode": _records(3, 6000, lambda r: r.choice(WORDS) + str(r.randrange(40))),
}


class _Recording(FlowEnclave):
    """An enclave worker that keeps what each of its tasks held and spilled."""

    tasks: dict[tuple[int, int], dict[str, int]]

    def run_task(self, ticket: bytes, stage: int, partition: int, batches: Any, **kw: Any) -> Any:
        self.last_task = {}  # a source task does not measure (it holds its raw input chunks)
        out = super().run_task(ticket, stage, partition, batches, **kw)
        self.tasks[(stage, partition)] = dict(self.last_task)
        return out


def _enclave(zygote: Zygote, identity: Identity, **kw: Any) -> _Recording:
    e = make_enclave(zygote, identity, **kw)  # with a budget, its batches are ~1/16 of it
    e.__class__ = _Recording
    assert isinstance(e, _Recording)
    e.tasks = {}
    return e


def _measured(e: _Recording) -> list[dict[str, int]]:
    """What every task after the source stage held (the held bytes of each)."""
    return [t for (stage, _), t in e.tasks.items() if stage > 0]


class _Interleaving(LocalEngine):
    """An honest engine that hands each task its streams interleaved, newest first where it may
    (each stream's own order kept): the order of ties must not depend on it."""

    def _deliver(self, stage: int, partition: int, batches: list[bytes]) -> list[bytes]:
        from confide.enclave.flow.batch import parse_header

        streams: dict[tuple[int, int], list[bytes]] = {}
        for b in batches:
            h, _ = parse_header(b, where="test")
            streams.setdefault((h.stage, h.part), []).append(b)
        queues = [streams[k] for k in sorted(streams, reverse=True)]
        out: list[bytes] = []
        while any(queues):
            for q in queues:
                if q:
                    out.append(q.pop(0))
        return out


def _seal(d: Path, records: list[Any], identity: Identity) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    return seal_text(d / "data.sealed", lines, [identity.public], chunk_size=1 << 14)


def _sort(
    enclave: FlowEnclave,
    path: Path,
    out: Path,
    who: Identity,
    *,
    ascending: bool = True,
    ranges: int = 1,
    partitions: int | None = None,
    then: Callable[[Any], Any] = lambda ds: ds,
    engine: type[LocalEngine] = LocalEngine,
    padding: ShufflePadding | None = None,
) -> list[Any]:
    flow = Flow(FUNCTIONS, padded_shuffle=padding)
    ds = flow.json_lines(path, partitions=partitions).sort_by("by_k", ascending, num_partitions=ranges)
    flow.run(then(ds).save("o"), engine=engine([enclave]), recipients=[who.public], out_dir=out)
    return open_result(out, "o", who)


@pytest.mark.parametrize(
    ("name", "ascending"),
    [("ints", True), ("ints", False), ("duplicates", True), ("duplicates", False), ("unicode", True)],
)
def test_a_sort_partition_four_times_the_budget_equals_sorted(
    name: str,
    ascending: bool,
    tmp_path: Path,
    zygote: Zygote,
    enclave_identity: Identity,
    recipient: Identity,
) -> None:
    records = DATA[name]
    path = _seal(tmp_path, records, enclave_identity)
    want = sorted(records, key=lambda r: r["k"], reverse=not ascending)  # stable: ties in input order
    free = _enclave(zygote, enclave_identity)
    assert _sort(free, path, tmp_path / "free", recipient, ascending=ascending) == want
    assert free.tasks[(1, 0)]["held_bytes"] > 4 * BUDGET  # the sorting task's partition, unbudgeted
    spill = tmp_path / "spill"
    tight = _enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=spill)
    got = _sort(tight, path, tmp_path / "tight", recipient, ascending=ascending, engine=_Interleaving)
    assert got == want
    stats = tight.tasks[(1, 0)]
    assert stats["runs"] >= 8 and stats["spill_files"] >= stats["runs"]
    assert stats["spilled_bytes"] > 4 * BUDGET and stats["subpartitions"] >= 4  # merged pieces
    assert all(0 < t["held_bytes"] <= BUDGET for t in _measured(tight)), tight.tasks
    assert list(spill.iterdir()) == []  # every run file deleted


def test_a_range_sort_whose_routing_and_sorting_tasks_are_over_the_budget(
    tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """One map task, so its routing task holds the whole input (routed piece by piece against the
    boundaries of all samples, nothing spilled); three ranges, each over half the budget (sorted
    externally)."""
    records = DATA["ints"]
    path = _seal(tmp_path, records, enclave_identity)
    free = _enclave(zygote, enclave_identity)
    want = _sort(free, path, tmp_path / "free", recipient, ascending=False, ranges=3, partitions=1)
    assert want == sorted(records, key=lambda r: r["k"], reverse=True)
    tight = _enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    got = _sort(tight, path, tmp_path / "tight", recipient, ascending=False, ranges=3, partitions=1)
    assert got == want
    routing = tight.tasks[(1, 0)]
    assert free.tasks[(1, 0)]["held_bytes"] > 2 * BUDGET
    assert routing["subpartitions"] >= 4 and routing["spilled_bytes"] == 0
    assert all(tight.tasks[(2, p)]["runs"] >= 2 for p in range(3))
    assert all(0 < t["held_bytes"] <= BUDGET for t in _measured(tight)), tight.tasks
    assert list((tmp_path / "s").iterdir()) == []


def test_what_follows_the_sort_runs_per_piece_in_the_sandbox(
    tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """A map after the sort, and a reduce_by_key's map side (a combiner: the reduce side combines
    the pieces), give the unbudgeted result; map_partitions needs the whole partition: refused."""
    records = DATA["duplicates"]
    path = _seal(tmp_path, records, enclave_identity)
    tight = _enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    tagged = _sort(tight, path, tmp_path / "map", recipient, then=lambda ds: ds.map("tag"))
    assert tagged == [(r["k"], r["i"]) for r in sorted(records, key=lambda r: r["k"])]
    assert tight.tasks[(1, 0)]["subpartitions"] >= 4
    counts = _sort(
        tight, path, tmp_path / "reduce", recipient, then=lambda ds: ds.map("one").reduce_by_key("add")
    )
    assert dict(counts) == dict(Counter(r["k"] for r in records))
    assert tight.tasks[(1, 0)]["subpartitions"] >= 4  # the sorting task, its map side of the reduce
    with pytest.raises(
        FlowTaskError, match=rf"budget of {BUDGET} bytes, and its sort is followed by map_partitions"
    ):
        _sort(tight, path, tmp_path / "mp", recipient, then=lambda ds: ds.map_partitions("count_all"))
    assert not (tmp_path / "mp" / "o.manifest.cnfseal").exists()
    assert list((tmp_path / "s").iterdir()) == []


def test_keys_that_do_not_compare_fail_as_without_a_budget(
    tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    records = DATA["ints"] + [{"k": "a string", "i": -1}]
    path = _seal(tmp_path, records, enclave_identity)
    for budget in (None, BUDGET):
        e = _enclave(zygote, enclave_identity, memory_budget=budget, spill_dir=tmp_path / "s")
        with pytest.raises(FlowTaskError, match=r"stage 1 partition 0: .*exception \(TypeError\)"):
            _sort(e, path, tmp_path / f"o{budget}", recipient)
    assert list((tmp_path / "s").iterdir()) == []


def test_a_padded_sort_over_the_budget(
    tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    records = DATA["duplicates"][:3000]
    path = _seal(tmp_path, records, enclave_identity)
    pad = ShufflePadding(records=2000, record_bytes=64, batch_records=128)
    tight = _enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    got = _sort(tight, path, tmp_path / "o", recipient, ranges=2, partitions=2, padding=pad)
    assert got == sorted(records, key=lambda r: r["k"])
    assert any(t.get("runs", 0) >= 2 for t in tight.tasks.values())
    assert all(0 < t["held_bytes"] <= BUDGET for t in _measured(tight)), tight.tasks


def _truncate(blob: bytes) -> bytes:
    """The file without its final chunk (cut at a chunk boundary)."""
    r = SealedReader(io.BytesIO(blob), where="test")
    return blob[: r.header.body_offset + (r.n_chunks - 1) * (r.header.chunk_size + TAG_LEN)]


ATTACKS = {
    "flip": "failed authentication",
    "swap a run": "swapped",
    "swap another task's": "header authentication failed",
    "drop": "spill file gone",
    "truncate": "truncated",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_host_that_tampers_with_run_files_is_refused(
    attack: str, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """The host rewrites a run file between its writing and its reading: the first one a task opens
    (for another task's, the first one the second sorting task opens gets the first task's)."""
    path = _seal(tmp_path, DATA["ints"], enclave_identity)
    spill = tmp_path / "s"
    tight = _enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=spill)
    first: dict[str, bytes] = {}  # task directory -> the first run file it opened
    attacked: list[str] = []

    def hostile(p: Path) -> io.BufferedIOBase:
        blob = p.read_bytes()
        first.setdefault(p.parent.name, blob)
        if attacked:
            return io.BytesIO(blob)
        if attack == "swap another task's":
            if len(first) < 2:
                return io.BytesIO(blob)
            blob = next(iter(first.values()))
        elif attack == "flip":
            blob = blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:]
        elif attack == "swap a run":
            blob = sorted(q for q in p.parent.iterdir() if q != p)[0].read_bytes()
        elif attack == "drop":
            p.unlink()
        elif attack == "truncate":
            blob = _truncate(blob)
        attacked.append(p.name)
        return open(p, "rb") if attack == "drop" else io.BytesIO(blob)

    tight._open_spill = hostile  # type: ignore[method-assign,assignment]
    with pytest.raises((IntegrityError, FlowIntegrityError)) as err:
        _sort(tight, path, tmp_path / "o", recipient, ranges=2, partitions=4)
    assert attacked and ATTACKS[attack] in str(err.value)
    assert f"spill file {attacked[0]}" in str(err.value) and "stage 2 partition" in str(err.value)
    assert not (tmp_path / "o" / "o.manifest.cnfseal").exists()
    assert list(spill.iterdir()) == []  # deleted after the failure too


ROUTING_ATTACKS = {
    "drop own sample": r"stream from stage 0 partition 0: no sample batch \(its last data batch",
    "drop a sample": r"stream from stage 0 partition 1: no sample batch",
    "move a sample": r"stream from stage 0 partition 1: no sample batch",
    "duplicate a sample": r"stream from stage 0 partition 1: batch seq 0 where seq 1 was due \(duplicated",
    "drop an end batch": r"no end batch from stage 0 partition 1",
}


@pytest.mark.parametrize("attack", list(ROUTING_ATTACKS))
def test_an_engine_that_tampers_with_a_streamed_routing_tasks_samples_is_refused(
    attack: str, tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    """Routing task 0, over the budget, picks each stream's sample (its last data batch) by the
    stream's authenticated end batch before it routes anything: a dropped, moved or duplicated
    sample or a dropped end batch fails the job as tampering, naming stage and partition."""
    from confide.enclave.flow.batch import parse_header

    class Tamperer(LocalEngine):
        def __init__(self, workers: Any) -> None:
            super().__init__(workers)
            self.history: list[bytes] = []  # every task's outputs so far

        def _outputs(self, stage: int, partition: int, outputs: list[tuple[int, bytes]]) -> Any:
            self.history.extend(b for _, b in outputs)
            return outputs

        def _deliver(self, stage: int, partition: int, batches: list[bytes]) -> list[bytes]:
            if (stage, partition) != (1, 0):
                return batches
            heads = [parse_header(b, where="engine")[0] for b in batches]
            own = max(
                (j for j, h in enumerate(heads) if h.kind == "data" and h.part == 0),
                key=lambda j: heads[j].seq,
            )
            i = next(j for j, h in enumerate(heads) if h.kind == "data" and h.part == 1)
            if attack == "drop own sample":
                return batches[:own] + batches[own + 1 :]
            if attack == "drop a sample":
                return batches[:i] + batches[i + 1 :]
            if attack == "duplicate a sample":
                return [*batches[: i + 1], batches[i], *batches[i + 1 :]]
            if attack == "drop an end batch":
                return [
                    b for b, h in zip(batches, heads, strict=True) if not (h.kind == "end" and h.part == 1)
                ]
            other = next(  # the sample map task 1 sent to routing task 1
                b
                for b in self.history
                if (x := parse_header(b, where="engine")[0]).part == 1
                and x.bucket == 1
                and x.kind == "data"
                and x.seq == heads[i].seq
            )
            return [*batches[:i], other, *batches[i + 1 :]]

    path = _seal(tmp_path, DATA["ints"], enclave_identity)
    tight = _enclave(zygote, enclave_identity, memory_budget=BUDGET, spill_dir=tmp_path / "s")
    with pytest.raises(FlowIntegrityError, match=r"stage 1 partition 0: " + ROUTING_ATTACKS[attack]):
        _sort(tight, path, tmp_path / "o", recipient, ranges=2, partitions=2, engine=Tamperer)
    assert not (tmp_path / "o" / "o.manifest.cnfseal").exists()
