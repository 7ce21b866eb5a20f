"""A hostile host rewriting its audit log, against a real `confide serve` (SQLite, one sim worker).

The host edits its database directly: it drops an event a party has already seen and re-chains
every later event (each hash recomputed, the head row updated), or cuts the newest events off.
The server's own chain check then passes; what must refuse is the party's client, which pinned
the chain it verified (in its home directory) and the audit head the enclave signed in a receipt.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, select, update

from confide.attest.anchors import load_trust_anchors
from confide.client import Client
from confide.client.audit_chain import link_hash
from confide.client.audit_pins import AuditRewritten, AuditVerifier, PinStore
from confide.client.policy import Policy
from confide.enclave.keys import Identity
from confide.host import audit
from confide.host.db import AuditEvent, AuditHead, Database, sqlite_url
from platform_support import UPPER_FN, ServerProcess, run_upper_task

UPPER = UPPER_FN


@pytest.fixture
def server(tmp_path: Path):
    srv = ServerProcess(tmp_path / "data", workers=1).start()
    yield srv
    srv.stop()


def _client(server: ServerProcess, home: Path, name: str) -> Client:
    # the measurement the server's workers report (this test is about the audit log, not attestation;
    # the TCB files may change between the server's start and this call while the tree is edited)
    measurement = httpx.get(f"{server.url}/v1/service", timeout=10).json()["measurement"]
    policy = Policy(backends=("sim",), measurements=(measurement,), allow_simulation=True)
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    client = Client(server.url, Identity.generate(name), policy=policy, anchors=anchors, home=home)
    client.register(name)
    return client


def _db(server: ServerProcess) -> Database:
    return Database(sqlite_url(server.data_dir / "confide.db"))


def _finished_task(server: ServerProcess, tmp_path: Path) -> tuple[Client, Client, str]:
    owner = _client(server, tmp_path / "owner-home", "owner")
    lab = _client(server, tmp_path / "lab-home", "lab")
    task, _, _ = run_upper_task(owner, lab, tmp_path)
    return owner, lab, task


def drop_and_rechain(db: Database, seq: int) -> None:
    """The hostile host: delete event `seq`, renumber the later ones, recompute every hash after it
    and the head row, so that the chain in the database is consistent again."""
    with db.transaction() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq == seq))
        later = [
            r.seq
            for r in s.execute(
                select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)
            ).scalars()
        ]
        for old in later:
            s.execute(update(AuditEvent).where(AuditEvent.seq == old).values(seq=old - 1))
    with db.transaction() as s:
        prev = audit.GENESIS
        for row in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars():
            row.prev_sha256 = prev
            row.sha256 = audit.event_hash(audit.as_dict(row))
            prev = row.sha256
            last = row.seq
        head = s.get(AuditHead, audit.HEAD_ID)
        assert head is not None
        head.seq, head.sha256 = last, prev
    with db.transaction() as s:
        assert audit.verify_log(s) > 0  # the platform's own check passes: only the clients can tell


def test_dropping_a_seen_event_and_rechaining_is_refused_naming_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    _owner, lab, task = _finished_task(server, tmp_path)
    events = lab.audit(task)  # verified and pinned
    approved = [e for e in events if e["kind"] == "task.approved"]
    victim = approved[0]["seq"]
    pins = json.loads((tmp_path / "lab-home" / "audit-pins.json").read_text())
    assert pins["platforms"][lab.service.fingerprint]["head"]["seq"] >= events[-1]["seq"]
    drop_and_rechain(_db(server), victim)
    with pytest.raises(AuditRewritten, match=f"event {victim}") as info:
        lab.audit(task)
    assert info.value.seq == victim
    with pytest.raises(AuditRewritten) as info:  # every later answer: the whole log, too
        lab.audit()
    assert info.value.seq == victim


def test_a_rewrite_before_the_receipt_is_provable_with_the_signed_receipt_alone(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A party that never looked at the audit log before (no pins) still refuses: the enclave signed
    the head the host passed into the receipt, and the rewritten chain no longer contains it."""
    _owner, lab, task = _finished_task(server, tmp_path)
    body = lab.receipt(task)
    signed = body["audit_head"]
    assert signed is not None and signed["seq"] >= 1
    with _db(server).reading() as s:  # the host passed its real head (this run's task.running event)
        row = s.get(AuditEvent, signed["seq"])
        assert row is not None and row.sha256 == signed["sha256"] and row.kind == "task.running"
    drop_and_rechain(_db(server), 1)  # an event the lab never saw
    fresh = Client(
        server.url, lab.identity, policy=lab.policy, anchors=lab.anchors, home=tmp_path / "fresh-home"
    )
    with fresh, pytest.raises(AuditRewritten, match=f"receipt of task {task}") as info:
        fresh.results(task, tmp_path / "out", expect_manifest=body["manifest_sha256"])
    assert info.value.seq == signed["seq"]
    assert not (tmp_path / "out" / "out").exists()


