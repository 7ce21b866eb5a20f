"""The pool of enclave workers: threads in the server process, each owning one enclave process.

Each worker keeps its own enclave state directory under the server's data directory. The first
worker to start creates the service identity (``service_init``) when no worker of this platform
has it; every other worker gets it by mutual attestation: the new worker makes an offer bound into
its evidence (``provision_offer``), a provisioned worker checks that evidence and wraps the service
key to the offer (``provision_grant``), and the new worker checks the granter's evidence before it
accepts (``provision_accept``). The host relays these messages and learns nothing from them.

A worker pulls queued tasks (see `scheduler`), runs each in its enclave, and publishes outputs only
after the enclave replied. When the enclave process dies, the worker restarts it and the task goes
back to the queue.
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

from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError, EnclaveError
from confide.enclave.keys import PublicIdentity
from confide.host import EnclaveProcess
from confide.platform import audit
from confide.platform.blobstore import BlobStore
from confide.platform.db import Database, Evidence, Meta, Worker, insert_ignore, now
from confide.platform.scheduler import ClaimedTask, Scheduler, StoredOutput

log = logging.getLogger("confide.platform")

META_SERVICE = "service"  # the service's public line
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10, 30)
PROVISION_WAIT_LOG_S = 30.0


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
            try:
                reply = self.call("task", **args)
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


class WorkerPool:
    def __init__(self, db: Database, blobs: BlobStore, scheduler: Scheduler, settings: PoolSettings) -> None:
        self.db = db
        self.blobs = blobs
        self.scheduler = scheduler
        self.settings = settings
        self.stopping = threading.Event()
        self.work = threading.Condition()
        self.provision_lock = threading.Lock()
        self.workers = [EnclaveWorker(self, i) for i in range(settings.size)]
        self.maintenance = threading.Thread(target=self._maintain, name="confide-maintenance", daemon=True)

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        requeued = self.scheduler.requeue_expired(
            actor=f"{self.settings.server_name}@{self.settings.boot_id}"
        )
        if requeued:
            log.info("requeued %d task(s) left running by a stopped server", len(requeued))
        for w in self.workers:
            w.thread.start()
        self.maintenance.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.thread.join(max(0.1, deadline - time.monotonic()))
        self.maintenance.join(5.0)

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
        """Make sure `worker` holds the service key: it has it sealed already, it creates it (first
        worker of the platform), or a provisioned worker grants it by mutual attestation."""
        info = worker.call("service_info")
        known = self.service_line()
        if info.get("provisioned"):
            line = str(info["service"])
            if known is None:
                self._adopt(worker, line, created=False)
            elif _fingerprint(line) != _fingerprint(known):
                self._reset_stale(worker, line, known)
            worker.service = known or line
            log.info(
                "worker %s: holds the service key %s (sealed state)", worker.worker_id, _fingerprint(line)
            )
            return
        waited = time.monotonic()
        while not self.stopping.is_set():
            with self.provision_lock:
                known = self.service_line()
                donors = [w for w in self.workers if w is not worker and w.ready]
                donors.sort(key=lambda w: w.current is not None)  # an idle one answers at once
                donor = donors[0] if donors else None
                if donor is not None:
                    self._grant(worker, donor)
                    return
                if known is None:
                    worker.call("service_init")
                    info = worker.call("service_info")
                    if not info.get("provisioned"):
                        raise EnclaveError(
                            "service_init did not provision the worker", where=worker.worker_id
                        )
                    self._adopt(worker, str(info["service"]), created=True)
                    worker.service = str(info["service"])
                    return
            if time.monotonic() - waited > PROVISION_WAIT_LOG_S:
                log.warning(
                    "worker %s: waiting for a worker holding service key %s to provision it",
                    worker.worker_id,
                    _fingerprint(known),
                )
                waited = time.monotonic()
            self.stopping.wait(0.2)
        raise WorkerGone("server stopping", where=worker.worker_id)

    def _grant(self, worker: EnclaveWorker, donor: EnclaveWorker) -> None:
        offer = worker.call("provision_offer")
        grant = donor.call("provision_grant", offer=offer["offer"], evidence=offer["evidence"])
        worker.call("provision_accept", grant=grant["grant"], evidence=grant["evidence"])
        info = worker.call("service_info")
        if not info.get("provisioned") or _fingerprint(str(info.get("service"))) != _fingerprint(
            donor.service
        ):
            raise EnclaveError("provisioning did not give the worker the service key", where=worker.worker_id)
        worker.service = str(info["service"])
        with self.db.transaction() as s:
            audit.append(
                s,
                "worker.provisioned",
                actor=worker.worker_id,
                detail={"granted_by": donor.worker_id, "service": _fingerprint(worker.service)},
            )
        log.info(
            "worker %s: provisioned with service key %s by %s (mutual attestation)",
            worker.worker_id,
            _fingerprint(worker.service),
            donor.worker_id,
        )

    def _adopt(self, worker: EnclaveWorker, line: str, *, created: bool) -> None:
        with self.db.transaction() as s:
            if insert_ignore(s, Meta, key=META_SERVICE, value=line):
                audit.append(
                    s,
                    "service.created" if created else "service.adopted",
                    actor=worker.worker_id,
                    detail={"service": _fingerprint(line), "measurement": worker.info.get("measurement")},
                )
        log.info(
            "worker %s: %s the service key %s",
            worker.worker_id,
            "created" if created else "adopted",
            _fingerprint(line),
        )

    def _reset_stale(self, worker: EnclaveWorker, line: str, known: str) -> None:
        """A worker sealed a service key other than the platform's (its state is from another
        installation): keep its state aside and start it fresh, to be provisioned."""
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
                {"id": w.worker_id, "state": w.state, "restarts": w.restarts, "ready": w.ready}
                for w in self.workers
            ],
        }
