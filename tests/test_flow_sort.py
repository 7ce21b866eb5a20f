"""sort_by range-partitioned as PySpark's sortBy: a sample of the keys, drawn and used only in the
enclave, gives N - 1 boundaries; every map task's pairs are routed to their range; each reducer
sorts its bucket. Results equal plain Python's sorted() (stable) on uniform, skewed, duplicated,
unicode and descending data and with empty partitions; the output partitions are ranges, roughly
balanced on uniform data; padded, the engine sees the same batch counts and sizes for every
(task, bucket); and an engine that drops, duplicates, replays or moves a batch of the new stages
(the samples included) fails the job naming the stage and partition."""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.flow import FlowEnclave, FlowFormatError, FlowIntegrityError
from confide.enclave.flow.batch import parse_header
from confide.enclave.flow.plan import parse_plan
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Flow, LocalEngine, ShufflePadding, open_manifest, open_result, seal_text
from confide.flow.malicious import MaliciousEngine
from flow_support import enclave_identity, make_enclave, recipient, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

FUNCTIONS = """
def by_k(r):
    return r["k"]

def ident(x):
    return x
"""


def _rng_records(seed: int, n: int, key: Callable[[random.Random, int], Any]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"k": key(rng, i), "i": i} for i in range(n)]


WORDS = ["äpfel", "zürich", "ñandú", "日本語", "ελλάδα", "apple", "Zebra", "émile", "ø", "🙂smile"]
DATA: dict[str, list[dict[str, Any]]] = {
    "uniform": _rng_records(1, 2400, lambda r, i: r.randrange(1_000_000)),
    "skew": _rng_records(2, 2400, lambda r, i: 7 if r.random() < 0.9 else r.randrange(100)),
    "duplicates": _rng_records(3, 1200, lambda r, i: r.randrange(5)),
    "unicode": _rng_records(4, 1500, lambda r, i: r.choice(WORDS) + str(r.randrange(30))),
    "tuples": _rng_records(5, 900, lambda r, i: (r.randrange(4), r.choice(WORDS))),
    "floats": _rng_records(6, 600, lambda r, i: r.uniform(-1e6, 1e6)),
}


@pytest.fixture(scope="module")
def enclave(zygote: Zygote, enclave_identity: Identity) -> FlowEnclave:
    return make_enclave(zygote, enclave_identity, batch_records=64)  # several batches per stream


def _seal(d: Path, name: str, records: list[Any], identity: Identity, chunk: int = 4096) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    return seal_text(d / f"{name}.sealed", lines, [identity.public], chunk_size=chunk)


def _parts(out: Path, name: str, who: Identity) -> list[list[Any]]:
    """The output, split into its partitions (the manifest's record count per part)."""
    records = open_result(out, name, who)
    files = sorted(open_manifest(out, name, who)["outputs"][name]["files"], key=lambda f: f["part"])
    parts, off = [], 0
    for f in files:
        parts.append(records[off : off + f["records"]])
        off += f["records"]
    assert off == len(records)
    return parts


def _norm(r: Any) -> Any:  # JSON lines give tuples for arrays
    return {**r, "k": tuple(r["k"])} if isinstance(r["k"], list) else r


def _sorted_run(
    engine: LocalEngine,
    path: Path,
    out: Path,
    who: Identity,
    *,
    partitions: int,
    buckets: int | None,
    ascending: bool = True,
    flow: Flow | None = None,
) -> tuple[list[list[Any]], dict[str, Any]]:
    flow = flow or Flow(FUNCTIONS)
    action = flow.json_lines(path, partitions=partitions).sort_by("by_k", ascending, buckets).save("s")
    summary = flow.run(action, engine=engine, recipients=[who.public], out_dir=out)
    return _parts(out, "s", who), summary


@pytest.mark.parametrize(
    ("name", "ascending"), [*((n, True) for n in DATA), ("uniform", False), ("skew", False)]
)
def test_range_sort_equals_sorted_and_partitions_are_ranges(
    name: str,
    ascending: bool,
    tmp_path: Path,
    enclave: FlowEnclave,
    enclave_identity: Identity,
    recipient: Identity,
) -> None:
    data = [_norm(r) for r in DATA[name]]
    path = _seal(tmp_path, name, DATA[name], enclave_identity)
    parts, summary = _sorted_run(
        LocalEngine([enclave]), path, tmp_path / "o", recipient, partitions=3, buckets=4, ascending=ascending
    )
    got = [_norm(r) for p in parts for r in p]
    assert got == sorted(data, key=lambda r: r["k"], reverse=not ascending)  # stable, as sorted()
    assert len(parts) == 4 and summary["stages"] == 3  # map and sample, route, sort
    keys = [[r["k"] for r in p] for p in parts]
    # every key of part i before every key of part i + 1 (empty parts skipped)
    for a, b in itertools.pairwise([p for p in keys if p]):
        assert (max(a) <= min(b)) if ascending else (min(a) >= max(b))
    if name == "uniform":  # 60 samples per range: each within 0.4..1.6 of n / N (the worst of 3,000
        sizes = [len(p) for p in parts]  # simulated draws of this sample was 0.46 off)
        assert all(0.4 * len(data) / 4 <= s <= 1.6 * len(data) / 4 for s in sizes), sizes
    if name == "skew":  # the hot key (90 %) is in one partition, whole
        hot = [i for i, p in enumerate(keys) if 7 in p]
        assert len(hot) == 1 and keys[hot[0]].count(7) == sum(1 for r in data if r["k"] == 7)
    if name == "duplicates":  # 5 distinct keys over 4 ranges: no key in two partitions
        seen = [set(p) for p in keys]
        assert all(not (seen[i] & seen[j]) for i in range(4) for j in range(i + 1, 4))


