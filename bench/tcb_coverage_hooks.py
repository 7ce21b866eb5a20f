"""Test-only hooks of `make coverage` (bench/tcb_coverage.py) that bring a sandboxed child's coverage
data home. Never part of the TCB and never on the path of a normal run: bench/tcb_coverage.py copies
this file, as `confide_cov_hooks`, into a temporary directory that only its own pytest run (a `-p`
plugin) and the enclave processes and zygotes that run starts (a `sitecustomize` there, and the
zygote's boot code) put on sys.path, and every hook is a no-op unless coverage.py is measuring.

The channel is one the child already has: its status pipe. In the child, os._exit first writes one
extra line, `confide-coverage:<base64 zlib JSON {file: [lines]}>`, after the child's own status record;
the reader of that pipe (the zygote for the probe child, the enclave side `classify` for a run) strips
such lines before anything parses the pipe and saves them as one more coverage data file. Nothing is
relaxed in the sandbox: the child writes only to a descriptor it holds anyway, as a function may.
"""

from __future__ import annotations

import base64
import json
import os
import posix
import re
import zlib
from typing import Any

MAGIC = b"confide-coverage:"
_LINE = re.compile(rb"\n?confide-coverage:[A-Za-z0-9+/=]*\n")


def _current() -> Any:
    try:
        import coverage
    except ImportError:
        return None
    return coverage.Coverage.current()


def strip_and_save(data: bytes) -> bytes:
    """Remove the coverage lines from what a child wrote to its status pipe; save what they carried."""
    if MAGIC not in data:
        return data
    cov = _current()
    for match in _LINE.finditer(data):
        blob = match.group(0).strip()[len(MAGIC) :]
        try:
            lines = json.loads(zlib.decompress(base64.b64decode(blob)))
        except (ValueError, zlib.error):
            continue
        if cov is not None and lines:
            from coverage import CoverageData

            out = CoverageData(basename=cov.config.data_file, suffix=True)
            out.add_lines({os.path.realpath(f): v for f, v in lines.items()})
            out.write()
    return _LINE.sub(b"", data)


def _child_exit_hook(status_fd: int) -> None:
    """In a sandboxed child: make os._exit write the lines executed so far to the status pipe."""
    cov = _current()
    collector = getattr(cov, "_collector", None) if cov is not None else None
    if collector is None:
        return

    def _exit(code: int) -> Any:
        try:
            raw = dict(collector.data)
            payload = {f: sorted(v) for f, v in raw.items() if v and not f.startswith("<")}
            blob = base64.b64encode(zlib.compress(json.dumps(payload).encode()))
            view = memoryview(b"\n" + MAGIC + blob + b"\n")
            while view:
                view = view[os.write(status_fd, view) :]
        except BaseException:  # the child's fd may be gone; its lines then stay unrecorded
            pass
        posix._exit(code)  # not coverage's own os._exit patch: it would try to write a data file

    os._exit = _exit  # type: ignore[assignment]


def install_zygote() -> None:
    """In the zygote, before the server starts: the hook in every child, and the probe's reader."""
    if _current() is None:
        return
    from confide.enclave.sandbox import child, server

    for name in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_FILE"):  # coverage has read them; the child's
        os.environ.pop(name, None)  # environment stays the scrubbed one test_sandbox checks
    real_main = child.child_main
    real_collect = server._collect

    def child_main(plan: Any, fds: Any, *, probe_mode: bool = False) -> Any:
        _child_exit_hook(fds.status)
        real_main(plan, fds, probe_mode=probe_mode)

    def _collect(pipes: dict[int, bytes], **kw: Any) -> dict[int, bytes] | None:
        out = real_collect(pipes, **kw)
        return None if out is None else {fd: strip_and_save(b) for fd, b in out.items()}

    child.child_main = child_main  # type: ignore[assignment]
    server._collect = _collect


def install_enclave() -> None:
    """In a process that starts zygotes: their boot code installs the zygote hooks, and each run's
    status pipe is stripped before it is classified."""
    if _current() is None:
        return
    from confide.enclave.sandbox import zygote

    if getattr(zygote, "_confide_cov_hooked", False):
        return
    zygote._confide_cov_hooked = True  # type: ignore[attr-defined]
    keep = {k: os.environ[k] for k in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_FILE") if k in os.environ}
    real_env = zygote.zygote_environment
    zygote.zygote_environment = lambda: {**real_env(), **keep}
    marker = "from confide.enclave.sandbox.server import main\n"
    zygote._BOOT = zygote._BOOT.replace(
        marker, "import confide_cov_hooks\nconfide_cov_hooks.install_zygote()\n" + marker
    )
    real_classify = zygote.classify

    def classify(obs: Any, **kw: Any) -> Any:
        obs.status_bytes = strip_and_save(obs.status_bytes)
        return real_classify(obs, **kw)

    zygote.classify = classify


def pytest_configure(config: Any) -> None:
    """As a pytest plugin (`-p confide_cov_hooks`): hook the test process too."""
    install_enclave()
