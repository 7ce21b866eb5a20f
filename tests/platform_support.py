"""Test support for the platform (`confide serve`): a throwaway PostgreSQL cluster, a server in a
subprocess on loopback, a signed HTTP client built on confide.client.api_auth, and helpers that prepare
datasets, functions and tasks with confide.enclave.manifest (what a party's client would do).

PostgreSQL: the binaries of /usr/lib/postgresql/<version>/bin (15 preferred; ``CONFIDE_PG_BIN``
overrides). initdb refuses to run as root, so as root the cluster runs as the ``postgres`` user
(runuser). It listens only on a Unix socket in its own temporary directory. If PostgreSQL is
missing or does not start, the fixture FAILS: `.ci/run` installs it on a fresh machine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confide.client import api_auth
from confide.client.dataset_keys import new_dataset_id, wrap_dataset_key
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.policy import Policy
from confide.client.receipts import verify_task_receipt
from confide.client.sealing import encrypt_stream
from confide.enclave import manifest as mf
from confide.enclave.config import EnclaveConfig
from confide.enclave.encoding import canonical_json
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.measurement import measure
from confide.enclave.sealed_file import SealedReader

PG_USER = "postgres"
PG_PORT = 5432  # the socket lives in a private directory: the port only names the socket file
SERVER_START_TIMEOUT_S = 120.0


# ---- PostgreSQL -------------------------------------------------------------------------------------


def find_pg_bin() -> Path:
    override = os.environ.get("CONFIDE_PG_BIN")
    if override:
        return Path(override)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: (
            p.parent.parent.name != "15",
            -int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
        ),
    )
    if not found:
        pytest.fail(
            "PostgreSQL not found (no /usr/lib/postgresql/*/bin/initdb): install it "
            "(apt-get install -y postgresql; .ci/run does) or set CONFIDE_PG_BIN",
            pytrace=False,
        )
    return found[0].parent


class PostgresCluster:
    """initdb + pg_ctl in a temporary directory; databases created on demand."""

    def __init__(self) -> None:
        self.bin = find_pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="confide-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.as_root = os.geteuid() == 0
        self.user = PG_USER if self.as_root else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        self.sock.mkdir()
        if self.as_root:
            try:
                pw = pwd.getpwnam(PG_USER)
            except KeyError:
                pytest.fail(
                    f"running as root, but there is no {PG_USER!r} user to run PostgreSQL as", pytrace=False
                )
            for path in (self.root, self.sock):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        steps = (
            (
                "initdb",
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ),
            (
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "-o",
                f"-k {self.sock} -p {PG_PORT} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200",
                "start",
            ),
        )
        for step in steps:
            result = self._run(*step)
            if result.returncode != 0:
                log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                pytest.fail(
                    f"PostgreSQL {step[0]} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}\n{log}",
                    pytrace=False,
                )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@/{database}?host={self.sock}&port={PG_PORT}"

    def create_database(self) -> str:
        import psycopg

        name = f"confide_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host=str(self.sock), port=PG_PORT, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(pg_cluster: PostgresCluster) -> str:
    """A fresh, empty database on the session's throwaway cluster."""
    return pg_cluster.create_database()


