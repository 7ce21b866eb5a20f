"""The `infer` built-in's outsourced modes in a real enclave worker (issue 9): the host hands the
enclave an accelerator socket, the enclave opens one fresh pipe pair per task for the sandbox child,
the child's executor outsources every MatMul/Gemm/Conv and checks each product with Freivalds.

Played here by the adversary, the host's accelerator (a thread of this test, serving the streams
the enclave sends over the socket with whatever behaviour the test sets): honest, lying about one
layer, hanging up, writing garbage frames. A lie or a broken stream fails the task closed (no output
published, the error names the layer); an enclave whose host offers no accelerator refuses the
outsourced modes before anything runs."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
from typing import Any

import numpy as np
import pytest

from confide.client import inference
from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError, EnclaveError
from confide.enclave.infer import wire
from confide.enclave.infer.field import HALF_BLIND
from confide.enclave.keys import Identity
from confide.enclave.sandbox.protocol import recv_msg
from confide.infer.accelerator import LyingAccelerator, NumpyAccelerator, serve_stream
from infer_support import cnn, mlp, ort_run

VENDOR = Identity.generate("vendor")
CLINIC = Identity.generate("clinic")
LAB = Identity.generate("lab")
PARTIES = {"vendor": VENDOR.public, "clinic": CLINIC.public, "lab": LAB.public}
OUTSOURCED = ("outsourced-verified", "outsourced-blinded+verified")
X_MLP = np.random.default_rng(7).normal(size=(8, 32)).astype(np.float32)
X_CNN = np.random.default_rng(8).normal(size=(2, 1, 12, 12)).astype(np.float32)


class HostAccelerator:
    """The host's side of the enclave's accelerator socket, with a behaviour chosen per test."""

    def __init__(self) -> None:
        self.enclave_end, self._ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.behaviour = "honest"
        self.streams = 0
        self.seen: list[np.ndarray] = []  # every matmul request's array (what the accelerator learns)
        self.release = threading.Event()  # ends a stall
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (msg := recv_msg(self._ours)) is not None:
            head, fds = msg
            assert head["op"] == "stream" and len(fds) == 2
            self.streams += 1
            threading.Thread(target=self._serve, args=(fds[0], fds[1], self.behaviour), daemon=True).start()

    def _serve(self, rfd: int, wfd: int, behaviour: str) -> None:
        if behaviour == "honest":
            serve_stream(rfd, wfd, Recording(NumpyAccelerator(), self.seen))
        elif behaviour.startswith("lie:"):
            serve_stream(rfd, wfd, LyingAccelerator(NumpyAccelerator(), "flip", layers={behaviour[4:]}))
        elif behaviour == "no-read":  # takes the stream and never reads a byte of it, holding it open
            self.release.wait(60)
            os.close(rfd)
            os.close(wfd)
        elif behaviour in ("hang-up", "garbage", "stall"):
            with os.fdopen(rfd, "rb") as r, os.fdopen(wfd, "wb") as w, contextlib.suppress(OSError):
                backend = NumpyAccelerator()
                while (got := wire.recv(r, where="test")) is not None:
                    head, arr = got
                    if head["op"] == "load":
                        assert arr is not None
                        backend.load(head["layer"], arr)
                        wire.send(w, {"ok": True, "seq": head["seq"]})
                        continue
                    if behaviour == "garbage":  # a frame header that is not JSON, then noise
                        w.write(b"\x00\x00\x00\x10" + os.urandom(16))
                        w.flush()
                    if behaviour == "stall":  # half a reply, then nothing, the stream held open
                        w.write(b"\x00\x00")
                        w.flush()
                        self.release.wait(60)
                    return  # hang up: both ends closed on the first product asked for
        else:
            raise AssertionError(behaviour)


class Recording:
    def __init__(self, inner: Any, seen: list[np.ndarray]) -> None:
        self.inner, self.seen = inner, seen

    def load(self, layer: str, w_q: np.ndarray) -> None:
        self.inner.load(layer, w_q)

    def matmul(self, layer: str, x: np.ndarray) -> Any:
        self.seen.append(np.array(x))
        return self.inner.matmul(layer, x)


@pytest.fixture(scope="module")
def accel_worker(tmp_path_factory: pytest.TempPathFactory):
    """An enclave worker whose host offers the test's accelerator: (kit, host accelerator)."""
    from confide.client.home import Home
    from confide.enclave.keys import PublicIdentity
    from conftest import TaskKit

    root = tmp_path_factory.mktemp("accel")
    accel = HostAccelerator()
    enclave = Home(root / "home").start_enclave(accelerator=accel.enclave_end)
    assert enclave.info["accelerator"] is True
    info = enclave.service_init()
    yield TaskKit(root / "work", enclave, PublicIdentity.from_line(info["service"])), accel
    enclave.close()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def run(
    kit: Any, model: bytes, x: np.ndarray, mode: str, **params: Any
) -> tuple[dict[str, Any], dict[str, Any], dict]:
    return kit.run_builtin(
        "infer",
        {"model": model, "data": _npz(x=x)},
        {"mode": mode, **params},
        owners={"model": VENDOR, "data": CLINIC},
        creator=LAB,
        outputs=("outputs",),
        participants=PARTIES,
    )


