"""Outsourced linear layers (issue 9): blinding, Freivalds, fail-closed refusal of every tampered result,
and the accelerator as an external process over the framed protocol."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import numpy as np
import pytest

from confide.enclave.infer import slalom, wire
from confide.enclave.infer.field import HALF_BLIND, P_BLIND, P_VERIF, matmul_mod
from confide.enclave.infer.slalom import Mode, OutsourceRejected, QuantLinear, precompute, run_linear
from confide.infer.accelerator import ATTACKS, LyingAccelerator, NumpyAccelerator

RNG = np.random.default_rng(7)
W = RNG.normal(size=(24, 12)) * 0.2
B = RNG.normal(size=12) * 0.1
X = RNG.normal(size=(5, 24))


def _layer(name: str = "fc1") -> tuple[QuantLinear, NumpyAccelerator]:
    layer = QuantLinear.from_float(name, W, B)
    acc = NumpyAccelerator()
    acc.load(name, layer.w_q)
    return layer, acc


class Recorder:
    """An honest accelerator that keeps everything it was sent (what the host learns)."""

    def __init__(self, inner: NumpyAccelerator) -> None:
        self.inner = inner
        self.seen: list[np.ndarray] = []

    def load(self, layer: str, w_q: np.ndarray) -> None:
        self.inner.load(layer, w_q)

    def matmul(self, layer: str, x: np.ndarray) -> np.ndarray:
        self.seen.append(x.copy())
        return self.inner.matmul(layer, x)


@pytest.mark.parametrize("mode", [Mode.VERIFIED, Mode.BLINDED])
def test_honest_accelerator_gives_the_float_result_within_the_quantization_error(mode: Mode) -> None:
    layer, acc = _layer()
    y, stats = run_linear(layer, X, acc, precompute(layer, 5, blinded=mode is Mode.BLINDED), mode)
    ref = X @ W + B
    assert np.max(np.abs(y - ref)) < 0.01 * np.max(np.abs(ref))
    assert stats.accelerator_flops == 2 * 5 * 24 * 12 and stats.freivalds_ops == 2 * 2 * 5 * (24 + 12)


def test_blinded_mode_shows_the_accelerator_only_fresh_uniform_field_elements() -> None:
    layer, acc = _layer()
    rec = Recorder(acc)
    x = np.zeros((64, 24))
    x[:, 0] = 3.0  # a very structured input: one value, repeated
    for _ in range(2):
        run_linear(layer, x, rec, precompute(layer, 64, blinded=True), Mode.BLINDED)
    first, second = rec.seen
    assert np.all(np.abs(first) <= HALF_BLIND)
    assert not np.array_equal(first, second)  # the same input twice: unrelated values
    assert len(np.unique(first)) > 0.99 * first.size  # no trace of the zeros or the repeated value
    # the verified mode, by contrast, shows the quantized input itself
    run_linear(layer, x, rec, precompute(layer, 64, blinded=False), Mode.VERIFIED)
    assert len(np.unique(rec.seen[-1])) == 2


def test_freivalds_vectors_are_fresh_and_never_constant() -> None:
    layer, _ = _layer()
    a, b = precompute(layer, 1, blinded=True), precompute(layer, 1, blinded=True)
    assert a.s.shape == (12, slalom.REPS) == b.s.shape
    assert not np.array_equal(a.s, b.s) and not np.array_equal(a.r, b.r)
    assert all(len(np.unique(a.s[:, i])) > 1 for i in range(slalom.REPS))
    assert np.array_equal(a.t, matmul_mod(layer.w_q, a.s, P_VERIF, a_bound=127, where="t"))


def test_ten_thousand_single_element_flips_are_all_refused() -> None:
    w = RNG.normal(size=(6, 4))
    layer = QuantLinear.from_float("tiny", w)
    honest = NumpyAccelerator()
    honest.load("tiny", layer.w_q)
    liar = LyingAccelerator(honest, "flip")
    x = RNG.normal(size=(2, 6))
    accepted = 0
    for i in range(10_000):
        mode = Mode.BLINDED if i % 2 else Mode.VERIFIED
        try:
            run_linear(layer, x, liar, precompute(layer, 2, blinded=mode is Mode.BLINDED), mode)
            accepted += 1
        except OutsourceRejected as exc:
            assert "layer tiny" in str(exc) and "Freivalds" in str(exc)
    assert liar.tampered == 10_000 and accepted == 0  # false accept <= P_VERIF^-2 each


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a != "replay"])
def test_every_attack_is_refused_naming_the_layer(attack: str) -> None:
    layer, acc = _layer("conv7")
    liar = LyingAccelerator(acc, attack)
    with pytest.raises(OutsourceRejected, match="layer conv7"):
        run_linear(layer, X, liar, precompute(layer, 5, blinded=True), Mode.BLINDED)


def test_replayed_answer_is_refused() -> None:
    layer, acc = _layer()
    liar = LyingAccelerator(acc, "replay")
    with pytest.raises(OutsourceRejected):  # first call: tampered (nothing to replay yet)
        run_linear(layer, X, liar, precompute(layer, 5, blinded=True), Mode.BLINDED)
    # the same input again: the last call's (honest) answer is wrong under the new masks
    with pytest.raises(OutsourceRejected, match="Freivalds"):
        run_linear(layer, X, liar, precompute(layer, 5, blinded=True), Mode.BLINDED)
    # integrity-only mode: a replayed answer for another input is refused too
    with pytest.raises(OutsourceRejected, match="Freivalds"):
        run_linear(layer, X + 1.0, liar, precompute(layer, 5, blinded=False), Mode.VERIFIED)


def test_cancelling_errors_pass_a_constant_vector_but_not_ours() -> None:
    """Slalom's public code used r.setConstant(1 << 20): +d and -d in one row cancel under it."""
    layer, acc = _layer()
    x_q = np.rint(X * 64).astype(np.int64)
    y = x_q @ layer.w_q
    y[1, 3] += 1000
    y[1, 4] -= 1000
    const = np.full((layer.n, 2), 1 << 20, dtype=np.int64)
    t = matmul_mod(layer.w_q, const, P_VERIF, a_bound=127, where="t")
    lhs = matmul_mod(y, const, P_VERIF, a_bound=HALF_BLIND, where="t")
    assert np.array_equal(lhs, matmul_mod(x_q, t, P_VERIF, a_bound=HALF_BLIND, where="t"))  # fooled
    liar = LyingAccelerator(acc, "cancel")
    for _ in range(200):
        with pytest.raises(OutsourceRejected, match="Freivalds"):
            run_linear(layer, X, liar, precompute(layer, 5, blinded=True), Mode.BLINDED)


