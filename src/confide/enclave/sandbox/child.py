"""The sandboxed child, from fork to exit. Never returns: always ends in os._exit.

1. reads its request (source, params, names, limits) from a sealed memfd the zygote never read;
2. applies every layer (layers.apply_all) — the function's source is not even compiled yet;
3. compiles the source as "<function>", calls run(ctx), flushes the outputs;
4. writes one JSON status line (outcome, exception type, traceback) to the status pipe.

The exit code says what happened (0 ok, 1 exception, 71 sandbox setup failed, 70 internal error);
the enclave process classifies from the exit status first and reads the status line only as detail,
since the function can write to any of its fds.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import linecache
import os
import sys
import traceback
from typing import Any, NoReturn

from confide.enclave.sandbox.api import DETAIL_CAP
from confide.enclave.sandbox.context import Context
from confide.enclave.sandbox.exitcodes import EXIT_EXCEPTION, EXIT_INTERNAL, EXIT_OK, EXIT_SETUP_FAILED
from confide.enclave.sandbox.layers import LayerFailed, apply_all, verify
from confide.enclave.sandbox.plan import ChildFds, SandboxPlan
from confide.enclave.sandbox.probe import Probe

FUNCTION_FILENAME = "<function>"


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _cap(text: str, limit: int = DETAIL_CAP) -> str:
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return text
    return data[: limit - 20].decode("utf-8", "ignore") + "\n[... truncated]"


def write_status(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def format_exception(exc: BaseException) -> str:
    """Traceback starting at the function's own frames (the runtime's frames are left out)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != FUNCTION_FILENAME:
        tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # e.g. MemoryError while formatting
        return f"{type(exc).__name__} (traceback unavailable)"


def child_main(plan: SandboxPlan, fds: ChildFds, *, probe_mode: bool = False) -> NoReturn:
    code = EXIT_INTERNAL
    try:
        code = _child(plan, fds, probe_mode)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            write_status(fds.status, {"outcome": "internal-error", "detail": _cap(format_exception(exc))})
    finally:
        os._exit(code)


def _child(plan: SandboxPlan, fds: ChildFds, probe_mode: bool) -> int:
    request = json.loads(_read_all(fds.payload))
    os.close(fds.payload)
    probe = Probe(plan) if probe_mode else None
    fresh_problem = probe.check_fresh() if probe is not None else None
    try:
        run, inputs, limit_table = apply_all(
            plan,
            status_fd=fds.status,
            log_fd=fds.log,
            input_fds=fds.inputs,
            output_fds=fds.outputs,
            limits=request["limits"],
            probe=probe,
            stream_fds=fds.stream,
        )
    except LayerFailed as exc:
        write_status(fds.status, {"outcome": "setup-failed", "layer": exc.layer, "detail": str(exc)})
        return EXIT_SETUP_FAILED
    if probe is not None:
        io_problem = _probe_io(inputs, fds.outputs)
        report = verify(
            run,
            probe,
            expected_fds={0, 1, 2, fds.status, *inputs, *fds.outputs},
            read_only=inputs,
            limit_table=limit_table,
            fresh_problem=fresh_problem,
        )
        write_status(fds.status, {"outcome": "probe", "layers": report, "io_problem": io_problem})
        return EXIT_OK
    return _run_function(request, inputs, fds.outputs, fds.status, fds.stream)


def _probe_io(inputs: tuple[int, ...], outputs: tuple[int, ...]) -> str | None:
    try:
        data = os.pread(inputs[0], 64, 0)
        os.write(outputs[0], data)
    except OSError as exc:
        return f"probe could not move its input to its output: {exc}"
    return None


def _run_function(
    request: dict[str, Any],
    input_fds: tuple[int, ...],
    output_fds: tuple[int, ...],
    status_fd: int,
    stream_fds: tuple[int, ...] = (),
) -> int:
    # Keep our own references: the function may monkeypatch any module.
    write, cap, fmt = write_status, _cap, format_exception
    sys.dont_write_bytecode = True
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives until exit
    sys.stdout = open(1, "w", closefd=False, buffering=1, errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1, errors="backslashreplace")  # noqa: SIM115
    stdout, stderr = sys.stdout, sys.stderr
    inputs = {name: os.fdopen(fd, "rb") for name, fd in zip(request["inputs"], input_fds, strict=True)}
    outputs = {name: os.fdopen(fd, "wb") for name, fd in zip(request["outputs"], output_fds, strict=True)}
    stream = (os.fdopen(stream_fds[0], "rb"), os.fdopen(stream_fds[1], "wb")) if stream_fds else None
    source: str = request["source"]
    linecache.cache[FUNCTION_FILENAME] = (len(source), None, source.splitlines(True), FUNCTION_FILENAME)
    try:
        code = compile(source, FUNCTION_FILENAME, "exec", dont_inherit=True)
        namespace: dict[str, Any] = {"__name__": "__function__", "__builtins__": builtins}
        exec(code, namespace)
        fn = namespace.get("run")
        if not callable(fn):
            raise TypeError("the function's source must define run(ctx)")
        fn(Context(request["params"], inputs, outputs, stream))  # type: ignore[arg-type]
        for handle in outputs.values():
            handle.close()
        stdout.flush()
        stderr.flush()
    except BaseException as exc:
        try:
            stdout.flush()
            stderr.flush()
        except BaseException:
            pass
        write(status_fd, {"outcome": "exception", "exc_type": type(exc).__name__, "detail": cap(fmt(exc))})
        return EXIT_EXCEPTION
    write(status_fd, {"outcome": "ok"})
    return EXIT_OK
