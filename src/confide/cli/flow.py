"""`confide flow`: confidential dataflow jobs (confide.flow) from the command line.

A job file is a Python module: its top-level functions are the job's user functions (they run in
the enclave workers' sandbox, from the sealed job description), and its `job(flow, inputs)` builds
the job with the Flow API and returns the action(s) (`.save(name)` / `.count(name)`); `inputs` maps
each `--input NAME=FILE` to its path. `job` itself runs here, on your machine, only to build the job.
"""

from __future__ import annotations

import json
import runpy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from confide.cli.common import friendly, home, parse_assignments, with_client
from confide.cli.output import emit_json, output_option
from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.group()
def flow() -> None:
    """Confidential dataflow: your functions run in enclave workers; the engine moves only ciphertext."""


@flow.command(name="workers")
@click.option("--count", type=click.IntRange(1, 64), default=2, show_default=True)
@output_option
@friendly
def workers_cmd(count: int, fmt: str) -> None:
    """The public keys of this machine's enclave workers (seal input files to them, or pass
    --identity to `flow run` to hand over your file's key in the attested job instead)."""
    from confide.flow.workers import local_backend, worker_identity

    here = home()
    backend = local_backend(here)
    pubs = [worker_identity(backend, here.state_dir, i).public for i in range(count)]
    if fmt == "json":
        emit_json(
            [{"worker": i, "fingerprint": p.fingerprint, "public": p.to_line()} for i, p in enumerate(pubs)]
        )
        return
    for i, p in enumerate(pubs):
        click.echo(f"worker {i}  {p.fingerprint}  {p.to_line()}")


@flow.command(name="run")
@click.argument("job_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--input", "inputs", multiple=True, required=True, help="NAME=FILE: a sealed input file")
@click.option("--to", "recipients", multiple=True, required=True, help="recipient public line or .pub file")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="result directory"
)
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="your key: inputs sealed to you are opened in the enclave with the key you hand over")  # fmt: skip
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True)
@click.option("--master", default="local[2]", show_default=True, help="Spark master URL (--engine spark)")
@click.option(
    "--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="local enclave workers"
)
@click.option("--memory-budget", "budget_mib", type=click.IntRange(1), default=None,
              help="MiB of decrypted records a task may hold; a larger keyed partition spills, sealed")  # fmt: skip
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="CONFIDE_POLICY", help="policy the engine's coordinator must pass")  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True)
@output_option
@friendly
def run_cmd(
    job_file: Path,
    inputs: tuple[str, ...],
    recipients: tuple[str, ...],
    out: Path,
    identity: Path | None,
    engine: str,
    master: str,
    workers: int,
    budget_mib: int | None,
    policy_path: Path | None,
    progress: bool,
    fmt: str,
) -> None:
    """Run JOB_FILE's job on sealed inputs; results are sealed to the recipients in --out."""
    from confide.enclave.keys import Identity, load_public
    from confide.flow import Flow, FlowError

    named = {k: Path(v) for k, v in parse_assignments(inputs, what="--input").items()}
    for name, path in named.items():
        if not path.is_file():
            raise ConfideError(f"no such file {str(path)!r}", where=f"--input {name}")
    pubs = [load_public(r) for r in recipients]
    owner = Identity.load(identity) if identity is not None else None
    here = home()
    here.platform()  # this installation's simulated platform (the local workers' TEE), made on first use
    policy = here.policy(policy_path)
    _, anchors = here.trust_from_env()
    module = _load_job(job_file)
    fl = Flow(job_file.read_text(encoding="utf-8"), identity=owner)
    try:
        built = _build(module, fl, named, job_file)
        actions = list(built) if isinstance(built, list | tuple) else [built]
        budget = budget_mib << 20 if budget_mib else None
        with _engine(engine, master, workers, _progress if progress else None, budget) as eng:
            summary = fl.run(
                *actions, engine=eng, recipients=pubs, out_dir=out, policy=policy, anchors=anchors
            )
    except FlowError as exc:
        raise ConfideError(str(exc), where=str(job_file)) from None
    if fmt == "json":
        emit_json(summary)
        return
    click.echo(
        f"job {summary.get('job')} accepted: {summary.get('stages')} stage(s), every partition consumed "
        f"exactly once; outputs {', '.join(summary.get('outputs', []))} sealed in {out} for "
        f"{', '.join(p.fingerprint for p in pubs)}"
    )