def test_empty_partitions_and_more_ranges_than_keys(
    tmp_path: Path, enclave: FlowEnclave, enclave_identity: Identity, recipient: Identity
) -> None:
    data = DATA["duplicates"][:40]
    path = _seal(tmp_path, "few", data, enclave_identity, chunk=1024)
    # 7 source partitions over 2 chunks (most empty), 9 ranges over 5 distinct keys
    parts, _ = _sorted_run(LocalEngine([enclave]), path, tmp_path / "o", recipient, partitions=7, buckets=9)
    assert [r for p in parts for r in p] == sorted(data, key=lambda r: r["k"])
    assert len(parts) == 9 and sum(1 for p in parts if not p) >= 4
    empty = _seal(tmp_path, "empty", [], enclave_identity)
    parts, _ = _sorted_run(LocalEngine([enclave]), empty, tmp_path / "e", recipient, partitions=3, buckets=4)
    assert parts == [[], [], [], []]


def test_default_is_the_parents_partitions_and_one_partition_needs_no_sampling(
    tmp_path: Path, enclave: FlowEnclave, enclave_identity: Identity, recipient: Identity
) -> None:
    data = DATA["unicode"][:300]
    path = _seal(tmp_path, "u", data, enclave_identity, chunk=1024)
    want = sorted(data, key=lambda r: r["k"])
    parts, summary = _sorted_run(
        LocalEngine([enclave]), path, tmp_path / "d", recipient, partitions=3, buckets=None
    )
    assert len(parts) == 3 and summary["stages"] == 3 and [r for p in parts for r in p] == want
    parts, summary = _sorted_run(
        LocalEngine([enclave]), path, tmp_path / "one", recipient, partitions=3, buckets=1
    )
    assert len(parts) == 1 and summary["stages"] == 2 and parts[0] == want


def test_padded_range_sort_shows_the_engine_the_same_sizes_everywhere(
    tmp_path: Path, enclave: FlowEnclave, enclave_identity: Identity, recipient: Identity
) -> None:
    data = DATA["skew"][:600]
    path = _seal(tmp_path, "skew", data, enclave_identity, chunk=2048)
    engine = MaliciousEngine([enclave])  # honest: it only records what it handles
    flow = Flow(FUNCTIONS, padded_shuffle=ShufflePadding(records=600, record_bytes=48, batch_records=100))
    parts, _ = _sorted_run(engine, path, tmp_path / "o", recipient, partitions=3, buckets=4, flow=flow)
    assert [r for p in parts for r in p] == sorted(data, key=lambda r: r["k"])
    assert max(len(p) for p in parts) >= 0.85 * len(data)  # skewed: one range holds the hot key
    streams: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for blob in engine.history:
        h = parse_header(blob, where="test")[0]
        streams[(h.stage, h.part, h.bucket)].append(len(blob) - len(str(h.bucket)) - len(str(h.part)))
    routed = {tuple(v) for (s, _, _), v in streams.items() if s == 1}  # route -> sort: bucket sizes hidden
    assert len(routed) == 1 and len(next(iter(routed))) == 6 + 1  # 6 padded batches and the end batch
    samples = {tuple(v) for (s, p, b), v in streams.items() if s == 0 and p != b}  # sample-only streams
    assert len(samples) == 1 and len(next(iter(samples))) == 2  # one fixed-size sample and the end


