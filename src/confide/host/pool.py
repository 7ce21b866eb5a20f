"""The pool of enclave workers: threads in the server process, each owning one enclave process.

Each worker keeps its own enclave state directory under the server's data directory. One worker
creates the service identity (``service_init``): the one that wins the platform's init claim while
the database names no service (see `provisioning`). Every other worker gets it by mutual
attestation: the new worker makes an offer bound into its evidence (``provision_offer``), a
provisioned worker checks that evidence and wraps the service key to the offer
(``provision_grant``), and the new worker checks the granter's evidence before it accepts
(``provision_accept``). The host relays these messages and learns nothing from them: directly
between two workers of this server (the fast path) or, when this server has no provisioned worker,
through the database to and from an idle provisioned worker of another server sharing it.

A worker pulls queued tasks (see `scheduler`), runs each in its enclave, and publishes outputs only
after the enclave replied. When the enclave process dies, the worker restarts it and the task goes
back to the queue. With `--flow-engine spark` a flow task takes two enclave calls with the stages run
on Spark between them (`flow_engine`): `task` opens the job, `flow_finish` verifies it and seals its
outputs; a failure on Spark is reported to `flow_finish`, which signs the failed receipt.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError, EnclaveError
from confide.enclave.keys import PublicIdentity
from confide.host import audit
from confide.host.blobstore import BlobStore
from confide.host.db import Database, Evidence, Meta, Worker, insert_ignore, now
from confide.host.enclave_process import EnclaveProcess
from confide.host.flow_engine import SparkFlowEngine, run_on_engine
from confide.host.provisioning import (
    INIT_CLAIM_STALE_S,
    META_SERVICE,
    Grant,
    InitClaim,
    InitClaims,
    Offer,
    ProvisionRelay,
)
from confide.host.scheduler import ClaimedTask, Scheduler, StoredOutput

log = logging.getLogger("confide.host")

RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)
PROVISION_WAIT_LOG_S = 30.0
PROVISION_POLL_S = 0.25  # how often a worker waiting for the service key looks again
PROVISION_RETRY_S = (30.0, 60.0, 120.0, 300.0, 600.0)  # after the 1st, 2nd, ... refusal: ask again


class WorkerGone(ConfideError):
    """The worker's enclave process exited; the worker restarts it."""


class ServiceUnavailable(ConfideError):
    """No provisioned worker can answer now."""


@dataclass
class PoolSettings:
    data_dir: Path
    platform_dir: Path
    size: int
    server_name: str
    boot_id: str
    enclave_config: Path | None = None
    backend: str = "sim"
    poll_seconds: float = 0.5
    lease_seconds: float = 60.0
    accelerator: str | None = None  # numpy | cuda | auto: one accelerator process per enclave worker
    flow_engine: str = "local"  # local: flow tasks run inside the enclave's call; spark: on Spark
    spark_master: str = "local[2]"
    flow_agents: tuple[tuple[str, str], ...] = ()  # other hosts' node agents: (public line, evidence)


