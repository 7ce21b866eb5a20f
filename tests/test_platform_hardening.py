"""Security hardening of the platform (issue 12, items 5, 6 and 7a), each property played by the
adversary against a real `confide serve` on loopback (SQLite, no enclave workers: none is needed):

* no work for unauthenticated clients: an unsigned or mis-signed upload is refused with 401 before
  a byte of its body is sent, and nothing in the data directory changes; a body that differs from
  its signed declaration is refused and nothing is kept; over quota 413, over the upload slots 429
  (the JSON error shape); a client that sends a few bytes a second is cut off (408);
* ciphertext only to those its owner approved: naming another party's dataset in a task grants
  nothing; the owner may reject the task (it cannot run); after the owner approves, participants
  may download;
* a request signed for one platform is refused by another where the same key is registered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import pytest

from confide.client import api_auth
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.transport import ApiError as TransportApiError
from confide.client.transport import Transport
from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity
from platform_support import (
    PATIENTS,
    UPPER,
    Party,
    ServerProcess,
    approve,
    create_task,
    register_function,
    upload_dataset,
)

BIG = 50 << 20  # what a hostile client claims it will send
SOCKET_TIMEOUT_S = 30.0  # only a bound on a test that would otherwise hang (the old server did)
SERVICE = Identity.generate("stand-in service").public  # no workers: the platform checks no service key


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("hardening") / "data",
        workers=0,
        extra_args=(
            "--max-blob-mib", "1",
            "--quota-mib", "1",
            "--max-uploads", "2",
            "--max-uploads-per-party", "1",
            "--upload-timeout", "30",
        ),
    ).start(wait_workers=False)  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Another platform, one that cuts slow clients off quickly."""
    srv = ServerProcess(
        tmp_path_factory.mktemp("impatient") / "data",
        workers=0,
        extra_args=("--upload-timeout", "0.5", "--upload-min-kib-per-s", "64"),
    ).start(wait_workers=False)
    yield srv
    srv.stop()


def party(srv: ServerProcess, name: str) -> Party:
    p = Party(srv.url, name).register()
    assert p.audience  # fetched now, not in the middle of a test that watches the data directory
    return p


def error_of(status: int, body: bytes) -> dict[str, str]:
    assert b"Traceback" not in body and status >= 400, (status, body)
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and set(parsed["error"]) == {"code", "message", "where"}, parsed
    return dict(parsed["error"])


def snapshot(root: Path) -> dict[str, int]:
    """Every file under the data directory and its size (the blob store, its temporary files, the
    SQLite database and its WAL)."""
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def blob_path(srv: ServerProcess, sha: str) -> Path:
    return srv.data_dir / "blobs" / "sha256" / sha[:2] / sha[2:4] / sha


def temporary_files(srv: ServerProcess) -> list[Path]:
    return list((srv.data_dir / "blobs" / "tmp").iterdir())


# ---- a raw HTTP/1.1 client: send the headers, send (part of) a body when we choose, read the answer ---------


