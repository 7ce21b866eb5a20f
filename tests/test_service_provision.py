"""The service identity and its provisioning between enclave workers by mutual attestation
(PROTOCOL.md sections 2 and 6), against real enclave processes on one simulated platform."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import pytest

from confide.attest import verify_evidence
from confide.client.home import Home
from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.errors import EnclaveError
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.report_data import report_data_for
from confide.host.enclave_process import EnclaveProcess
from conftest import TaskKit


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory):
    """A platform, and worker 1 holding a fresh service key; `start(name, config)` starts more."""
    root = tmp_path_factory.mktemp("pool")
    home = Home(root / "home")
    home.platform()
    started: list[EnclaveProcess] = []

    def start(name: str, config: str | None = None) -> EnclaveProcess:
        cfg = None
        if config is not None:
            cfg = root / f"{name}.toml"
            cfg.write_text(f"[enclave]\n{config}\n")
        worker = EnclaveProcess(platform_dir=home.platform_dir, state_dir=root / name, config=cfg)
        started.append(worker)
        return worker

    first = start("w1")
    first.service_init()
    yield home, first, start, root
    for w in started:
        w.close()


def _evidence_claims(home: Home, evidence: bytes):
    return verify_evidence(evidence, at=int(time.time()), anchors=home.anchors())


def test_init_is_once_and_info_reports_the_key(pool) -> None:
    home, first, _, _ = pool
    info = first.service_info()
    assert info["provisioned"] is True
    service = PublicIdentity.from_line(info["service"])
    assert info["fingerprint"] == service.fingerprint
    with pytest.raises(EnclaveError, match="already holds service key"):
        first.service_init()
    # boot evidence: binds the service key and no nonce; a fresh nonce gives fresh evidence
    boot = first.service_evidence()
    assert hashlib.sha256(boot).hexdigest() == info["evidence_sha256"]
    assert _evidence_claims(home, boot).report_data == report_data_for(service, None)
    nonce = b"n" * 32
    claims = _evidence_claims(home, first.service_evidence(nonce))
    assert claims.report_data == report_data_for(service, nonce)
    assert claims.extra["service"] == info["service"]


def test_second_worker_provisioned_runs_a_task_and_survives_restart(pool, tmp_path: Path) -> None:
    _home, first, start, root = pool
    second = start("w2")
    assert second.service_info()["provisioned"] is False
    with pytest.raises(EnclaveError, match="holds no service key"):
        second.service_evidence()
    info = second.provision_from(first)
    assert info["service"] == first.service_info()["service"]
    assert info["evidence_sha256"] != first.service_info()["evidence_sha256"]  # its own boot evidence

    # a task whose keys were wrapped to the service (not to any worker) runs on the new worker
    service = PublicIdentity.from_line(info["service"])
    kit = TaskKit(tmp_path, second, service)
    lab, owner = Identity.generate("lab"), Identity.generate("owner")
    ds = kit.dataset(owner, b"a,y\n1,0\n2,1\n")
    source = "def run(ctx):\n    ctx.outputs['out'].write(ctx.inputs['d'].read().upper())\n"
    m = build_manifest(
        service=service,
        creator=lab.public,
        function=mf.function_descriptor(
            name="up", source=source, owner=lab.public, description="", outputs=["out"]
        ),
        inputs=[kit.task_input("d", ds)],
        outputs=[mf.TaskOutput("out", (lab.fingerprint,))],
        participants={"lab": lab.public, "owner": owner.public},
    )
    approvals = [sign_approval(owner, m), sign_approval(lab, m)]
    result, body, outs = kit.run(m, approvals, {"d": ds}, function_source={"clear": source})
    assert result["ok"], body
    assert kit.read(outs["out"], lab) == b"A,Y\n1,0\n2,1\n"
    assert body["evidence_sha256"] == info["evidence_sha256"]

    # restart: the service key is unsealed from the worker's state directory, not re-provisioned
    second.close()
    again = start("w2")
    assert again.service_info()["service"] == info["service"]
    kit.enclave = again
    result, body, outs = kit.run(m, approvals, {"d": ds}, function_source={"clear": source})
    assert result["ok"], body
    # the sealed service key is bound to the build: tampering stops the start with the reason
    again.close()
    sealed = next((root / "w2").glob("service-*.sealed"))
    blob = bytearray(sealed.read_bytes())
    blob[-1] ^= 1
    sealed.write_bytes(bytes(blob))
    with pytest.raises(EnclaveError, match="sealed service key does not unseal"):
        start("w2")


def test_peer_with_another_measurement_is_refused(pool) -> None:
    _, first, start, _ = pool
    other = start("other", "memory_budget_mib = 768")
    assert other.info["measurement"] != first.info["measurement"]
    offer = other.call("provision_offer")
    with pytest.raises(EnclaveError, match="peer measurement .* differs from this enclave's"):
        first.call("provision_grant", **offer)
    # ... and in the other direction: a new worker refuses a granter of another build
    other.service_init()
    fresh = start("fresh")
    offer = fresh.call("provision_offer")
    nonce = hashlib.sha256(offer["offer"].encode()).digest()
    forged_evidence = base64.b64encode(other.service_evidence(nonce)).decode()
    with pytest.raises(EnclaveError, match="peer measurement .* differs"):
        fresh.call("provision_accept", grant=base64.b64encode(b"x" * 64).decode(), evidence=forged_evidence)
    assert fresh.service_info()["provisioned"] is False


def test_debug_peer_is_refused_by_a_production_worker(pool) -> None:
    _, first, start, _ = pool
    debug = start("debug", "debug = true")
    with pytest.raises(EnclaveError, match="peer is a debug enclave and this one is not"):
        first.call("provision_grant", **debug.call("provision_offer"))


def test_tampered_evidence_and_unbound_offer_are_refused(pool, tmp_path: Path) -> None:
    _, first, start, _ = pool
    new = start("w-tamper")
    offer = new.call("provision_offer")
    outer = json.loads(base64.b64decode(offer["evidence"]))
    body = json.loads(base64.b64decode(outer["body"]))
    body["debug"] = False
    body["time"] += 1
    outer["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    tampered = base64.b64encode(json.dumps(outer).encode()).decode()
    with pytest.raises(EnclaveError, match="signature does not verify under the platform attestation key"):
        first.call("provision_grant", offer=offer["offer"], evidence=tampered)
    # genuine evidence, but for another key than the one offered (a host-in-the-middle's key)
    mitm = Identity.generate("mitm").public.to_line()
    with pytest.raises(EnclaveError, match="does not bind the offered key"):
        first.call("provision_grant", offer=mitm, evidence=offer["evidence"])
    # evidence from another (simulated) platform
    elsewhere = Home(tmp_path / "elsewhere")
    with elsewhere.start_enclave() as foreign:
        foreign_offer = foreign.call("provision_offer")
    with pytest.raises(EnclaveError, match="not certified by this simulated platform"):
        first.call("provision_grant", **foreign_offer)
    assert new.provision_from(first)["provisioned"] is True  # the genuine offer still works


def test_grant_replay_and_stale_grant_are_refused(pool) -> None:
    _, first, start, _ = pool
    a = start("w-replay-a")
    offer = a.call("provision_offer")
    grant = first.call("provision_grant", **offer)
    assert a.call("provision_accept", **grant)["provisioned"] is True
    with pytest.raises(EnclaveError, match="already holds service key"):
        a.call("provision_accept", **grant)  # replayed to the same worker
    b = start("w-replay-b")
    with pytest.raises(EnclaveError, match="no provisioning offer is pending"):
        b.call("provision_accept", **grant)
    b.call("provision_offer")
    with pytest.raises(EnclaveError, match="does not bind this worker's current offer"):
        b.call("provision_accept", **grant)  # replayed to another worker
    # a grant for an earlier offer of the same worker is stale once it made a new one
    old = first.call("provision_grant", **b.call("provision_offer"))
    current = b.call("provision_offer")
    with pytest.raises(EnclaveError, match="stale or replayed grant"):
        b.call("provision_accept", **old)
    assert b.call("provision_accept", **first.call("provision_grant", **current))["provisioned"] is True
    assert b.service_info()["service"] == first.service_info()["service"]