class EnclaveWorker:
    """One enclave process and the thread that feeds it tasks."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.worker_id = f"{pool.settings.server_name}/w{index}"
        self.lease_owner = f"{self.worker_id}@{pool.settings.boot_id}"
        self.state_dir = pool.settings.data_dir / "workers" / f"w{index}"
        self.lock = threading.Lock()  # one enclave call at a time on this worker's channel
        self.enclave: EnclaveProcess | None = None
        self.info: dict[str, Any] = {}
        self.service: str | None = None  # the service line once this worker holds the key
        self.state = "starting"
        self.message: str | None = None  # why the worker is in its state (a refusal, a failure)
        self.restarts = 0
        self.current: ClaimedTask | None = None
        self.thread = threading.Thread(target=self._main, name=f"confide-worker-{index}", daemon=True)

    # ---- enclave calls ---------------------------------------------------------------------------
    def call(self, name: str, **args: Any) -> dict[str, Any]:
        with self.lock:
            return self._call_locked(name, **args)

    def _call_locked(self, name: str, **args: Any) -> dict[str, Any]:
        enclave = self.enclave
        if enclave is None:
            raise WorkerGone("enclave not running", where=self.worker_id)
        try:
            return enclave.call(name, **args)
        except EnclaveError as exc:
            if exc.where is None or enclave.proc.poll() is not None:  # channel closed, not a refusal
                raise WorkerGone(f"enclave process died ({exc.message})", where=self.worker_id) from None
            raise
        except OSError as exc:
            raise WorkerGone(f"enclave channel failed ({exc})", where=self.worker_id) from None

    # the three provisioning calls, relayed in-process or through the database (see WorkerPool)
    def make_offer(self) -> Offer:
        reply = self.call("provision_offer")
        return Offer(str(reply["offer"]), str(reply["evidence"]))

    def grant_to(self, offer: Offer) -> Grant:
        reply = self.call("provision_grant", offer=offer.offer, evidence=offer.evidence)
        return Grant(str(reply["grant"]), str(reply["evidence"]))

    def accept(self, grant: Grant) -> dict[str, Any]:
        return self.call("provision_accept", grant=grant.grant, evidence=grant.evidence)

    @property
    def ready(self) -> bool:
        return self.state in ("ready", "busy") and self.service is not None

    @property
    def pid(self) -> int | None:
        return self.enclave.proc.pid if self.enclave is not None else None

    # ---- life cycle ------------------------------------------------------------------------------
    def _main(self) -> None:
        failures = 0
        while not self.pool.stopping.is_set():
            try:
                self._start()
                failures = 0
                self._serve()
            except WorkerGone as exc:
                log.warning("worker %s: %s; restarting its enclave", self.worker_id, exc.message)
            except ConfideError as exc:
                failures += 1
                self._set_state("failed", message=str(exc))
                log.error("worker %s: %s", self.worker_id, exc)
            except Exception as exc:  # a bug must not kill the worker silently
                failures += 1
                self._set_state("failed", message=f"internal error: {type(exc).__name__}: {exc}")
                log.exception("worker %s: internal error", self.worker_id)
            finally:
                self._stop_enclave()
            if self.pool.stopping.is_set():
                break
            self.restarts += 1
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)] if failures else 0.0
            self.pool.stopping.wait(delay)
        self._set_state("stopped")

    def _start(self) -> None:
        self._set_state("starting")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        enclave = EnclaveProcess(
            platform_dir=self.pool.settings.platform_dir,
            state_dir=self.state_dir,
            config=self.pool.settings.enclave_config,
            backend=self.pool.settings.backend,
            accelerator=self.pool.settings.accelerator,
        )
        self.enclave = enclave
        self.info = enclave.info
        log.info(
            "worker %s: enclave started (pid %d, measurement %s…, %s, %.1f s)",
            self.worker_id,
            enclave.proc.pid,
            str(enclave.info.get("measurement", ""))[:16],
            "SIMULATED" if enclave.info.get("simulated") else enclave.info.get("backend"),
            enclave.start_seconds,
        )
        self._set_state("provisioning")
        self.pool.provision(self)
        self._record_boot_evidence()
        self._set_state("ready")
        self.pool.log_ready()

    def _record_boot_evidence(self) -> None:
        reply = self.call("service_evidence", nonce="")
        raw = base64.b64decode(reply["evidence"])
        digest = hashlib.sha256(raw).hexdigest()
        with self.pool.db.transaction() as s:
            insert_ignore(
                s,
                Evidence,
                sha256=digest,
                worker_id=self.worker_id,
                evidence=reply["evidence"],
                created_at=now(),
            )
            row = s.get(Worker, self.worker_id)
            if row is not None:
                row.evidence_sha256 = digest

    def _stop_enclave(self) -> None:
        enclave, self.enclave = self.enclave, None
        self.service = None
        if enclave is not None:
            with self.lock:
                enclave.close(timeout=5.0)

    def _serve(self) -> None:
        while not self.pool.stopping.is_set():
            enclave = self.enclave
            if enclave is None or enclave.proc.poll() is not None:
                raise WorkerGone(
                    f"enclave process exited (code {enclave.proc.poll() if enclave else None})",
                    where=self.worker_id,
                )
            self.pool.answer_provision_requests(self)
            claimed = self.pool.scheduler.claim(self.lease_owner)
            if claimed is None:
                self.pool.wait_for_work()
                continue
            self._set_state("busy")
            self.current = claimed
            try:
                self._run(claimed)
            finally:
                self.current = None
                if self.state == "busy":
                    self._set_state("ready")

    # ---- one attempt ------------------------------------------------------------------------------
    def _run(self, claimed: ClaimedTask) -> None:
        sched = self.pool.scheduler
        log.info(
            "task %s: claimed by %s (run %d, attempt %d)",
            claimed.task_id,
            self.worker_id,
            claimed.run_no,
            claimed.attempt,
        )
        if claimed.problem is not None:
            sched.finish(
                claimed, ok=False, category="platform", receipt=None, outputs=(), message=claimed.problem
            )
            log.warning("task %s: failed before the enclave: %s", claimed.task_id, claimed.problem)
            return
        work = self.pool.settings.data_dir / "work" / f"{claimed.task_id}-{claimed.run_id}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, mode=0o700)
        try:
            paths = {name: work / name for name in (*claimed.outputs, mf.ERROR_OUTPUT)}
            args: dict[str, Any] = {
                "manifest": claimed.manifest,
                "approvals": claimed.approvals,
                "dataset_keys": claimed.dataset_keys,
                "inputs": {name: str(self.pool.blobs.path(sha)) for name, sha in claimed.inputs.items()},
                "outputs": {name: str(p) for name, p in paths.items()},
            }
            if claimed.function_source is not None:
                args["function_source"] = claimed.function_source
            flow = self.pool.flow
            engine = flow if flow is not None and _is_flow_task(claimed.manifest) else None
            if engine is not None:
                try:
                    args["flow_agents"] = engine.agents()
                except ConfideError as exc:
                    sched.finish(
                        claimed, ok=False, category="platform", receipt=None, outputs=(), message=str(exc)
                    )
                    log.warning("task %s: not run: %s", claimed.task_id, exc)
                    return
            with self.pool.db.reading() as s:  # at least this run's task.running event: signed in the receipt
                args["audit_head"] = audit.head(s)
            try:
                reply = self.call("task", **args)
                if engine is not None and isinstance(reply.get("flow"), dict):
                    reply = self._run_on_engine(claimed, reply["flow"], args["inputs"], work)
            except WorkerGone as exc:
                state = sched.worker_lost(claimed, exc.message)
                log.warning(
                    "task %s: worker %s lost (%s); task %s",
                    claimed.task_id,
                    self.worker_id,
                    exc.message,
                    state,
                )
                raise
            except EnclaveError as exc:  # refused without a receipt (malformed call): say why
                sched.finish(
                    claimed, ok=False, category="enclave-refused", receipt=None, outputs=(), message=str(exc)
                )
                log.warning("task %s: enclave refused the call: %s", claimed.task_id, exc)
                return
            self._publish(claimed, reply, paths)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _run_on_engine(
        self, claimed: ClaimedTask, start: dict[str, Any], inputs: dict[str, str], work: Path
    ) -> dict[str, Any]:
        """A flow task the enclave started: its stages on Spark, then `flow_finish` (flow_engine)."""
        assert self.pool.flow is not None
        return run_on_engine(self.pool.flow, self.call, claimed.task_id, start, inputs, work)

    def _publish(self, claimed: ClaimedTask, reply: dict[str, Any], paths: dict[str, Path]) -> None:
        """Move the enclave's outputs into the blob store (digests checked), then record everything
        in one transaction. A reply we cannot make sense of fails the task without publishing."""
        sched = self.pool.scheduler
        ok = reply.get("ok") is True
        category = str(reply.get("category") or ("ok" if ok else "error"))[:64]
        receipt = reply.get("receipt")
        stored: list[StoredOutput] = []
        try:
            if not isinstance(receipt, str):
                raise ConfideError("enclave reply has no receipt", where=f"task {claimed.task_id}")
            listed = reply.get("outputs") or {}
            if not isinstance(listed, dict):
                raise ConfideError("enclave reply: outputs is not an object", where=f"task {claimed.task_id}")
            if ok and set(listed) != set(claimed.outputs):
                raise ConfideError(
                    f"enclave reported outputs {sorted(listed)}, the manifest declares {sorted(claimed.outputs)}",
                    where=f"task {claimed.task_id}",
                )
            for name, meta in sorted(listed.items()):
                if name not in paths or not isinstance(meta, dict):
                    raise ConfideError(
                        f"enclave reported an unknown output {name!r}", where=f"task {claimed.task_id}"
                    )
                sha, size = self.pool.blobs.import_file(paths[name], expected_sha256=str(meta.get("sha256")))
                stored.append(StoredOutput(name, sha, int(meta.get("size", size))))
        except (ConfideError, OSError, ValueError) as exc:
            sched.finish(
                claimed,
                ok=False,
                category="platform",
                receipt=receipt if isinstance(receipt, str) else None,
                outputs=(),
                message=f"outputs not published: {exc}",
            )
            log.error("task %s: %s", claimed.task_id, exc)
            return
        state = sched.finish(claimed, ok=ok, category=category, receipt=receipt, outputs=stored)
        log.info(
            "task %s: %s on %s (%s, %d output(s))",
            claimed.task_id,
            state or "result discarded",
            self.worker_id,
            category,
            len(stored),
        )

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _set_state(self, state: str, *, message: str | None = None) -> None:
        self.state = state
        self.message = message
        with self.pool.db.transaction() as s:
            row = s.get(Worker, self.worker_id)
            if row is None:
                row = Worker(
                    worker_id=self.worker_id,
                    server=self.pool.settings.server_name,
                    restarts=0,
                    heartbeat=now(),
                    state=state,
                )
                s.add(row)
            row.state = state
            row.pid = self.pid
            row.restarts = self.restarts
            row.measurement = self.info.get("measurement")
            row.service = _fingerprint(self.service)
            row.message = message
            row.heartbeat = now()


def _fingerprint(line: str | None) -> str | None:
    return None if line is None else PublicIdentity.from_line(line).fingerprint


def _is_flow_task(manifest: str) -> bool:
    """The `flow` built-in (a dataflow job): the scheduler parsed this manifest when it claimed it."""
    try:
        fn = mf.parse_manifest(manifest).function
    except ConfideError:
        return False
    return fn.kind == "builtin" and fn.name == "flow"


class WorkerPool:
    def __init__(self, db: Database, blobs: BlobStore, scheduler: Scheduler, settings: PoolSettings) -> None:
        self.db = db
        self.blobs = blobs
        self.scheduler = scheduler
        self.settings = settings
        self.stopping = threading.Event()
        self.work = threading.Condition()
        self.provision_lock = threading.Lock()
        self.relay = ProvisionRelay(db)
        self.init_claims = InitClaims(db)
        self._relay_look_lock = threading.Lock()
        self._relay_look_at = 0.0  # monotonic time of the next look for other servers' requests
        self.workers = [EnclaveWorker(self, i) for i in range(settings.size)]
        self.flow: SparkFlowEngine | None = None
        if settings.flow_engine == "spark" and settings.size:
            self.flow = SparkFlowEngine(
                master=settings.spark_master,
                work_dir=settings.data_dir / "flow-engine",
                platform_dir=settings.platform_dir,
                backend=settings.backend,
                enclave_config=settings.enclave_config,
                remote_agents=settings.flow_agents,
            )
        self._ready_lock = threading.Lock()  # one "N/M workers ready" line at a time
        self.maintenance = threading.Thread(target=self._maintain, name="confide-maintenance", daemon=True)

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        requeued = self.scheduler.requeue_expired(
            actor=f"{self.settings.server_name}@{self.settings.boot_id}"
        )
        if requeued:
            log.info("requeued %d task(s) left running by a stopped server", len(requeued))
        if self.flow is not None:
            log.info("flow engine: starting Spark %s and a node agent", self.settings.spark_master)
            self.flow.start()
        for w in self.workers:
            w.thread.start()
        self.maintenance.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking tasks, let running ones finish (up to `timeout`), stop every enclave. A task
        still running then keeps its lease until it expires; then any server queues it again."""
        self.stopping.set()
        self.wake()
        running = [c.task_id for c in (w.current for w in self.workers) if c is not None]
        if running:
            log.info(
                "draining %d running task(s) (up to %.0f s): %s", len(running), timeout, ", ".join(running)
            )
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.thread.join(max(0.1, deadline - time.monotonic()))
        left = [c.task_id for c in (w.current for w in self.workers if w.thread.is_alive()) if c is not None]
        if left:
            log.warning(
                "%d task(s) still running after %.0f s, left to their lease: %s",
                len(left),
                timeout,
                ", ".join(left),
            )
        self.maintenance.join(5.0)
        if self.flow is not None:
            self.flow.stop()

    def log_ready(self) -> None:
        """A worker became ready: say how many are, and under which service key."""
        with self._ready_lock:
            ready = sum(1 for w in self.workers if w.ready)
            line = next((w.service for w in self.workers if w.ready and w.service), None)
            log.info("%d/%d workers ready, service key %s", ready, len(self.workers), _fingerprint(line))

    def wake(self) -> None:
        """A task was queued: let idle workers look now rather than at their next poll."""
        with self.work:
            self.work.notify_all()

    def wait_for_work(self) -> None:
        with self.work:
            self.work.wait(self.settings.poll_seconds)

    def _maintain(self) -> None:
        interval = max(0.2, self.settings.lease_seconds / 4)
        while not self.stopping.wait(interval):
            try:
                self.scheduler.renew(
                    {w.current.task_id: w.lease_owner for w in self.workers if w.current is not None}
                )
                requeued = self.scheduler.requeue_expired(
                    actor=f"{self.settings.server_name}@{self.settings.boot_id}"
                )
                if requeued:
                    self.wake()
            except Exception:  # keep renewing: a transient database error must not stop leases
                log.exception("maintenance failed")

    # ---- the service identity --------------------------------------------------------------------
    def service_line(self) -> str | None:
        with self.db.transaction() as s:
            row = s.get(Meta, META_SERVICE)
            return row.value if row is not None else None

    def provision(self, worker: EnclaveWorker) -> None:
        """Make sure `worker` holds the service key: it has it sealed already; it creates it (it won
        the platform's init claim while the database names no service); a provisioned worker of
        this server grants it by mutual attestation (the fast path); or, when this server has none,
        a provisioned worker of another server does, relayed through the database."""
        info = worker.call("service_info")
        if info.get("provisioned"):
            line = str(info["service"])
            worker.service = self._record_service(worker, line, created=False)
            log.info(
                "worker %s: holds the service key %s (sealed state)", worker.worker_id, _fingerprint(line)
            )
            return
        remote = _RemoteProvisioning(self, worker)
        logged = time.monotonic()
        try:
            while not self.stopping.is_set():
                claim: InitClaim | None = None
                with self.provision_lock:
                    others = [w for w in self.workers if w is not worker]
                    donors = sorted((w for w in others if w.ready), key=lambda w: w.current is not None)
                    if donors:  # an idle one answers at once
                        remote.withdraw()
                        self._provision_in_process(worker, donors[0])
                        return
                    known = self.service_line()
                    if known is None:
                        claim = self.init_claims.claim(worker.worker_id)
                        if claim.won:
                            self._create_service(worker, claim)
                            return
                    # a worker of this server holding the key will be ready in a moment: wait for it
                    local_holder = any(w.service is not None for w in others)
                if known is not None and not local_holder and remote.step():
                    return
                if time.monotonic() - logged > PROVISION_WAIT_LOG_S:
                    log.warning(
                        "worker %s: waiting for %s", worker.worker_id, remote.waiting_for(known, claim)
                    )
                    logged = time.monotonic()
                self.stopping.wait(PROVISION_POLL_S)
        finally:
            remote.withdraw()
        raise WorkerGone("server stopping", where=worker.worker_id)

    def _create_service(self, worker: EnclaveWorker, claim: InitClaim) -> None:
        if claim.took_over is not None:
            log.warning(
                "worker %s: %s claimed the creation of the service key over %.0f s ago and recorded "
                "none; this worker creates it instead",
                worker.worker_id,
                claim.took_over,
                INIT_CLAIM_STALE_S,
            )
        info = worker.call("service_init")
        if not info.get("provisioned"):
            raise EnclaveError("service_init did not provision the worker", where=worker.worker_id)
        worker.service = self._record_service(worker, str(info["service"]), created=True)

    def _provision_in_process(self, worker: EnclaveWorker, donor: EnclaveWorker) -> None:
        self._accept(worker, donor.grant_to(worker.make_offer()), granter=donor.worker_id)

    def _accept(
        self, worker: EnclaveWorker, grant: Grant, *, granter: str, request_id: str | None = None
    ) -> None:
        """The worker's enclave checks the granter's evidence and takes the key; the provisioning is
        recorded (and the database request, if any, deleted) in one transaction with its audit event."""
        info = worker.accept(grant)
        line = str(info.get("service"))
        if not info.get("provisioned"):
            raise EnclaveError("provision_accept did not provision the worker", where=worker.worker_id)
        relay = "in-process" if request_id is None else "database"
        with self.db.transaction() as s:
            stored, _ = self._record_service_in(s, worker, line, created=False)
            if _fingerprint(stored) == _fingerprint(line):
                if request_id is not None:
                    self.relay.finish(s, request_id)
                audit.append(
                    s,
                    "service.provisioned",
                    actor=worker.worker_id,
                    detail={
                        "granter": granter,
                        "grantee": worker.worker_id,
                        "service": _fingerprint(line),
                        "relay": relay,
                    },
                )
        if _fingerprint(stored) != _fingerprint(line):
            self._reset_stale(worker, line, stored)
        worker.service = line
        log.info(
            "worker %s: provisioned with service key %s by %s (mutual attestation%s)",
            worker.worker_id,
            _fingerprint(line),
            granter,
            "" if request_id is None else f", relayed through the database: request {request_id}",
        )

    def _record_service(self, worker: EnclaveWorker, line: str, *, created: bool) -> str:
        """Record `line` as the platform's service unless the database names one already; returns the
        platform's line. A worker holding another key has its state moved aside (`_reset_stale`)."""
        with self.db.transaction() as s:
            stored, recorded = self._record_service_in(s, worker, line, created=created)
        if _fingerprint(stored) != _fingerprint(line):
            self._reset_stale(worker, line, stored)
        if recorded:
            log.info(
                "worker %s: %s the service key %s",
                worker.worker_id,
                "created" if created else "adopted",
                _fingerprint(line),
            )
        return stored

    @staticmethod
    def _record_service_in(
        s: Session, worker: EnclaveWorker, line: str, *, created: bool
    ) -> tuple[str, bool]:
        """Insert-if-absent of the service line, with its audit event; (the stored line, inserted)."""
        if insert_ignore(s, Meta, key=META_SERVICE, value=line):
            audit.append(
                s,
                "service.created" if created else "service.adopted",
                actor=worker.worker_id,
                detail={"service": _fingerprint(line), "measurement": worker.info.get("measurement")},
            )
            return line, True
        row = s.execute(
            select(Meta).where(Meta.key == META_SERVICE).execution_options(populate_existing=True)
        ).scalar_one()
        return row.value, False

    def _reset_stale(self, worker: EnclaveWorker, line: str, known: str) -> None:
        """A worker sealed a service key other than the platform's (its state is from another
        installation, or it lost a race to create the key): keep its state aside and start it
        fresh, to be provisioned."""
        aside = worker.state_dir.with_name(f"{worker.state_dir.name}.stale-{int(time.time())}")
        log.warning(
            "worker %s: holds service key %s, the platform's is %s; moving its state to %s",
            worker.worker_id,
            _fingerprint(line),
            _fingerprint(known),
            aside,
        )
        worker._stop_enclave()
        worker.state_dir.rename(aside)
        raise WorkerGone("stale enclave state moved aside", where=worker.worker_id)

    def answer_provision_requests(self, worker: EnclaveWorker) -> None:
        """Called by a provisioned worker between tasks: when a worker of another server waits for
        the service key, claim its request and answer it with this worker's enclave (a grant, or
        the enclave's refusal and why). At most one look per poll interval per server."""
        with self._relay_look_lock:
            if time.monotonic() < self._relay_look_at:
                return
            self._relay_look_at = time.monotonic() + self.settings.poll_seconds
        server = self.settings.server_name
        try:
            if not self.relay.any_open(exclude_server=server):
                return
            request = self.relay.claim(worker.worker_id, exclude_server=server)
        except SQLAlchemyError as exc:  # the next look tries again; tasks must not stop for this
            log.warning("worker %s: cannot read provisioning requests (%s)", worker.worker_id, exc)
            return
        if request is None:
            return
        log.info(
            "worker %s: answering provisioning request %s of worker %s",
            worker.worker_id,
            request.id,
            request.worker_id,
        )
        try:
            grant = worker.grant_to(request.offer)
        except WorkerGone:
            self.relay.release(request, worker.worker_id)
            raise
        except EnclaveError as exc:
            self.relay.refuse(request, worker.worker_id, exc.message)
            log.warning(
                "worker %s: its enclave refused to provision worker %s (request %s): %s",
                worker.worker_id,
                request.worker_id,
                request.id,
                exc.message,
            )
            return
        if self.relay.grant(request, worker.worker_id, grant):
            log.info(
                "worker %s: granted the service key to worker %s (request %s); its enclave checks "
                "this one's evidence before it accepts",
                worker.worker_id,
                request.worker_id,
                request.id,
            )
        else:
            log.info(
                "worker %s: request %s of worker %s was withdrawn before the grant was written",
                worker.worker_id,
                request.id,
                request.worker_id,
            )

    # ---- answers for the API -------------------------------------------------------------------
    def evidence(self, nonce_hex: str, *, timeout: float = 30.0) -> tuple[str, str]:
        """Fresh evidence binding the service key and a verifier's nonce, from an idle worker when
        there is one. Returns (evidence b64, service line)."""
        if not self.workers:
            raise ServiceUnavailable("this server runs no enclave workers", where="service")
        deadline = time.monotonic() + timeout
        while True:
            ready = [w for w in self.workers if w.ready]
            for w in sorted(ready, key=lambda w: w.current is not None):
                if w.lock.acquire(timeout=0.05):
                    try:
                        reply = w._call_locked("service_evidence", nonce=nonce_hex)
                        return str(reply["evidence"]), str(w.service)
                    except WorkerGone:
                        continue
                    finally:
                        w.lock.release()
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    "no provisioned enclave worker is available (starting, or all busy)", where="service"
                )
            time.sleep(0.1)

    def describe(self) -> dict[str, Any]:
        line = self.service_line()
        info = next((w.info for w in self.workers if w.info), {})
        return {
            "service": line,
            "fingerprint": _fingerprint(line),
            "backend": info.get("backend"),
            "simulated": info.get("simulated"),
            "measurement": info.get("measurement"),
            "workers": [
                {
                    "id": w.worker_id,
                    "state": w.state,
                    "restarts": w.restarts,
                    "ready": w.ready,
                    "message": w.message,
                }
                for w in self.workers
            ],
        }


