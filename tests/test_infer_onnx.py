"""Encrypted ONNX models (issue 9): visible metadata, sealed model files, ONNX Runtime in the sandbox
child (all-in-enclave mode), and the outsourced path on real ONNX graphs against plain ONNX Runtime."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from confide.client.sealing import open_reader
from confide.enclave import builtins as builtins_pkg
from confide.enclave.errors import FormatError, IntegrityError
from confide.enclave.infer import wire
from confide.enclave.infer.executor import Executor, Graph, UnsupportedModel
from confide.enclave.infer.slalom import Mode, OutsourceRejected
from confide.enclave.keys import Identity
from confide.enclave.memory import MemoryBudget
from confide.enclave.pipeline import open_input
from confide.enclave.sandbox import SandboxLimits, Zygote, make_input_memfd
from confide.enclave.sealed_file import SealedReader
from confide.infer.accelerator import LyingAccelerator, NumpyAccelerator
from confide.infer.model_meta import KIND, model_meta, seal_model
from infer_support import cnn, mlp, ort_run

SERVICE = Identity.generate("service")
BUILTIN = (Path(builtins_pkg.__file__).parent / "onnx_infer.py").read_text()
RNG = np.random.default_rng(11)
X_MLP = RNG.normal(size=(16, 32)).astype(np.float32)
X_CNN = RNG.normal(size=(4, 1, 12, 12)).astype(np.float32)


def test_model_meta_counts_parameters_and_flops() -> None:
    meta = model_meta(mlp())
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 32]}]
    assert meta["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["N", 10]}]
    assert meta["parameters"] == 32 * 64 + 64 + 64 * 48 + 48 + 48 * 10 + 10
    # Gemm 2·N·K + N (bias), ReLU and Softmax one per element
    assert (
        meta["flops_per_sample"]
        == (2 * 64 * 32 + 64) + 64 + (2 * 48 * 64 + 48) + 48 + (2 * 10 * 48 + 10) + 10
    )
    c = model_meta(cnn())
    conv1, pool, conv2, fc = 4 * 12 * 12, 4 * 6 * 6, 8 * 2 * 2, 10
    assert c["flops_per_sample"] == (2 * conv1 * 9 + conv1) + conv1 + pool + (
        2 * conv2 * 36 + conv2
    ) + 2 * conv2 + (2 * fc * 32 + fc)
    with pytest.raises(FormatError, match="not a valid ONNX model"):
        model_meta(b"\x08\x01garbage")


def test_sealed_model_shows_its_metadata_and_refuses_tampering(tmp_path: Path) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "m.sealed"
    src.write_bytes(mlp())
    seal_model(src, dst, recipients=[SERVICE.public], chunk_size=4096)
    fh, reader = open_reader(dst)
    with fh:  # what the host sees without any key
        assert reader.header.metadata["kind"] == KIND
        assert reader.header.metadata["model"] == model_meta(mlp())
        key = reader.unlock(identity=SERVICE).data_key
    assert SealedReader(io.BytesIO(dst.read_bytes())).unlock(data_key=key).read_chunk(0) == mlp()[:4096]
    data = bytearray(dst.read_bytes())
    data[-40] ^= 1
    bad = tmp_path / "bad.sealed"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="failed authentication"):
        open_input(str(bad), "model", data_key=key, budget=MemoryBudget(64 << 20))


# ---- all-in-enclave: ONNX Runtime in the sandbox child --------------------------------------------


@pytest.fixture(scope="module")
def zygote():
    # as the enclave's zygote: numpy, and split (its session options); onnxruntime cannot be (a thread)
    z = Zygote.start(strict=True, preimport=("numpy", "confide.enclave.infer.split"))
    yield z
    z.close()


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def _sandboxed(zygote: Zygote, model_fd: int, data: bytes, params: dict | None = None):
    out = Sink()
    result = zygote.run(
        BUILTIN,
        params=params or {},
        inputs={"model": model_fd, "data": make_input_memfd(data, name="data")},
        outputs={"outputs": out},
        limits=SandboxLimits(memory_bytes=512 << 20, wall_seconds=60.0),
    )
    return result, out.data


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize(("name", "x"), [("mlp", X_MLP), ("cnn", X_CNN)])
def test_sealed_model_runs_in_the_sandbox_like_plain_onnxruntime(
    zygote, tmp_path: Path, name: str, x
) -> None:
    model = mlp() if name == "mlp" else cnn()
    src, dst = tmp_path / "m.onnx", tmp_path / "m.sealed"
    src.write_bytes(model)
    seal_model(src, dst, recipients=[SERVICE.public], chunk_size=1024)
    fh, reader = open_reader(dst)
    with fh:
        key = reader.unwrap_key(SERVICE)
    budget = MemoryBudget(64 << 20)
    fd, _ = open_input(str(dst), "model", data_key=key, budget=budget)
    result, out = _sandboxed(zygote, fd, _npz(x=x))
    assert result.ok, result.detail
    got = np.load(io.BytesIO(bytes(out)), allow_pickle=False)["y"]
    assert np.array_equal(got, ort_run(model, {"x": x})[0])  # same runtime, same threads: bit-identical


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_npz(x=np.array([{"a": 1}], dtype=object)), "not a .npy/.npz file"),  # a pickle: never loaded
        (_npz(z=X_MLP), "the model takes \\['x'\\]"),
        (_npz(x=X_MLP.astype(np.float64)), "is float64"),
        (_npz(x=X_MLP[:, :5]), "has shape"),
        (b"not numpy", "not a .npy/.npz file"),
    ],
)
def test_hostile_data_is_refused_in_the_sandbox(zygote, data: bytes, message: str) -> None:
    result, out = _sandboxed(zygote, make_input_memfd(mlp(), name="model"), data)
    assert not result.ok and result.category == "exception" and out == b""
    assert "onnx-infer" in result.detail
    import re

    assert re.search(message, result.detail), result.detail


def test_hostile_model_and_params_are_refused_in_the_sandbox(zygote) -> None:
    result, _ = _sandboxed(zygote, make_input_memfd(b"\x08\x07junk", name="model"), _npz(x=X_MLP))
    assert not result.ok and "is not a model ONNX Runtime can load" in result.detail
    result, _ = _sandboxed(zygote, make_input_memfd(mlp(), name="model"), _npz(x=X_MLP), {"threads": 8})
    assert not result.ok and "unknown parameter(s) threads" in result.detail


# ---- the outsourced path on ONNX graphs -----------------------------------------------------------


@pytest.mark.parametrize("gemm", [True, False])
def test_outsourced_mlp_matches_onnxruntime_within_the_quantization_error(gemm: bool) -> None:
    model = mlp(gemm=gemm)
    ref = ort_run(model, {"x": X_MLP})[0]
    graph = Graph.from_bytes(model)
    results = {}
    for mode in Mode:
        ex = Executor(graph, mode, NumpyAccelerator())
        assert ex.precompute({"x": X_MLP.shape}, 2) >= 0.0 and ex.pads_left({"x": X_MLP.shape}) == (
            0 if mode is Mode.ENCLAVE else 2
        )
        out, stats = ex.run({"x": X_MLP})
        results[mode] = out["y"]
        if mode is not Mode.ENCLAVE:
            assert stats.outsourced_calls == 3 and stats.accelerator_flops == 2 * 16 * (
                32 * 64 + 64 * 48 + 48 * 10
            )
            assert stats.online_pad_s == 0.0  # the pad came from the offline phase
    assert np.max(np.abs(results[Mode.ENCLAVE] - ref)) < 1e-6
    for mode in (Mode.VERIFIED, Mode.BLINDED):
        err = np.max(np.abs(results[mode] - ref))
        assert err < 0.01, (mode, err)  # softmax probabilities; measured ~2e-3 (bench/inference.py)
        assert np.array_equal(np.argmax(results[mode], axis=1), np.argmax(ref, axis=1))


def test_outsourced_cnn_matches_onnxruntime() -> None:
    model = cnn()
    ref = ort_run(model, {"x": X_CNN})[0]
    out, stats = Executor(Graph.from_bytes(model), Mode.BLINDED, NumpyAccelerator()).run({"x": X_CNN})
    assert stats.outsourced_calls == 3 and stats.online_pad_s > 0.0  # no offline pad: drawn online
    assert np.max(np.abs(out["y"] - ref)) < 0.03 * np.max(np.abs(ref))


def test_tampered_layer_fails_the_whole_inference_naming_it() -> None:
    model = mlp()
    graph = Graph.from_bytes(model)
    liar = LyingAccelerator(NumpyAccelerator(), "flip", layers={"fc1"})
    ex = Executor(graph, Mode.BLINDED, liar)
    with pytest.raises(OutsourceRejected, match="layer fc1: .*Freivalds"):
        ex.run({"x": X_MLP})
    assert liar.tampered == 1


def test_unsupported_operators_are_refused_naming_the_node() -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Einsum", ["x"], ["y"], name="odd", equation="ij->ij")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    with pytest.raises(UnsupportedModel, match="ai.onnx.Einsum \\(node odd\\)"):
        Graph.from_bytes(m.SerializeToString())
    with pytest.raises(FormatError, match="not a valid ONNX model"):
        Graph.from_bytes(b"junk")
    assert onnx  # imported for the helper


def test_outsourced_mlp_through_the_external_accelerator_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "confide.infer.accelerator"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        client = wire.AcceleratorClient(proc.stdout, proc.stdin)
        model = mlp()
        ex = Executor(Graph.from_bytes(model), Mode.BLINDED, client)
        out, stats = ex.run({"x": X_MLP})
        assert np.max(np.abs(out["y"] - ort_run(model, {"x": X_MLP})[0])) < 0.01
        assert stats.bytes_to_accelerator == 16 * (32 + 64 + 48) * 4
        client.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
