"""A dataflow job's key passes between enclave workers only after mutual attestation, played by a
hostile engine: it offers the coordinator a worker of another build, another platform or a debug
enclave, evidence of one worker with the keys of another, a worker with no TEE at all; and it hands a
worker a grant it made itself, or a genuine grant of another job or for another worker."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from confide.client.policy import Policy
from confide.enclave import hpke_box
from confide.enclave.errors import ConfideError, EvidenceError, PolicyError
from confide.enclave.flow import FlowEnclave, FlowIntegrityError
from confide.enclave.flow.task import GRANT_PURPOSE
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Flow, LocalEngine, open_result, seal_description, seal_text
from flow_support import BUILD, FUNCTIONS, enclave_identity, make_enclave, recipient, sim_backend, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures


@pytest.fixture
def job(tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity) -> dict[str, Any]:
    coordinator = make_enclave(zygote, enclave_identity)
    path = seal_text(tmp_path / "in.sealed", ["kiwi apple", "kiwi"], [enclave_identity.public])
    flow = Flow(FUNCTIONS)
    action = flow.text(path).flat_map("words").map("one").reduce_by_key("add", 2).save("wc")

    def start() -> bytes:
        sealed = seal_description(flow.describe([action], [recipient.public]), enclave_identity.public)
        return coordinator.start_job(sealed, flow.input_paths())[0]

    return {"coordinator": coordinator, "start": start, "flow": flow, "action": action}


def test_a_worker_of_this_build_gets_the_key_and_runs_tasks(job, zygote, tmp_path, recipient) -> None:
    worker = make_enclave(zygote, Identity.generate("worker"))
    engine = LocalEngine([job["coordinator"], worker])
    job["flow"].run(job["action"], engine=engine, recipients=[recipient.public], out_dir=tmp_path / "out")
    assert dict(open_result(tmp_path / "out", "wc", recipient)) == {"kiwi": 2, "apple": 1}


@pytest.mark.parametrize(
    ("backend", "refusal"),
    [
        (lambda: sim_backend("0e" * 32), "differs from this enclave's"),  # another build
        (lambda: sim_backend(debug=True), "debug enclave"),
        (lambda: sim_backend(platform=Path(tempfile.mkdtemp())), "another platform"),
    ],
)
def test_no_key_for_a_worker_that_is_not_this_build(job, zygote, backend, refusal) -> None:
    worker = FlowEnclave(Identity.generate("worker"), zygote, backend=backend())
    with pytest.raises(EvidenceError, match=refusal):
        job["coordinator"].grant(job["start"](), worker.public_line, worker.evidence())


def test_no_key_for_evidence_of_another_workers_keys(job, zygote) -> None:
    genuine = make_enclave(zygote, Identity.generate("genuine"))
    impostor = Identity.generate("impostor")  # the engine's own keys, behind genuine evidence
    with pytest.raises(FlowIntegrityError, match="does not bind this worker's keys"):
        job["coordinator"].grant(job["start"](), impostor.public.to_line(), genuine.evidence())


def test_no_key_passes_to_or_from_a_worker_without_a_tee(job, zygote, enclave_identity) -> None:
    bare = FlowEnclave(Identity.generate("bare"), zygote)
    with pytest.raises(FlowIntegrityError, match="no TEE backend"):
        bare.evidence()
    ticket = job["start"]()
    wrapped, vouch = job["coordinator"].grant(
        ticket, *_line_and_evidence(make_enclave(zygote, Identity.generate("w")))
    )
    with pytest.raises(FlowIntegrityError, match="no TEE backend"):
        bare.accept(ticket, wrapped, vouch)
    lone = FlowEnclave(enclave_identity, zygote)  # a coordinator without a TEE grants nothing
    sealed = seal_description(
        job["flow"].describe([job["action"]], [Identity.generate("r").public]), enclave_identity.public
    )
    lone_ticket = lone.start_job(sealed, job["flow"].input_paths())[0]
    with pytest.raises(FlowIntegrityError, match="no TEE backend"):
        lone.grant(lone_ticket, *_line_and_evidence(make_enclave(zygote, Identity.generate("w2"))))


def test_a_worker_refuses_grants_the_coordinator_did_not_vouch_for(job, zygote) -> None:
    worker = make_enclave(zygote, Identity.generate("worker"))
    other = make_enclave(zygote, Identity.generate("other"))
    coordinator = job["coordinator"]
    first, second = job["start"](), job["start"]()
    wrapped1, vouch1 = coordinator.grant(first, *_line_and_evidence(worker))
    # the engine's own key, sealed to the worker, behind the coordinator's evidence of a real grant
    forged = hpke_box.seal(
        b"\x07" * 32, worker.identity.kem_key.public_key(), GRANT_PURPOSE, job="00" * 16, measurement=BUILD
    )
    with pytest.raises(FlowIntegrityError, match="does not vouch for this grant"):
        worker.accept(first, forged, vouch1)
    # a genuine grant of another job, replayed with this job's ticket
    with pytest.raises(FlowIntegrityError, match="does not vouch for this grant"):
        worker.accept(second, wrapped1, vouch1)
    # a genuine grant for another worker
    wrapped_o, vouch_o = coordinator.grant(first, *_line_and_evidence(other))
    with pytest.raises(FlowIntegrityError, match="does not vouch for this grant"):
        worker.accept(first, wrapped_o, vouch_o)
    # vouched by an enclave of another build
    foreign = FlowEnclave(Identity.generate("foreign"), zygote, backend=sim_backend("0e" * 32))
    with pytest.raises(EvidenceError, match="differs from this enclave's"):
        worker.accept(first, wrapped1, foreign.evidence())
    worker.accept(first, wrapped1, vouch1)  # the genuine one is taken


def _line_and_evidence(worker: FlowEnclave) -> tuple[str, bytes]:
    return worker.public_line, worker.evidence()


# ---- the client attests the coordinator before it seals the job description to it ------------------


class _ReplayingEngine(LocalEngine):
    """An engine that answers the client's challenge with evidence it fetched earlier."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.old = self.workers[0].evidence(b"an earlier nonce")

    def evidence(self, nonce: bytes) -> bytes:
        return self.old