class RawRequest:
    def __init__(self, srv: ServerProcess, method: str, target: str, headers: dict[str, str]) -> None:
        url = urlsplit(srv.url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=SOCKET_TIMEOUT_S)
        self.conn = h11.Connection(h11.CLIENT)
        head = [("Host", url.netloc), *headers.items()]
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=target, headers=head)))

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.conn.send(h11.Data(data=data)))

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The answer, read while (part of) the body is still unsent."""
        status, headers, body = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, headers, body

    def close(self) -> None:
        self.sock.close()


def upload_headers(who: Party, sha256: str, length: int, **changes: str) -> dict[str, str]:
    headers = api_auth.sign_request(
        who.identity, "PUT", "/v1/blobs", b"", audience=who.audience, body_sha256=sha256, body_length=length
    )
    headers.update({"Content-Type": "application/octet-stream", "Content-Length": str(length)})
    headers.update(changes)
    return headers


# ---- 5. no work for unauthenticated clients ----------------------------------------------------------------


def test_unsigned_and_mis_signed_uploads_get_401_before_the_body_and_nothing_is_written(
    server: ServerProcess,
) -> None:
    alice = party(server, "alice")
    before = snapshot(server.data_dir)
    claimed = hashlib.sha256(b"x").hexdigest()
    good = upload_headers(alice, claimed, BIG)
    forged = base64.b64encode(bytes(64)).decode()
    mallory = Identity.generate("mallory")  # never registered
    cases: list[tuple[dict[str, str], str, str]] = [
        ({"Content-Length": str(BIG)}, "X-Confide-Party", "missing header"),  # unsigned
        ({**good, "X-Confide-Signature": forged}, "X-Confide-Signature", "does not verify"),
        # a declaration other than the signed one (a longer body than Alice signed for)
        (
            {**good, "X-Confide-Content-Length": str(BIG + 1), "Content-Length": str(BIG + 1)},
            "X-Confide-Signature",
            "does not verify",
        ),
        ({**good, "X-Confide-Party": mallory.fingerprint}, "X-Confide-Party", "unknown party"),
        (
            {k: v for k, v in good.items() if k != "X-Confide-Content-SHA256"},
            "X-Confide-Content-SHA256",
            "missing header",
        ),
    ]
    for headers, where, reason in cases:
        raw = RawRequest(server, "PUT", "/v1/blobs", headers)
        try:
            status, response_headers, body = raw.response()  # not one byte of the 50 MiB sent
        finally:
            raw.close()
        err = error_of(status, body)
        assert status == 401 and err["code"] == "unauthenticated", (status, body)
        assert err["where"] == where and reason in err["message"], err
        assert response_headers["connection"] == "close"  # the body is not drained either
    assert snapshot(server.data_dir) == before  # no temporary file, no blob, the database unchanged
    assert not temporary_files(server)


def test_a_body_unlike_its_signed_declaration_is_refused_and_nothing_is_kept(server: ServerProcess) -> None:
    alice = party(server, "alice-2")
    data = os.urandom(200_000)
    sha = hashlib.sha256(data).hexdigest()
    other = os.urandom(200_000)

    def chunked(payload: bytes) -> Iterator[bytes]:  # no Content-Length: the length is not framed
        yield from (payload[i : i + 65536] for i in range(0, len(payload), 65536))

    refusals = [
        (other, "has SHA-256", "body"),  # the same length, other bytes
        (data + b"tail", "longer than the signed declaration", "body"),
        (data[:-1], "the signed declaration says 200000", "body"),
    ]
    for payload, reason, where in refusals:
        fresh = {k: v for k, v in upload_headers(alice, sha, len(data)).items() if k != "Content-Length"}
        r = alice.http.put("/v1/blobs", content=chunked(payload), headers=fresh)
        assert r.status_code == 400, (reason, r.status_code, r.text)
        err = r.json()["error"]
        assert err["where"] == where and reason in err["message"], err
    # an HTTP length other than the signed one is refused before the body is read
    r = alice.http.put(
        "/v1/blobs",
        content=data + b"x",
        headers={**upload_headers(alice, sha, len(data)), "Content-Length": str(len(data) + 1)},
    )
    assert r.status_code == 400 and r.json()["error"]["where"] == "Content-Length", r.text
    for digest in (sha, hashlib.sha256(other).hexdigest(), hashlib.sha256(data + b"tail").hexdigest()):
        assert not blob_path(server, digest).exists()
    assert not temporary_files(server)
    assert alice.put_blob(data)  # the declared body itself goes through == {"sha256": sha, "size": len(data)}


def test_over_quota_is_413_and_the_same_bytes_again_cost_nothing(server: ServerProcess) -> None:
    alice = party(server, "alice-3")  # quota 1 MiB
    first = os.urandom(700_000)
    assert alice.put_blob(first)["size"] == len(first)
    second = os.urandom(400_000)
    r = alice.http.put("/v1/blobs", content=second, headers=alice.upload_headers(second))
    err = error_of(r.status_code, r.content)
    assert r.status_code == 413 and err["code"] == "quota-exceeded", r.text
    assert "700000 bytes stored" in err["message"] and err["where"] == "X-Confide-Content-Length"
    assert not blob_path(server, hashlib.sha256(second).hexdigest()).exists()
    assert alice.put_blob(first)["size"] == len(first)  # already hers: no more storage
    assert alice.put_blob(second[:300_000])["size"] == 300_000  # what is left of the quota
    bob = party(server, "bob-3")  # another party's quota is its own
    assert bob.put_blob(second)["size"] == len(second)
    big = os.urandom((1 << 20) + 1)  # over the blob cap: refused from the declaration
    r = bob.http.put("/v1/blobs", content=big, headers=bob.upload_headers(big))
    assert r.status_code == 413 and error_of(r.status_code, r.content)["code"] == "too-large"
    assert not temporary_files(server)


def _wait_for_temporary_files(srv: ServerProcess, n: int) -> None:
    """Until `n` uploads are streaming (each has its temporary file, made after every check)."""
    deadline = time.monotonic() + SOCKET_TIMEOUT_S
    while len(temporary_files(srv)) != n:
        assert time.monotonic() < deadline, f"expected {n} uploads in progress, see {temporary_files(srv)}"
        time.sleep(0.02)


def test_uploads_over_the_concurrency_limits_are_429(server: ServerProcess) -> None:
    a, b, c = party(server, "up-a"), party(server, "up-b"), party(server, "up-c")  # 2 in all, 1 each
    size = 100_000
    data = os.urandom(size)
    holders: list[RawRequest] = []
    try:
        holders.append(
            RawRequest(server, "PUT", "/v1/blobs", upload_headers(a, hashlib.sha256(data).hexdigest(), size))
        )
        holders[-1].send(data[:1000])  # and then nothing more, for now
        _wait_for_temporary_files(server, 1)
        small = os.urandom(10)
        r = a.http.put("/v1/blobs", content=small, headers=a.upload_headers(small))
        err = error_of(r.status_code, r.content)
        assert r.status_code == 429 and err["code"] == "too-many-uploads", r.text
        assert err["where"] == "X-Confide-Party" and "per party" in err["message"]
        assert r.headers["retry-after"] == "1"
        holders.append(
            RawRequest(server, "PUT", "/v1/blobs", upload_headers(b, hashlib.sha256(data).hexdigest(), size))
        )
        holders[-1].send(data[:1000])
        _wait_for_temporary_files(server, 2)
        r = c.http.put("/v1/blobs", content=small, headers=c.upload_headers(small))
        err = error_of(r.status_code, r.content)
        assert r.status_code == 429 and err["where"] == "PUT /v1/blobs" and "limit 2" in err["message"]
        holders[0].send(data[1000:])  # the first one finishes
        status, _, body = holders[0].response()
        assert status == 201, body
    finally:
        for raw in holders:
            raw.close()  # the second one goes away: refused, its temporary file removed
    _wait_for_temporary_files(server, 0)
    assert c.put_blob(small)["size"] == 10  # slots free again


def test_a_slow_client_is_cut_off(impatient: ServerProcess) -> None:
    """A few bytes a second: the upload (limit 0.5 s + size at 64 KiB/s) and a JSON body (limit 0.5 s
    per chunk, 0.5 s + 4 MiB at 64 KiB/s in all; here it waits longer than a chunk may) get 408."""
    alice = party(impatient, "slow")
    data = os.urandom(2000)
    raw = RawRequest(
        impatient, "PUT", "/v1/blobs", upload_headers(alice, hashlib.sha256(data).hexdigest(), len(data))
    )
    stop = threading.Event()

    def trickle() -> None:
        for i in range(0, len(data), 2):
            if stop.wait(0.1):
                return
            try:
                raw.send(data[i : i + 2])
            except OSError:  # cut off
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        status, headers, body = raw.response()
    finally:
        stop.set()
        sender.join()
        raw.close()
    err = error_of(status, body)
    assert status == 408 and err["code"] == "timeout" and "upload too slow" in err["message"], body
    assert headers["connection"] == "close"
    assert not blob_path(impatient, hashlib.sha256(data).hexdigest()).exists()
    assert not temporary_files(impatient)

    body_json = b'{"manifest": {}}'
    req = alice.signed("POST", "/v1/tasks", raw=body_json)
    headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host", "content-length")}
    raw = RawRequest(impatient, "POST", "/v1/tasks", {**headers, "Content-Length": str(len(body_json))})
    try:
        raw.send(body_json[:3])  # and nothing more
        status, headers, body = raw.response()
    finally:
        raw.close()
    assert status == 408 and error_of(status, body)["code"] == "timeout", body


# ---- 7a. a signature is for one platform ------------------------------------------------------------------


def test_a_request_signed_for_one_platform_is_refused_by_another(
    server: ServerProcess, impatient: ServerProcess
) -> None:
    a_id = httpx.get(f"{server.url}/v1/platform").json()["platform_id"]
    b_id = httpx.get(f"{impatient.url}/v1/platform").json()["platform_id"]
    assert a_id != b_id and httpx.get(f"{server.url}/v1/service").json()["platform_id"] == a_id
    alice_a = party(server, "alice-both")
    alice_b = Party(impatient.url, "alice-both")
    alice_b.identity = alice_a.identity  # the same key, registered on both platforms
    alice_b.register()
    req = alice_a.signed("GET", "/v1/tasks")
    assert alice_a.http.send(req).status_code == 200  # at A
    replayed = alice_b.http.build_request("GET", "/v1/tasks", headers=dict(req.headers))
    r = alice_b.http.send(replayed)  # the adversary replays it at B
    err = error_of(r.status_code, r.content)
    assert r.status_code == 401 and err["where"] == "X-Confide-Audience", r.text
    assert "audience mismatch" in err["message"] and a_id in err["message"] and b_id in err["message"]
    # never sent to A: still refused at B (the nonce is fresh there), and B's own requests work
    fresh = alice_a.signed("GET", "/v1/audit/head")
    r = alice_b.http.send(alice_b.http.build_request("GET", "/v1/audit/head", headers=dict(fresh.headers)))
    assert r.status_code == 401 and "audience mismatch" in r.json()["error"]["message"]
    assert alice_b.ok("GET", "/v1/tasks") == {"tasks": []}
    # an upload signed for A is refused at B before its body is read
    raw = RawRequest(impatient, "PUT", "/v1/blobs", upload_headers(alice_a, "0" * 64, BIG))
    try:
        status, _, body = raw.response()
    finally:
        raw.close()
    assert status == 401 and error_of(status, body)["where"] == "X-Confide-Audience"


def test_a_client_can_pin_the_platform_id(server: ServerProcess) -> None:
    ident = Identity.generate("pinner")
    real = httpx.get(f"{server.url}/v1/platform").json()["platform_id"]
    api = Transport(server.url, ident, platform_id="c3" * 16)
    try:
        with pytest.raises(ConfideError, match="not the pinned"):
            api.call("GET", "/v1/tasks")
    finally:
        api.close()
    api = Transport(server.url, ident, platform_id=real)
    try:
        assert api.platform_id == real
    finally:
        api.close()


# ---- 6. ciphertext only to those its owner approved; rejecting a task --------------------------------------


def test_naming_a_dataset_in_a_task_grants_nothing_until_its_owner_approves(server: ServerProcess) -> None:
    owner, mallory, lab, carol = (party(server, n) for n in ("owner_6", "mallory_6", "lab_6", "carol_6"))
    ds = upload_dataset(owner, PATIENTS, SERVICE)
    missing = error_of(404, mallory.call("GET", f"/v1/blobs/{'0' * 64}").content)
    like_missing = {k: v.replace("0" * 64, ds.ciphertext_sha256) for k, v in missing.items()}

    def refused(who: Party) -> None:
        r = who.call("GET", f"/v1/blobs/{ds.ciphertext_sha256}")
        assert r.status_code == 404 and error_of(404, r.content) == like_missing  # as if there were none

    # the hostile party names the owner's dataset in a task nobody approved
    fn = register_function(mallory, UPPER, name="grab")
    grab = create_task(mallory, SERVICE, fn, ds, [mallory])
    refused(mallory)
    meta = mallory.ok("GET", f"/v1/datasets/{ds.dataset_id}")
    assert meta["size"] is None and "key_envelope" not in meta  # not even the ciphertext's size
    listed = {d["dataset_id"]: d for d in mallory.ok("GET", "/v1/datasets")["datasets"]}
    assert listed[ds.dataset_id]["size"] is None
    approve(mallory, grab)  # approvals of others than the owner grant nothing
    refused(mallory)

    # an honest task: once the owner approves it, its participants may download; others may not
    fn_lab = register_function(lab, UPPER, name="study")
    study = create_task(lab, SERVICE, fn_lab, ds, [lab])
    refused(lab)
    approve(owner, study)
    assert lab.get_blob(ds.ciphertext_sha256)
    assert lab.ok("GET", f"/v1/datasets/{ds.dataset_id}")["size"] > 0
    refused(carol)
    refused(mallory)  # Mallory's own task is still unapproved
    assert owner.get_blob(ds.ciphertext_sha256)

    # the owner rejects the task it approved: the approval is withdrawn, and the access with it
    view = owner.ok("POST", f"/v1/tasks/{study.task_id}/reject", {"reason": "changed my mind"})
    assert owner.fp not in {a["party"] for a in view["approvals"]}
    assert view["rejections"][0]["party"] == owner.fp
    refused(lab)


def test_a_party_rejects_a_task_it_was_added_to(server: ServerProcess, tmp_path: Path) -> None:
    owner, mallory, carol = (party(server, n) for n in ("owner_r", "mallory_r", "carol_r"))
    ds = upload_dataset(owner, PATIENTS, SERVICE)
    fn = register_function(mallory, UPPER, name="grab-r")
    grab = create_task(mallory, SERVICE, fn, ds, [mallory])
    tid = grab.task_id
    assert tid in {t["task_id"] for t in owner.ok("GET", "/v1/tasks")["tasks"]}  # in the owner's list

    # not a participant: 404, like a task that does not exist
    r = carol.call("POST", f"/v1/tasks/{tid}/reject", {})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not-found"
    r = owner.call("POST", f"/v1/tasks/{tid}/reject", {"reason": "line\nbreak"})
    assert r.status_code == 422 and r.json()["error"]["where"] == "body.reason"

    view = owner.ok("POST", f"/v1/tasks/{tid}/reject", {"reason": "I never agreed to this"})
    assert view["state"] == "failed" and view["category"] == "rejected"
    assert view["message"] == f"rejected by {owner.fp}: I never agreed to this"
    assert view["rejections"] == [
        {
            "party": owner.fp,
            "reason": "I never agreed to this",
            "created_at": view["rejections"][0]["created_at"],
        }
    ]
    assert owner.ok("POST", f"/v1/tasks/{tid}/reject", {})["rejections"] == view["rejections"]  # idempotent
    # the task cannot run, and the rejection is final
    r = mallory.call("POST", f"/v1/tasks/{tid}/run", {})
    assert r.status_code == 409 and f"rejected by {owner.fp}" in r.json()["error"]["message"]
    r = owner.call("POST", f"/v1/tasks/{tid}/approvals", {"approval": sign_approval(owner.identity, grab)})
    assert r.status_code == 409 and "rejected" in r.json()["error"]["message"]
    events = [
        e for e in mallory.ok("GET", f"/v1/tasks/{tid}/audit")["events"] if e["kind"] == "task.rejected"
    ]
    assert len(events) == 1 and events[0]["actor"] == owner.fp
    assert events[0]["detail"] == {
        "manifest_sha256": grab.digest,
        "reason": "I never agreed to this",
        "approval_withdrawn": False,
    }

    # a queued task: rejecting it takes it off the queue (no worker ever claims it)
    lab = party(server, "lab_r")
    fn_lab = register_function(lab, UPPER, name="study-r")
    study = create_task(lab, SERVICE, fn_lab, ds, [lab])
    approve(owner, study)
    assert lab.ok("POST", f"/v1/tasks/{study.task_id}/run", {})["state"] == "queued"
    view = owner.ok("POST", f"/v1/tasks/{study.task_id}/reject", {})
    assert (view["state"], view["category"], view["message"]) == (
        "failed",
        "rejected",
        f"rejected by {owner.fp}",
    )
    assert lab.call("POST", f"/v1/tasks/{study.task_id}/run", {}).status_code == 409


def test_the_sdk_rejects_a_task(server: ServerProcess, tmp_path: Path) -> None:
    from confide.client.sdk import Client

    owner, mallory = party(server, "owner_sdk"), party(server, "mallory_sdk")
    ds = upload_dataset(owner, PATIENTS, SERVICE)
    grab = create_task(mallory, SERVICE, register_function(mallory, UPPER, name="grab-sdk"), ds, [mallory])
    client = Client(server.url, owner.identity, home=tmp_path / "home")
    try:
        info: dict[str, Any] = client.reject_task(grab.task_id, reason="not mine")
    finally:
        client.close()
    assert info["state"] == "failed" and info["rejections"][0]["reason"] == "not mine"


def test_the_sdk_transport_uploads_with_a_declaration_and_reports_refusals(
    server: ServerProcess, tmp_path: Path
) -> None:
    who = party(server, "transport_up")
    api = Transport(server.url, who.identity)
    try:
        first, second = tmp_path / "first.cnf", tmp_path / "second.cnf"
        first.write_bytes(os.urandom(700_000))
        second.write_bytes(os.urandom(700_000))
        got = api.put_blob(first)
        assert got == {"sha256": hashlib.sha256(first.read_bytes()).hexdigest(), "size": 700_000}
        with pytest.raises(TransportApiError) as err:  # over the 1 MiB quota: the JSON error reaches us
            api.put_blob(second)
        assert err.value.status == 413 and err.value.code == "quota-exceeded"
    finally:
        api.close()


def test_the_creator_approves_with_the_manifest_and_cannot_slip_in_another_partys(
    server: ServerProcess,
) -> None:
    """`POST /v1/tasks` may carry the creator's own approval (one call instead of two); an approval by
    someone else, or of another manifest, is refused and the task is not created."""
    owner, lab = (party(server, n) for n in ("owner_c", "lab_c"))
    ds = upload_dataset(owner, PATIENTS, SERVICE)
    fn = register_function(lab, UPPER, name="with-approval")

    def manifest_for(creator: Party) -> mf.Manifest:
        return build_manifest(
            service=SERVICE,
            creator=creator.public,
            function=fn,
            inputs=[ds.task_input("data")],
            outputs=[mf.TaskOutput("out", (creator.fp,), 1 << 20)],
            participants={p.name: p.public for p in (creator, owner)},
        )

    m = manifest_for(lab)
    other = manifest_for(lab)
    for approval, status in (
        (sign_approval(owner.identity, m), 403),  # the owner's approval, slipped in by the creator
        (sign_approval(lab.identity, other), 400),  # the creator's approval of another manifest
    ):
        r = lab.call("POST", "/v1/tasks", {"manifest": m.to_json(), "approval": approval})
        assert r.status_code == status, r.text
        assert lab.call("GET", f"/v1/tasks/{m.task_id}").status_code == 404  # not created
    view = lab.ok("POST", "/v1/tasks", {"manifest": m.to_json(), "approval": sign_approval(lab.identity, m)})
    assert [a["party"] for a in view["approvals"]] == [lab.fp]
    events = [e["kind"] for e in lab.ok("GET", "/v1/audit")["events"] if e.get("task_id") == m.task_id]
    assert events == ["task.created", "task.approved"]
