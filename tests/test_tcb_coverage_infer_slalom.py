"""confide.enclave.infer.slalom: layers and calls a hostile model owner or accelerator could hand the
enclave (bad weights, wrong shapes, non-finite values, non-array replies, wrong modes) are refused."""

from __future__ import annotations

import numpy as np
import pytest

from confide.enclave.errors import ConfideError
from confide.enclave.infer.slalom import (
    LayerStats,
    Mode,
    OutsourceRejected,
    QuantLinear,
    _check_reply,
    activation_shift,
    precompute,
    run_linear,
)

W = np.arange(12, dtype=np.float64).reshape(4, 3) / 10


@pytest.mark.parametrize(
    ("w", "bias", "bits", "message"),
    [
        (np.zeros((0, 3)), None, 8, "weights must be a non-empty 2-D matrix"),
        (np.zeros(3), None, 8, "weights must be a non-empty 2-D matrix"),
        (np.array([[np.nan]]), None, 8, "weights or bias are not finite"),
        (W, np.array([np.inf, 0, 0]), 8, "weights or bias are not finite"),
        (W, None, 1, "bits_w 1 outside 2..16"),
        (W, None, 17, "bits_w 17 outside 2..16"),
        (W, np.zeros(2), 8, "bias has 2 entries for 3 outputs"),
    ],
)
def test_hostile_layers_are_refused(w: np.ndarray, bias: np.ndarray | None, bits: int, message: str) -> None:
    with pytest.raises(ConfideError) as info:
        QuantLinear.from_float("fc1", w, bias, bits_w=bits)
    assert message in str(info.value) and "layer fc1" in str(info.value)


def test_an_all_zero_layer_quantises() -> None:
    layer = QuantLinear.from_float("z", np.zeros((2, 2)))
    assert layer.w_scale == 1.0 and int(np.abs(layer.w_q).max()) == 0
    assert activation_shift(np.ones((1, 2)), layer) >= 0


@pytest.mark.parametrize(
    ("z", "message"),
    [
        ([[1, 2, 3]], "returned list, not an array"),
        (np.zeros((2, 3), dtype=np.int64), "returned shape (2, 3), expected (1, 3)"),
        (np.zeros((1, 3)), "returned dtype float64, expected integers"),
        (np.array([[-1, 0, 0]]), "outside the field"),
    ],
)
def test_hostile_accelerator_replies_are_refused(z: object, message: str) -> None:
    with pytest.raises(OutsourceRejected) as info:
        _check_reply(z, 1, 3, "layer fc1")
    assert message in str(info.value)


class _Never:
    def load(self, name: str, w_q: np.ndarray) -> None:
        raise AssertionError("not reached")

    def matmul(self, name: str, x: np.ndarray) -> np.ndarray:
        raise AssertionError("the call must be refused before anything is sent")


@pytest.mark.parametrize(
    ("x", "mode", "message"),
    [
        (np.ones((1, 4)), Mode.ENCLAVE, "run_linear outsources; mode enclave does not"),
        (np.ones((1, 5)), Mode.VERIFIED, "input shape (1, 5) does not fit weights (4, 3)"),
        (np.ones(4), Mode.VERIFIED, "input shape (4,) does not fit"),
        (np.array([[1.0, np.nan, 0, 0]]), Mode.VERIFIED, "activations are not finite"),
    ],
)
def test_calls_that_do_not_fit_are_refused_before_outsourcing(
    x: np.ndarray, mode: Mode, message: str
) -> None:
    layer = QuantLinear.from_float("fc1", W)
    with pytest.raises(ConfideError) as info:
        run_linear(layer, x, _Never(), precompute(layer, 1, blinded=False), mode)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_layer_stats_add_up() -> None:
    a, b = LayerStats(), LayerStats()
    b.calls, b.bytes_in, b.bytes_out, b.enclave_ops = 1, 2, 3, 4
    a.add(b)
    a.add(b)
    assert (a.calls, a.bytes_in, a.bytes_out, a.enclave_ops) == (2, 4, 6, 8)
