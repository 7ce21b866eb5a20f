"""Several `confide serve` processes on one database (PROTOCOL.md section 2): a server whose workers
have no service key is provisioned by another server's worker through the database, tasks queued
on one server run on either, an enclave of another build is refused (and its server keeps running),
and servers starting together on an empty database create one service identity.

The servers share the simulated TEE platform (``--platform-dir``: the same "hardware vendor") and
the blob store (a symlinked directory, as shared storage would be); each has its own data directory,
so its workers have their own sealed state."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from confide.enclave.encoding import canonical_json
from confide.enclave.keys import PublicIdentity
from confide.enclave.sim_platform import SimPlatform
from confide.host import audit
from confide.host.db import AuditEvent, Base, Database, Meta, ProvisionRequest, now, sqlite_url
from confide.host.migrations import upgrade
from confide.host.provisioning import (
    INIT_CLAIM_STALE_S,
    META_SERVICE,
    META_SERVICE_INIT,
    Grant,
    InitClaims,
    Offer,
    ProvisionRelay,
)
from platform_support import (
    PATIENTS,
    UPPER,
    Party,
    PostgresCluster,
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


def make_server(
    root: Path,
    name: str,
    db_url: str,
    *,
    workers: int,
    extra: tuple[str, ...] = (),
) -> ServerProcess:
    """A server with its own data directory, on the shared simulated platform and blob store."""
    data = root / name
    data.mkdir()
    shared = ("--platform-dir", str(root / "platform"), "--blob-dir", str(root / "blobs"))
    return ServerProcess(data, db_url, workers=workers, extra_args=(*shared, *extra))


def shared_root(root: Path) -> Path:
    SimPlatform.create(root / "platform")  # before any server starts: they must not race to create it
    (root / "blobs").mkdir()
    return root


def service_of(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/v1/service", timeout=10).json())


def server_name(server: ServerProcess) -> str:
    return str(service_of(server)["workers"][0]["id"]).split("/")[0]


def events(db: Database | str) -> list[dict[str, Any]]:
    """Every audit event, after checking the whole chain."""
    database = Database(db) if isinstance(db, str) else db
    try:
        with database.reading() as s:
            audit.verify_log(s)
            return [
                audit.as_dict(e) for e in s.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars()
            ]
    finally:
        if database is not db:
            database.dispose()


def wait_log(server: ServerProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert server.proc is not None and server.proc.poll() is None, server.log()
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log after {timeout} s:\n{server.log()}")
        time.sleep(0.1)


def sealed_service(server: ServerProcess, worker: str) -> list[Path]:
    return list((server.data_dir / "workers" / worker).glob("service-*.sealed"))


# ---- two servers on one PostgreSQL database ------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    url: str
    a: ServerProcess


@pytest.fixture(scope="module")
def cluster(pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Server A (one worker, which creates the service key) on a fresh PostgreSQL database."""
    root = shared_root(tmp_path_factory.mktemp("scaleout"))
    url = pg_cluster.create_database()
    a = make_server(root, "a", url, workers=1).start()
    yield Cluster(root, url, a)
    a.stop()