def _run(job: dict[str, Any], engine: LocalEngine, out: Path, recipient: Identity, **kw: Any) -> Any:
    return job["flow"].run(job["action"], engine=engine, recipients=[recipient.public], out_dir=out, **kw)


def test_no_job_description_for_a_coordinator_that_fails_the_policy(job, zygote, tmp_path, recipient) -> None:
    other_build = FlowEnclave(job["coordinator"].identity, zygote, backend=sim_backend("0e" * 32))
    with pytest.raises(PolicyError, match="not accepted"):
        _run(job, LocalEngine([other_build]), tmp_path / "o1", recipient)
    with pytest.raises(PolicyError, match="SIMULATED"):
        _run(job, LocalEngine([job["coordinator"]]), tmp_path / "o2", recipient, policy=Policy())
    with pytest.raises(PolicyError, match="nonce mismatch"):
        _run(job, _ReplayingEngine([job["coordinator"]]), tmp_path / "o3", recipient)
    with pytest.raises(FlowIntegrityError, match="no TEE backend"):
        _run(job, LocalEngine([FlowEnclave(job["coordinator"].identity, zygote)]), tmp_path / "o4", recipient)
    assert not any(
        (tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in ("o1", "o2", "o3", "o4")
    )
    assert _run(job, LocalEngine([job["coordinator"]]), tmp_path / "ok", recipient)["accepted"]


def test_an_owner_sealed_input_is_opened_with_the_key_in_the_sealed_job(job, tmp_path, recipient) -> None:
    owner = Identity.generate("owner")
    path = seal_text(tmp_path / "own.sealed", ["fig fig", "plum"], [owner.public])  # not to the worker
    engine = LocalEngine([job["coordinator"]])

    def count(identity: Identity | None, out: str) -> dict[str, int]:
        flow = Flow(FUNCTIONS)
        action = (
            flow.text(path, identity=identity).flat_map("words").map("one").reduce_by_key("add").save("wc")
        )
        flow.run(action, engine=engine, recipients=[recipient.public], out_dir=tmp_path / out)
        return dict(open_result(tmp_path / out, "wc", recipient))

    assert count(owner, "o1") == {"fig": 2, "plum": 1}
    with pytest.raises(ConfideError, match="not addressed to identity"):
        count(None, "o2")  # the worker cannot open a file that is not sealed to it
    with pytest.raises(ConfideError, match="not addressed to identity"):
        count(Identity.generate("stranger"), "o3")  # nor can someone else hand its key over