# ---- the server in a subprocess ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`confide serve` in its own process group (so a test can SIGKILL it, and clean up after)."""

    def __init__(
        self,
        data_dir: Path,
        db_url: str | None = None,
        *,
        workers: int = 2,
        lease_seconds: float = 60,
        extra_args: tuple[str, ...] = (),
        command: list[str] | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.extra_args = extra_args
        self.command = command  # a whole `confide serve ...` command line, as a user types it
        self.cwd = cwd
        self.env = env
        self.data_dir = data_dir
        self.db_url = db_url
        self.workers = workers
        self.lease_seconds = lease_seconds
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: list[int] = []  # process groups of every start, cleaned up by stop()

    def start(self, *, wait_workers: bool = True) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "confide.cli.main",
            "serve",
            "--data",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--lease-seconds",
            str(self.lease_seconds),
        ]
        if self.db_url:
            cmd += ["--db", self.db_url]
        cmd += self.extra_args
        if self.command is not None:
            cmd = [*self.command, "--port", str(self.port)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.cwd,
            env=self.env,
        )
        self.groups.append(self.proc.pid)
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not answer in time:\n{self.log()}")
            time.sleep(0.1)
        if wait_workers:
            self.wait_workers(self.workers)
        return self

    def wait_workers(self, n: int, timeout: float = SERVER_START_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = httpx.get(f"{self.url}/v1/service", timeout=5).json()
            if info["service"] and sum(1 for w in info["workers"] if w["ready"]) >= n:
                return dict(info)
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} worker(s) not ready in time: {info}\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server process only (its enclave processes notice the closed channel)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for group in self.groups:  # whatever a killed server left behind (its enclaves)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        self.groups.clear()
        self.proc = None


# ---- a party talking to the server -------------------------------------------------------------------------


