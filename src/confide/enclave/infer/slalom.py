"""Outsourced linear layers, Slalom done honestly (issue 9; anchors.md B.2).

A linear layer ``y = x·W + b`` (a MatMul or Gemm; a Conv after im2col) runs on an untrusted
accelerator in one of two modes, chosen by the enclave:

- ``verified`` (integrity only): the accelerator receives the quantized activations ``X`` in clear;
- ``blinded`` (integrity and input privacy): it receives ``X + R mod p`` with a fresh mask ``R``
  drawn uniformly from the OS CSPRNG, so every value it sees is uniform in the field whatever X is.

Either way the accelerator holds the quantized weights in clear (Slalom protects inputs, never the
model) and returns ``Z = (X + R)·W mod p``; the enclave unblinds ``Y = Z - R·W mod p`` with the
factor ``U = R·W`` it computed itself in the offline phase, then runs Freivalds' check
``Y·s == X·(W·s) mod P_VERIF`` for ``REPS = 2`` independent uniform vectors ``s`` (also drawn in
the offline phase, fresh for every inference, never constant, never shown to the accelerator).
A product that fails is refused with ``OutsourceRejected`` naming the layer: the inference stops,
no value derived from it is used. False acceptance: at most ``P_VERIF^-2 < 3.6e-15`` per product.

Fixed point: weights are scaled per tensor, or per output column with ``per_column`` (largest |w| to
2^(bits_w-1) - 1; the executor scales per column: on all-MiniLM-L6-v2 that takes the embedding cosine
at 8 bits from 0.96-0.98 to 0.9994), to ``bits_w``-bit integers (default 8, as Slalom's VGG/MobileNet);
the scales stay in the enclave. Each row of activations gets its own power-of-two scale,
the largest for which one of two bounds proves ``|X·W| <= HALF_BLIND`` entrywise:
``max|x_q|·max_j ||W[:, j]||_1`` or ``||x_q||_1·max|W|`` (the second wins for sparse rows, e.g.
after a ReLU). The bound is checked on the quantized integers before anything is sent, so the signed
residue of Y *is* the exact integer product; a row that would keep fewer than ``MIN_ACT_BITS`` bits
of its largest activation is refused (a layer too wide for the field) rather than computed badly.
This is the price of exactness with Slalom's p: the bits of X and W together are at most about
``log2(HALF) - log2(K)`` for dense rows (22.3 - 10 for K = 1024). The bias is added in float
inside the enclave after rescaling. The quantization error of one output is at most
``2^-(sx+1)·||W[:, j]||_1 + ||x||_1·max|W|/(2·qmax)``; tests/test_infer_onnx.py measures it end to end
against ONNX Runtime.

An offline pad (R, U, s, W·s) is single-use: a second use would give the accelerator the
difference of two inputs, so it is refused.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

from confide.enclave.errors import ConfideError, IntegrityError
from confide.enclave.infer.field import (
    FLOAT64_EXACT,
    HALF_BLIND,
    P_BLIND,
    P_VERIF,
    ExactnessError,
    check_range,
    matmul_exact,
    matmul_mod,
    signed,
    uniform_mod,
)

REPS = 2
DEFAULT_BITS_W = 8
MAX_ACT_SHIFT = 40
MIN_ACT_BITS = 4  # a row's largest quantized activation must be at least 2^4


class Mode(StrEnum):
    ENCLAVE = "enclave"  # linear layers in the enclave, nothing leaves
    VERIFIED = "outsourced-verified"  # integrity only: the accelerator sees quantized activations
    BLINDED = "outsourced-blinded"  # integrity and input privacy: it sees uniform field elements


class OutsourceRejected(IntegrityError):
    """The accelerator's result for a layer failed a check: the inference stops (fail closed)."""


class Accelerator(Protocol):
    """What the enclave side asks of an accelerator (the untrusted side: confide.infer.accelerator;
    over a pipe: confide.enclave.infer.wire.AcceleratorClient). Returns are never trusted."""

    def load(self, layer: str, w_q: np.ndarray) -> None: ...

    def matmul(self, layer: str, x: np.ndarray) -> object: ...