def error_text(kit: Any, outs: dict) -> str:
    return kit.read(outs["_error"], LAB).decode("utf-8", "replace")


@pytest.mark.parametrize("mode", OUTSOURCED)
def test_outsourced_modes_match_onnxruntime(accel_worker: Any, mode: str) -> None:
    kit, accel = accel_worker
    accel.behaviour = "honest"
    for model, x, bound in ((mlp(), X_MLP, 0.01), (cnn(), X_CNN, None)):
        before, seen_before = accel.streams, len(accel.seen)
        result, body, outs = run(kit, model, x, mode)
        assert result["ok"], body
        assert accel.streams == before + 1  # one fresh stream per task
        got = np.load(io.BytesIO(kit.read(outs["outputs"], LAB)), allow_pickle=False)["y"]
        ref = ort_run(model, {"x": x})[0]
        err = float(np.max(np.abs(got - ref)))
        # the documented quantization error (docs/inference/): softmax outputs within 0.01, the
        # CNN's logits within 3% of their largest magnitude; same argmax
        assert err < (bound if bound is not None else 0.03 * float(np.max(np.abs(ref)))), err
        assert np.array_equal(np.argmax(got, axis=1), np.argmax(ref, axis=1))
        sent = accel.seen[seen_before:]
        assert len(sent) == 3  # three linear layers each
        rows = _first_rows(x, sent[0])
        if mode == "outsourced-verified":  # the accelerator sees each input row, scaled by 2^s
            for got_row, x_row in zip(sent[0].astype(float), rows, strict=True):
                assert np.corrcoef(got_row, x_row)[0, 1] > 0.999
        else:  # blinded: spread over the whole field, uncorrelated with the input
            assert np.max(np.abs(sent[0])) > HALF_BLIND // 2
            assert abs(np.corrcoef(sent[0].ravel().astype(float), rows.ravel())[0, 1]) < 0.25


def _first_rows(x: np.ndarray, sent: np.ndarray) -> np.ndarray:
    """The input as the first layer's rows (the MLP's x itself; the CNN's im2col patches)."""
    if x.ndim == 2:
        return x.astype(float)
    p = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(p, (3, 3), axis=(1, 2))  # b, 12, 12, 3, 3
    return win.reshape(sent.shape).astype(float)


@pytest.mark.parametrize("mode", OUTSOURCED)
def test_a_lying_accelerator_fails_the_task_naming_the_layer(accel_worker: Any, mode: str) -> None:
    kit, accel = accel_worker
    accel.behaviour = "lie:fc1"
    result, _, outs = run(kit, mlp(), X_MLP, mode)
    assert not result["ok"] and result["category"] == "exception"
    assert "outputs" not in result["outputs"] and not outs["outputs"].exists()  # nothing released
    text = error_text(kit, outs)
    assert "OutsourceRejected" in text and "layer fc1: accelerator result failed Freivalds' check" in text