class Party:
    """One party's signed HTTP calls, made with confide.client.api_auth directly (not the SDK)."""

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.identity = Identity.generate(name)
        self.http = httpx.Client(base_url=url, timeout=60)
        self._audience: str | None = None

    @property
    def audience(self) -> str:
        """The platform id this party's requests are signed for (announced at GET /v1/platform)."""
        if self._audience is None:
            self._audience = str(self.http.get("/v1/platform").json()["platform_id"])
        return self._audience

    @property
    def fp(self) -> str:
        return self.identity.fingerprint

    @property
    def public(self) -> PublicIdentity:
        return self.identity.public

    def register(self) -> Party:
        r = self.http.post(
            "/v1/parties",
            json={
                "name": self.name,
                "identity": self.public.to_line(),
                "signature": api_auth.sign_registration(self.identity, self.name),
            },
        )
        assert r.status_code in (200, 201), r.text
        return self

    def signed(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> httpx.Request:
        content = raw if raw is not None else (canonical_json(body) if body is not None else b"")
        headers = api_auth.sign_request(self.identity, method, path, content, audience=self.audience)
        if body is not None:
            headers["content-type"] = "application/json"
        return self.http.build_request(method, path, content=content, headers=headers)

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.http.send(self.signed(method, path, body))

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        r = self.call(method, path, body)
        assert r.is_success, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def upload_headers(self, data: bytes) -> dict[str, str]:
        """Signed headers of ``PUT /v1/blobs`` declaring `data` (its length and SHA-256)."""
        return api_auth.sign_request(
            self.identity,
            "PUT",
            "/v1/blobs",
            b"",
            audience=self.audience,
            body_sha256=hashlib.sha256(data).hexdigest(),
            body_length=len(data),
        )

    def put_blob(self, data: bytes) -> dict[str, Any]:
        r = self.http.put("/v1/blobs", content=data, headers=self.upload_headers(data))
        assert r.status_code == 201, r.text
        return dict(r.json())

    def get_blob(self, sha256: str) -> bytes:
        r = self.call("GET", f"/v1/blobs/{sha256}")
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == sha256
        return r.content

    def close(self) -> None:
        self.http.close()


@dataclass(frozen=True)
class UploadedDataset:
    dataset_id: str
    ciphertext_sha256: str
    owner: Party

    def task_input(self, name: str) -> mf.TaskInput:
        return mf.TaskInput(name, self.dataset_id, self.owner.fp, self.ciphertext_sha256)


def service_key(party: Party) -> PublicIdentity:
    info = party.http.get("/v1/service").json()
    return PublicIdentity.from_line(info["service"])


def upload_dataset(
    owner: Party, data: bytes, service: PublicIdentity, *, name: str = "data"
) -> UploadedDataset:
    """What a data owner's client does: seal with a fresh key, upload, wrap the key to the service."""
    key = AESGCM.generate_key(256)
    dataset_id = new_dataset_id()
    sealed = io.BytesIO()
    encrypt_stream(
        io.BytesIO(data), sealed, recipients=[owner.public], data_key=key, metadata={"dataset_id": dataset_id}
    )
    blob = owner.put_blob(sealed.getvalue())
    envelope = wrap_dataset_key(
        key, dataset_id=dataset_id, owner=owner.public, service=service, ciphertext_sha256=blob["sha256"]
    )
    owner.ok(
        "POST",
        "/v1/datasets",
        {
            "dataset_id": dataset_id,
            "name": name,
            "schema": {"columns": ["text"]},
            "rows": data.count(b"\n"),
            "ciphertext_sha256": blob["sha256"],
            "key_envelope": envelope,
        },
    )
    return UploadedDataset(dataset_id, blob["sha256"], owner)


PATIENTS = b"patient,weight\nann,61\nbob,82\n"  # a small dataset the platform tests upload

UPPER = """
import time

def run(ctx):
    time.sleep(float(ctx.params.get("sleep", 0)))
    data = ctx.inputs["data"].read()
    ctx.outputs["out"].write(data.upper() + ctx.params.get("suffix", "").encode())
"""

FAILING = """
def run(ctx):
    raise ValueError("the function broke: " + ctx.inputs["data"].read().decode())
"""


def register_function(owner: Party, source: str, *, name: str = "upper") -> mf.FunctionDescriptor:
    desc = mf.function_descriptor(
        name=name,
        source=source,
        owner=owner.public,
        description="upper-cases its input",
        inputs=["data"],
        outputs=["out"],
    )
    owner.ok("POST", "/v1/functions", {"descriptor": desc.to_json(), "source": source})
    return desc


def create_task(
    creator: Party,
    service: PublicIdentity,
    function: mf.FunctionDescriptor,
    dataset: UploadedDataset,
    recipients: list[Party],
    *,
    params: dict[str, Any] | None = None,
) -> mf.Manifest:
    parties = {p.fp: p for p in [creator, dataset.owner, *recipients]}
    manifest = build_manifest(
        service=service,
        creator=creator.public,
        function=function,
        inputs=[dataset.task_input("data")],
        outputs=[mf.TaskOutput("out", tuple(p.fp for p in recipients), 1 << 20)],
        participants={p.name: p.public for p in parties.values()},
        params=params or {},
    )
    creator.ok("POST", "/v1/tasks", {"manifest": manifest.to_json()})
    approve(creator, manifest)  # the enclave runs only a manifest its creator approved
    return manifest


def approve(party: Party, manifest: mf.Manifest) -> None:
    party.ok(
        "POST",
        f"/v1/tasks/{manifest.task_id}/approvals",
        {"approval": sign_approval(party.identity, manifest)},
    )


def wait_task(
    party: Party, task_id: str, *, states: tuple[str, ...] = ("succeeded", "failed"), timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = party.ok("GET", f"/v1/tasks/{task_id}")
        if info["state"] in states:
            return dict(info)
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {info['state']} after {timeout} s: {info}")
        time.sleep(0.1)


def receipt_body(info: dict[str, Any], service: PublicIdentity) -> dict[str, Any]:
    """The latest receipt, its service signature checked."""
    return verify_task_receipt(base64.b64decode(info["receipt"]), service)


def open_output(party: Party, sha256: str) -> bytes:
    """Download an output (digest checked) and decrypt it with the party's own key."""
    reader = SealedReader(io.BytesIO(party.get_blob(sha256)), where=f"output {sha256}")
    return b"".join(bytes(c) for c in reader.unlock(identity=party.identity).iter_chunks())


# ---- the SDK-level tests' shared pieces -------------------------------------------------------------------

UPPER_FN = 'def run(ctx):\n    ctx.outputs["out"].write(ctx.inputs["data"].read().upper())\n'


def this_build_dev_policy() -> Policy:
    """A development policy accepting this build's simulated enclave (like `policy init --dev`)."""
    return Policy(backends=("sim",), measurements=(measure(EnclaveConfig()).value,), allow_simulation=True)


def run_upper_task(owner: Any, lab: Any, data_dir: Path) -> tuple[str, Any, str]:
    """SDK clients `owner` and `lab`: upload a dataset, register UPPER_FN, create, approve and run a
    task to success; returns (task id, dataset ref, function digest)."""
    data = data_dir / "rows.csv"
    data.write_text("name,score\nada,1\ngrace,2\n")
    ds = owner.upload_dataset(data)
    fn = lab.register_function(UPPER_FN, name="upper", description="upper-cases the input", outputs=["out"])
    task = lab.create_task(function=fn, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]})
    owner.approve(task)
    lab.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    return task, ds, fn