@dataclass
class QuantLinear:
    """A linear layer's quantized weights as the enclave keeps them: w_q (K, N) int64, |w_q| < 2^(bits-1)."""

    name: str
    w_q: np.ndarray
    w_scale: float | np.ndarray  # w_q = round(w · w_scale): a float, or one per output column (N,)
    bias: np.ndarray | None
    l1_max: int  # max over output columns of sum_i |w_q[i, j]|
    w_bound: int  # max |w_q| (at most 2^(bits_w-1) - 1)

    @property
    def k(self) -> int:
        return int(self.w_q.shape[0])

    @property
    def n(self) -> int:
        return int(self.w_q.shape[1])

    @classmethod
    def from_float(
        cls,
        name: str,
        w: np.ndarray,
        bias: np.ndarray | None = None,
        *,
        bits_w: int = DEFAULT_BITS_W,
        per_column: bool = False,
    ) -> QuantLinear:
        where = f"layer {name}"
        w = np.asarray(w, dtype=np.float64)
        if w.ndim != 2 or 0 in w.shape:
            raise ConfideError(f"weights must be a non-empty 2-D matrix, not shape {w.shape}", where=where)
        if not np.all(np.isfinite(w)) or (bias is not None and not np.all(np.isfinite(bias))):
            raise ConfideError("weights or bias are not finite", where=where)
        if not 2 <= bits_w <= 16:
            raise ConfideError(f"bits_w {bits_w} outside 2..16", where=where)
        qmax = 2 ** (bits_w - 1) - 1
        scale: float | np.ndarray
        if per_column:
            peaks = np.max(np.abs(w), axis=0)
            scale = qmax / np.where(peaks == 0.0, float(qmax), peaks)  # an all-zero column: scale 1
        else:
            peak = float(np.max(np.abs(w)))
            scale = 1.0 if peak == 0.0 else qmax / peak
        w_q = np.clip(np.rint(w * scale), -qmax, qmax).astype(np.int64)
        l1 = int(np.max(np.sum(np.abs(w_q), axis=0)))
        b = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        if b is not None and b.shape != (w.shape[1],):
            raise ConfideError(f"bias has {b.shape[0]} entries for {w.shape[1]} outputs", where=where)
        return cls(name, w_q, scale, b, l1, max(1, int(np.max(np.abs(w_q)))))

    def exactness_report(self) -> dict[str, int | float]:
        """The per-layer bounds behind exactness (tests/test_infer_field.py proves them)."""
        return {
            "k": self.k,
            "n": self.n,
            "w_bound": self.w_bound,
            "l1_max": self.l1_max,
            # accelerator: |x_blinded| <= HALF, |w| <= w_bound, k terms, float64
            "accelerator_log2": math.log2(self.k * HALF_BLIND * self.w_bound),
            # unblinding factor R·W in the enclave: same bound
            "unblind_log2": math.log2(self.k * HALF_BLIND * self.w_bound),
            # the true product |X·W| <= HALF by the activation scale (checked per row and call)
            "product_log2": math.log2(HALF_BLIND),
            "float64_limit_log2": math.log2(FLOAT64_EXACT),
        }


@dataclass
class Pad:
    """One inference's offline secrets for one layer: mask r and factor u = r·W mod p (blinded mode),
    Freivalds vectors s (N, REPS) and t = W·s mod P_VERIF (K, REPS). Single use."""

    layer: str
    batch: int
    r: np.ndarray | None
    u: np.ndarray | None
    s: np.ndarray
    t: np.ndarray
    used: bool = False


