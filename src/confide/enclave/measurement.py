"""The enclave measurement: like MRENCLAVE, a digest over everything that decides the enclave's behaviour.

It covers (1) every file of the TCB package ``confide.enclave``, (2) the exact version and the hash of
every installed file of each third-party distribution the TCB imports (and of what those require),
(3) the Python implementation and version, and (4) the enclave configuration. The same release on the
same platform gives the same value on any machine; a change to any of these gives a new value.
"""

from __future__ import annotations

import hashlib
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import EnclaveConfig
from .encoding import canonical_json
from .errors import ConfideError

FORMAT = "confide-measurement-v1"
TCB_ROOT = Path(__file__).resolve().parent

# Third-party distributions the TCB imports. Everything they require is measured too.
TCB_DISTRIBUTIONS: tuple[str, ...] = (
    "cryptography",  # AEAD, HPKE, Ed25519/X25519, X.509 (keys, sealed files, evidence)
    "pyseccomp",  # seccomp-bpf filter of the sandbox
    "numpy",  # pre-imported in the sandbox zygote for untrusted functions
    "pandas",  # idem
    "xgboost-cpu",  # idem (GBDT)
    "scikit-learn",  # imported lazily in the sandbox by xgboost's sklearn API
)

_SKIP_DIST_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest_listing(entries: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in sorted(entries):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def tcb_files() -> list[Path]:
    return sorted(
        p for p in TCB_ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots: Iterable[str] = TCB_DISTRIBUTIONS) -> list[str]:
    """Installed distributions reachable from `roots` through non-optional requirements."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = _normalise(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in {_normalise(r) for r in roots}:
                raise ConfideError(f"TCB dependency {name!r} is not installed") from None
            continue  # a requirement guarded by a marker that does not apply here
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" in req.replace("extra==", "extra =="):
                continue
            m = _REQ_NAME.match(req)
            if m:
                todo.append(m.group(1))
    return sorted(seen)


def _dist_digest(name: str) -> dict[str, Any]:
    dist = metadata.distribution(name)
    entries = []
    for f in dist.files or []:
        if f.suffix == ".pyc" or "__pycache__" in f.parts or f.name in _SKIP_DIST_FILES:
            continue
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            entries.append((str(f), _sha256_file(path)))
    return {"version": dist.version, "files": len(entries), "digest": _digest_listing(entries)}


@dataclass(frozen=True)
class Measurement:
    value: str  # hex SHA-256
    manifest: dict[str, Any]


def measure(config: EnclaveConfig) -> Measurement:
    tcb = [(str(p.relative_to(TCB_ROOT)), _sha256_file(p)) for p in tcb_files()]
    manifest = {
        "format": FORMAT,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": platform.machine(),
        "tcb": {"package": "confide.enclave", "files": len(tcb), "digest": _digest_listing(tcb)},
        "dependencies": {name: _dist_digest(name) for name in dependency_closure()},
        "config": config.to_dict(),
    }
    return Measurement(hashlib.sha256(canonical_json(manifest)).hexdigest(), manifest)
