"""confide.enclave.run_ledger: the host controls the state directory, so a sealed run count it
replaced, rolled into another task's name, forged as a negative count or made unreadable is refused,
and a count that cannot be recorded stops the run (never runs uncounted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confide.enclave.backend import SIM_SIGNER, EnclaveIdentity, SimBackend
from confide.enclave.errors import EnclaveError, IntegrityError
from confide.enclave.run_ledger import LEDGER_AAD, LEDGER_LABEL, RunLedger
from confide.enclave.sim_platform import SimPlatform


@pytest.fixture
def ledger(tmp_path: Path) -> RunLedger:
    plat = SimPlatform.create(tmp_path / "platform")
    return RunLedger(
        SimBackend(plat, EnclaveIdentity("sim", "ab" * 32, SIM_SIGNER, 1, 1, False)), tmp_path / "state"
    )


def test_counts_and_the_cap(ledger: RunLedger) -> None:
    assert ledger.count("t1") == 0
    assert ledger.next_run("t1", 2) == 1 and ledger.next_run("t1", 2) == 2
    with pytest.raises(IntegrityError, match="run 3 of this task exceeds the 2 run\\(s\\)"):
        ledger.next_run("t1", 2)


def test_another_tasks_count_does_not_unseal(ledger: RunLedger) -> None:
    ledger.next_run("t1", 5)
    os.replace(ledger._path("t1"), ledger._path("t2"))  # the host renames t1's count to t2
    with pytest.raises(IntegrityError, match="sealed run count does not unseal"):
        ledger.count("t2")


def test_a_sealed_negative_count_is_refused(ledger: RunLedger) -> None:
    key = ledger.backend.sealing_key("measurement", LEDGER_LABEL)
    aad = LEDGER_AAD + bytes.fromhex(ledger.backend.identity.measurement) + b"\0" + b"t1"
    nonce = b"\0" * 12
    blob = nonce + AESGCM(key).encrypt(nonce, json.dumps({"task_id": "t1", "runs": -4}).encode(), aad)
    ledger.dir.mkdir(parents=True)
    ledger._path("t1").write_bytes(blob)
    with pytest.raises(IntegrityError, match="sealed run count is not a count"):
        ledger.count("t1")


def test_an_unreadable_or_unwritable_ledger_stops_the_run(ledger: RunLedger) -> None:
    ledger.dir.mkdir(parents=True)
    ledger._path("t1").mkdir()  # a directory where the count should be
    with pytest.raises(EnclaveError, match="cannot read the run count"):
        ledger.count("t1")
    other = RunLedger(ledger.backend, ledger.dir.parent / "other")
    other.dir.parent.mkdir()
    other.dir.symlink_to(ledger.dir.parent / "nowhere")  # reads as no count; cannot be created
    assert other.count("t3") == 0
    with pytest.raises(EnclaveError, match="cannot record the run count .*: the task does not run uncounted"):
        other.next_run("t3", 1)