def test_a_second_server_is_provisioned_through_the_database(cluster: Cluster) -> None:
    a = cluster.a
    b = make_server(cluster.root, "b", cluster.url, workers=2).start()  # waits for 2 ready workers
    try:
        info_a, info_b = service_of(a), service_of(b)
        assert info_b["fingerprint"] == info_a["fingerprint"] and info_b["service"] == info_a["service"]
        assert info_b["measurement"] == info_a["measurement"]
        for w in ("w0", "w1"):  # each of B's workers sealed the key in its own state directory
            assert sealed_service(b, w), w
        assert "relayed through the database" in b.log() and "(mutual attestation)" in b.log()
        assert "granted the service key to worker" in a.log()
        name_a, name_b = server_name(a), server_name(b)
        log = events(cluster.url)
        assert [e["kind"] for e in log].count("service.created") == 1
        provisioned = [e["detail"] for e in log if e["kind"] == "service.provisioned"]
        assert {"granter", "grantee", "service", "relay"} <= set(provisioned[0])
        relayed = [d for d in provisioned if d["relay"] == "database"]
        assert relayed and all(d["granter"].startswith(name_a + "/") for d in relayed)
        assert all(d["grantee"].startswith(name_b + "/") for d in relayed)
        assert {d["service"] for d in provisioned} == {info_a["fingerprint"]}
        db = Database(cluster.url)
        try:
            with db.reading() as s:  # every request was consumed
                assert s.execute(select(ProvisionRequest)).scalars().all() == []
        finally:
            db.dispose()

        # tasks queued through B run on the workers of either server, under the one service key
        alice, bob = Party(b.url, "alice").register(), Party(b.url, "bob").register()
        service = service_key(alice)
        function = register_function(bob, UPPER)
        manifests = []
        for i in range(3):
            ds = upload_dataset(alice, DATA + b"%d\n" % i, service)
            m = create_task(bob, service, function, ds, [bob], params={"sleep": 2, "suffix": str(i)})
            approve(alice, m)
            approve(bob, m)
            manifests.append(m)
        for m in manifests:  # B's two workers take two of them at once; A's takes the third
            bob.ok("POST", f"/v1/tasks/{m.task_id}/run", {})
        ran_on = set()
        for i, m in enumerate(manifests):
            info = wait_task(bob, m.task_id)
            assert info["state"] == "succeeded", info
            body = receipt_body(info, PublicIdentity.from_line(info_a["service"]))
            assert body["status"] == "ok"
            assert (
                open_output(bob, info["outputs"][0]["sha256"])
                == (DATA + b"%d\n" % i).upper() + str(i).encode()
            )
            ran_on.add(info["history"][-1]["worker"].split("/")[0])
        assert ran_on == {name_a, name_b}
    finally:
        b.stop()


def test_a_server_of_another_enclave_build_is_refused_and_keeps_running(cluster: Cluster) -> None:
    a = cluster.a
    config = cluster.root / "other-enclave.toml"
    config.write_text("[enclave]\nmemory_budget_mib = 512\n")  # another measurement
    c = make_server(cluster.root, "c", cluster.url, workers=1, extra=("--enclave-config", str(config))).start(
        wait_workers=False
    )
    try:
        wait_log(c, "provisioning refused by")
        info_c, info_a = service_of(c), service_of(a)
        assert info_c["measurement"] != info_a["measurement"]
        assert info_c["fingerprint"] == info_a["fingerprint"]  # no second service identity
        (worker,) = info_c["workers"]
        assert worker["ready"] is False and worker["state"] == "provisioning"
        assert "measurement" in worker["message"] and "refused" in worker["message"], worker
        assert "its enclave refused to provision worker" in a.log()
        assert "stays unprovisioned and asks again" in c.log()
        assert not sealed_service(c, "w0")
        refused = [e for e in events(cluster.url) if e["kind"] == "service.provision-refused"]
        assert refused and refused[0]["detail"]["grantee"] == worker["id"]
        assert "differs from this enclave's" in refused[0]["detail"]["reason"]
        assert httpx.get(f"{c.url}/v1/health", timeout=10).json() == {"ok": True}
        assert c.proc is not None and c.proc.poll() is None
        assert service_of(a)["workers"][0]["ready"] is True
    finally:
        c.stop()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_servers_starting_together_on_an_empty_database_create_one_service(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = shared_root(tmp_path)
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = sqlite_url(root / "shared.db")
    servers = [make_server(root, name, url, workers=1) for name in ("x", "y")]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(wait_workers=False), servers))
        infos = [s.wait_workers(1, timeout=90) for s in servers]
        assert infos[0]["fingerprint"] == infos[1]["fingerprint"] is not None
        log = events(url)
        kinds = [e["kind"] for e in log]
        assert kinds.count("service.created") == 1 and "service.adopted" not in kinds, kinds
        (relayed,) = [e["detail"] for e in log if e["kind"] == "service.provisioned"]
        assert relayed["relay"] == "database"
        db = Database(url)
        try:
            with db.reading() as s:
                claim = s.get(Meta, META_SERVICE_INIT)
                assert claim is not None and '"worker"' in claim.value
                service = s.get(Meta, META_SERVICE)
                assert service is not None and service.value == infos[0]["service"]
        finally:
            db.dispose()
    finally:
        for s in servers:
            s.stop()


