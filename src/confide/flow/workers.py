"""Enclave workers for dataflow jobs on this machine, as `confide flow run` starts them.

Each worker is a ``FlowEnclave`` with its own sandbox zygote, vouched for by this installation's TEE
backend (the simulated one by default: it protects nothing against the host). Its identity is kept
sealed to the backend (like the platform's service key): the same workers keep one identity across
runs, so a data owner can seal a file to them once (`confide flow workers` prints their keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from confide.client.home import Home
from confide.enclave.backend import TeeBackend, create_backend
from confide.enclave.config import EnclaveConfig
from confide.enclave.flow import FlowEnclave
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.enclave.sandbox.zygote import PARQUET_READER
from confide.enclave.state import seal_identity, state_path, unseal_identity

SEAL_LABEL = b"confide-flow-worker-identity"


@dataclass
class LocalWorkers:
    backend: TeeBackend
    enclaves: list[FlowEnclave]


def worker_identity(backend: TeeBackend, state_dir: Path, index: int) -> Identity:
    """Worker `index`'s identity, unsealed from `state_dir`, or created and sealed there."""
    path = state_path(backend, state_dir, f"flow-worker-{index}")
    if path.exists():
        return unseal_identity(backend, path, SEAL_LABEL, f"flow worker {index} key")
    identity = Identity.generate(f"confide-flow-worker-{index}")
    seal_identity(backend, path, SEAL_LABEL, identity)
    return identity


def local_backend(home: Home, name: str = "sim") -> TeeBackend:
    home.platform()  # the simulated platform of this installation, created on first use
    return create_backend(name, platform_dir=home.platform_dir, config=EnclaveConfig())


@contextlib.contextmanager
def local_workers(
    home: Home, count: int = 2, *, backend: str = "sim", memory_budget: int | None = None
) -> Iterator[LocalWorkers]:
    """`count` enclave workers (one zygote each), closed on exit; `memory_budget`: the decrypted
    bytes a task may hold (a larger keyed partition spills to sealed files)."""
    tee = local_backend(home, backend)
    zygotes: list[Zygote] = []
    try:
        enclaves = []
        for i in range(max(1, count)):
            zygotes.append(Zygote.start(preimport=(PARQUET_READER,)))
            ident = worker_identity(tee, home.state_dir, i)
            enclaves.append(FlowEnclave(ident, zygotes[-1], backend=tee, memory_budget=memory_budget))
        yield LocalWorkers(tee, enclaves)
    finally:
        for z in zygotes:
            z.close()
