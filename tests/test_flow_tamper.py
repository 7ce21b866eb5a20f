"""A malicious engine drops, duplicates, reorders, replays or splices batches, swaps partitions,
feeds a batch of another job, reruns a task, drops or duplicates a report, or swaps an input file:
each job is refused with an error naming the stage and partition. And the engine sees no plaintext."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.enclave.errors import ConfideError
from confide.enclave.flow import FlowEnclave, FlowIntegrityError, FlowTaskError, driver
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Flow, open_result, seal_text
from confide.flow.malicious import MaliciousEngine
from flow_support import FUNCTIONS, enclave_identity, make_enclave, recipient, sim_backend, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

SECRET_WORDS = ["zebra-secret", "ünïcörn-token", "kiwi-private"]
LINES = [f"{SECRET_WORDS[i % 3]} common{i % 5} {SECRET_WORDS[(i + 1) % 3]}" for i in range(120)]


@pytest.fixture(scope="module")
def enclave(zygote: Zygote, enclave_identity: Identity) -> FlowEnclave:
    return make_enclave(zygote, enclave_identity, batch_records=2)  # several batches per stream


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, enclave_identity: Identity) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("flow-in")
    pub = [enclave_identity.public]
    a = seal_text(d / "a.sealed", LINES, pub, chunk_size=1024)
    b = seal_text(d / "b.sealed", LINES[::-1], pub, chunk_size=1024)
    return a, b


def word_count(path: Path) -> tuple[Flow, object]:
    flow = Flow(FUNCTIONS)
    wc = flow.text(path, partitions=3).flat_map("words").map("one").reduce_by_key("add", 2)
    return flow, wc.save("wc")


def run(engine: MaliciousEngine, path: Path, out: Path, recipient: Identity) -> dict:
    flow, action = word_count(path)
    return flow.run(action, engine=engine, recipients=[recipient.public], out_dir=out)


def test_honest_engine_sees_no_plaintext(
    tmp_path: Path, enclave: FlowEnclave, inputs: tuple[Path, Path], recipient: Identity
) -> None:
    engine = MaliciousEngine([enclave])
    summary = run(engine, inputs[0], tmp_path / "out", recipient)
    assert summary["accepted"]
    counts = dict(open_result(tmp_path / "out", "wc", recipient))
    assert counts["zebra-secret"] == 80
    handled = b"".join(engine.seen) + b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir())
    assert len(engine.seen) > 20
    for token in [*SECRET_WORDS, "common1", "def words", "line.split", "reduce_local"]:
        assert token.encode() not in handled, token
        assert token.encode("utf-16-le") not in handled


ATTACKS = {
    "drop": r"stage 1 partition \d+: stream from stage 0 partition \d: .*a batch is missing",
    "drop_end": r"stage 1 partition \d+: no end batch from stage 0 partition \d",
    "drop_stream": r"stage 1 partition \d+: no end batch from stage 0 partition \d",
    "duplicate": r"stage 1 partition \d+: stream from stage 0 partition \d: batch seq 0 where seq 1 was due \(duplicated",
    "reorder": r"stage 1 partition \d+: stream from stage 0 partition \d: batch seq \d+ where seq \d+ was due \(out of order",
    "splice": r"stage 1 partition \d+: batch \d+: batch claiming data from stage 0 partition \d .* failed authentication",
    "swap_partitions": r"stage 1 partition 0: batch for partition 1 .* delivered to partition 0: partitions swapped",
    "rerun_task": r"stage 0 partition 1: two reports for one task|stage 1 partition \d: .*duplicated",
    "drop_report": r"stage 0 partition 0: no report",
    "duplicate_report": r"stage 0 partition 0: two reports for one task",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_is_refused(
    attack: str, tmp_path: Path, enclave: FlowEnclave, inputs: tuple[Path, Path], recipient: Identity
) -> None:
    stage = 0 if attack == "rerun_task" else 1
    engine = MaliciousEngine([enclave], attack, stage=stage)
    with pytest.raises(FlowIntegrityError, match=ATTACKS[attack]):
        run(engine, inputs[0], tmp_path / "out", recipient)
    assert engine.done  # the attack happened
    assert not list((tmp_path / "out").glob("*.manifest.cnfseal"))  # no result is vouched for


def test_batch_of_another_job_is_refused(
    tmp_path: Path, enclave: FlowEnclave, inputs: tuple[Path, Path], recipient: Identity
) -> None:
    first = MaliciousEngine([enclave])
    run(first, inputs[0], tmp_path / "o1", recipient)
    engine = MaliciousEngine([enclave], "foreign", foreign_batches=first.history)
    with pytest.raises(FlowIntegrityError, match=r"stage 1 partition \d+: batch \d+: batch of another job"):
        run(engine, inputs[0], tmp_path / "o2", recipient)


def test_replayed_batch_of_an_earlier_stage_is_refused(
    tmp_path: Path, enclave: FlowEnclave, inputs: tuple[Path, Path], recipient: Identity
) -> None:
    flow = Flow(FUNCTIONS)
    wc = flow.text(inputs[0], partitions=2).flat_map("words").map("one").reduce_by_key("add", 2)
    action = wc.map("ident").distinct(2).save("d")
    engine = MaliciousEngine([enclave], "replay", stage=2)
    with pytest.raises(
        FlowIntegrityError, match=r"stage 2 partition 0: batch from stage 0 delivered to stage 2"
    ):
        flow.run(action, engine=engine, recipients=[recipient.public], out_dir=tmp_path / "out")


def test_swapped_input_file_is_refused(
    tmp_path: Path, enclave: FlowEnclave, inputs: tuple[Path, Path], recipient: Identity
) -> None:
    engine = MaliciousEngine([enclave], "swap_input", stage=0, other_input=str(inputs[1]))
    with pytest.raises(
        FlowIntegrityError, match=r"stage 0 partition 0: input 'in0' is not the file the job opened"
    ):
        run(engine, inputs[0], tmp_path / "out", recipient)


def test_truncated_input_file_is_refused(
    tmp_path: Path, enclave: FlowEnclave, inputs: tuple[Path, Path], recipient: Identity
) -> None:
    victim = tmp_path / "victim.sealed"
    victim.write_bytes(inputs[0].read_bytes())
    flow, action = word_count(victim)
    with open(victim, "r+b") as fh:  # the engine cuts the file at a chunk boundary after the job was built
        fh.truncate(victim.stat().st_size - 1040)
    engine = MaliciousEngine([enclave])
    with pytest.raises(
        ConfideError,
        match=r"stage 0 partition 2: input 'in0': (file is truncated|chunk 3 of 4 failed authentication)",
    ):
        flow.run(action, engine=engine, recipients=[recipient.public], out_dir=tmp_path / "out")


class _SplittingSandbox(FlowEnclave):
    """Hostile function code that writes its stage-0 output itself: one record whose bytes hold two
    JSON values ('["x",1],["y",1]' counted as one), which the enclave seals unparsed."""

    def _run_driver(self, job, st, specs, fds, where, chain=None):  # type: ignore[no-untyped-def]
        out = super()._run_driver(job, st, specs, fds, where, chain)
        if st.id != 0:
            return out
        keys, recs = b'"x"', b'["x",1],["y",1]'
        body = driver.KEYED.pack(1, len(keys)) + keys + recs
        return driver.FRAME.pack(len(body)) + body


@pytest.mark.parametrize("budget", [None, 256])
def test_a_record_that_holds_two_values_fails_the_next_task_not_the_counts(
    budget: int | None,
    tmp_path: Path,
    zygote: Zygote,
    enclave_identity: Identity,
    inputs: tuple[Path, Path],
    recipient: Identity,
) -> None:
    """The enclave seals a keyed output's record bytes without decoding them; the next task checks
    that its input holds as many records as the authenticated batches count (its driver, or, over a
    memory budget, the spill router that decodes them), so a record smuggling a second value fails
    that task, naming it, instead of being counted as one."""
    hostile = _SplittingSandbox(
        enclave_identity, zygote, backend=sim_backend(), memory_budget=budget, spill_dir=tmp_path / "s"
    )
    what = (
        "exception \\(ValueError\\)"
        if budget is None
        else "a batch holds 2 records where the enclave counted 1"
    )
    with pytest.raises(FlowTaskError, match=f"stage 1 partition \\d: .*{what}"):
        run(MaliciousEngine([hostile]), inputs[0], tmp_path / "out", recipient)
    assert not list((tmp_path / "out").glob("*.manifest.cnfseal"))