def precompute(layer: QuantLinear, batch: int, *, blinded: bool) -> Pad:
    """The offline phase for one layer and one inference of `batch` rows, entirely in the enclave."""
    where = f"layer {layer.name} (offline)"
    s = uniform_mod(P_VERIF, (layer.n, REPS))
    t = _w_times_s(layer, s)
    if blinded:
        r = signed(uniform_mod(P_BLIND, (batch, layer.k)), P_BLIND)
        u = matmul_exact(r, layer.w_q, a_bound=HALF_BLIND, b_bound=layer.w_bound, where=where) % P_BLIND
        return Pad(layer.name, batch, r, u, s, t)
    return Pad(layer.name, batch, None, None, s, t)


def _w_times_s(layer: QuantLinear, s: np.ndarray) -> np.ndarray:
    """t = W·s mod P_VERIF (K, REPS), W signed (|W| <= w_bound), s in [0, P_VERIF)."""
    return matmul_mod(layer.w_q, s, P_VERIF, a_bound=layer.w_bound, where=f"layer {layer.name} (offline)")


def _row_bound(x_q: np.ndarray, layer: QuantLinear) -> np.ndarray:
    """Per row, an upper bound of max_j |sum_i x_q[i]·w_q[i, j]| (exact int64: both terms < 2^62)."""
    a = np.max(np.abs(x_q), axis=1) * layer.l1_max
    b = np.sum(np.abs(x_q), axis=1) * layer.w_bound
    return np.minimum(a, b)


def quantize_rows(x: np.ndarray, layer: QuantLinear) -> tuple[np.ndarray, np.ndarray]:
    """(x_q, shifts): each row x[r] scaled by 2^shifts[r] and rounded, with the largest shift for
    which _row_bound(x_q) <= HALF_BLIND holds, checked on the integers (the exactness proof)."""
    where = f"layer {layer.name}"
    ax = np.abs(x)
    peak = np.max(ax, axis=1)
    l1 = np.sum(ax, axis=1)
    est = np.minimum(peak * layer.l1_max, l1 * layer.w_bound)
    with np.errstate(divide="ignore"):
        shift = np.where(est > 0, np.floor(np.log2(HALF_BLIND / np.where(est > 0, est, 1.0))), MAX_ACT_SHIFT)
    shift = np.minimum(shift, MAX_ACT_SHIFT).astype(np.int64)
    for _ in range(8):
        x_q = np.rint(np.ldexp(x, shift[:, None])).astype(np.int64)
        over = _row_bound(x_q, layer) > HALF_BLIND
        if not np.any(over):
            break
        shift = shift - over  # rounding pushed a row over: one bit less for it
    else:
        raise ExactnessError("no activation scale keeps the product inside the field", where=where)
    low = (peak > 0) & (np.max(np.abs(x_q), axis=1) < 2**MIN_ACT_BITS)
    if np.any(low):
        raise ExactnessError(
            f"layer too wide for the field p = {P_BLIND}: {int(np.count_nonzero(low))} row(s) would keep "
            f"fewer than {MIN_ACT_BITS} bits of activation (K = {layer.k}, max column L1 {layer.l1_max})",
            where=where,
        )
    return x_q, shift


def activation_shift(x: np.ndarray, layer: QuantLinear) -> int:
    """The smallest per-row shift of quantize_rows for this batch (for reports and tests)."""
    return int(np.min(quantize_rows(np.asarray(x, dtype=np.float64), layer)[1]))


@dataclass
class LayerStats:
    """What one outsourced call cost and moved (for the benchmark and the FLOP share)."""

    enclave_ops: int = 0
    accelerator_flops: int = 0
    freivalds_ops: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    calls: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: LayerStats) -> None:
        self.enclave_ops += other.enclave_ops
        self.accelerator_flops += other.accelerator_flops
        self.freivalds_ops += other.freivalds_ops
        self.bytes_out += other.bytes_out
        self.bytes_in += other.bytes_in
        self.calls += other.calls


