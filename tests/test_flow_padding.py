"""Padded shuffle: with Flow(padded_shuffle=...), what the engine sees of an exchange (batches and
bytes per bucket, task reports) is the same for every bucket on skewed keys, the results are those
of the unpadded job, a task over the job's bound fails naming its stage and partition, and an engine
dropping a dummy batch is refused."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.errors import FormatError
from confide.enclave.flow import FlowEnclave, FlowIntegrityError, FlowTaskError
from confide.enclave.flow.batch import parse_header
from confide.enclave.flow.plan import parse_plan
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Flow, FlowError, ShufflePadding, open_result, seal_text
from confide.flow.malicious import MaliciousEngine
from flow_support import FUNCTIONS, enclave_identity, make_enclave, recipient, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

# skewed: "hot" is most of the words; 9 distinct words in all
LINES = [" ".join(["hot"] * 6 + [f"cold{i % 8}", "ünï"]) for i in range(90)]
PAD = ShufflePadding(records=12, record_bytes=32, batch_records=2)
BATCHES = 6  # data batches per (task, bucket): 12 records' slots, 2 per batch


@pytest.fixture(scope="module")
def enclave(zygote: Zygote, enclave_identity: Identity) -> FlowEnclave:
    return make_enclave(zygote, enclave_identity)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, enclave_identity: Identity) -> Path:
    d = tmp_path_factory.mktemp("flow-pad-in")
    return seal_text(d / "in.sealed", LINES, [enclave_identity.public], chunk_size=1024)


def word_count(source: Path, pad: ShufflePadding | None) -> tuple[Flow, Any]:
    flow = Flow(FUNCTIONS, padded_shuffle=pad)
    wc = flow.text(source, partitions=3).flat_map("words").map("one").reduce_by_key("add", 3)
    return flow, wc.save("wc")


def observed(engine: MaliciousEngine, stage: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(map task, bucket) -> (batches, bytes), as the engine saw the stage's output."""
    seen: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for blob in engine.history:
        h = parse_header(blob, where="test")[0]
        if h.stage == stage:
            seen[(h.part, h.bucket)][0] += 1
            seen[(h.part, h.bucket)][1] += len(blob)
    return {k: (v[0], v[1]) for k, v in seen.items()}


def test_padded_exchange_looks_the_same_for_every_bucket(
    tmp_path: Path, enclave: FlowEnclave, source: Path, recipient: Identity
) -> None:
    views, results, reports = {}, {}, {}
    for name, pad in (("plain", None), ("padded", PAD)):
        engine = MaliciousEngine([enclave])
        flow, action = word_count(source, pad)
        flow.run(action, engine=engine, recipients=[recipient.public], out_dir=tmp_path / name)
        views[name] = observed(engine, 0)
        results[name] = dict(open_result(tmp_path / name, "wc", recipient))
        batches = [r for r in engine.seen if r.startswith(b"CNFFLOW1")]  # not the description
        reports[name] = {len(r) for r in batches if parse_header(r, where="test")[0].kind == "report"}
    want = Counter(w for ln in LINES for w in ln.split())
    assert results["padded"] == results["plain"] == want
    assert len(views["padded"]) == len(views["plain"]) == 3 * 3  # every task sends every bucket
    assert len(set(views["padded"].values())) == 1  # same batch count and bytes for every bucket
    ((batches, _),) = set(views["padded"].values())
    assert batches == BATCHES + 1  # the data batches and the end batch
    assert len(set(views["plain"].values())) > 1  # unpadded, the hot key's bucket stands out
    assert len(reports["plain"]) > 1  # and the reports' sizes vary with the counts in them
    assert len(reports["padded"]) == 2  # padded: one size for the map tasks, one for the sink's


def test_a_task_over_the_bound_fails_naming_stage_and_partition(
    tmp_path: Path, enclave: FlowEnclave, source: Path, recipient: Identity
) -> None:
    for pad, what in (
        (ShufflePadding(records=2, record_bytes=32, batch_records=2), "more records for one bucket"),
        (ShufflePadding(records=12, record_bytes=8, batch_records=2), r"a record is over .*\(8 bytes"),
    ):
        flow, action = word_count(source, pad)
        with pytest.raises(FlowTaskError, match=rf"stage 0 partition \d: {what}"):
            flow.run(
                action, engine=MaliciousEngine([enclave]), recipients=[recipient.public], out_dir=tmp_path
            )
        assert not list(tmp_path.glob("*.manifest.cnfseal"))


class DropDummy(MaliciousEngine):
    """Drops the last data batch of the first stream to a reduce task: with at most 9 records per
    stream and 2 per batch, batch 5 of 6 holds none."""

    dropped: bytes | None = None

    def _deliver(self, stage: int, partition: int, batches: list[bytes]) -> list[bytes]:
        if stage != 1 or self.dropped is not None:
            return batches
        for i, blob in enumerate(batches):
            h = parse_header(blob, where="engine")[0]
            if h.kind == "data" and h.seq == BATCHES - 1:
                self.dropped = blob
                return batches[:i] + batches[i + 1 :]
        return batches


def test_an_engine_dropping_a_dummy_batch_is_refused(
    tmp_path: Path, enclave: FlowEnclave, source: Path, recipient: Identity
) -> None:
    engine = DropDummy([enclave])
    flow, action = word_count(source, PAD)
    with pytest.raises(
        FlowIntegrityError,
        match=r"stage 1 partition 0: stream from stage 0 partition \d: batch seq 6 where seq 5 was due",
    ):
        flow.run(action, engine=engine, recipients=[recipient.public], out_dir=tmp_path)
    assert engine.dropped is not None
    header = parse_header(engine.dropped, where="test")[0]
    _, payload = enclave._jobs[header.job].keys.open(engine.dropped, where="test")
    assert payload[:4] == b"\0\0\0\0" and payload[4:].strip() == b"[]"  # it was a dummy
    assert len(engine.dropped) == len(engine.history[0])  # sealed like the batches with records


def test_hostile_padding_in_a_job_description_is_refused(source: Path, recipient: Identity) -> None:
    flow, action = word_count(source, PAD)
    good = flow.describe([action], [recipient.public])
    assert parse_plan(good).stages[0].output.pad is not None
    bad = {
        "records": ({"records": 0, "record_bytes": 32, "batch_records": 2}, r"'records' must be within 1"),
        "huge batch": ({"records": 9, "record_bytes": 1 << 20, "batch_records": 1 << 16}, "over 16777216"),
        "huge task": (
            {"records": 1 << 24, "record_bytes": 1 << 10, "batch_records": 1 << 10},
            "over 1073741824",
        ),
        "field": ({"records": 9, "record_bytes": 32}, "missing field"),
        "type": ("yes", "must be dict"),
    }
    for name, (pad, error) in bad.items():
        desc = flow.describe([action], [recipient.public])
        desc["stages"][0]["output"]["pad"] = pad
        with pytest.raises(FormatError, match=rf"stage 0: output.*{error}"):
            parse_plan(desc)
        assert name
    desc = flow.describe([action], [recipient.public])
    desc["stages"][1]["output"]["pad"] = PAD.spec()  # a sink has no exchange to pad
    with pytest.raises(FormatError, match="stage 1: output: unknown field"):
        parse_plan(desc)
    with pytest.raises(FlowError, match="positive integer"):
        ShufflePadding(records=0)
