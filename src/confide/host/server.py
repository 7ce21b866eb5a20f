"""`confide serve`: the database, blob store, worker pool and HTTP API in one process."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy.exc import DBAPIError

from confide.enclave import bytecode
from confide.enclave.errors import ConfideError
from confide.enclave.sim_platform import SimPlatform
from confide.host.api import Platform, create_app
from confide.host.api.state import UploadLimits
from confide.host.blobstore import DEFAULT_MAX_BYTES, BlobStore
from confide.host.db import Database, sqlite_url
from confide.host.pool import PoolSettings, WorkerPool
from confide.host.scheduler import Scheduler

log = logging.getLogger("confide.host")

DEFAULT_PORT = 8470
DEFAULT_LEASE_S = 60.0


@dataclass(frozen=True)
class ServeOptions:
    db_url: str | None
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 2
    platform_dir: Path | None = None
    enclave_config: Path | None = None
    backend: str = "sim"
    lease_seconds: float = DEFAULT_LEASE_S
    poll_seconds: float = 0.5
    max_blob_bytes: int = DEFAULT_MAX_BYTES
    blob_dir: Path | None = None  # shared by every server of one platform (default: DATA/blobs)
    uploads: UploadLimits = field(default_factory=UploadLimits)  # concurrency, per-party quota, time
    accelerator: str | None = None  # numpy | cuda | auto (untrusted; for infer's outsourced modes)
    flow_engine: str = "local"  # local | spark: where a flow task's stages run (confide.host.flow_engine)
    spark_master: str = "local[2]"
    flow_agents: tuple[tuple[str, str], ...] = ()  # other hosts' node agents: (public line, evidence)


def configure_logging() -> None:
    """Progress lines on stderr: what the server is doing (never keys or data: it has none)."""
    logger = logging.getLogger("confide.host")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s confide serve: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def describe_db(db: Database) -> str:
    url = db.url
    if db.dialect == "sqlite":
        return f"SQLite file {url.database}"
    return f"PostgreSQL database {url.database} on {url.host or 'local socket'}"


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    log.info("listening on http://%s:%d (OpenAPI at /openapi.json)", host, port)


def build(opts: ServeOptions) -> tuple[Platform, WorkerPool]:
    data_dir = opts.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    platform_dir = (opts.platform_dir or data_dir / "platform").resolve()
    if opts.backend == "sim":
        SimPlatform.load_or_create(platform_dir)
        log.info("SIMULATED TEE platform at %s: no protection against this host", platform_dir)
    db = Database(opts.db_url or sqlite_url(data_dir / "confide.db"))
    try:
        db.migrate()
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise ConfideError(f"cannot open the database ({reason})", where=f"--db {db.url!r}") from None
    log.info("database: %s (schema at head)", describe_db(db))
    blobs = BlobStore(opts.blob_dir or data_dir / "blobs", max_bytes=opts.max_blob_bytes)
    blobs.clean_temporary()  # uploads cut short by a crash (not another server's live upload)
    shutil.rmtree(data_dir / "work", ignore_errors=True)  # enclave outputs of attempts that never finished
    scheduler = Scheduler(db, blobs, lease_seconds=opts.lease_seconds)
    name = f"{socket.gethostname()}:{hashlib.sha256(str(data_dir).encode()).hexdigest()[:8]}"
    pool = WorkerPool(
        db,
        blobs,
        scheduler,
        PoolSettings(
            data_dir=data_dir,
            platform_dir=platform_dir,
            size=opts.workers,
            server_name=name,
            boot_id=os.urandom(4).hex(),
            enclave_config=opts.enclave_config,
            backend=opts.backend,
            accelerator=opts.accelerator,
            flow_engine=opts.flow_engine,
            spark_master=opts.spark_master,
            flow_agents=opts.flow_agents,
            poll_seconds=opts.poll_seconds,
            lease_seconds=opts.lease_seconds,
        ),
    )
    return Platform(db=db, blobs=blobs, scheduler=scheduler, pool=pool, uploads=opts.uploads), pool


def serve(
    db_url: str | None,
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workers: int = 2,
    platform_dir: Path | None = None,
    *,
    enclave_config: Path | None = None,
    backend: str = "sim",
    lease_seconds: float = DEFAULT_LEASE_S,
    max_blob_bytes: int = DEFAULT_MAX_BYTES,
    blob_dir: Path | None = None,
    uploads: UploadLimits | None = None,
    accelerator: str | None = None,
    flow_engine: str = "local",
    spark_master: str = "local[2]",
    flow_agents: tuple[tuple[str, str], ...] = (),
) -> None:
    """`confide serve`: run until SIGINT/SIGTERM (see `run`)."""
    run(
        ServeOptions(
            db_url=db_url,
            data_dir=data_dir,
            host=host,
            port=port,
            workers=workers,
            platform_dir=platform_dir,
            enclave_config=enclave_config,
            backend=backend,
            lease_seconds=lease_seconds,
            max_blob_bytes=max_blob_bytes,
            blob_dir=blob_dir,
            uploads=uploads or UploadLimits(),
            accelerator=accelerator,
            flow_engine=flow_engine,
            spark_master=spark_master,
            flow_agents=flow_agents,
        )
    )


def run(opts: ServeOptions, **uvicorn_options: Any) -> None:
    """Run until SIGINT/SIGTERM; then stop the workers (each enclave is shut down cleanly)."""
    configure_logging()
    if opts.workers < 0:
        raise ConfideError("must be 0 or more", where="--workers")
    from confide.host.flow_engine import check_available

    check_available(opts.flow_engine)
    platform, pool = build(opts)
    app = create_app(platform)
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        **uvicorn_options,
    )
    server = _Server(config)
    if opts.workers and not bytecode.cache_ready():
        log.info("building the enclaves' checked-hash bytecode cache (once per installation, ~20 s)")
        bytecode.ensure_cache()
    log.info("starting %d enclave worker(s) under %s", opts.workers, opts.data_dir)
    # uvicorn handles SIGTERM during run(), then raises it again once it has stopped serving; with
    # the default handler that would kill the process before the workers drain. Ours just lets
    # run() return, so the running tasks finish and every enclave is shut down cleanly.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    pool.start()
    try:
        server.run()
    finally:
        log.info("stopping: no new tasks; shutting down enclave workers")
        pool.stop()
        platform.db.dispose()
        log.info("stopped")