def _check_reply(z: object, batch: int, n: int, where: str) -> np.ndarray:
    """The accelerator's answer as int64 residues of shape (batch, n) in [0, P_BLIND), or refused."""
    if not isinstance(z, np.ndarray):
        raise OutsourceRejected(f"accelerator returned {type(z).__name__}, not an array", where=where)
    if z.shape != (batch, n):
        raise OutsourceRejected(f"accelerator returned shape {z.shape}, expected {(batch, n)}", where=where)
    if z.dtype.kind not in "iu":
        raise OutsourceRejected(f"accelerator returned dtype {z.dtype}, expected integers", where=where)
    z = z.astype(np.int64)
    if z.size and (int(z.min()) < 0 or int(z.max()) >= P_BLIND):
        raise OutsourceRejected("accelerator returned values outside the field [0, p)", where=where)
    return z


def run_linear(
    layer: QuantLinear, x: np.ndarray, accelerator: Accelerator, pad: Pad, mode: Mode
) -> tuple[np.ndarray, LayerStats]:
    """y = x·W + b for a float batch x (B, K), the product computed by `accelerator` and checked."""
    where = f"layer {layer.name}"
    if mode not in (Mode.VERIFIED, Mode.BLINDED):
        raise ConfideError(f"run_linear outsources; mode {mode.value} does not", where=where)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != layer.k:
        raise ConfideError(f"input shape {x.shape} does not fit weights {layer.w_q.shape}", where=where)
    if not np.all(np.isfinite(x)):
        raise ConfideError("activations are not finite (NaN or infinity)", where=where)
    batch = x.shape[0]
    if pad.used:
        raise ConfideError("offline pad already used: masks are never reused", where=where)
    if pad.layer != layer.name or pad.batch != batch or ((pad.r is None) != (mode is Mode.VERIFIED)):
        raise ConfideError(f"offline pad for {pad.layer} x{pad.batch} does not fit this call", where=where)
    pad.used = True
    x_q, sx = quantize_rows(x, layer)
    x_bound = int(np.max(np.abs(x_q))) if x_q.size else 0
    if x_q.size and int(np.max(_row_bound(x_q, layer))) > HALF_BLIND:  # the proof, again, on what is sent
        raise ExactnessError(f"activation bound exceeds {HALF_BLIND}", where=where)
    if mode is Mode.BLINDED:
        assert pad.r is not None and pad.u is not None
        sent = signed((x_q + pad.r) % P_BLIND, P_BLIND)
    else:
        sent = x_q
    t0 = time.perf_counter()
    reply = accelerator.matmul(layer.name, sent)
    t1 = time.perf_counter()
    z = _check_reply(reply, batch, layer.n, where)
    y = (z - pad.u) % P_BLIND if pad.u is not None else z
    y = signed(y, P_BLIND)
    check_range(y, -HALF_BLIND, HALF_BLIND, what="unblinded product", where=where)
    # Freivalds: Y·s == X·(W·s) mod P_VERIF, REPS columns at once.
    tf = time.perf_counter()
    lhs = matmul_mod(y, pad.s, P_VERIF, a_bound=HALF_BLIND, where=where)
    rhs = matmul_mod(x_q, pad.t, P_VERIF, a_bound=max(1, x_bound), where=where)
    t2 = time.perf_counter()
    if not np.array_equal(lhs, rhs):
        bad = int(np.count_nonzero(np.any(lhs != rhs, axis=1)))
        raise OutsourceRejected(
            f"accelerator result failed Freivalds' check ({bad} of {batch} rows wrong): inference stopped",
            where=where,
        )
    out = np.ldexp(y.astype(np.float64), -sx[:, None]) / layer.w_scale
    if layer.bias is not None:
        out = out + layer.bias
    k, n = layer.k, layer.n
    stats = LayerStats(
        enclave_ops=batch * (3 * k + 4 * n) + 2 * REPS * batch * (k + n),
        accelerator_flops=2 * batch * k * n,
        freivalds_ops=2 * REPS * batch * (k + n),
        bytes_out=int(sent.size) * 4,  # residues below 2^24 travel as int32
        bytes_in=int(z.size) * 4,
        calls=1,
        extra={"accelerator_s": t1 - t0, "freivalds_s": t2 - tf},
    )
    return out, stats