@flow.command(name="task")
@click.argument("job_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--input", "inputs", multiple=True, required=True, help="NAME=DATASET_REF (repeat)")
@click.option(
    "--output",
    "outputs",
    multiple=True,
    required=True,
    help="NAME=RECIPIENT[,RECIPIENT...] (repeat): a party name, a .pub file or a fingerprint",
)
@click.option("--max-runs", type=click.IntRange(1, 1000), default=3, show_default=True)
@with_client
def task_cmd(
    client: Client, job_file: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], max_runs: int
) -> None:
    """Create a platform task running JOB_FILE's job (the `flow` built-in) on datasets; prints its id.
    The job file is the same as for `flow run`: its job(flow, inputs) reads each input with
    flow.text/csv/json_lines(inputs[NAME]). Every input owner approves the job's code (`task show`)."""
    from confide.flow import Flow, FlowError
    from confide.flow.api import TaskInput
    from confide.flow.platform import flow_task

    refs = parse_assignments(inputs, what="--input")
    out_map: dict[str, list[str]] = {}
    for name, given in parse_assignments(outputs, what="--output").items():
        who = [r.strip() for r in given.split(",") if r.strip()]
        if not who:
            raise ConfideError(f"output {name!r} has no recipient", where="--output")
        out_map[name] = [client.resolve_party(r, where=f"--output {name}") for r in who]
    module = _load_job(job_file)
    fl = Flow(job_file.read_text(encoding="utf-8"))
    try:
        built = _build(module, fl, {name: TaskInput(name) for name in refs}, job_file)
        actions = list(built) if isinstance(built, list | tuple) else [built]
        task_id = flow_task(client, fl, *actions, inputs=refs, outputs=out_map, max_runs=max_runs)
    except FlowError as exc:
        raise ConfideError(str(exc), where=str(job_file)) from None
    click.echo(task_id)


@flow.command(name="open")
@click.argument("out_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("name")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--limit", type=click.IntRange(0), default=0, help="at most this many records (0: all)")
@friendly
def open_cmd(out_dir: Path, name: str, identity: Path, limit: int) -> None:
    """Open output NAME of a job (its records, as JSON lines), after checking every part against the
    manifest the enclave signed."""
    from confide.enclave.keys import Identity
    from confide.flow import open_result

    records = open_result(out_dir, name, Identity.load(identity))
    for rec in records[:limit] if limit else records:
        click.echo(json.dumps(rec, ensure_ascii=False, default=str))


def _progress(stage: int, done: int, total: int) -> None:
    click.echo(f"stage {stage}: {done}/{total} task(s) done", err=True)


def _load_job(path: Path) -> dict[str, Any]:
    try:
        module = runpy.run_path(str(path), run_name="confide_flow_job")
    except SyntaxError as exc:
        raise ConfideError(
            f"the job file does not parse: {exc.msg} (line {exc.lineno})", where=str(path)
        ) from None
    except Exception as exc:
        raise ConfideError(
            f"the job file failed to load: {type(exc).__name__}: {exc}", where=str(path)
        ) from None
    if not callable(module.get("job")):
        raise ConfideError("the job file defines no job(flow, inputs) function", where=str(path))
    return module


def _build(module: dict[str, Any], fl: Any, inputs: dict[str, Any], job_file: Path) -> Any:
    """The job file's job(flow, inputs), its own failure one clear error (it runs here, on your machine)."""
    from confide.flow import FlowError

    try:
        return module["job"](fl, inputs)
    except FlowError:
        raise
    except Exception as exc:
        raise ConfideError(
            f"job(flow, inputs) failed: {type(exc).__name__}: {exc} (inputs given: {', '.join(sorted(inputs))})",
            where=str(job_file),
        ) from None


@contextmanager
def _engine(kind: str, master: str, workers: int, progress: Any, budget: int | None) -> Iterator[Any]:
    from confide.flow import LocalEngine
    from confide.flow.workers import local_workers

    with local_workers(home(), workers if kind == "local" else 1, memory_budget=budget) as local:
        if kind == "local":
            yield LocalEngine(local.enclaves, progress=progress)
            return
        from confide.flow.node_agent import AgentClient, NodeAgent
        from confide.flow.spark_engine import SparkEngine, spark_session

        with tempfile.TemporaryDirectory(prefix="cf-flow-") as tmp:
            sock = str(Path(tmp) / "agent.sock")
            with NodeAgent(local.enclaves[0], sock):
                session = spark_session(master)
                try:
                    yield SparkEngine(session, AgentClient(sock), sock, progress=progress)
                finally:
                    session.stop()