def test_accelerator_computing_with_other_weights_is_refused() -> None:
    layer, _ = _layer()
    other = NumpyAccelerator()
    w_q = layer.w_q.copy()
    w_q[0, 0] += 1  # one weight off by one
    other.load("fc1", w_q)
    with pytest.raises(OutsourceRejected, match="Freivalds"):
        run_linear(layer, X, other, precompute(layer, 5, blinded=False), Mode.VERIFIED)


def test_pads_are_single_use_and_must_fit() -> None:
    layer, acc = _layer()
    pad = precompute(layer, 5, blinded=True)
    run_linear(layer, X, acc, pad, Mode.BLINDED)
    with pytest.raises(slalom.ConfideError, match="already used"):
        run_linear(layer, X, acc, pad, Mode.BLINDED)
    with pytest.raises(slalom.ConfideError, match="does not fit"):
        run_linear(layer, X, acc, precompute(layer, 4, blinded=True), Mode.BLINDED)
    with pytest.raises(slalom.ConfideError, match="does not fit"):
        run_linear(layer, X, acc, precompute(layer, 5, blinded=False), Mode.BLINDED)
    with pytest.raises(slalom.ConfideError, match="not finite"):
        run_linear(layer, X * np.nan, acc, precompute(layer, 5, blinded=True), Mode.BLINDED)


