"""Prime fields, CSPRNG sampling and exact modular matrix products (no silent overflow).

Two fields, as in Slalom (ftramer/slalom, SGXDNN/sgxdnn_main.cpp and python/slalom/quant_layers.py):

- ``P_BLIND = 2^23 + 2^21 + 7`` (10,485,767) for blinding: activations travel as ``x + r mod p``,
  signed representatives in ``[-HALF, HALF]`` with ``HALF = (p - 1) / 2 < 2^22.33``;
- ``P_VERIF = 2^24 - 3`` (16,777,213), the largest prime below 2^24, for Freivalds' check of the
  *unblinded integer* product ``Y = X·W``. Both |Y| and |X·W| are at most HALF, so a wrong Y differs
  from the true product by a nonzero integer of magnitude at most ``2·HALF < P_VERIF``: it stays
  nonzero mod P_VERIF and each repetition accepts it with probability at most 1/P_VERIF. Checking
  over the larger field also covers the integrity-only mode (no blinding, no reduction mod p) with
  the same code, and it checks the value the enclave goes on to use, after its own unblinding.

Exactness: numpy's float64 matrix product (BLAS) is exact on integers as long as every partial sum
stays below 2^53 in magnitude, whatever the summation order. ``matmul_mod`` proves that bound from
the operands' declared bounds and the inner dimension before calling BLAS, splitting the right
operand into limbs when needed; int64 is used only where the bound below 2^63 is checked as well.
"""

from __future__ import annotations

import math
import os

import numpy as np

from confide.enclave.errors import ConfideError

P_BLIND = 2**23 + 2**21 + 7
P_VERIF = 2**24 - 3
HALF_BLIND = (P_BLIND - 1) // 2
FLOAT64_EXACT = 2**53  # every integer of magnitude below this is exact in float64
INT64_SAFE = 2**62  # int64 sums are checked against this (headroom for one addition)


class ExactnessError(ConfideError):
    """An integer computation would leave the range where it is exact: refused, never wrapped."""


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the first 13 prime bases)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for b in bases:
        if n % b == 0:
            return n == b
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def uniform_mod(m: int, shape: tuple[int, ...] | int) -> np.ndarray:
    """Independent uniform integers in [0, m) (int64) from the OS CSPRNG (getrandom), by rejection
    sampling on bit_length(m)-bit words: exactly uniform, no modulo bias."""
    if not 2 <= m < 2**32:
        raise ValueError("modulus must be in 2..2^32")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = math.prod(shape)
    mask = (1 << m.bit_length()) - 1
    accept = m / (mask + 1)
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        want = n - filled
        draw = int(want / accept * 1.05) + 16
        words = np.frombuffer(os.urandom(4 * draw), dtype="<u4").astype(np.int64) & mask
        ok = words[words < m][:want]
        out[filled : filled + len(ok)] = ok
        filled += len(ok)
    return out.reshape(shape)


def signed(a: np.ndarray, m: int) -> np.ndarray:
    """Representatives in [-(m-1)/2, (m-1)/2] of residues in [0, m) (m odd)."""
    return a - m * (a > (m - 1) // 2)


def check_range(a: np.ndarray, lo: int, hi: int, *, what: str, where: str) -> None:
    """All entries of the integer array `a` within [lo, hi], else ExactnessError."""
    if a.size and (int(a.min()) < lo or int(a.max()) > hi):
        raise ExactnessError(
            f"{what} outside [{lo}, {hi}] (min {int(a.min())}, max {int(a.max())})", where=where
        )


def exact_matmul_bound(k: int, a_bound: int, b_bound: int) -> int:
    """The largest magnitude any partial sum of a (.., k) @ (k, ..) product can reach."""
    return k * a_bound * b_bound


def matmul_exact(a: np.ndarray, b: np.ndarray, *, a_bound: int, b_bound: int, where: str) -> np.ndarray:
    """The exact integer product a @ b (int64), computed in float64 BLAS after proving that every
    partial sum is below 2^53. The bounds are checked against the operands, not trusted."""
    k = a.shape[-1]
    bound = exact_matmul_bound(k, a_bound, b_bound)
    if bound >= FLOAT64_EXACT:
        raise ExactnessError(
            f"product of inner size {k} with |a| <= {a_bound}, |b| <= {b_bound} may reach {bound} "
            f">= 2^53 (not exact in float64)",
            where=where,
        )
    check_range(a, -a_bound, a_bound, what="left operand", where=where)
    check_range(b, -b_bound, b_bound, what="right operand", where=where)
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def limb_bits(k: int, a_bound: int) -> int:
    """The widest limb L such that k · a_bound · (2^L - 1) < 2^53."""
    room = (FLOAT64_EXACT - 1) // max(1, k * a_bound)
    return max(0, room.bit_length() - 1) if room >= 1 else 0


def matmul_mod(a: np.ndarray, b: np.ndarray, m: int, *, a_bound: int, where: str) -> np.ndarray:
    """(a @ b) mod m in [0, m), exactly: |a| <= a_bound (checked), b's entries in [0, m) (checked).
    b is split into L-bit limbs with k·a_bound·(2^L - 1) < 2^53 so each limb product is an exact
    float64 BLAS call; the limbs are recombined mod m in int64 (each term < m^2 < 2^48)."""
    if m >= 2**24:
        raise ValueError("matmul_mod recombines in int64 for moduli below 2^24 only")
    k = a.shape[-1]
    check_range(a, -a_bound, a_bound, what="left operand", where=where)
    check_range(b, 0, m - 1, what="right operand", where=where)
    bits = limb_bits(k, a_bound)
    if bits < 1:
        raise ExactnessError(f"inner size {k} with |a| <= {a_bound} leaves no exact limb", where=where)
    af = a.astype(np.float64)
    width = m.bit_length()
    acc = np.zeros(a.shape[:-1] + b.shape[1:], dtype=np.int64)
    shift = 0
    while shift < width:
        limb = (b >> shift) & ((1 << bits) - 1)
        part = (af @ limb.astype(np.float64)).astype(np.int64) % m
        acc = (acc + part * (pow(2, shift, m))) % m
        shift += bits
    return acc
