"""Prime fields, CSPRNG sampling and exactness of every integer product of the Slalom core (issue 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from confide.enclave.infer import field
from confide.enclave.infer.field import (
    FLOAT64_EXACT,
    HALF_BLIND,
    P_BLIND,
    P_VERIF,
    ExactnessError,
    is_prime,
    matmul_exact,
    matmul_mod,
    signed,
    uniform_mod,
)
from confide.enclave.infer.slalom import MIN_ACT_BITS, QuantLinear, quantize_rows


def _trial_division_prime(n: int) -> bool:
    """An independent check: no divisor up to sqrt(n) (vectorised trial division)."""
    d = np.arange(2, math.isqrt(n) + 1, dtype=np.int64)
    return n > 1 and not np.any(n % d == 0)


def test_both_fields_are_prime_and_fit_the_representations() -> None:
    assert P_BLIND == 10_485_767 and P_VERIF == 16_777_213
    for p in (P_BLIND, P_VERIF):
        assert is_prime(p) and _trial_division_prime(p)
    assert max(n for n in range(2**24 - 20, 2**24) if _trial_division_prime(n)) == P_VERIF  # largest < 2^24
    assert P_BLIND + HALF_BLIND < 2**24  # Slalom's float32 condition ("P + P/2 < 2^24")
    # a wrong unblinded product differs by at most 2·HALF < P_VERIF: it stays nonzero mod P_VERIF
    assert 2 * HALF_BLIND < P_VERIF
    assert not is_prime(P_BLIND + 2) and not is_prime(2**24) and is_prime(2) and not is_prime(1)


def test_uniform_mod_stays_in_range_and_covers_it_evenly() -> None:
    for m in (P_BLIND, P_VERIF, 3):
        a = uniform_mod(m, (400, 500))
        assert a.dtype == np.int64 and a.shape == (400, 500)
        assert int(a.min()) >= 0 and int(a.max()) < m
    a = uniform_mod(P_BLIND, 320_000)
    counts = np.bincount(a * 16 // P_BLIND, minlength=16)
    assert np.all(np.abs(counts - 20_000) < 1_200)  # 8.5 sigma: not flaky, catches a skewed sampler
    assert len(np.unique(uniform_mod(P_BLIND, 1000))) > 990  # fresh values, not a constant


def test_signed_representatives() -> None:
    a = np.array([0, 1, HALF_BLIND, HALF_BLIND + 1, P_BLIND - 1])
    assert signed(a, P_BLIND).tolist() == [0, 1, HALF_BLIND, -HALF_BLIND, -1]


def _exact_ref(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(object) @ b.astype(object)  # Python integers: no overflow at all


def test_float64_products_are_exact_at_the_worst_case_operands() -> None:
    # all entries at their bounds: the largest partial sums an accelerator or the enclave can meet
    k, wb = 4608, 127  # VGG16's widest conv fan-in, 8-bit weights
    a = np.full((3, k), -HALF_BLIND, dtype=np.int64)
    a[1] = HALF_BLIND
    b = np.full((k, 2), wb, dtype=np.int64)
    b[:, 1] = -wb
    got = matmul_exact(a, b, a_bound=HALF_BLIND, b_bound=wb, where="test")
    assert got.tolist() == _exact_ref(a, b).tolist()
    assert k * HALF_BLIND * wb < FLOAT64_EXACT


def test_matmul_mod_matches_big_integers_with_limbs() -> None:
    rng = np.random.default_rng(3)
    for k, a_bound in ((7, HALF_BLIND), (4096, HALF_BLIND), (25_088, 2**12)):
        a = rng.integers(-a_bound, a_bound + 1, size=(2, k))
        a[0, :] = a_bound  # worst case row
        s = uniform_mod(P_VERIF, (k, 2))
        s[:, 0] = P_VERIF - 1
        got = matmul_mod(a, s, P_VERIF, a_bound=a_bound, where="test")
        want = (_exact_ref(a, s) % P_VERIF).astype(np.int64)
        assert np.array_equal(got, want)
        assert field.limb_bits(k, a_bound) >= 1


def test_bounds_are_refused_not_wrapped() -> None:
    # 2^53 + 1 is where float64 stops being exact: the check must refuse before that
    assert float(2**53 + 1) == float(2**53)
    k = 2**24
    with pytest.raises(ExactnessError, match="2\\^53"):
        matmul_exact(
            np.zeros((1, k), np.int64), np.zeros((k, 1), np.int64), a_bound=2**22, b_bound=2**8, where="L"
        )
    with pytest.raises(ExactnessError, match="left operand outside"):
        matmul_exact(np.array([[5]]), np.array([[1]]), a_bound=4, b_bound=1, where="L")
    with pytest.raises(ExactnessError, match="right operand outside"):
        matmul_mod(np.array([[1]]), np.array([[P_VERIF]]), P_VERIF, a_bound=1, where="L")
    with pytest.raises(ExactnessError, match="no exact limb"):
        matmul_mod(
            np.zeros((1, 2**30), np.int8), np.zeros((2**30, 1), np.int8), P_VERIF, a_bound=2**24, where="L"
        )


@pytest.mark.parametrize(
    ("k", "n"),
    [(32, 64), (784, 512), (4608, 512), (25_088, 64), (1_000_000, 4)],  # up to VGG16 fc6 and beyond
)
def test_every_layer_bound_is_below_2_53(k: int, n: int) -> None:
    rng = np.random.default_rng(k)
    layer = QuantLinear.from_float("fc", rng.normal(size=(k, n)) * 0.05)
    rep = layer.exactness_report()
    # accelerator (|x_blinded| <= HALF) and unblinding factor r·W: K·HALF·127 < 2^53 up to K ~ 1.3e7
    assert rep["w_bound"] <= 127 and rep["accelerator_log2"] < 53 and rep["unblind_log2"] < 53
    # the true product is bounded by HALF through the per-row activation scale, for any range
    dense_ok = layer.l1_max * 2**MIN_ACT_BITS <= HALF_BLIND  # a dense row keeps 2^MIN_ACT_BITS
    # the honest limit of Slalom's p with a proven bound and 8-bit weights: VGG16's fc6 (K = 25,088)
    # keeps ~3.5 bits on a dense row and is refused; up to K = 4,608 (its widest conv) it fits
    assert dense_ok == (k <= 4608)
    for peak in (1e-9, 1.0, 1e6):
        x = rng.normal(size=(3, k)) * peak
        x[2, 16:] = 0.0  # a sparse row (after a ReLU): the L1 bound lets it keep its bits
        if not dense_ok:
            with pytest.raises(ExactnessError, match="too wide for the field"):
                quantize_rows(x, layer)
            x = x[2:]
        x_q, shifts = quantize_rows(x, layer)
        exact = _exact_ref(x_q, layer.w_q)
        assert max(abs(int(v)) for v in exact.ravel()) <= HALF_BLIND  # measured, not only bounded
        assert np.all(np.max(np.abs(x_q), axis=1) >= 2**MIN_ACT_BITS)
        assert len(shifts) == len(x)


def test_quantized_product_is_the_exact_integer_product() -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(size=(300, 40))
    layer = QuantLinear.from_float("fc", w)
    x = rng.normal(size=(6, 300)) * 50
    x[0] = np.sign(layer.w_q[:, 0]) * np.max(np.abs(x))  # aligned with a column: the worst case
    x_q, _ = quantize_rows(x, layer)
    exact = _exact_ref(x_q, layer.w_q)
    assert max(abs(int(v)) for v in exact.ravel()) <= HALF_BLIND
    r = signed(uniform_mod(P_BLIND, x_q.shape), P_BLIND)
    z = matmul_exact(
        signed((x_q + r) % P_BLIND, P_BLIND), layer.w_q, a_bound=HALF_BLIND, b_bound=127, where="t"
    )
    u = matmul_exact(r, layer.w_q, a_bound=HALF_BLIND, b_bound=127, where="t")
    y = signed((z - u) % P_BLIND, P_BLIND)
    assert y.tolist() == exact.tolist()