# ---- the database side, without enclaves ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "confide.db")
    else:
        url = request.getfixturevalue("pg_cluster").create_database()
    db = Database(url)
    db.migrate()
    yield db
    db.dispose()


def test_upgrade_from_the_first_schema_adds_the_requests_table(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path / "old.db"))
    try:
        upgrade(db.engine, "0001")  # a database made by the previous release
        db.migrate()
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.dispose()


def test_init_claim_is_won_once_and_a_stale_claim_is_taken_over(any_db: Database) -> None:
    claims = InitClaims(any_db)
    results: dict[str, bool] = {}

    def claim(worker: str) -> None:  # one engine per claimant, as several servers have
        db = Database(any_db.url.render_as_string(hide_password=False))
        try:
            results[worker] = InitClaims(db).claim(worker).won
        finally:
            db.dispose()

    threads = [threading.Thread(target=claim, args=(f"s{i}/w0",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [w for w, won in results.items() if won]
    assert len(winners) == 1
    loser = next(w for w in results if w not in winners)
    held = claims.claim(loser)
    assert not held.won and held.worker == winners[0]
    assert claims.claim(winners[0]).won  # the winner, restarted before it created the key
    # the winner died without recording a service: after INIT_CLAIM_STALE_S another may create it
    with any_db.transaction() as s:
        row = s.get(Meta, META_SERVICE_INIT)
        assert row is not None
        row.value = canonical_json({"worker": winners[0], "at": now() - 2 * INIT_CLAIM_STALE_S}).decode()
    stolen = claims.claim(loser)
    assert stolen.won and stolen.took_over == winners[0]
    # once the database names a service, nobody claims
    with any_db.transaction() as s:
        s.add(Meta(key=META_SERVICE, value="confide-pub1:..."))
    assert not claims.claim("s9/w0").won and claims.claim(loser).worker is None


def test_requests_are_claimed_by_one_granter_answered_once_and_replaced(any_db: Database) -> None:
    relay = ProvisionRelay(any_db)
    first = relay.post(server="b", worker_id="b/w0", offer=Offer("offer-1", "ev-1"))
    assert not relay.any_open(exclude_server="b")  # a server does not answer its own workers
    assert relay.any_open(exclude_server="a")
    claimed = [relay.claim(f"a/w{i}", exclude_server="a") for i in range(3)]
    winners = [c for c in claimed if c is not None]
    assert len(winners) == 1 and winners[0].id == first and winners[0].offer == Offer("offer-1", "ev-1")
    assert relay.claim("a/w9", exclude_server="a") is None
    grant = Grant("grant-b64", "evidence-b64")
    assert not relay.grant(winners[0], "a/w9", grant)  # not the claimant
    assert relay.refuse(winners[0], "a/w0", "peer measurement differs: refused")
    status = relay.status(first)
    assert status is not None and (status.state, status.granted_by) == ("refused", "a/w0")
    assert status.grant is None and status.message == "peer measurement differs: refused"
    assert not relay.grant(winners[0], "a/w0", grant)  # answered once
    # the worker asks again: its old request is replaced; a released claim is open again
    second = relay.post(server="b", worker_id="b/w0", offer=Offer("offer-2", "ev-2"))
    assert relay.status(first) is None
    again = relay.claim("a/w1", exclude_server="a")
    assert again is not None and again.id == second
    relay.release(again, "a/w1")
    again = relay.claim("a/w0", exclude_server="a")
    assert again is not None and relay.grant(again, "a/w0", grant)
    status = relay.status(second)
    assert status is not None and status.grant == grant
    relay.withdraw(second)
    assert relay.status(second) is None
    # an expired request is not offered to granters
    expired = ProvisionRelay(any_db, ttl_seconds=-1)
    expired.post(server="c", worker_id="c/w0", offer=Offer("o", "e"))
    assert expired.claim("a/w0", exclude_server="a") is None
    assert [e["kind"] for e in events(any_db)] == ["service.provision-refused"]
