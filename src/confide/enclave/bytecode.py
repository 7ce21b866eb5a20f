"""Bytecode for the processes that run TCB code (the enclave and the sandbox zygote).

CPython trusts a `__pycache__/*.pyc` whose header matches its source's mtime and size, so a stale
or planted timestamp-based .pyc would run code other than the measured source. The enclave and the
zygote therefore run with `interpreter_args()`:

- `-B`: never write bytecode;
- `-X pycache_prefix=DIR`: look for bytecode only in Confide's own cache `DIR` (never beside the
  sources, where an installer, an editor or a planted file may have left some);
- `--check-hash-based-pycs always`: every .pyc in `DIR` is *checked-hash* bytecode (PEP 552), whose
  header holds a hash of its source; the interpreter re-reads the source on every import and uses the
  bytecode only when the hash matches, else compiles the source. What runs is the measured source.

`DIR` is filled once per installation (`python -m confide.enclave.bytecode`, run by `make install`
and on first use by the host launcher) with checked-hash bytecode for the standard library, the TCB
and every measured distribution. Without it (`cache_ready()` false) the flags point the cache at
/dev/null: every module is compiled from source, which is correct but makes an enclave start about
2 s slower here.

Limit, stated plainly: the source hash is SipHash-1-3 with a fixed key, which detects stale bytecode,
not a forger. Whoever can write `DIR` can craft bytecode that passes the check; on the simulated
backend that is the host, who can do anything anyway. A real TEE deployment measures the cache with
the sources (Gramine lists it as trusted files) or keeps it inside the enclave image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

CACHE_ENV = "CONFIDE_BYTECODE_CACHE"
STAMP = "complete"
NO_CACHE_ARGS: tuple[str, ...] = ("-B", "-X", "pycache_prefix=/dev/null")
_SKIP_STDLIB = ("site-packages", "test", "idlelib", "tkinter", "lib2to3", "turtledemo", "ensurepip")


def cache_dir() -> Path:
    """Where this interpreter's checked-hash bytecode lives ($CONFIDE_BYTECODE_CACHE or beneath the
    virtual environment's prefix), one folder per interpreter version."""
    base = os.environ.get(CACHE_ENV) or str(Path(sys.prefix) / "var" / "confide-bytecode")
    return Path(base) / (sys.implementation.cache_tag or "python")


def cache_ready(directory: Path | None = None) -> bool:
    return ((directory or cache_dir()) / STAMP).is_file()


def args_for(prefix: str | None) -> tuple[str, ...]:
    """The flags for a process whose bytecode cache is `prefix` (None: no cache, compile sources)."""
    if not prefix or prefix == "/dev/null":
        return NO_CACHE_ARGS
    return ("-B", "-X", f"pycache_prefix={prefix}", "--check-hash-based-pycs", "always")


def interpreter_args() -> tuple[str, ...]:
    """Flags for starting the enclave: the checked-hash cache when it is complete, else none."""
    directory = cache_dir()
    return args_for(str(directory) if cache_ready(directory) else None)


def inherited_args() -> tuple[str, ...]:
    """Flags for a process the enclave starts (the zygote): the same cache as this process; from a
    process started without one (a test, a dataflow node agent), what `interpreter_args()` gives."""
    if sys.pycache_prefix is None:
        return interpreter_args()
    return args_for(sys.pycache_prefix)


def _roots() -> list[Path]:
    """The standard library, the confide package and the top-level modules and packages of every
    measured distribution."""
    from confide.enclave import measurement

    roots = {Path(sysconfig.get_paths()["stdlib"]), measurement.TCB_ROOT.parent}
    for name in measurement.dependency_closure():
        for rel, path in measurement.dist_files(name):
            parts = Path(rel).parts
            if rel.endswith(".py") and not parts[0].endswith((".dist-info", ".data")):
                base = Path(str(path)[: -len(rel)])
                roots.add(base / parts[0])
    return sorted(roots)


def _compile(roots: list[Path], workers: int) -> bool:
    """Runs in a process started with `-X pycache_prefix=DIR`: compile every root into DIR."""
    import compileall
    import py_compile
    import re

    skip = re.compile("|".join(rf"/{re.escape(s)}/" for s in _SKIP_STDLIB))
    ok = True
    for root in roots:
        if root.is_dir():
            rx = skip if root == Path(sysconfig.get_paths()["stdlib"]) else None
            ok &= bool(
                compileall.compile_dir(
                    root,
                    quiet=2,
                    workers=workers,
                    rx=rx,
                    invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
                )
            )
        elif root.suffix == ".py":
            ok &= bool(
                compileall.compile_file(
                    root, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH
                )
            )
    return ok


def build_cache(directory: Path | None = None, *, workers: int = 2) -> Path:
    """Fill the cache (idempotent: files already compiled with a matching hash are kept). The
    compiling process runs with -B, so the modules it imports itself leave no timestamp bytecode."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-I", "-B", "-X", f"pycache_prefix={directory}", "-m", "confide.enclave.bytecode",
         "--compile", str(workers), *map(str, _roots())],
        check=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    (directory / STAMP).write_text("checked-hash bytecode of the stdlib, the TCB and its distributions\n")
    return directory


def ensure_cache() -> None:
    """Build the cache when it is missing; a failure leaves the enclave compiling its sources."""
    if cache_ready():
        return
    try:
        build_cache()
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"confide: bytecode cache not built ({exc}); enclaves compile their sources", file=sys.stderr)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--compile"]:
        return 0 if _compile([Path(a) for a in argv[2:]], int(argv[1])) else 1
    where = build_cache()
    print(f"checked-hash bytecode for the enclave in {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
