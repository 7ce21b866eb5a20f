"""confide.enclave.flow.in_enclave, the part a platform flow task on the host's engine adds: what the
host hands the enclave between the two calls (its node agents, the framed task reports, its account
of a failure) is refused when malformed, naming what; the jobs kept open are bounded."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.errors import EnclaveError, FormatError
from confide.enclave.flow import in_enclave as fl

EV = base64.b64encode(b"evidence").decode()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "must list 1 to 16 node agents"),
        ([["line", EV]] * 17, "must list 1 to 16 node agents"),
        ("line", "must list 1 to 16"),
        ([["line"]], "flow_agents[0]: a node agent is [public line, evidence"),
        ([["line", EV], ["line", 3]], "flow_agents[1]: a node agent is"),
        ([["l" * 5000, EV]], "public line or evidence too long"),
        ([["line", "A" * (fl.MAX_EVIDENCE_B64 + 4)]], "public line or evidence too long"),
        ([["line", "not base64!"]], "'evidence' is not valid base64"),
    ],
)
def test_malformed_agent_lists_are_refused(value: Any, message: str) -> None:
    with pytest.raises(FormatError) as info:
        fl.parse_agents(value)
    assert message in str(info.value)


def test_agents_parse() -> None:
    assert fl.parse_agents([["a", EV], ["b", EV]]) == [("a", b"evidence"), ("b", b"evidence")]


def test_reports_round_trip_and_bad_framing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.bin"
    fl.write_reports(path, [b"one", b"", b"three" * 100])
    assert fl.read_reports(str(path)) == [b"one", b"", b"three" * 100]
    whole = path.read_bytes()
    for cut, message in ((2, "truncated frame header"), (len(whole) - 1, "report 2 is truncated")):
        path.write_bytes(whole[:cut])
        with pytest.raises(FormatError, match=message):
            fl.read_reports(str(path))
    with pytest.raises(FormatError, match="cannot read the reports file"):
        fl.read_reports(str(tmp_path / "missing.bin"))


def test_an_oversized_reports_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fl, "MAX_REPORTS_BYTES", 16)
    path = tmp_path / "r.bin"
    fl.write_reports(path, [b"x" * 20])
    with pytest.raises(FormatError, match="reports file larger than"):
        fl.read_reports(str(path))


def test_the_open_jobs_are_bounded_and_taken_once() -> None:
    pending: dict[str, fl.EngineJob] = {}
    jobs = {f"t{i}": fl.EngineJob(None, b"", {}, i) for i in range(fl.MAX_PENDING + 2)}  # type: ignore[arg-type]
    for task_id, job in jobs.items():
        fl.remember(pending, task_id, job)
    assert list(pending) == [f"t{i}" for i in range(2, fl.MAX_PENDING + 2)]  # the oldest dropped
    again = fl.EngineJob(None, b"", {}, "again")  # type: ignore[arg-type]
    fl.remember(pending, "t2", again)  # a task started again replaces its earlier start
    assert list(pending)[-1] == "t2" and fl.take(pending, "t2") is again
    for task_id in ("t2", "t0", 7):
        with pytest.raises(EnclaveError, match="is waiting to finish in this enclave worker"):
            fl.take(pending, task_id)


def test_the_hosts_account_of_a_failure_is_marked_printable_and_short() -> None:
    text = fl.engine_failure("stage 1 partition 0: lost\x1b[31m\n" + "x" * 2000)
    assert text.startswith(
        "the dataflow job failed on the engine (as the host reports it): stage 1 partition 0"
    )
    assert "\x1b" not in text and "\n" not in text and len(text) == 512
    with pytest.raises(FormatError, match="engine_error must be text"):
        fl.engine_failure(3)