def _sample_attack(attack: str) -> type[MaliciousEngine]:
    class SampleTamperer(MaliciousEngine):
        """Tampers with the sample batches a routing task (stage 1) receives."""

        def _deliver(self, stage: int, partition: int, batches: list[bytes]) -> list[bytes]:
            if stage != 1 or self.done:
                return batches
            heads = [parse_header(b, where="engine")[0] for b in batches]
            # a stream from another map task carries only its sample: its one data batch
            i = next(j for j, h in enumerate(heads) if h.kind == "data" and h.part != partition)
            self.done = True
            if attack == "drop_sample":
                return batches[:i] + batches[i + 1 :]
            if attack == "duplicate_sample":
                return [*batches[: i + 1], batches[i], *batches[i + 1 :]]
            # "move_sample": the sample this map task sent to another routing task
            h = heads[i]
            other = next(
                b
                for b in self.history
                if (x := parse_header(b, where="engine")[0]).stage == 0
                and x.part == h.part
                and x.bucket != partition
                and x.kind == "data"
                and x.seq == h.seq
            )
            return [*batches[:i], other, *batches[i + 1 :]]

    return SampleTamperer


ATTACKS = {
    # (engine, stage): the error
    (
        "drop",
        1,
    ): r"stage 1 partition \d+: stream from stage 0 partition \d: .*(a batch is missing|end batch counts)",
    (
        "drop",
        2,
    ): r"stage 2 partition \d+: stream from stage 1 partition \d: .*(a batch is missing|end batch counts)",
    (
        "duplicate",
        1,
    ): r"stage 1 partition \d+: stream from stage 0 partition \d: batch seq 0 where seq 1 was due \(duplicated",
    (
        "duplicate",
        2,
    ): r"stage 2 partition \d+: stream from stage 1 partition \d: batch seq 0 where seq 1 was due \(duplicated",
    ("replay", 2): r"stage 2 partition 0: batch from stage 0 delivered to stage 2",
    ("drop_end", 2): r"stage 2 partition \d+: no end batch from stage 1 partition \d",
    (
        "swap_partitions",
        2,
    ): r"stage 2 partition 0: batch for partition 1 .* delivered to partition 0: partitions swapped",
    ("drop_report", 1): r"stage 0 partition 0: no report",
    (
        "drop_sample",
        1,
    ): r"stage 1 partition 0: stream from stage 0 partition [12]: batch seq 1 where seq 0 was due \(out of order or a batch is missing",
    (
        "duplicate_sample",
        1,
    ): r"stage 1 partition 0: stream from stage 0 partition [12]: batch seq 0 where seq 1 was due \(duplicated",
    (
        "move_sample",
        1,
    ): r"stage 1 partition 0: batch for partition [12] \(from stage 0 partition [12]\) delivered to partition 0",
}


@pytest.mark.parametrize(("attack", "stage"), list(ATTACKS))
def test_tampering_with_the_sort_stages_is_refused(
    attack: str,
    stage: int,
    tmp_path: Path,
    enclave: FlowEnclave,
    enclave_identity: Identity,
    recipient: Identity,
) -> None:
    path = _seal(tmp_path, "u", DATA["uniform"][:400], enclave_identity, chunk=1024)
    if attack.endswith("_sample"):
        engine: MaliciousEngine = _sample_attack(attack)([enclave])
    else:
        engine = MaliciousEngine([enclave], attack, stage=stage)
    with pytest.raises(FlowIntegrityError, match=ATTACKS[(attack, stage)]):
        _sorted_run(engine, path, tmp_path / "o", recipient, partitions=3, buckets=2)
    assert engine.done
    assert not list((tmp_path / "o").glob("*.manifest.cnfseal"))


def test_a_description_that_misuses_the_sort_outputs_is_refused(
    recipient: Identity, tmp_path: Path, enclave_identity: Identity
) -> None:
    path = _seal(tmp_path, "u", DATA["uniform"][:10], enclave_identity)
    flow = Flow(FUNCTIONS)
    desc = flow.describe(
        [flow.json_lines(path, partitions=2).sort_by("by_k", num_partitions=3).save("s")], [recipient.public]
    )
    parse_plan(desc)
    no_sample = json.loads(json.dumps(desc))
    no_sample["stages"][0]["output"] = {"kind": "forward", "offset": 0, "buckets": 2}
    with pytest.raises(
        FlowFormatError, match="stage 1 has a range output but does not read a sort's samples"
    ):
        parse_plan(no_sample)
    ops = json.loads(json.dumps(desc))
    ops["stages"][1]["chain"] = [{"op": "key_by", "fn": "ident"}]
    with pytest.raises(FlowFormatError, match="stage 1 reads a sort's samples"):
        parse_plan(ops)
    unkeyed = json.loads(json.dumps(desc))
    unkeyed["stages"][0]["chain"] = []
    with pytest.raises(FlowFormatError, match="stage 0 samples a sort's keys but does not end with key_by"):
        parse_plan(unkeyed)
    wide = json.loads(json.dumps(desc))
    wide["stages"][0]["output"]["buckets"] = 3
    with pytest.raises(
        FlowFormatError, match="send to different bucket counts|stage 1 reads a sort's samples"
    ):
        parse_plan(wide)
