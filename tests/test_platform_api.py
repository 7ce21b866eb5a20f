"""The platform's HTTP API against a real `confide serve` on loopback (SQLite, two enclave workers):
service and evidence, registration, authentication failures, validation, blobs and authorization."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from confide.attest.anchors import load_trust_anchors
from confide.client import api_auth
from confide.client.dataset_keys import wrap_dataset_key
from confide.client.local import check_attestation
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.policy import Policy
from confide.enclave import manifest as mf
from confide.enclave.keys import Identity, PublicIdentity
from platform_support import (
    UPPER,
    Party,
    ServerProcess,
    create_task,
    register_function,
    service_key,
    upload_dataset,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("api") / "data", workers=2, extra_args=("--max-blob-mib", "1")
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server: ServerProcess) -> Party:
    return Party(server.url, "alice").register()


@pytest.fixture(scope="module")
def bob(server: ServerProcess) -> Party:
    return Party(server.url, "bob").register()


@pytest.fixture(scope="module")
def carol(server: ServerProcess) -> Party:
    return Party(server.url, "carol").register()


def error_of(r: httpx.Response) -> dict[str, str]:
    assert "Traceback" not in r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "where"}, body
    return dict(body["error"])


# ---- service ------------------------------------------------------------------------------------------


def test_health_openapi_and_service(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/v1/health").json() == {"ok": True}
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in (
        "/v1/service",
        "/v1/service/evidence",
        "/v1/service/evidence/{sha256}",
        "/v1/parties",
        "/v1/parties/{fingerprint}",
        "/v1/blobs",
        "/v1/blobs/{sha256}",
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/functions",
        "/v1/functions/{digest}",
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/approvals",
        "/v1/tasks/{task_id}/run",
        "/v1/tasks/{task_id}/reject",
        "/v1/platform",
        "/v1/tasks/{task_id}/audit",
        "/v1/audit",
        "/v1/audit/head",
    ):
        assert path in paths, path
    info = httpx.get(f"{server.url}/v1/service").json()
    assert info["backend"] == "sim" and info["simulated"] is True
    assert [w["ready"] for w in info["workers"]] == [True, True]
    assert PublicIdentity.from_line(info["service"]).fingerprint == info["fingerprint"]
    log = server.log()
    assert "created the service key" in log and "(mutual attestation)" in log


def test_service_evidence_binds_the_service_key_and_a_fresh_nonce(server: ServerProcess) -> None:
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    info = httpx.get(f"{server.url}/v1/service").json()
    policy = Policy(backends=("sim",), measurements=(info["measurement"],), allow_simulation=True)
    seen = set()
    for _ in range(4):  # whichever worker answers, it attests the same service key
        nonce = os.urandom(32)
        reply = httpx.post(f"{server.url}/v1/service/evidence", json={"nonce": nonce.hex()}).json()
        att = check_attestation(
            base64.b64decode(reply["evidence"]), nonce, policy, anchors, keys_line=reply["service"]
        )
        seen.add(att.enclave.fingerprint)
    assert seen == {info["fingerprint"]}
    r = httpx.post(f"{server.url}/v1/service/evidence", json={"nonce": "zz"})
    assert r.status_code == 422 and error_of(r)["where"] == "body.nonce"
    r = httpx.get(f"{server.url}/v1/service/evidence/{'0' * 64}")
    assert r.status_code == 404


# ---- registration and authentication ---------------------------------------------------------------------


def test_registration(server: ServerProcess) -> None:
    ident = Identity.generate("dave")
    line = ident.public.to_line()
    body = {"name": "dave", "identity": line, "signature": api_auth.sign_registration(ident, "dave")}
    r = httpx.post(f"{server.url}/v1/parties", json=body)
    assert r.status_code == 201 and r.json() == {"fingerprint": ident.fingerprint, "name": "dave"}
    assert httpx.post(f"{server.url}/v1/parties", json=body).status_code == 200  # idempotent
    other = {**body, "name": "eve", "signature": api_auth.sign_registration(ident, "eve")}
    r = httpx.post(f"{server.url}/v1/parties", json=other)
    assert r.status_code == 409 and "registered as 'dave'" in error_of(r)["message"]
    mallory = Identity.generate("mallory")  # cannot register someone else's keys
    r = httpx.post(
        f"{server.url}/v1/parties", json={**body, "signature": api_auth.sign_registration(mallory, "dave")}
    )
    assert r.status_code == 400 and "does not verify" in error_of(r)["message"]
    r = httpx.post(f"{server.url}/v1/parties", json={**body, "admin": True})
    assert r.status_code == 422 and error_of(r)["where"] == "body.admin"
    dave = Party(server.url, "dave")
    dave.identity = ident
    got = dave.ok("GET", f"/v1/parties/{ident.fingerprint}")
    assert got == {"fingerprint": ident.fingerprint, "name": "dave", "identity": line}


def test_authentication_failures_are_401_with_a_reason(server: ServerProcess, alice: Party) -> None:
    r = httpx.get(f"{server.url}/v1/tasks")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Confide-Signature"
    assert error_of(r) == {"code": "unauthenticated", "message": "missing header", "where": "X-Confide-Party"}

    req = alice.signed("GET", "/v1/tasks")
    req.headers["X-Confide-Signature"] = base64.b64encode(bytes(64)).decode()
    r = alice.http.send(req)
    assert r.status_code == 401 and "does not verify" in error_of(r)["message"]

    stale = api_auth.sign_request(
        alice.identity, "GET", "/v1/tasks", b"", audience=alice.audience, now=time.time() - 400
    )
    r = alice.http.get("/v1/tasks", headers=stale)
    assert r.status_code == 401 and "behind the server clock" in error_of(r)["message"]

    req = alice.signed("GET", "/v1/tasks")
    assert alice.http.send(req).status_code == 200
    r = alice.http.send(req)  # the very same request again
    assert r.status_code == 401 and "replay" in error_of(r)["message"]
    assert error_of(r)["where"] == "X-Confide-Nonce"

    stranger = Party(server.url, "stranger")  # never registered
    r = stranger.call("GET", "/v1/tasks")
    assert r.status_code == 401 and "unknown party" in error_of(r)["message"]

    # the signature covers the path: a request signed for one object cannot fetch another
    req = alice.signed("GET", "/v1/datasets")
    r = alice.http.send(alice.http.build_request("GET", "/v1/tasks", headers=req.headers))
    assert r.status_code == 401


def test_blob_upload_is_authenticated_over_the_body_digest(server: ServerProcess, alice: Party) -> None:
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    r = alice.http.put("/v1/blobs", content=data)
    assert r.status_code == 401 and error_of(r)["where"] == "X-Confide-Party"
    # a declaration of other content: the body differs from it, refused, nothing published
    headers = alice.upload_headers(data[:-1] + b"!")
    r = alice.http.put("/v1/blobs", content=data[:-1] + b"?", headers=headers)
    assert r.status_code == 400 and "signed declaration" in error_of(r)["message"]
    assert not (server.data_dir / "blobs" / "sha256" / sha[:2] / sha[2:4] / sha).exists()
    assert alice.put_blob(data) == {"sha256": sha, "size": len(data)}
    stored = server.data_dir / "blobs" / "sha256" / sha[:2] / sha[2:4] / sha
    assert stored.read_bytes() == data
    assert not list((server.data_dir / "blobs" / "tmp").iterdir())  # no temporary file left
    assert alice.get_blob(sha) == data


def test_blob_over_the_cap_is_refused_while_streaming(server: ServerProcess, alice: Party) -> None:
    data = os.urandom((1 << 20) + 1)
    r = alice.http.put("/v1/blobs", content=data, headers=alice.upload_headers(data))
    assert r.status_code == 413 and error_of(r)["code"] == "too-large"
    sha = hashlib.sha256(data).hexdigest()
    assert not (server.data_dir / "blobs" / "sha256" / sha[:2] / sha[2:4] / sha).exists()
    assert not list((server.data_dir / "blobs" / "tmp").iterdir())
    assert alice.put_blob(data[: 1 << 20])["size"] == 1 << 20  # exactly the cap is fine


# ---- validation ------------------------------------------------------------------------------------------


def test_requests_are_validated_strictly(server: ServerProcess, alice: Party) -> None:
    good = {
        "dataset_id": "0" * 32,
        "name": "d",
        "schema": {},
        "rows": 1,
        "ciphertext_sha256": "0" * 64,
        "key_envelope": {},
    }
    r = alice.call("POST", "/v1/datasets", {**good, "extra": 1})
    assert r.status_code == 422 and error_of(r)["where"] == "body.extra"
    r = alice.call("POST", "/v1/datasets", {**good, "rows": "1"})  # strict: no coercion
    assert r.status_code == 422 and error_of(r)["where"] == "body.rows"
    r = alice.call("POST", "/v1/datasets", {**good, "dataset_id": "XYZ"})
    assert r.status_code == 422 and error_of(r)["where"] == "body.dataset_id"
    r = alice.call("POST", "/v1/datasets", good)  # well-formed, but the envelope is not one
    assert r.status_code == 400 and error_of(r)["where"] == "key_envelope"
    raw = b'{"manifest": {}, "manifest": {}}'
    headers = {
        **api_auth.sign_request(alice.identity, "POST", "/v1/tasks", raw, audience=alice.audience),
        "content-type": "application/json",
    }
    r = alice.http.post("/v1/tasks", content=raw, headers=headers)
    assert r.status_code == 400 and "duplicate key" in error_of(r)["message"]
    big = b"x" * (5 << 20)
    r = alice.http.post("/v1/tasks", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "too-large"
    r = alice.call("GET", "/v1/tasks/not-a-task-id")
    assert r.status_code == 422 and error_of(r)["where"] == "path.task_id"
    r = alice.call("GET", "/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["code"] == "not-found"
    r = alice.call("DELETE", "/v1/tasks")
    assert r.status_code == 405


# ---- authorization ---------------------------------------------------------------------------------------


def test_others_objects_are_404(server: ServerProcess, alice: Party, bob: Party, carol: Party) -> None:
    service = service_key(alice)
    ds = upload_dataset(alice, b"alice's rows\n", service)
    for who in (bob, carol):
        # the id is a capability the owner shares: metadata yes, the key envelope no
        meta = who.ok("GET", f"/v1/datasets/{ds.dataset_id}")
        assert meta["owner"] == alice.fp and "key_envelope" not in meta
        assert ds.dataset_id not in {d["dataset_id"] for d in who.ok("GET", "/v1/datasets")["datasets"]}
        r = who.call("GET", f"/v1/blobs/{ds.ciphertext_sha256}")
        missing = who.call("GET", f"/v1/blobs/{'0' * 64}")
        assert r.status_code == missing.status_code == 404
        same = error_of(missing)["message"].replace("0" * 64, ds.ciphertext_sha256)
        assert error_of(r)["message"] == same  # no hint that it exists
    mine = alice.ok("GET", f"/v1/datasets/{ds.dataset_id}")
    assert mine["key_envelope"]["dataset_id"] == ds.dataset_id and mine["owner"] == alice.fp

    # Bob cannot register a dataset on Alice's blob, nor in Alice's name
    env = wrap_dataset_key(
        os.urandom(32),
        dataset_id="1" * 32,
        owner=bob.public,
        service=service,
        ciphertext_sha256=ds.ciphertext_sha256,
    )
    body = {
        "dataset_id": "1" * 32,
        "name": "x",
        "schema": {},
        "rows": None,
        "ciphertext_sha256": ds.ciphertext_sha256,
        "key_envelope": env,
    }
    r = bob.call("POST", "/v1/datasets", body)
    assert r.status_code == 400 and error_of(r)["where"] == "ciphertext_sha256"
    env_a = {**env, "owner": alice.fp}
    r = bob.call("POST", "/v1/datasets", {**body, "key_envelope": env_a})
    assert r.status_code == 400 and error_of(r)["where"] == "key_envelope.owner"

    # functions: only their owner registers them
    desc = mf.function_descriptor(name="f", source=UPPER, owner=alice.public, description="", outputs=["out"])
    r = bob.call("POST", "/v1/functions", {"descriptor": desc.to_json(), "source": UPPER})
    assert r.status_code == 403
    r = alice.call("POST", "/v1/functions", {"descriptor": desc.to_json(), "source": UPPER + "#"})
    assert r.status_code == 400 and "SHA-256" in error_of(r)["message"]

    # a task of Bob's on Alice's data: Alice and Bob see it, Carol does not
    fn = register_function(bob, UPPER)
    manifest = create_task(bob, service, fn, ds, [bob])
    tid = manifest.task_id
    assert bob.ok("GET", f"/v1/tasks/{tid}")["state"] == "created"
    assert alice.ok("GET", f"/v1/tasks/{tid}")["manifest_sha256"] == manifest.digest
    assert ds.dataset_id in {d["dataset_id"] for d in bob.ok("GET", "/v1/datasets")["datasets"]}
    # naming Alice's dataset in a task grants Bob nothing until Alice approves (tests/test_platform_hardening.py)
    r = bob.call("GET", f"/v1/blobs/{ds.ciphertext_sha256}")
    assert r.status_code == 404 and error_of(r)["code"] == "not-found"
    missing_task = carol.call("GET", f"/v1/tasks/{'0' * 32}")
    for method, path, body_ in (
        ("GET", f"/v1/tasks/{tid}", None),
        ("GET", f"/v1/tasks/{tid}/audit", None),
        ("POST", f"/v1/tasks/{tid}/run", {}),
        ("POST", f"/v1/tasks/{tid}/approvals", {"approval": sign_approval(carol.identity, manifest)}),
    ):
        r = carol.call(method, path, body_)
        assert r.status_code == 404, (method, path, r.text)
        assert error_of(r)["message"] == error_of(missing_task)["message"].replace("0" * 32, tid)
    assert tid not in {t["task_id"] for t in carol.ok("GET", "/v1/tasks")["tasks"]}
    assert not [e for e in carol.ok("GET", "/v1/audit")["events"] if e["task_id"] == tid]
    # approvals only in one's own name; manifests only by their creator
    r = alice.call("POST", f"/v1/tasks/{tid}/approvals", {"approval": sign_approval(bob.identity, manifest)})
    assert r.status_code == 403
    r = alice.call("POST", "/v1/tasks", {"manifest": manifest.to_json()})
    assert r.status_code == 403
    r = bob.call("POST", "/v1/tasks", {"manifest": manifest.to_json()})
    assert r.status_code == 409


def test_task_for_another_service_or_unknown_data_is_refused(server: ServerProcess, alice: Party) -> None:
    service = service_key(alice)
    ds = upload_dataset(alice, b"rows\n", service)
    fn = register_function(alice, UPPER, name="upper-a")
    other_service = Identity.generate("other").public
    manifest = build_manifest(
        service=other_service,
        creator=alice.public,
        function=fn,
        inputs=[ds.task_input("data")],
        outputs=[mf.TaskOutput("out", (alice.fp,), 1 << 20)],
        participants={"alice": alice.public},
    )
    r = alice.call("POST", "/v1/tasks", {"manifest": manifest.to_json()})
    assert r.status_code == 400 and error_of(r)["where"] == "manifest.service"
    ghost = mf.TaskInput("data", "e" * 32, alice.fp, "e" * 64)
    manifest = build_manifest(
        service=service,
        creator=alice.public,
        function=fn,
        inputs=[ghost],
        outputs=[mf.TaskOutput("out", (alice.fp,), 1 << 20)],
        participants={"alice": alice.public},
    )
    r = alice.call("POST", "/v1/tasks", {"manifest": manifest.to_json()})
    assert r.status_code == 400 and error_of(r)["where"] == "manifest.inputs.data"
    r = alice.call("POST", "/v1/tasks", {"manifest": {"format": "confide-task-v1"}})
    assert r.status_code == 400 and "missing field" in error_of(r)["message"]


def test_server_log_says_what_it_does(server: ServerProcess) -> None:
    log = server.log()
    for line in ("database: SQLite file", "listening on http://127.0.0.1", "enclave started", "party "):
        assert line in log, line
    assert "Traceback" not in log


def _serve_refused(tmp_path: Path, *args: str) -> str:
    """`confide serve --data TMP --workers 0 ARGS` that must fail at once: its stderr."""
    cmd = [sys.executable, "-m", "confide.cli.main", "serve", "--data", str(tmp_path), "--workers", "0"]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "error: " in result.stderr and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_serve_refuses_a_bad_database_with_one_clear_line(tmp_path: Path) -> None:
    for url, reason in (
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("postgresql://nobody:secret@127.0.0.1:1/none", "cannot open the database"),
    ):
        err = _serve_refused(tmp_path, "--db", url)
        assert "(--db" in err and reason in err and "secret" not in err


def test_serve_refuses_bad_flow_agent_files_with_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "agent.txt"
    bad.write_text("ready nonsense\n")
    spark = ("--flow-engine", "spark", "--flow-agent")
    for args, where, reason in (
        (("--flow-agent", str(bad)), "--flow-agent", "node agents are for --flow-engine spark"),
        ((*spark, str(bad)), f"--flow-agent {bad}", "no 'evidence ...' line"),
        ((*spark, str(tmp_path / "none")), "--flow-agent", "cannot read"),
    ):
        err = _serve_refused(tmp_path, *args)
        assert f"({where}" in err and reason in err, err


def test_api_only_server_without_workers(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", workers=0).start(wait_workers=False)
    try:
        assert httpx.get(f"{server.url}/v1/service").json()["workers"] == []
        r = httpx.post(f"{server.url}/v1/service/evidence", json={"nonce": ""})
        assert r.status_code == 503 and error_of(r)["code"] == "unavailable"
    finally:
        server.stop()