class _RemoteProvisioning:
    """One worker's request for the service key through the database (see `provisioning`): post
    an offer, poll for the answer, accept a grant; a refused, failed or expired request is withdrawn
    and asked again with a fresh offer."""

    def __init__(self, pool: WorkerPool, worker: EnclaveWorker) -> None:
        self.pool = pool
        self.worker = worker
        self.request_id: str | None = None
        self.retry_at = 0.0  # monotonic: no new request before this (after a refusal)
        self.refusals = 0

    def step(self) -> bool:
        """One round: post, or look at the pending request. True once the worker holds the key."""
        pool, worker = self.pool, self.worker
        if self.request_id is None:
            if time.monotonic() < self.retry_at:
                return False
            self.request_id = pool.relay.post(
                server=pool.settings.server_name, worker_id=worker.worker_id, offer=worker.make_offer()
            )
            log.info(
                "worker %s: no worker of this server holds the service key; asked the other servers "
                "through the database (request %s, valid %.0f s)",
                worker.worker_id,
                self.request_id,
                pool.relay.ttl_seconds,
            )
            return False
        status = pool.relay.status(self.request_id)
        if status is None:
            log.info(
                "worker %s: request %s was removed from the database; asking again",
                worker.worker_id,
                self.request_id,
            )
            self.request_id = None
        elif status.grant is not None:
            granter = status.granted_by or "an unnamed worker"
            try:
                pool._accept(worker, status.grant, granter=granter, request_id=status.id)
            except WorkerGone:
                raise
            except EnclaveError as exc:  # the granter's evidence or the grant did not check out
                self._ask_later(f"its enclave refused the grant of {granter}: {exc.message}")
                return False
            self.request_id = None
            return True
        elif status.state == "refused":
            self._ask_later(
                f"provisioning refused by {status.granted_by or 'an unnamed worker'}: {status.message}"
            )
        elif status.expires < now():
            log.info(
                "worker %s: request %s was not answered in %.0f s (no idle provisioned worker on "
                "another server?); asking again with a fresh offer",
                worker.worker_id,
                status.id,
                pool.relay.ttl_seconds,
            )
            self.withdraw()
        return False

    def _ask_later(self, reason: str) -> None:
        delay = PROVISION_RETRY_S[min(self.refusals, len(PROVISION_RETRY_S) - 1)]
        self.refusals += 1
        log.warning(
            "worker %s: %s; it stays unprovisioned and asks again in %.0f s",
            self.worker.worker_id,
            reason,
            delay,
        )
        self.worker._set_state("provisioning", message=reason)
        self.withdraw()
        self.retry_at = time.monotonic() + delay

    def withdraw(self) -> None:
        request_id, self.request_id = self.request_id, None
        if request_id is None:
            return
        try:
            self.pool.relay.withdraw(request_id)
        except SQLAlchemyError as exc:  # the worker's next request (or any later one) removes it
            log.warning(
                "worker %s: could not withdraw request %s (%s)", self.worker.worker_id, request_id, exc
            )

    def waiting_for(self, known: str | None, claim: InitClaim | None) -> str:
        if known is None and claim is not None and claim.worker is not None:
            return f"worker {claim.worker} to create the service key (claimed at {claim.at:.0f})"
        if known is None:
            return "the service key to be created"
        if self.request_id is not None:
            where = f"request {self.request_id} in the database"
        elif self.retry_at > time.monotonic():
            where = f"refused before; asks again in {self.retry_at - time.monotonic():.0f} s"
        else:
            where = "from a worker of this server"
        return f"a worker holding service key {_fingerprint(known)} to provision it ({where})"