def sdk_clients(server: ServerProcess, homes: Path, names: tuple[str, ...]) -> list[Any]:
    """Registered SDK clients, one per name, each with its own home under `homes`, trusting the
    server's simulated root and this build's development policy."""
    from confide.attest.anchors import load_trust_anchors
    from confide.client.sdk import Client

    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    policy = this_build_dev_policy()
    clients = []
    for name in names:
        c = Client(server.url, Identity.generate(name), policy=policy, anchors=anchors, home=homes / name)
        c.register(name)
        clients.append(c)
    return clients


def upload_tables(owners: dict[str, Any], tables: dict[str, bytes], where: Path) -> dict[str, str]:
    """Each table (input name -> CSV bytes) uploaded by its owner; the dataset references by name."""
    refs = {}
    for name, data in tables.items():
        (where / f"{name}.csv").write_bytes(data)
        refs[name] = owners[name].upload_dataset(where / f"{name}.csv").ref
    return refs


class CliParties:
    """`confide` CLI calls (click's runner, in this process) by several parties of one server: each
    named party gets a key (keygen) under `tmp` and is registered under its name; all trust this
    build's development policy and the server's simulated root."""

    def __init__(self, server: ServerProcess, tmp: Path, names: tuple[str, ...]) -> None:
        from click.testing import CliRunner

        from confide.cli.main import main

        self._runner, self._main, self.tmp = CliRunner(), main, tmp
        policy = tmp / "dev-policy.toml"
        policy.write_text(this_build_dev_policy().to_toml())
        self.env = {
            "CONFIDE_HOME": str(tmp / "home"),
            "CONFIDE_URL": server.url,
            "CONFIDE_POLICY": str(policy),
            "CONFIDE_SIM_ROOT": str(server.data_dir / "platform" / "vendor_root.crt"),
        }
        self.keys: dict[str, Path] = {}
        for name in names:
            r = self._runner.invoke(main, ["keygen", name, "--out-dir", str(tmp)], env=self.env)
            assert r.exit_code == 0, r.output
            self.keys[name] = tmp / f"{name}.key"
            r = self(name, "party", "register", "--name", name)
            assert r.exit_code == 0, r.output
        self.fps = {n: Identity.load(k).fingerprint for n, k in self.keys.items()}

    def __call__(self, who: str, *args: str, stdin: str | None = None) -> Any:
        """`confide ARGS` as party `who`: click's Result."""
        env = {**self.env, "CONFIDE_IDENTITY": str(self.keys[who])}
        return self._runner.invoke(self._main, list(args), input=stdin, env=env)

    def ok(self, who: str, *args: str, stdin: str | None = None) -> str:
        """The last line of a successful command's output (a reference, a task id)."""
        r = self(who, *args, stdin=stdin)
        assert r.exit_code == 0, r.output
        return str(r.stdout).strip().splitlines()[-1]

    def upload(self, who: str, name: str, data: bytes, *options: str) -> str:
        """`dataset upload` of `data` (written to NAME.csv) by `who`; the dataset's reference."""
        path = self.tmp / f"{name}.csv"
        path.write_bytes(data)
        return self.ok(who, "dataset", "upload", str(path), *options)