@pytest.mark.parametrize("behaviour", ["hang-up", "garbage"])
def test_a_broken_accelerator_stream_fails_closed(accel_worker: Any, behaviour: str) -> None:
    kit, accel = accel_worker
    accel.behaviour = behaviour
    result, _, outs = run(kit, mlp(), X_MLP, "outsourced-blinded+verified")
    assert not result["ok"] and result["category"] == "exception"
    assert "outputs" not in result["outputs"] and not outs["outputs"].exists()
    text = error_text(kit, outs)
    assert "WireError" in text and "layer fc0" in text, text
    want = "the accelerator closed the channel" if behaviour == "hang-up" else "header is not JSON"
    assert want in text, text


def test_an_accelerator_that_never_reads_fails_the_layer_at_the_timeout(accel_worker: Any) -> None:
    """The first layer's weights (512 x 256 int8, 128 KiB) overflow the pipe's buffer: a blocking
    write would wait for ever; the child's write gives up at params.reply_timeout_s."""
    kit, accel = accel_worker
    accel.behaviour = "no-read"
    accel.release.clear()
    x = np.random.default_rng(9).normal(size=(2, 512)).astype(np.float32)
    try:
        result, _, outs = run(kit, mlp(sizes=(512, 256, 10)), x, "outsourced-verified", reply_timeout_s=1)
    finally:
        accel.release.set()
    assert not result["ok"] and result["category"] == "exception"  # not the run's wall timeout
    assert "outputs" not in result["outputs"] and not outs["outputs"].exists()
    text = error_text(kit, outs)
    assert "layer fc0 (load): cannot reach the accelerator (the accelerator took" in text, text
    assert "bytes of a request within 1 s (params.reply_timeout_s)" in text, text


def test_a_stalled_accelerator_fails_the_layer_at_the_reply_timeout(accel_worker: Any) -> None:
    kit, accel = accel_worker
    accel.behaviour = "stall"
    accel.release.clear()
    try:
        result, _, outs = run(kit, mlp(), X_MLP, "outsourced-verified", reply_timeout_s=1)
    finally:
        accel.release.set()
    assert not result["ok"] and result["category"] == "exception"  # not the run's wall timeout
    assert "outputs" not in result["outputs"] and not outs["outputs"].exists()
    text = error_text(kit, outs)
    assert "layer fc0: cannot read the accelerator (no complete reply within 1 s" in text, text
    for bad in (0, -1, "5", True, 3601):
        result, _, outs = run(kit, mlp(), X_MLP, "outsourced-verified", reply_timeout_s=bad)
        assert not result["ok"] and "params.reply_timeout_s must be a number" in error_text(kit, outs)


def test_all_in_enclave_needs_no_accelerator_stream(accel_worker: Any) -> None:
    kit, accel = accel_worker
    before = accel.streams
    result, body, outs = run(kit, mlp(), X_MLP, "all-in-enclave")
    assert result["ok"], body and accel.streams == before  # the accelerator is never contacted
    got = np.load(io.BytesIO(kit.read(outs["outputs"], LAB)), allow_pickle=False)["y"]
    np.testing.assert_allclose(got, ort_run(mlp(), {"x": X_MLP})[0], rtol=1e-6, atol=1e-6)


def test_no_accelerator_offered_is_a_clear_refusal(service_worker: Any) -> None:
    kit, _ = service_worker  # an enclave started without --accelerator-fd
    for mode in OUTSOURCED:
        result, body, outs = run(kit, mlp(), X_MLP, mode)
        assert result["category"] == "refused" and body["error"]["check"] == "run"
        assert f"mode {mode} needs an accelerator and this host offers none" in body["error"]["message"]
        assert not outs["outputs"].exists()


def test_the_approval_text_says_what_each_mode_reveals() -> None:
    def text(mode: str) -> str:
        from confide.client.manifest_build import build_manifest

        svc = Identity.generate("svc")
        m = build_manifest(
            service=svc.public,
            creator=LAB.public,
            function=mf.builtin_descriptor("infer"),
            params={"mode": mode},
            inputs=[
                mf.TaskInput("model", "d" * 32, VENDOR.fingerprint, "0" * 64),
                mf.TaskInput("data", "e" * 32, CLINIC.fingerprint, "1" * 64),
            ],
            outputs=[mf.TaskOutput("outputs", (LAB.fingerprint,))],
            participants=PARTIES,
        )
        return "\n".join(inference.describe(m))

    verified, blinded = text("outsourced-verified"), text("outsourced-blinded+verified")
    for t in (verified, blinded):
        assert "weights" in t and "in clear" in t and "accelerator" in t
    assert "sees the data of clinic" in verified and "hidden from the accelerator" in blinded
    assert "waits at most 120 s for each accelerator reply" in verified
    assert set(inference.MODES) == {"all-in-enclave", *OUTSOURCED, "split"}