# ---- the external accelerator process ---------------------------------------------------------------


def _spawn(*extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "confide.infer.accelerator", "--backend", "numpy", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_external_accelerator_process_over_pipes() -> None:
    layer = QuantLinear.from_float("fc1", W, B)
    proc = _spawn()
    assert proc.stdin is not None and proc.stdout is not None
    try:
        client = wire.AcceleratorClient(proc.stdout, proc.stdin)
        client.load("fc1", layer.w_q)
        for mode in (Mode.VERIFIED, Mode.BLINDED):
            y, _ = run_linear(layer, X, client, precompute(layer, 5, blinded=mode is Mode.BLINDED), mode)
            assert np.max(np.abs(y - (X @ W + B))) < 0.02
        with pytest.raises(wire.WireError, match="not loaded"):
            client.matmul("nope", np.zeros((1, 24), np.int64))
        assert client.bytes_sent > 5 * 24 * 4 * 2
        client.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_lying_external_accelerator_is_refused() -> None:
    layer = QuantLinear.from_float("fc1", W, B)
    proc = _spawn("--lie", "flip")
    assert proc.stdin is not None and proc.stdout is not None
    try:
        client = wire.AcceleratorClient(proc.stdout, proc.stdin)
        client.load("fc1", layer.w_q)
        with pytest.raises(OutsourceRejected, match="layer fc1.*Freivalds"):
            run_linear(layer, X, client, precompute(layer, 5, blinded=True), Mode.BLINDED)
    finally:
        proc.kill()
        proc.wait()


def _frame(header: bytes, payload: bytes = b"") -> io.BytesIO:
    return io.BytesIO(struct.pack(">I", len(header)) + header + payload)


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (io.BytesIO(struct.pack(">I", wire.MAX_HEADER + 1)), "exceeds"),
        (_frame(b"{not json"), "not JSON"),
        (_frame(b"[1]"), "not a JSON object"),
        (_frame(b'{"dtype":"float64","shape":[1]}'), "unknown dtype"),
        (_frame(b'{"dtype":"int32","shape":[-1]}'), "bad shape"),
        (_frame(b'{"dtype":"int32","shape":[1,1,1,1,1]}'), "bad shape"),
        (_frame(b'{"dtype":"int32","shape":[65536,65536]}'), "exceeds"),
        (_frame(b'{"dtype":"int32","shape":[4]}', b"\x00" * 15), "channel closed"),
        (io.BytesIO(b"\x00\x00"), "channel closed"),
    ],
)
def test_hostile_frames_are_refused(stream: io.BytesIO, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.recv(stream, where="test")


class _Replier:
    """A fake channel answering every request with a fixed reply frame."""

    def __init__(self, reply: dict, array: np.ndarray | None = None) -> None:
        self.out = io.BytesIO()
        wire.send(self.out, reply, array)
        self.out.seek(0)

    def read(self, n: int) -> bytes:
        return self.out.read(n)


def test_client_refuses_a_reply_to_another_request() -> None:
    client = wire.AcceleratorClient(
        _Replier({"ok": True, "seq": 99}, np.zeros((5, 12), np.int32)), io.BytesIO()
    )  # type: ignore[arg-type]
    with pytest.raises(wire.WireError, match="reply to request 99"):
        client.matmul("fc1", np.zeros((5, 24), np.int64))
    client = wire.AcceleratorClient(_Replier({"ok": False, "seq": 1, "error": "no"}), io.BytesIO())  # type: ignore[arg-type]
    with pytest.raises(wire.WireError, match="refused: no"):
        client.load("fc1", np.zeros((2, 2), np.int64))


def test_accelerator_refuses_out_of_field_inputs() -> None:
    acc = NumpyAccelerator()
    acc.load("a", np.ones((2, 2), np.int64))
    with pytest.raises(Exception, match="signed range"):
        acc.matmul("a", np.full((1, 2), P_BLIND, np.int64))
