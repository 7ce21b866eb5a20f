from __future__ import annotations

from pathlib import Path

import pytest

from confide.enclave.keys import Identity

REPO = Path(__file__).resolve().parents[1]
TESTVECTORS = REPO.parent / "shared" / "testvectors"


@pytest.fixture
def alice() -> Identity:
    return Identity.generate("alice")


@pytest.fixture
def bob() -> Identity:
    return Identity.generate("bob")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "confide-home"
    monkeypatch.setenv("CONFIDE_HOME", str(root))
    return root


# ---- multi-party tasks against real enclave workers (test_task_enclave, test_builtins, ...) --------


class TaskKit:
    """What owners, creator and host do around a `task` call, with the real objects of PROTOCOL.md."""

    def __init__(self, root: Path, enclave, service) -> None:
        self.root = root
        self.enclave = enclave
        self.service = service  # the service's PublicIdentity
        self._n = 0

    def path(self, name: str) -> Path:
        self._n += 1
        d = self.root / f"t{self._n}"
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def dataset(self, owner: Identity, data: bytes, *, service=None, metadata: dict | None = None):
        """Seal `data` as the owner does (with header `metadata`); returns a SimpleNamespace (path,
        dataset_id, sha256, envelope, data_key, owner) the test can mix and match."""
        import hashlib
        import os as _os
        from types import SimpleNamespace

        from confide.client.dataset_keys import new_dataset_id, wrap_dataset_key
        from confide.enclave.sealed_file import SealedWriter

        data_key = _os.urandom(32)
        dataset_id = new_dataset_id()
        path = self.path("blob.sealed")
        with (
            open(path, "wb") as fh,
            SealedWriter(fh, data_key=data_key, recipients=[owner.public], metadata=metadata) as w,
        ):
            w.write(data)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        envelope = wrap_dataset_key(
            data_key,
            dataset_id=dataset_id,
            owner=owner.public,
            service=service or self.service,
            ciphertext_sha256=sha,
        )
        return SimpleNamespace(
            path=path, dataset_id=dataset_id, sha256=sha, envelope=envelope, data_key=data_key, owner=owner
        )

    def task_input(self, name: str, ds):
        from confide.enclave import manifest as mf

        return mf.TaskInput(name, ds.dataset_id, ds.owner.fingerprint, ds.sha256)

    def run(self, m, signed, datasets: dict, *, function_source=None, error_output=True, **over):
        """The host's `task` call; returns (result, receipt body, {output: path})."""
        import base64

        from confide.client.receipts import verify_task_receipt

        outs = {o.name: self.path(f"{o.name}.sealed") for o in m.outputs}
        if error_output:
            outs["_error"] = self.path("_error.sealed")
        args = {
            "manifest": m.text,
            "approvals": signed,
            "dataset_keys": {n: ds.envelope for n, ds in datasets.items()},
            "inputs": {n: ds.path for n, ds in datasets.items()},
            "outputs": outs,
            "function_source": function_source,
        }
        args.update(over)
        result = self.enclave.task(**args)
        body = verify_task_receipt(base64.b64decode(result["receipt"]), self.service)
        return result, body, outs

    def run_builtin(
        self,
        name: str,
        tables: dict[str, bytes],
        params: dict,
        *,
        owners: dict[str, Identity],
        creator: Identity,
        outputs: tuple[str, ...],
        participants: dict,
        metadata: dict[str, dict] | None = None,
    ):
        """A built-in's task over `tables` (input name -> bytes, uploaded by owners[name], sealed with
        header metadata[name]), each output sealed to the creator, approved by every owner and the
        creator; returns what `run` returns."""
        from confide.client.manifest_build import build_manifest, sign_approval
        from confide.enclave import manifest as mf

        meta = metadata or {}
        datasets = {n: self.dataset(owners[n], t, metadata=meta.get(n)) for n, t in tables.items()}
        m = build_manifest(
            service=self.service,
            creator=creator.public,
            function=mf.builtin_descriptor(name),
            params=params,
            inputs=[self.task_input(n, ds) for n, ds in datasets.items()],
            outputs=[mf.TaskOutput(o, (creator.fingerprint,)) for o in outputs],
            participants=participants,
        )
        approvals = [sign_approval(ds.owner, m) for ds in datasets.values()] + [sign_approval(creator, m)]
        return self.run(m, approvals, datasets)

    @staticmethod
    def read(path: Path, who: Identity) -> bytes:
        from confide.client.sealing import open_reader

        fh, reader = open_reader(path)
        with fh:
            return b"".join(bytes(c) for c in reader.unlock(identity=who).iter_chunks())


@pytest.fixture(scope="module")
def service_worker(tmp_path_factory: pytest.TempPathFactory):
    """One provisioned enclave worker (sim backend) for a whole test module: (kit, home)."""
    from confide.client.home import Home
    from confide.enclave.keys import PublicIdentity

    root = tmp_path_factory.mktemp("service")
    home = Home(root / "home")
    enclave = home.start_enclave()
    info = enclave.service_init()
    kit = TaskKit(root / "work", enclave, PublicIdentity.from_line(info["service"]))
    yield kit, home
    enclave.close()


# the platform's PostgreSQL fixtures (a throwaway cluster per session; see platform_support.py)
from platform_support import pg_cluster, postgres_url  # noqa: E402, F401

# ---- a platform server on loopback, shared by the tests of one module -----------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """`confide serve` with one enclave worker (a module may define its own `server` instead)."""
    from platform_support import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("server") / "data", workers=1).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def accelerator_server(tmp_path_factory: pytest.TempPathFactory):
    """`confide serve --accelerator numpy`: the worker's enclave gets an accelerator process, so the
    infer built-in's outsourced modes run as platform tasks."""
    from platform_support import ServerProcess

    srv = ServerProcess(
        tmp_path_factory.mktemp("server") / "data", workers=1, extra_args=("--accelerator", "numpy")
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def dev_policy():
    """A development policy accepting this build's simulated enclave."""
    from platform_support import this_build_dev_policy

    return this_build_dev_policy()


@pytest.fixture(autouse=True)
def _flow_clients_trust_the_test_build(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dataflow tests: Flow.run attests the engine's coordinator against CONFIDE_POLICY; point it at
    a policy for the test build (flow_support.BUILD) and the test platform's simulated root."""
    if request.module.__name__.startswith(("test_flow", "test_tcb_coverage_flow")):
        from flow_support import trust_this_build

        trust_this_build(monkeypatch, request.getfixturevalue("tmp_path_factory").mktemp("flow-trust"))