def test_the_accelerator_process_serves_each_enclave_stream() -> None:
    """What `confide serve --accelerator numpy` starts per worker, driven by the enclave's link."""
    from confide.enclave.accelerator_link import AcceleratorLink
    from confide.enclave.infer.executor import Executor, Graph
    from confide.enclave.infer.slalom import Mode
    from confide.infer.accelerator import AcceleratorProcess

    proc = AcceleratorProcess("numpy")
    assert proc.backend == "numpy-cpu"
    link = AcceleratorLink(proc.enclave_sock)
    try:
        model = mlp()
        for _ in range(2):  # two tasks, two fresh streams, each with its own loaded weights
            rfd, wfd = link.open_stream()
            with os.fdopen(rfd, "rb") as r, os.fdopen(wfd, "wb") as w:
                client = wire.AcceleratorClient(r, w)
                out, stats = Executor(Graph.from_bytes(model), Mode.BLINDED, client).run({"x": X_MLP})
                client.close()
            assert np.max(np.abs(out["y"] - ort_run(model, {"x": X_MLP})[0])) < 0.01
            assert stats.outsourced_calls == 3
    finally:
        link.close()
        proc.close()
    assert proc.proc.returncode == 0  # it exits when the enclave's end closes
    with pytest.raises(EnclaveError, match="accelerator is not reachable"):
        link.open_stream()


def test_a_cuda_accelerator_without_cuda_is_a_clear_start_error() -> None:
    from confide.infer.accelerator import AcceleratorProcess

    try:  # torch is imported only in the accelerator process, never in this one
        proc = AcceleratorProcess("cuda")
    except ConfideError as exc:  # this CPU machine: torch without CUDA, or no torch at all
        said = str(exc)
        assert "accelerator (--backend cuda) did not start (exit code 2): error: " in said, said
        assert "CUDA is not available" in said or "torch is not installed" in said, said
        return
    assert proc.backend == "torch-cuda"  # a machine with a GPU
    proc.close()


def _in_process(params: dict[str, Any], model: bytes, data: bytes, *, accelerator: bool = True) -> bytes:
    """The built-in's run(ctx) in this process (coverage sees it), its stream served by a thread."""
    from confide.enclave.builtins import onnx_infer
    from confide.enclave.sandbox.context import Context

    out = io.BytesIO()
    stream = None
    if accelerator:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        threading.Thread(target=serve_stream, args=(req_r, rep_w, NumpyAccelerator()), daemon=True).start()
        stream = (os.fdopen(rep_r, "rb"), os.fdopen(req_w, "wb"))
    ctx = Context(params, {"model": io.BytesIO(model), "data": io.BytesIO(data)}, {"outputs": out}, stream)  # type: ignore[arg-type]
    try:
        onnx_infer.run(ctx)
    finally:
        for f in stream or ():
            f.close()
    return out.getvalue()


