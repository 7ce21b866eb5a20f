"""Multi-party tasks through a real `confide serve` with real enclave workers: the full flow on
SQLite and PostgreSQL, consent refused by the enclave, and faults (an enclave process killed mid-task,
the server killed and restarted, a corrupted blob, a tampered audit log)."""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from confide.client.function_seal import seal_function_source
from confide.client.manifest_build import build_manifest
from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError, IntegrityError
from confide.enclave.keys import PublicIdentity
from confide.host import audit
from confide.host.db import AuditEvent, Database, TaskRun, Worker, sqlite_url
from platform_support import (
    FAILING,
    PATIENTS,
    UPPER,
    Party,
    ServerProcess,
    approve,
    create_task,
    open_output,
    receipt_body,
    register_function,
    service_key,
    upload_dataset,
    wait_task,
)

DATA = PATIENTS


class World:
    """Alice owns the data; Bob owns the function, creates the task and receives the output with Carol."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.alice = Party(server.url, "alice").register()
        self.bob = Party(server.url, "bob").register()
        self.carol = Party(server.url, "carol").register()
        self.service = service_key(self.alice)
        self.function = register_function(self.bob, UPPER)

    def task(
        self,
        *,
        data: bytes = DATA,
        params: dict[str, Any] | None = None,
        function: mf.FunctionDescriptor | None = None,
    ) -> mf.Manifest:
        ds = upload_dataset(self.alice, data, self.service)
        return create_task(
            self.bob, self.service, function or self.function, ds, [self.bob, self.carol], params=params
        )

    def approve_all(self, manifest: mf.Manifest) -> None:
        approve(self.alice, manifest)
        approve(self.bob, manifest)

    def run(self, manifest: mf.Manifest) -> dict[str, Any]:
        return dict(self.bob.ok("POST", f"/v1/tasks/{manifest.task_id}/run", {}))

    def db(self) -> Database:
        return Database(self.server.db_url or sqlite_url(self.server.data_dir / "confide.db"))


def check_chain(events: list[dict[str, Any]]) -> None:
    """What a party checks on the events it sees: each hash, and links between consecutive events."""
    by_seq = {e["seq"]: e for e in events}
    for e in events:
        if audit.event_hash(e) != e["sha256"]:
            raise IntegrityError(f"audit event {e['seq']} does not match its hash")
        prev = by_seq.get(e["seq"] - 1)
        if prev is not None and e["prev_sha256"] != prev["sha256"]:
            raise IntegrityError(f"audit event {e['seq']} does not link to {prev['seq']}")


def full_flow(world: World) -> dict[str, Any]:
    manifest = world.task(params={"suffix": "!"})
    world.approve_all(manifest)
    assert world.run(manifest)["state"] == "queued"
    info = wait_task(world.bob, manifest.task_id)
    assert info["state"] == "succeeded", info
    body = receipt_body(info, world.service)
    assert body["status"] == "ok" and body["manifest_sha256"] == manifest.digest
    assert body["simulated"] is True and body["function_digest"] == world.function.digest
    outputs = {o["name"]: o for o in info["outputs"]}
    assert {o["name"]: o["sha256"] for o in body["outputs"]} == {"out": outputs["out"]["sha256"]}
    for who in (world.bob, world.carol):  # both recipients decrypt the same result
        assert open_output(who, outputs["out"]["sha256"]) == DATA.upper() + b"!"
    with pytest.raises(ConfideError):  # Alice is no recipient: she sees ciphertext only
        open_output(world.alice, outputs["out"]["sha256"])
    # the receipt names the worker's boot evidence, which the platform serves
    ev = world.alice.http.get(f"/v1/service/evidence/{body['evidence_sha256']}")
    assert ev.status_code == 200, ev.text
    events = world.bob.ok("GET", f"/v1/tasks/{manifest.task_id}/audit")["events"]
    assert [e["kind"] for e in events] == [
        "task.created",
        "task.approved",  # by the creator (create_task signs it: the enclave requires it)
        "task.approved",
        "task.approved",
        "task.queued",
        "task.running",
        "task.succeeded",
    ]
    check_chain(world.bob.ok("GET", "/v1/audit")["events"])
    head = world.bob.ok("GET", "/v1/audit/head")
    assert head["seq"] >= events[-1]["seq"]
    return info


# ---- one SQLite server for most of the module -------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server = ServerProcess(tmp_path_factory.mktemp("tasks") / "data", workers=2, lease_seconds=4).start()
    yield World(server)
    server.stop()


def test_full_task_on_sqlite(world: World) -> None:
    info = full_flow(world)
    assert info["attempts"] == 1 and [h["status"] for h in info["history"]] == ["ok"]
    log = world.server.log()
    assert f"task {info['task_id']}: claimed by" in log and f"task {info['task_id']}: succeeded" in log


def test_run_before_all_approvals_is_refused_by_the_enclave(world: World) -> None:
    manifest = world.task()
    approve(world.bob, manifest)  # the data owner has not approved
    world.run(manifest)
    info = wait_task(world.bob, manifest.task_id)
    assert (info["state"], info["category"]) == ("failed", "refused")
    body = receipt_body(info, world.service)  # signed by the service key
    assert body["status"] == "error" and body["error"]["check"] == "approval"
    assert world.alice.fp in body["error"]["message"] and "alice" in body["error"]["message"]
    assert info["outputs"] == []
    kinds = [e["kind"] for e in world.alice.ok("GET", f"/v1/tasks/{manifest.task_id}/audit")["events"]]
    assert kinds[-1] == "task.failed"
    # once Alice approves, the failed task can be queued again; each run's receipt is kept
    approve(world.alice, manifest)
    world.run(manifest)
    info = wait_task(world.alice, manifest.task_id)
    assert info["state"] == "succeeded" and info["runs"] == 2
    assert [h["status"] for h in info["history"]] == ["error", "ok"]
    assert all(h["receipt"] for h in info["history"])
    r = world.bob.call("POST", f"/v1/tasks/{manifest.task_id}/run", {})
    assert r.status_code == 409  # succeeded: not again


def test_a_failing_function_seals_its_error_text(world: World) -> None:
    fn = register_function(world.bob, FAILING, name="failing")
    manifest = world.task(function=fn)
    world.approve_all(manifest)
    world.run(manifest)
    info = wait_task(world.bob, manifest.task_id)
    assert info["state"] == "failed" and info["category"] not in (None, "ok", "refused")
    body = receipt_body(info, world.service)
    assert body["error"]["check"] == "run" and DATA.decode() not in str(info)  # the host never sees the text
    err = {o["name"]: o["sha256"] for o in info["outputs"]}["_error"]
    assert b"the function broke: patient" in open_output(world.carol, err)


def test_corrupted_blob_fails_the_task_naming_the_dataset(world: World) -> None:
    manifest = world.task()
    world.approve_all(manifest)
    sha = manifest.inputs[0].ciphertext_sha256
    path = world.server.data_dir / "blobs" / "sha256" / sha[:2] / sha[2:4] / sha
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x40
    path.chmod(0o600)
    path.write_bytes(bytes(blob))
    world.run(manifest)
    info = wait_task(world.bob, manifest.task_id)
    assert info["state"] == "failed"
    body = receipt_body(info, world.service)
    assert body["error"]["check"] == "input"
    assert manifest.inputs[0].dataset_id in body["error"]["message"]


def test_missing_blob_fails_on_the_platform_naming_the_dataset(world: World) -> None:
    manifest = world.task(data=b"soon gone\n")
    world.approve_all(manifest)
    sha = manifest.inputs[0].ciphertext_sha256
    (world.server.data_dir / "blobs" / "sha256" / sha[:2] / sha[2:4] / sha).unlink()
    world.run(manifest)
    info = wait_task(world.bob, manifest.task_id)
    assert (info["state"], info["category"], info["receipt"]) == ("failed", "platform", None)
    assert manifest.inputs[0].dataset_id in info["message"] and "missing" in info["message"]


def test_confidential_function_source_travels_sealed(world: World) -> None:
    source = UPPER + "\n# the owner's secret sauce\n"
    desc = mf.function_descriptor(
        name="secret-upper",
        source=source,
        owner=world.bob.public,
        description="upper-cases its input",
        inputs=["data"],
        outputs=["out"],
    )
    sealed = seal_function_source(source, descriptor=desc, service=world.service)
    world.bob.ok(
        "POST",
        "/v1/functions",
        {"descriptor": desc.to_json(), "sealed_source": base64.b64encode(sealed).decode()},
    )
    shown = world.alice.ok("GET", f"/v1/functions/{desc.digest}")
    assert shown["confidential"] is True and "source" not in shown and "sealed_source" not in shown
    ds = upload_dataset(world.alice, DATA, world.service)
    manifest = build_manifest(
        service=world.service,
        creator=world.bob.public,
        function=desc,
        confidential=True,
        inputs=[ds.task_input("data")],
        outputs=[mf.TaskOutput("out", (world.carol.fp,), 1 << 20)],
        participants={"alice": world.alice.public, "bob": world.bob.public, "carol": world.carol.public},
    )
    world.bob.ok("POST", "/v1/tasks", {"manifest": manifest.to_json()})
    world.approve_all(manifest)
    world.run(manifest)
    info = wait_task(world.carol, manifest.task_id)
    assert info["state"] == "succeeded", info
    assert open_output(world.carol, info["outputs"][0]["sha256"]) == DATA.upper()


def _worker_pid_running(world: World, task_id: str, timeout: float = 30) -> int:
    db = world.db()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with db.transaction() as s:
                run = s.execute(
                    select(TaskRun).where(TaskRun.task_id == task_id, TaskRun.status == "running")
                ).scalar()
                if run is not None:
                    worker = s.get(Worker, run.worker.split("@")[0])
                    if worker is not None and worker.pid:
                        return worker.pid
            time.sleep(0.05)
    finally:
        db.dispose()
    raise AssertionError(f"task {task_id} never started running")


def test_enclave_killed_mid_task_is_retried_with_the_same_result(world: World) -> None:
    manifest = world.task(params={"sleep": 3, "suffix": "?"})
    world.approve_all(manifest)
    world.run(manifest)
    pid = _worker_pid_running(world, manifest.task_id)
    time.sleep(0.5)  # the sandboxed function is sleeping now
    os.kill(pid, signal.SIGKILL)
    info = wait_task(world.bob, manifest.task_id, timeout=90)
    assert info["state"] == "succeeded", info
    assert info["attempts"] == 2
    assert [h["status"] for h in info["history"]] == ["worker-lost", "ok"]
    out = {o["name"]: o["sha256"] for o in info["outputs"]}["out"]
    assert open_output(world.carol, out) == DATA.upper() + b"?"
    kinds = [e["kind"] for e in world.bob.ok("GET", f"/v1/tasks/{manifest.task_id}/audit")["events"]]
    assert "task.requeued" in kinds and kinds[-1] == "task.succeeded"
    world.server.wait_workers(2)  # the killed worker came back (restarted, service key unsealed)


def test_tampering_with_a_stored_audit_event_is_detected(world: World) -> None:
    events = world.alice.ok("GET", "/v1/audit")["events"]
    check_chain(events)
    victim = events[len(events) // 2]
    db = world.db()
    try:
        with db.transaction() as s:
            assert audit.verify_log(s) >= len(events)
            s.execute(update(AuditEvent).where(AuditEvent.seq == victim["seq"]).values(actor="mallory"))
        with db.transaction() as s, pytest.raises(IntegrityError, match=f"audit event {victim['seq']}"):
            audit.verify_log(s)
    finally:
        db.dispose()
    with pytest.raises(IntegrityError, match=f"event {victim['seq']}"):
        check_chain(world.alice.ok("GET", "/v1/audit")["events"])


# ---- the server killed and restarted -------------------------------------------------------------------


def test_server_killed_and_restarted_runs_the_queued_tasks(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", workers=1, lease_seconds=3).start()
    try:
        world = World(server)
        slow = world.task(params={"sleep": 2})
        fast = world.task()
        for m in (slow, fast):
            world.approve_all(m)
        world.run(slow)
        _worker_pid_running(world, slow.task_id)
        world.run(fast)  # queued behind the slow one (one worker)
        replay = world.alice.signed("GET", f"/v1/tasks/{slow.task_id}")
        assert world.alice.http.send(replay).status_code == 200
        server.kill()
        with pytest.raises(Exception):  # noqa: B017 - it is down
            world.alice.http.get("/v1/health")
        server.start()
        # nonces live in the database: the replay is refused by the restarted server too
        r = world.alice.http.send(replay)
        assert r.status_code == 401 and "replay" in r.json()["error"]["message"]
        for m in (slow, fast):
            info = wait_task(world.bob, m.task_id, timeout=90)
            assert info["state"] == "succeeded", info
            out = {o["name"]: o["sha256"] for o in info["outputs"]}["out"]
            assert open_output(world.bob, out) == DATA.upper()
        slow_info = world.bob.ok("GET", f"/v1/tasks/{slow.task_id}")
        assert [h["status"] for h in slow_info["history"]] == ["worker-lost", "ok"]
        assert "requeued 1 task(s) left running" in server.log() or "lease expired" in server.log()
    finally:
        server.stop()


# ---- PostgreSQL -------------------------------------------------------------------------------------------


def test_full_task_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    server = ServerProcess(tmp_path / "data", postgres_url, workers=2).start()
    try:
        world = World(server)
        assert "database: PostgreSQL database" in server.log()
        full_flow(world)
        db = world.db()
        try:
            with db.transaction() as s:
                assert audit.verify_log(s) > 0
        finally:
            db.dispose()
        assert PublicIdentity.from_line(server.wait_workers(2)["service"]) == world.service
    finally:
        server.stop()
