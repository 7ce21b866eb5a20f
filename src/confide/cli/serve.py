"""`confide serve`: run the untrusted platform (HTTP API, database, blob store, enclave workers).

The heavy imports (FastAPI, SQLAlchemy, uvicorn) happen only when the command runs."""

from __future__ import annotations

from pathlib import Path

import click

from confide.cli.common import friendly


@click.command(name="serve")
@click.option(
    "--db",
    "db_url",
    default=None,
    metavar="URL",
    help="sqlite:///FILE (default: DATA/confide.db) or postgresql://USER@HOST/DB (psycopg 3)",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("confide-data"),
    show_default=True,
    help="blob store, enclave worker state, SQLite file",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8470, show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True, help="enclave workers")
@click.option(
    "--platform-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="simulated TEE platform (default: DATA/platform)",
)
@click.option("--enclave-config", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--backend", default="sim", show_default=True, help="TEE backend of the enclave workers")
@click.option(
    "--lease-seconds",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="a running task whose worker stops renewing this long is queued again",
)
@click.option("--max-blob-mib", type=click.IntRange(1, 1 << 20), default=4096, show_default=True)
@click.option(
    "--blob-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="ciphertext blob store (default: DATA/blobs); servers sharing one database share this too",
)
@click.option(
    "--max-uploads",
    type=click.IntRange(1, 4096),
    default=16,
    show_default=True,
    help="concurrent blob uploads",
)
@click.option("--max-uploads-per-party", type=click.IntRange(1, 4096), default=4, show_default=True)
@click.option(
    "--quota-mib",
    type=click.IntRange(1, 1 << 40),
    default=16384,
    show_default=True,
    help="storage per party (the blobs it uploaded)",
)
@click.option(
    "--upload-timeout",
    type=click.FloatRange(0.1, 86400),
    default=60.0,
    show_default=True,
    help="seconds an upload (or a JSON body) may wait for its next chunk; in all it may take this "
    "plus its size at --upload-min-kib-per-s",
)
@click.option("--upload-min-kib-per-s", type=click.IntRange(1, 1 << 30), default=64, show_default=True)
@click.option(
    "--accelerator",
    type=click.Choice(["none", "numpy", "cuda", "auto"]),
    default="none",
    show_default=True,
    help="start an (untrusted) accelerator process per enclave worker for the infer built-in's "
    "outsourced modes: numpy on the CPU, cuda (PyTorch), or auto (cuda when available); none: "
    "such tasks are refused",
)
@click.option(
    "--flow-engine",
    type=click.Choice(["local", "spark"]),
    default="local",
    show_default=True,
    help="where a flow task's stages run: local (inside the enclave worker's call) or spark (PySpark "
    "and a node agent this server starts; the enclave worker opens and verifies the job)",
)
@click.option(
    "--spark-master",
    default=None,
    metavar="URL",
    help="Spark master for --flow-engine spark: local[N] or spark://HOST:PORT (default local[2])",
)
@click.option(
    "--flow-agent",
    "flow_agent_files",
    multiple=True,
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="for --flow-engine spark: another host's node agent, as the first two lines `python -m "
    "confide.flow.node_agent` printed there (ready ..., evidence ...); repeat per host. The enclave "
    "grants it a job key only once its evidence is checked; that host's Spark worker sets "
    "CONFIDE_FLOW_SOCKET to the agent's socket",
)
@friendly
def serve(
    db_url: str | None,
    data_dir: Path,
    host: str,
    port: int,
    workers: int,
    platform_dir: Path | None,
    enclave_config: Path | None,
    backend: str,
    lease_seconds: float,
    max_blob_mib: int,
    blob_dir: Path | None,
    max_uploads: int,
    max_uploads_per_party: int,
    quota_mib: int,
    upload_timeout: float,
    upload_min_kib_per_s: int,
    accelerator: str,
    flow_engine: str,
    spark_master: str | None,
    flow_agent_files: tuple[Path, ...],
) -> None:
    """Run the platform: parties talk to it over HTTP; it relays ciphertext to enclave workers.

    It is untrusted by design: it never holds a plaintext key or plaintext data.
    """
    from confide.enclave.errors import ConfideError
    from confide.host.api.state import UploadLimits
    from confide.host.server import serve as run_server

    if spark_master is not None and flow_engine != "spark":
        raise ConfideError("a Spark master is for --flow-engine spark", where="--spark-master")
    if flow_agent_files and flow_engine != "spark":
        raise ConfideError("node agents are for --flow-engine spark", where="--flow-agent")
    from confide.host.flow_engine import read_agent_announcement

    flow_agents = tuple(read_agent_announcement(f) for f in flow_agent_files)

    run_server(
        db_url,
        data_dir,
        host,
        port,
        workers,
        platform_dir,
        enclave_config=enclave_config,
        backend=backend,
        lease_seconds=lease_seconds,
        max_blob_bytes=max_blob_mib << 20,
        blob_dir=blob_dir,
        uploads=UploadLimits(
            max_concurrent=max_uploads,
            max_concurrent_per_party=max_uploads_per_party,
            quota_bytes=quota_mib << 20,
            timeout_s=upload_timeout,
            min_rate=upload_min_kib_per_s << 10,
        ),
        accelerator=None if accelerator == "none" else accelerator,
        flow_engine=flow_engine,
        spark_master=spark_master or "local[2]",
        flow_agents=flow_agents,
    )