def test_the_builtin_in_process_and_its_refusals() -> None:
    model = mlp()
    ref = ort_run(model, {"x": X_MLP})[0]
    for mode in OUTSOURCED:
        got = np.load(io.BytesIO(_in_process({"mode": mode}, model, _npz(x=X_MLP))))["y"]
        assert np.max(np.abs(got - ref)) < 0.01
    buf = io.BytesIO()
    np.save(buf, X_MLP)  # a .npy for a one-input model, and params.outputs
    got = np.load(io.BytesIO(_in_process({"mode": OUTSOURCED[1], "outputs": ["y"]}, model, buf.getvalue())))
    assert got.files == ["y"]
    bad: list[tuple[dict[str, Any], bytes, bytes, bool, str]] = [
        ({"mode": "outsourced-blinded"}, model, _npz(x=X_MLP), True, "is not one of all-in-enclave"),
        ({"mode": OUTSOURCED[0]}, model, _npz(x=X_MLP), False, "needs the accelerator stream"),
        ({"reply_timeout_s": 5}, model, _npz(x=X_MLP), True, "applies only to the outsourced modes"),
        ({"mode": OUTSOURCED[0]}, b"junk", _npz(x=X_MLP), True, "is not a valid ONNX model"),
        ({"mode": OUTSOURCED[0]}, model, b"junk", True, "is not a .npy/.npz file"),
        ({"mode": OUTSOURCED[0]}, model, _npz(z=X_MLP), True, "has arrays ['z'], the model takes ['x']"),
        ({"mode": OUTSOURCED[0]}, model, _npz(x=X_MLP.astype(np.float64)), True, "take float32"),
        ({"mode": OUTSOURCED[0]}, model, _npz(x=X_MLP[:, :16]), True, "the model takes [None, 32]"),
        ({"mode": OUTSOURCED[0]}, model, _npz(x=X_MLP * np.nan), True, "empty or not finite"),
        ({"mode": OUTSOURCED[0], "outputs": ["h0"]}, model, _npz(x=X_MLP), True, "params.outputs must be"),
        ({"mode": OUTSOURCED[0], "reply_timeout_s": 0}, model, _npz(x=X_MLP), True, "reply_timeout_s must"),
    ]
    for params, m, data, accel, message in bad:
        with pytest.raises(ValueError, match=None) as info:
            _in_process(params, m, data, accelerator=accel)
        assert message in str(info.value), (params, str(info.value))


def _embedding_model() -> bytes:
    """ids (int64, [batch, 6]) -> Gather from a constant table -> mean over the sequence -> MatMul:
    a transformer's input shape (token ids), its linear layer outsourced."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    table = numpy_helper.from_array(rng.normal(size=(50, 16)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["y"]),
        ],
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [table, w, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def test_token_id_inputs_run_in_the_outsourced_modes() -> None:
    """int64 inputs (MiniLM's token ids) are taken; an id beyond the table fails closed."""
    model = _embedding_model()
    ids = np.random.default_rng(12).integers(0, 50, size=(3, 6)).astype(np.int64)
    ref = ort_run(model, {"ids": ids})[0]
    for mode in OUTSOURCED:
        got = np.load(io.BytesIO(_in_process({"mode": mode}, model, _npz(ids=ids))))["y"]
        assert np.max(np.abs(got - ref)) < 0.02 * np.max(np.abs(ref))
    with pytest.raises(ValueError, match="the model takes int64; the outsourced modes take"):
        _in_process({"mode": OUTSOURCED[1]}, model, _npz(ids=ids.astype(np.float32)))
    with pytest.raises(Exception, match="Gather index out of range"):
        _in_process({"mode": OUTSOURCED[1]}, model, _npz(ids=ids + 100))


SNOOP = """
def run(ctx):
    ctx.outputs["out"].write(repr(ctx.accelerator).encode())
"""


def test_a_partys_own_function_never_gets_the_accelerator_stream(accel_worker: Any) -> None:
    """Only the infer built-in's outsourced modes get a stream: a party's function named `infer`,
    asking for an outsourced mode, on an enclave that has an accelerator, gets none."""
    from confide.client.manifest_build import build_manifest, sign_approval

    kit, accel = accel_worker
    before = accel.streams
    ds = kit.dataset(CLINIC, b"x")
    desc = mf.function_descriptor(
        name="infer", source=SNOOP, owner=VENDOR.public, description="snoop", inputs=["data"], outputs=["out"]
    )
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=desc,
        params={"mode": "outsourced-blinded+verified"},
        inputs=[kit.task_input("data", ds)],
        outputs=[mf.TaskOutput("out", (LAB.fingerprint,))],
        participants=PARTIES,
    )
    approvals = [sign_approval(p, m) for p in (LAB, CLINIC, VENDOR)]
    result, body, outs = kit.run(m, approvals, {"data": ds}, function_source={"clear": SNOOP})
    assert result["ok"], body
    assert kit.read(outs["out"], LAB) == b"None" and accel.streams == before
