"""Shared set-up of the dataflow tests: one zygote and enclave worker per test module."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confide.client.policy import Policy
from confide.enclave.backend import SIM_SIGNER, EnclaveIdentity, SimBackend
from confide.enclave.flow import FlowEnclave
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.enclave.sim_platform import SimPlatform
from confide.flow import Dataset, Flow, LocalEngine, open_result

FUNCTIONS = """
def words(line):
    return line.split()

def one(w):
    return (w, 1)

def add(a, b):
    return a + b

def is_long(w):
    return len(w) > 3

def upper(x):
    return x.upper()

def upper_all(it):
    for x in it:
        yield x.upper()

def first_char(w):
    return w[:1]

def length(x):
    return len(x)

def ident(x):
    return x

def neg_len(x):
    return -len(x)

def pair_id(r):
    return (r["id"], r["name"])

def pair_first(r):
    return (r[0], r[1])

def boom(x):
    raise KeyError("secret-" + x)
"""


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote.start(preimport=())
    yield z
    z.close()


@pytest.fixture(scope="module")
def enclave_identity() -> Identity:
    return Identity.generate("flow-enclave")


@pytest.fixture(scope="module")
def recipient() -> Identity:
    return Identity.generate("recipient")


BUILD = "f1" * 32  # the measurement every flow worker of these tests reports (one build)
_PLATFORM = Path(tempfile.mkdtemp(prefix="cf-sim-platform-"))  # one simulated platform per test run
atexit.register(shutil.rmtree, _PLATFORM, True)


def sim_backend(measurement: str = BUILD, *, debug: bool = False, platform: Path = _PLATFORM) -> SimBackend:
    """A simulated TEE vouching for one flow worker: same platform and measurement = same build."""
    ident = EnclaveIdentity("sim", measurement, SIM_SIGNER, 1, 1, debug)
    return SimBackend(SimPlatform.load_or_create(platform), ident)


def trust_this_build(monkeypatch: pytest.MonkeyPatch, work: Path) -> None:
    """What a client of these tests trusts (Flow.run attests the engine's coordinator): a
    development policy accepting the simulated build BUILD, and the test platform's vendor root."""
    policy = work / "flow-policy.toml"
    policy.write_text(Policy(backends=("sim",), measurements=(BUILD,), allow_simulation=True).to_toml())
    sim_backend()  # the platform exists
    monkeypatch.setenv("CONFIDE_POLICY", str(policy))
    monkeypatch.setenv("CONFIDE_SIM_ROOT", str(_PLATFORM / "vendor_root.crt"))
    monkeypatch.setenv("CONFIDE_HOME", str(work / "home"))


def make_enclave(zygote: Zygote, identity: Identity, **kw: Any) -> FlowEnclave:
    kw.setdefault("backend", sim_backend())
    return FlowEnclave(identity, zygote, **kw)


def run_and_open(
    flow: Flow, actions: dict[str, Dataset], engine: LocalEngine, recipient: Identity, out: Path
) -> dict[str, list[Any]]:
    saved = [ds.save(name) for name, ds in actions.items()]
    flow.run(*saved, engine=engine, recipients=[recipient.public], out_dir=out)
    return {name: open_result(out, name, recipient) for name in actions}