def test_cutting_off_the_newest_events_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    _owner, lab, task = _finished_task(server, tmp_path)
    events = lab.audit()
    top = max(e["seq"] for e in events)
    db = _db(server)
    with db.transaction() as s:  # the host drops the last two events and moves its head back
        s.execute(delete(AuditEvent).where(AuditEvent.seq > top - 2))
        row = s.get(AuditEvent, top - 2)
        head = s.get(AuditHead, audit.HEAD_ID)
        assert row is not None and head is not None
        head.seq, head.sha256 = row.seq, row.sha256
    with pytest.raises(AuditRewritten, match="truncated"):
        lab.audit(task)


def test_an_honest_platform_extends_the_pin(server: ServerProcess, tmp_path: Path) -> None:
    """New events after the pin are accepted; the party checks them through links it cannot read
    (another party's events)."""
    owner, lab, task = _finished_task(server, tmp_path)
    first = lab.audit(task)
    other = tmp_path / "more.csv"
    other.write_text("a,b\n1,2\n")
    owner.upload_dataset(other)  # an event the lab does not see
    again = lab.audit(task)
    assert [e["sha256"] for e in again] == [e["sha256"] for e in first]
    pins = json.loads((tmp_path / "lab-home" / "audit-pins.json").read_text())
    assert pins["platforms"][lab.service.fingerprint]["head"]["seq"] > first[-1]["seq"]


def test_forged_links_are_refused() -> None:
    """A link whose hash does not recompute, or that skips a sequence number, is refused."""
    a = {"seq": 1, "prev_sha256": audit.GENESIS, "body_sha256": "11" * 32}
    a["sha256"] = link_hash(1, a["prev_sha256"], a["body_sha256"])
    b = {"seq": 2, "prev_sha256": a["sha256"], "body_sha256": "22" * 32}
    b["sha256"] = link_hash(2, b["prev_sha256"], b["body_sha256"])
    head = {"seq": 2, "sha256": b["sha256"]}

    def serve(chain: list[dict]):
        return lambda first, last: {"links": [x for x in chain if first <= x["seq"] <= last], "head": head}

    AuditVerifier(PinStore(None), "k", serve([a, b])).verify([], head, where="test")
    forged = {**b, "body_sha256": "33" * 32}  # content swapped, hash kept
    with pytest.raises(AuditRewritten, match="event 2"):
        AuditVerifier(PinStore(None), "k", serve([a, forged])).verify([], head, where="test")
    store = PinStore(None)
    AuditVerifier(store, "k", serve([a, b])).verify([], head, where="test")
    with pytest.raises(AuditRewritten, match="event 2"):  # the pinned event 2 vanished
        AuditVerifier(store, "k", serve([a])).verify([], {"seq": 1, "sha256": a["sha256"]}, where="test")


def test_results_with_the_links_sent_along_still_catch_a_rewrite(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`results()` takes the audit head and links from the task view (one call); a host that drops a
    seen event and re-chains sends consistent but rewritten links there, and is still refused."""
    _owner, lab, task = _finished_task(server, tmp_path)
    lab.results(task, tmp_path / "out-1")  # pins the head, with the links sent along
    pinned = AuditVerifier(
        PinStore(tmp_path / "lab-home" / "audit-pins.json"), lab.service.fingerprint, lambda a, b: {}
    ).pinned_seq()
    assert pinned is not None
    view = lab.task(task, audit_from=pinned)
    assert view["audit"]["head"]["seq"] >= pinned and view["audit"]["links"][0]["seq"] == pinned
    victim = next(e["seq"] for e in lab.audit(task) if e["kind"] == "task.approved")
    drop_and_rechain(_db(server), victim)
    with pytest.raises(AuditRewritten) as info:
        lab.results(task, tmp_path / "out-2")
    assert info.value.seq <= pinned
