"""The enclave measurement: like MRENCLAVE, a digest over everything that decides the enclave's behaviour.

It covers (1) every file of the TCB package ``confide.enclave`` and ``confide/__init__.py`` (which
``python -m confide.enclave`` runs first), (2) the exact version and the hash of every file that can
be imported from each third-party distribution the TCB imports (and from what those require): the
files its RECORD lists inside site-packages plus any other file under its top-level packages, (3) the
Python implementation and version, and (4) the enclave configuration. The same release on the same
platform gives the same value on any machine; a change to any of these gives a new value.

Left out, because they do not decide behaviour and differ between two installs of one release:
``__pycache__`` (bytecode whose header carries the source's mtime; the enclave and its zygote never
read it: they use only checked-hash bytecode from Confide's own cache, checked against the measured
source on every import, see ``bytecode.py``), the installer's bookkeeping (``RECORD``, ``INSTALLER``, ``REQUESTED``,
``direct_url.json``) and files installed outside site-packages (console scripts, whose shebang
names the virtual environment; the enclave never runs them). File mtimes are never read.
"""

from __future__ import annotations

import hashlib
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from importlib.metadata import PackagePath
from pathlib import Path
from typing import Any

from .config import EnclaveConfig
from .encoding import canonical_json
from .errors import ConfideError

FORMAT = "confide-measurement-v2"
TCB_ROOT = Path(__file__).resolve().parent
TCB_PACKAGE = "confide.enclave"
PACKAGE_INIT = TCB_ROOT.parent / "__init__.py"  # `python -m confide.enclave` runs it first

# Third-party distributions the TCB imports. Everything they require is measured too.
TCB_DISTRIBUTIONS: tuple[str, ...] = (
    "cryptography",  # AEAD, HPKE, Ed25519/X25519, X.509 (keys, sealed files, evidence)
    "pyseccomp",  # seccomp-bpf filter of the sandbox
    "numpy",  # pre-imported in the sandbox zygote for untrusted functions
    "pandas",  # idem
    "xgboost-cpu",  # idem (GBDT)
    "scikit-learn",  # builtins/numeric_ml.py (logistic regression, PCA) in the sandbox child; xgboost's sklearn API
    "onnx",  # enclave/infer parses models in the sandbox child
    "onnxruntime",  # builtins/onnx_infer.py, imported in the sandbox child (not pre-importable: starts a thread)
    "duckdb",  # builtins/sql.py, imported in the sandbox child (not pre-imported: the zygote stays as it was)
    "pyarrow",  # parquet_keys.py (Parquet and its modular encryption), parsed in the sandbox child
    "opendp",  # builtins/dp_noise.py: differential privacy's noise, drawn in the sandbox child
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


def _tree_files(root: Path) -> list[Path]:
    """Every file beneath `root` but cached bytecode (a stray sourceless .pyc is importable: measured)."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.relative_to(root).parts
    )


def tcb_files() -> list[Path]:
    return _tree_files(TCB_ROOT)


def tcb_counts(files: Iterable[Path]) -> dict[str, int]:
    """How big the TCB is: its files, and its Python files and their lines."""
    files = list(files)
    py = [p for p in files if p.suffix == ".py"]
    return {"files": len(files), "python_files": len(py), "python_lines": sum(_lines(p) for p in py)}


def _lines(path: Path) -> int:
    data = path.read_bytes()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution(name: str, path: Sequence[str] | None) -> metadata.Distribution:
    """The installed distribution `name`, looked up on `path` (default: sys.path)."""
    if path is None:
        return metadata.distribution(name)
    for dist in metadata.distributions(name=name, path=list(path)):
        return dist
    raise metadata.PackageNotFoundError(name)


def dependency_closure(
    roots: Iterable[str] = TCB_DISTRIBUTIONS, path: Sequence[str] | None = None
) -> list[str]:
    """Installed distributions reachable from `roots` through non-optional requirements."""
    roots = list(roots)
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = _normalise(todo.pop())
        if name in seen:
            continue
        try:
            dist = _distribution(name, path)
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


def _importable(f: PackagePath) -> bool:
    parts = f.parts
    return bool(parts) and parts[0] != ".." and "__pycache__" not in parts and f.name not in _SKIP_DIST_FILES


def dist_files(name: str, path: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """(name relative to site-packages, path) of what `name` contributes that can be imported: the
    files its RECORD lists in site-packages, and any file its RECORD does not list beneath one of its
    top-level packages (a planted module or extension there would run: it must change the value)."""
    dist = _distribution(name, path)
    base = Path(str(dist.locate_file("")))
    listed = [f for f in dist.files or [] if _importable(f)]
    out = {f.as_posix(): Path(str(dist.locate_file(f))) for f in listed}
    tops = {f.parts[0] for f in listed if len(f.parts) > 1 and not f.parts[0].endswith(".dist-info")}
    for top in sorted(tops):
        for p in _tree_files(base / top) if (base / top).is_dir() else []:
            out.setdefault(p.relative_to(base).as_posix(), p)
    return sorted((n, p) for n, p in out.items() if p.is_file())


def _dist_digest(name: str, path: Sequence[str] | None = None) -> dict[str, Any]:
    entries = [(n, _sha256_file(p)) for n, p in dist_files(name, path)]
    version = _distribution(name, path).version
    return {"version": version, "files": len(entries), "digest": _digest_listing(entries)}


@dataclass(frozen=True)
class Measurement:
    value: str  # hex SHA-256
    manifest: dict[str, Any]


def measure(
    config: EnclaveConfig,
    *,
    tcb_root: Path | None = None,
    path: Sequence[str] | None = None,
    roots: Sequence[str] = TCB_DISTRIBUTIONS,
) -> Measurement:
    """Measure this install (defaults), or another tree: `tcb_root` a copy of ``confide/enclave``
    (next to its ``confide/__init__.py``), `path` the site directories to find `roots` and what they
    require in (tests/test_measure_reproducible.py measures two installs this way)."""
    root = TCB_ROOT if tcb_root is None else tcb_root
    init = PACKAGE_INIT if tcb_root is None else tcb_root.parent / "__init__.py"
    files = _tree_files(root) if tcb_root is not None else tcb_files()
    tcb = [(p.relative_to(root).as_posix(), _sha256_file(p)) for p in files]
    manifest = {
        "format": FORMAT,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "machine": platform.machine(),
        "tcb": {
            "package": TCB_PACKAGE,
            **tcb_counts(files),
            "digest": _digest_listing(tcb),
            "package_init": _sha256_file(init),  # confide/__init__.py runs first
        },
        "dependencies": {name: _dist_digest(name, path) for name in dependency_closure(roots, path)},
        "config": config.to_dict(),
    }
    return Measurement(hashlib.sha256(canonical_json(manifest)).hexdigest(), manifest)
