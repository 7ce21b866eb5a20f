"""The untrusted accelerator (outside the TCB and the sandbox): computes ``X·W mod p`` for the
enclave's linear layers and is checked on every answer (confide.enclave.infer.slalom).

Backends:

- ``NumpyAccelerator``: float64 BLAS on the CPU; exact because |X| <= (p-1)/2, |W| < 2^(bits_w-1)
  and K·(p-1)/2·2^(bits_w-1) < 2^53 for every layer (checked on load and on each call);
- ``CudaAccelerator``: the same product in float64 on a CUDA device with PyTorch, used only when
  ``torch`` imports and ``torch.cuda.is_available()``. UNTESTED here: torch is not installed on
  this machine. Float64 products of integers below 2^53 are exact in any summation order, so cuBLAS
  DGEMM gives the same residues as the CPU;
- ``LyingAccelerator``: for tests, wraps another and tampers with its answers (one element by
  default; other attacks by name).

``python -m confide.infer.accelerator [--backend numpy|cuda|auto]`` serves the framed protocol of
confide.enclave.infer.wire on stdin/stdout, so the enclave side talks to an external process. With
``--control-fd N`` it serves an enclave instead (what ``confide serve --accelerator`` starts, one
per enclave worker, through `AcceleratorProcess`): it writes one hello frame on the unix socket N,
then receives, per outsourced task, the two pipe ends of a fresh stream (SCM_RIGHTS; see
confide.enclave.accelerator_link) and serves each in its own thread with a fresh backend (weights
of one task never meet another's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import numpy as np

from confide.enclave.errors import ConfideError
from confide.enclave.infer import wire
from confide.enclave.infer.field import FLOAT64_EXACT, HALF_BLIND, P_BLIND, uniform_mod

MAX_LAYERS = 4096


class AcceleratorFault(Exception):
    """A request this accelerator cannot serve (reported back to the enclave side as ok: false)."""


class NumpyAccelerator:
    name = "numpy-cpu"

    def __init__(self) -> None:
        self._w: dict[str, np.ndarray] = {}

    def load(self, layer: str, w_q: np.ndarray) -> None:
        if w_q.ndim != 2:
            raise AcceleratorFault(f"weights of {layer} must be 2-D")
        if len(self._w) >= MAX_LAYERS and layer not in self._w:
            raise AcceleratorFault("too many layers")
        bound = int(np.max(np.abs(w_q))) if w_q.size else 0
        if w_q.shape[0] * HALF_BLIND * bound >= FLOAT64_EXACT:
            raise AcceleratorFault(f"layer {layer}: products would not be exact in float64")
        self._w[layer] = w_q.astype(np.float64)

    def matmul(self, layer: str, x: np.ndarray) -> np.ndarray:
        w = self._w.get(layer)
        if w is None:
            raise AcceleratorFault(f"layer {layer} is not loaded")
        if x.ndim != 2 or x.shape[1] != w.shape[0]:
            raise AcceleratorFault(f"layer {layer}: input shape {x.shape} does not fit {w.shape}")
        if x.size and int(np.max(np.abs(x))) > HALF_BLIND:
            raise AcceleratorFault(f"layer {layer}: input outside the field's signed range")
        return (x.astype(np.float64) @ w).astype(np.int64) % P_BLIND


class CudaAccelerator:
    """PyTorch on CUDA, float64 (UNTESTED here: no torch, no GPU on this machine)."""

    name = "torch-cuda"

    def __init__(self, device: str = "cuda") -> None:
        try:
            import torch  # only where the operator installed it; never in the TCB
        except ImportError:
            raise RuntimeError("torch is not installed (the cuda backend needs PyTorch with CUDA)") from None

        if not torch.cuda.is_available():
            raise RuntimeError("torch is installed but CUDA is not available")
        self._torch = torch
        self._device = torch.device(device)
        self._w: dict[str, Any] = {}
        self._shape: dict[str, tuple[int, int]] = {}

    def load(self, layer: str, w_q: np.ndarray) -> None:
        if w_q.ndim != 2:
            raise AcceleratorFault(f"weights of {layer} must be 2-D")
        bound = int(np.max(np.abs(w_q))) if w_q.size else 0
        if w_q.shape[0] * HALF_BLIND * bound >= FLOAT64_EXACT:
            raise AcceleratorFault(f"layer {layer}: products would not be exact in float64")
        self._w[layer] = self._torch.from_numpy(w_q.astype(np.float64)).to(self._device)
        self._shape[layer] = (int(w_q.shape[0]), int(w_q.shape[1]))

    def matmul(self, layer: str, x: np.ndarray) -> np.ndarray:
        w = self._w.get(layer)
        if w is None:
            raise AcceleratorFault(f"layer {layer} is not loaded")
        if x.ndim != 2 or x.shape[1] != self._shape[layer][0]:
            raise AcceleratorFault(f"layer {layer}: input shape {x.shape} does not fit {self._shape[layer]}")
        xt = self._torch.from_numpy(x.astype(np.float64)).to(self._device)
        z = self._torch.remainder(xt @ w, P_BLIND)
        return z.to("cpu").numpy().astype(np.int64)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def make_backend(kind: str = "auto") -> NumpyAccelerator | CudaAccelerator:
    if kind == "cuda" or (kind == "auto" and cuda_available()):
        return CudaAccelerator()
    if kind in ("numpy", "auto"):
        return NumpyAccelerator()
    raise ValueError(f"unknown backend {kind!r} (numpy, cuda, auto)")


ATTACKS = ("flip", "add-q", "cancel", "zero", "swap-rows", "replay", "shape", "range", "dtype")


class LyingAccelerator:
    """Wraps a backend and tampers with every answer (`attack`, default one element changed to another
    residue). The product it returns differs from the true one; the enclave must refuse it."""

    def __init__(self, inner: Any, attack: str = "flip", *, layers: set[str] | None = None) -> None:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        self.inner = inner
        self.attack = attack
        self.layers = layers  # tamper only with these (None: all)
        self.tampered = 0
        self._last: dict[str, np.ndarray] = {}

    def load(self, layer: str, w_q: np.ndarray) -> None:
        self.inner.load(layer, w_q)

    def matmul(self, layer: str, x: np.ndarray) -> Any:
        z = np.array(self.inner.matmul(layer, x), dtype=np.int64)
        if self.layers is not None and layer not in self.layers:
            return z
        self.tampered += 1
        i = int.from_bytes(os.urandom(4), "big") % z.shape[0]
        j = int.from_bytes(os.urandom(4), "big") % z.shape[1]
        a = self.attack
        if a == "flip":  # another residue at one position
            z[i, j] = (z[i, j] + 1 + int(uniform_mod(P_BLIND - 1, 1)[0])) % P_BLIND
        elif a == "add-q":
            z[i, j] = (z[i, j] + (2**24 - 3)) % P_BLIND
        elif a == "cancel":  # +d and -d in one row: what a constant Freivalds vector accepts
            j2 = (j + 1) % z.shape[1]
            d = 1 + int(uniform_mod(P_BLIND - 1, 1)[0])
            z[i, j] = (z[i, j] + d) % P_BLIND
            z[i, j2] = (z[i, j2] - d) % P_BLIND
        elif a == "zero":
            z[:] = 0
        elif a == "swap-rows":
            z = z[::-1].copy() if z.shape[0] > 1 else (z + 1) % P_BLIND
        elif a == "replay":
            prev = self._last.get(layer)
            self._last[layer] = z.copy()
            z = prev if prev is not None and prev.shape == z.shape else (z + 1) % P_BLIND
        elif a == "shape":
            return z[:, :-1]
        elif a == "range":
            z[i, j] = P_BLIND + int(z[i, j])
        elif a == "dtype":
            return z.astype(np.float64)
        return z


def serve(rfile: BinaryIO, wfile: BinaryIO, backend: Any) -> int:
    """Answer framed requests until `close` or end of stream; returns the number of requests."""
    served = 0
    while True:
        msg = wire.recv(rfile, where="accelerator")
        if msg is None:
            return served
        head, array = msg
        seq = head.get("seq")
        op = head.get("op")
        if op == "close":
            return served
        served += 1
        try:
            if array is None:
                raise AcceleratorFault(f"{op} without an array")
            layer = str(head.get("layer"))
            if op == "load":
                backend.load(layer, array)
                wire.send(wfile, {"ok": True, "seq": seq})
            elif op == "matmul":
                out = np.asarray(backend.matmul(layer, array))
                wire.send(wfile, {"ok": True, "seq": seq}, out.astype(np.int32))
            else:
                raise AcceleratorFault(f"unknown op {op!r}")
        except AcceleratorFault as exc:
            wire.send(wfile, {"ok": False, "seq": seq, "error": str(exc)})


def serve_stream(rfd: int, wfd: int, backend: Any) -> int:
    """Serve one enclave stream (two pipe ends) until it ends; closes both; returns requests served."""
    with os.fdopen(rfd, "rb") as rfile, os.fdopen(wfd, "wb") as wfile:
        try:
            return serve(rfile, wfile, backend)
        except (wire.WireError, OSError):
            return 0  # the enclave side went away or spoke nonsense: it fails closed on its own


def serve_streams(control: socket.socket, make: Callable[[], Any]) -> int:
    """The enclave's accelerator: one thread with a fresh `make()` backend per stream received on
    `control`, until the enclave closes it. Returns the number of streams."""
    from confide.enclave.sandbox.protocol import recv_msg

    threads: list[threading.Thread] = []
    while True:
        try:
            msg = recv_msg(control)
        except (OSError, ValueError, ConfideError):
            msg = None
        if msg is None:
            break
        _, fds = msg
        if len(fds) != 2:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            continue
        t = threading.Thread(target=serve_stream, args=(fds[0], fds[1], make()), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=5)
    return len(threads)


class AcceleratorProcess:
    """The host's side: start ``python -m confide.infer.accelerator --control-fd`` and keep the other
    end of its socket for an enclave (``enclave_sock``, passed as ``--accelerator-fd``)."""

    def __init__(self, backend: str = "auto", *, extra_args: Sequence[str] = ()) -> None:
        from confide.enclave.channel import read_frame
        from confide.enclave.encoding import parse_json_object

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - its stderr, read back if it does not start
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "confide.infer.accelerator",
                "--backend",
                backend,
                "--control-fd",
                str(theirs.fileno()),
                *extra_args,
            ],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stderr=errors,
            close_fds=True,
        )
        theirs.close()
        self.enclave_sock = ours
        ours.settimeout(120)
        try:
            hello = parse_json_object(read_frame(ours, 1 << 16), where="accelerator start")
        except (ConfideError, OSError) as exc:
            self.close()  # waits for the process: its exit code is known below
            errors.seek(0)
            said = errors.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
            errors.close()
            raise ConfideError(
                f"the accelerator (--backend {backend}) did not start (exit code {self.proc.returncode}): "
                + (said[-1] if said else str(exc)),
                where="accelerator",
            ) from None
        errors.close()  # the process keeps its own descriptor
        ours.settimeout(None)
        self.backend = str(hello.get("backend", "?"))

    def close(self) -> None:
        self.enclave_sock.close()  # the accelerator exits when its control socket closes
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m confide.infer.accelerator", description=__doc__)
    ap.add_argument("--backend", default="numpy", choices=("numpy", "cuda", "auto"))
    ap.add_argument("--lie", choices=ATTACKS, help="tamper with every answer (tests only)")
    ap.add_argument("--control-fd", type=int, default=None, help="serve an enclave's streams (see above)")
    args = ap.parse_args(argv)
    try:
        backend: Any = make_backend(args.backend)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc} (accelerator --backend {args.backend})", file=sys.stderr)
        return 2
    if args.lie:
        backend = LyingAccelerator(backend, args.lie)
    if args.control_fd is not None:
        from confide.enclave.channel import send_message

        control = socket.socket(fileno=args.control_fd)
        send_message(control, {"ready": True, "backend": getattr(backend, "name", "lying")})

        def make() -> Any:
            b: Any = make_backend(args.backend)
            return LyingAccelerator(b, args.lie) if args.lie else b

        serve_streams(control, make)
        return 0
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer, backend)
    except wire.WireError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
