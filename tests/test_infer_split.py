"""The infer built-in's `split` mode (issue 9, MazeNet splitting): a model larger than the enclave's
memory budget runs as submodels that each fit, in a real enclave worker whose budget is 128 MiB.

The model owner seals the model in ONNX's external-data layout (weights blob, then the graph; the
graph's offset in the authenticated header). The enclave decrypts only the graph and serves each
segment's weights chunk by chunk through the weight stream. Played by the adversary: a model owner
whose sealed file has a broken chunk, a host changing the file after the check (even with a valid
chunk made under the same key: the model owner colluding), and a sandbox child sending hostile
weight reads; a model with one layer larger than the allowance; a manifest setting the enclave's
own params. A run without the model owner's approval is refused like any infer task's
(tests/test_builtin_infer.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from confide.client import inference
from confide.client.dataset_keys import new_dataset_id, wrap_dataset_key
from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError, FormatError, IntegrityError
from confide.enclave.keys import Identity
from confide.enclave.model_layout import MAX_READ, OK, REFUSED, REPLY, REQUEST, Layout, parse_layout
from confide.enclave.model_stream import PinnedModel, WeightServer
from confide.enclave.sealed_file import SealedReader, SealedWriter
from confide.infer.model_meta import EXTERNAL_ABOVE, upload_parts
from infer_support import cnn, mlp, ort_run

BUDGET_MIB = 128
WIDTH, DEPTH = 2048, 33  # 33 layers of 2048 x 2048 float32: 528 MiB of weights, > 4x the budget
VENDOR = Identity.generate("vendor")
CLINIC = Identity.generate("clinic")
LAB = Identity.generate("lab")
PARTIES = {"vendor": VENDOR.public, "clinic": CLINIC.public, "lab": LAB.public}


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def deep_mlp(width: int, depth: int, seed: int = 0) -> onnx.ModelProto:
    """x (N, width) -> depth x (MatMul, Add, Relu but the last) -> y: He-scaled, values O(1)."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(depth):
        w = rng.standard_normal((width, width), dtype=np.float32) * np.float32(np.sqrt(2 / width))
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(np.full(width, 0.01, np.float32), f"b{i}"),
        ]
        del w
        nodes += [
            helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}"),
        ]
        cur = f"a{i}"
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def external(model: onnx.ModelProto, folder: Path) -> tuple[bytearray, dict[str, Any]]:
    """The model in the external-weights layout, written by onnx's own writer into `folder` (which
    plain ONNX Runtime then loads for the reference): (sealed plaintext, header metadata)."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=1024,
    )
    plain = bytearray((folder / "weights.bin").read_bytes())
    weights = len(plain)
    graph = (folder / "model.onnx").read_bytes()
    plain += graph
    return plain, {"kind": "onnx-model", "layout": Layout(weights, weights, len(graph)).to_json()}


def ort_reference(folder: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


def seal(
    root: Path,
    name: str,
    plain: bytes | bytearray,
    metadata: dict[str, Any],
    *,
    chunk: int = 1 << 20,
    tamper: Any = None,
) -> Any:
    """Sealed as the owner seals it (then `tamper(path)`, before the digest: the pinned file itself)."""
    from types import SimpleNamespace

    data_key = os.urandom(32)
    dataset_id = new_dataset_id()
    path = root / f"{name}.sealed"
    with (
        open(path, "wb") as fh,
        SealedWriter(
            fh, data_key=data_key, recipients=[VENDOR.public], metadata=metadata, chunk_size=chunk
        ) as w,
    ):
        w.write(plain)
    if tamper is not None:
        tamper(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return SimpleNamespace(
        path=path, dataset_id=dataset_id, sha256=h.hexdigest(), data_key=data_key, owner=VENDOR
    )


def task(
    kit: Any, model: Any, x: np.ndarray, params: dict[str, Any], *, report: bool = False
) -> tuple[dict, dict, dict]:
    data = kit.dataset(CLINIC, _npz(x=x))
    service = kit.service
    model.envelope = wrap_dataset_key(
        model.data_key,
        dataset_id=model.dataset_id,
        owner=VENDOR.public,
        service=service,
        ciphertext_sha256=model.sha256,
    )
    outputs = [mf.TaskOutput("outputs", (LAB.fingerprint,))]
    if report:
        outputs.append(mf.TaskOutput("report", (LAB.fingerprint,)))
    m = build_manifest(
        service=service,
        creator=LAB.public,
        function=mf.builtin_descriptor("infer"),
        params=params,
        inputs=[kit.task_input("model", model), kit.task_input("data", data)],
        outputs=outputs,
        participants=PARTIES,
    )
    approvals = [sign_approval(p, m) for p in (VENDOR, CLINIC, LAB)]
    return kit.run(m, approvals, {"model": model, "data": data})


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An enclave worker with a 128 MiB memory budget (no accelerator: split needs none)."""
    from confide.client.home import Home
    from confide.enclave.keys import PublicIdentity
    from conftest import TaskKit

    root = tmp_path_factory.mktemp("split")
    cfg = root / "enclave.toml"
    cfg.write_text(f"[enclave]\nmemory_budget_mib = {BUDGET_MIB}\n")
    enclave = Home(root / "home").start_enclave(config=cfg)
    info = enclave.service_init()
    yield TaskKit(root / "work", enclave, PublicIdentity.from_line(info["service"]))
    enclave.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The 528 MiB model, sealed, and plain ONNX Runtime's output on x."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("big")
    plain, meta = external(deep_mlp(WIDTH, DEPTH), root / "onnx")
    x = np.random.default_rng(1).normal(size=(4, WIDTH)).astype(np.float32)
    sealed = seal(root, "big", plain, meta)
    weights, plain_bytes = meta["layout"]["weights_bytes"], len(plain)
    del plain
    return SimpleNamespace(
        sealed=sealed, x=x, ref=ort_reference(root / "onnx", x), weights=weights, plain_bytes=plain_bytes
    )


def _error(kit: Any, outs: dict) -> str:
    return kit.read(outs["_error"], LAB).decode("utf-8", "replace").split("\x00")[0]


# ---- the model larger than the budget -------------------------------------------------------------


def test_all_in_enclave_refuses_a_model_larger_than_the_budget(worker: Any, big: Any) -> None:
    assert big.weights > 4 * (BUDGET_MIB << 20)
    result, body, outs = task(worker, big.sealed, big.x, {"mode": "all-in-enclave"})
    assert result["category"] == "refused" and body["error"]["check"] == "input"
    message = body["error"]["message"]
    assert f"input 'model' needs {big.plain_bytes / 2**20:.1f} MiB of enclave memory but only" in message
    assert f"of the {BUDGET_MIB} MiB budget is free" in message and not outs["outputs"].exists()


def test_split_runs_it_within_the_budget_and_matches_onnxruntime(worker: Any, big: Any) -> None:
    started = time.monotonic()
    result, body, outs = task(worker, big.sealed, big.x, {"mode": "split"}, report=True)
    elapsed = time.monotonic() - started
    assert result["ok"], (body, _error(worker, outs) if outs["_error"].exists() else "")
    got = np.load(io.BytesIO(worker.read(outs["outputs"], LAB)), allow_pickle=False)["y"]
    # within 1e-5 of plain ONNX Runtime, relative to the outputs' scale (here |y| up to 7.7: the
    # weights fed as inputs are multiplied unpacked, another summation order than ORT's prepacked)
    err, scale = float(np.max(np.abs(got - big.ref))), max(1.0, float(np.max(np.abs(big.ref))))
    assert err <= 1e-5 * scale, (err, scale)
    report = json.loads(worker.read(outs["report"], LAB))
    allowance = report["memory_allowance_bytes"]
    print(
        f"\nsplit: {big.weights / 2**20:.0f} MiB of weights, budget {BUDGET_MIB} MiB, max error {err:.2e} "
        f"(outputs up to {scale:.1f}), {elapsed:.1f} s: {json.dumps(report)}"
    )
    assert allowance < BUDGET_MIB << 20 and report["weights_bytes"] == big.weights
    assert report["weight_bytes_read"] == big.weights  # every weight read once, none twice
    assert report["segments"] >= big.weights // allowance  # it had to split
    assert report["max_segment_weight_bytes"] <= report["available_bytes"] < allowance
    # the child's measured peak resident memory above its start stays in the allowance, and its
    # address space (the kernel's RLIMIT_AS: the allowance above its size at fork) was never used up
    assert 0 < report["peak_rss_growth_bytes"] <= allowance, report
    assert report["least_address_space_free_bytes"] > 0, report


# ---- small external-layout models: every mode takes the layout; refusals -----------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("small")
    model = mlp(4, (64, 512, 512, 10))  # 1.3 MiB of weights
    plain, meta = upload_parts(model, layout="external")  # the SDK's conversion
    x = np.random.default_rng(2).normal(size=(3, 64)).astype(np.float32)
    return SimpleNamespace(
        root=root, model=model, plain=plain, meta=meta, x=x, ref=ort_run(model, {"x": x})[0]
    )


def test_every_mode_takes_the_external_layout(worker: Any, small: Any) -> None:
    sealed = seal(small.root, "ok", small.plain, small.meta, chunk=1 << 16)
    for mode in ("all-in-enclave", "split"):
        result, body, outs = task(worker, sealed, small.x, {"mode": mode})
        assert result["ok"], (mode, body, _error(worker, outs) if outs["_error"].exists() else "")
        got = np.load(io.BytesIO(worker.read(outs["outputs"], LAB)), allow_pickle=False)["y"]
        assert np.max(np.abs(got - small.ref)) <= 1e-6, mode


def test_a_broken_chunk_in_the_weights_fails_naming_the_input_and_chunk(worker: Any, small: Any) -> None:
    """The model owner's own file has a flipped byte in a weights chunk (so the pinned digest is the
    broken file's): the graph decrypts, the segment's read of that chunk fails its tag."""
    chunk = 1 << 16

    def flip(path: Path) -> None:
        with open(path, "r+b") as fh:
            body = SealedReader(fh).header.body_offset
            fh.seek(body + 3 * (chunk + 16) + 100)  # chunk 3: W1's bytes
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 1]))

    sealed = seal(small.root, "flipped", small.plain, small.meta, chunk=chunk, tamper=flip)
    result, body, outs = task(worker, sealed, small.x, {"mode": "split"})
    assert not result["ok"] and result["category"] == "exception" and not outs["outputs"].exists()
    text = _error(worker, outs)
    assert "the enclave refused a weight read: input 'model' (dataset" in text, text
    assert f"chunk 3 of {(len(small.plain) + chunk - 1) // chunk} failed authentication" in text, text
    # all-in-enclave decrypts the whole file first: refused before anything runs, naming the chunk
    result, body, _ = task(worker, sealed, small.x, {"mode": "all-in-enclave"})
    assert body["error"]["check"] == "input" and "chunk 3 of" in body["error"]["message"]


def test_split_refuses_an_inline_model_and_a_manifest_setting_the_enclaves_params(
    worker: Any, small: Any
) -> None:
    inline = seal(small.root, "inline", small.model, {"kind": "onnx-model"})
    result, body, _ = task(worker, inline, small.x, {"mode": "split"})
    assert result["category"] == "refused" and body["error"]["check"] == "input"
    assert "mode split needs a model sealed in the external-weights layout" in body["error"]["message"]
    sealed = seal(small.root, "ok2", small.plain, small.meta)
    forged = {
        "mode": "split",
        "_enclave": {"memory_allowance": 1 << 40, "model_layout": small.meta["layout"]},
    }
    result, body, _outs = task(worker, sealed, small.x, forged)
    assert result["category"] == "refused" and body["error"]["check"] == "manifest"
    assert "params._enclave is the enclave's own" in body["error"]["message"]


# ---- in process: the plan, the outsourced modes, the SDK's conversion ----------------------------


def _served(path: Path, sha: str, key: bytes) -> tuple[PinnedModel, WeightServer, bytes]:
    pinned = PinnedModel(str(path), data_key=key, ciphertext_sha256=sha, where="input 'model'")
    return pinned, WeightServer(pinned), b"".join(bytes(c) for c in pinned.graph_chunks())


def _run_in_process(
    params: dict[str, Any], model: bytes, x: np.ndarray, *, stream: Any = None, report: bool = False
) -> tuple[np.ndarray, dict | None]:
    from confide.enclave.builtins import onnx_infer
    from confide.enclave.sandbox.context import Context

    out, rep = io.BytesIO(), io.BytesIO()
    outputs = {"outputs": out, "report": rep} if report else {"outputs": out}
    ctx = Context(params, {"model": io.BytesIO(model), "data": io.BytesIO(_npz(x=x))}, outputs, stream)  # type: ignore[arg-type]
    onnx_infer.run(ctx)
    got = np.load(io.BytesIO(out.getvalue()), allow_pickle=False)["y"]
    return got, (json.loads(rep.getvalue()) if report else None)


def test_the_plan_cuts_segments_that_fit_and_refuses_a_node_too_big(small: Any, tmp_path: Path) -> None:
    from confide.enclave.infer import split

    model = mlp(5, (64, 1024, 1024, 1024, 10))  # 4 MiB per hidden layer
    plain, meta = upload_parts(model, layout="external")
    s = seal(tmp_path, "m", plain, meta, chunk=1 << 16)
    x = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    ref = ort_run(model, {"x": x})[0]
    graph = split.SplitGraph(plain[meta["layout"]["graph_offset"] :], parse_layout(meta, where="t"))  # type: ignore[arg-type]
    segments, _ = split.plan(graph, {"x": x}, ["y"], split.MARGIN + (6 << 20))
    # (b3, 40 bytes, stays in the graph: below onnx's 1 KiB threshold for external data)
    assert [s.weights for s in segments] == [["W0", "b0", "W1", "b1"], ["W2", "b2", "W3"]]
    assert segments[0].outputs == ["h1r"] and segments[1].inputs == ["h1r", "W2", "b2", "W3"]
    with pytest.raises(
        split.SplitError,
        match=r"node 'fc1' \(Gemm\) does not fit the memory allowance: its weights are 4.0 MiB",
    ):
        split.plan(graph, {"x": x}, ["y"], split.MARGIN + (3 << 20))
    for allowance, at_least in ((1 << 30, 1), (split.MARGIN + split.RESERVE + (7 << 20), 2)):
        pinned, server, g = _served(s.path, s.sha256, s.data_key)
        r, w = server.child_fds
        stream = (os.fdopen(r, "rb"), os.fdopen(w, "wb"))
        try:
            enclave = {"memory_allowance": allowance, "model_layout": meta["layout"]}
            got, figures = _run_in_process(
                {"mode": "split", "_enclave": enclave}, g, x, stream=stream, report=True
            )
        finally:
            for f in stream:
                f.close()
            server.stop()
            pinned.close()
        assert np.max(np.abs(got - ref)) <= 1e-6 and figures is not None, figures
        assert figures["segments"] >= at_least, figures
        assert server.bytes_served == figures["weights_bytes"] == meta["layout"]["weights_bytes"]
    # the memory allowance is the enclave's: a run without one (or without the stream) is refused
    for params, stream_given, message in (
        ({"mode": "split"}, False, "this run has no weight stream"),
        (
            {"mode": "split", "_enclave": {"model_layout": meta["layout"]}},
            True,
            "this run has no memory allowance",
        ),
        ({"mode": "split", "_enclave": {"memory_allowance": 1 << 30}}, True, "this run has no layout"),
        ({"mode": "split", "_enclave": [1]}, True, "params._enclave must be an object"),
        (
            {"mode": "split", "_enclave": {"model_layout": {"format": "x"}}},
            True,
            "layout must be an object with exactly",
        ),
        ({"mode": "split", "reply_timeout_s": 5}, True, "applies only to the outsourced modes"),
    ):
        fake = (io.BytesIO(), io.BytesIO()) if stream_given else None
        with pytest.raises(ValueError, match=None) as info:
            _run_in_process(params, plain[meta["layout"]["graph_offset"] :], x, stream=fake)
        assert message in str(info.value), (params, str(info.value))
    with pytest.raises(ValueError, match="output 'report' is written only in mode split"):
        _run_in_process({}, model, x, report=True)


def test_the_outsourced_modes_take_the_external_layout(small: Any) -> None:
    import threading

    from confide.infer.accelerator import NumpyAccelerator, serve_stream

    for model, x, bound in (
        (small.model, small.x, 0.01),
        (cnn(), np.random.default_rng(4).normal(size=(2, 1, 12, 12)).astype(np.float32), None),
    ):
        plain, meta = upload_parts(model, layout="external")
        ref = ort_run(model, {"x": x})[0]
        for mode in ("outsourced-verified", "outsourced-blinded+verified", "all-in-enclave"):
            req_r, req_w = os.pipe()
            rep_r, rep_w = os.pipe()
            threading.Thread(
                target=serve_stream, args=(req_r, rep_w, NumpyAccelerator()), daemon=True
            ).start()
            stream = (os.fdopen(rep_r, "rb"), os.fdopen(req_w, "wb"))
            try:
                params = {
                    "mode": mode,
                    "_enclave": {"model_layout": meta["layout"], "memory_allowance": 1 << 30},
                }
                got, _ = _run_in_process(params, bytes(plain), x, stream=stream)
            finally:
                for f in stream:
                    f.close()
            err = float(np.max(np.abs(got - ref)))
            if mode == "all-in-enclave":
                assert err <= 1e-6
            else:  # the outsourced modes' documented quantization error (docs/inference/)
                assert err < (bound if bound is not None else 0.03 * float(np.max(np.abs(ref)))), (mode, err)


def test_the_sdk_converts_with_onnxs_writer_and_checks_the_graph() -> None:
    from confide.enclave.infer.split import SplitGraph

    model = mlp(6, (16, 256, 10))
    plain, meta = upload_parts(model, layout="auto")  # small: inline
    assert plain == model and "layout" not in meta
    plain, meta = upload_parts(model, layout="external")
    layout = parse_layout(meta, where="t")
    assert layout is not None and meta["model"]["parameters"] == 16 * 256 + 256 + 256 * 10 + 10
    g = SplitGraph(plain[layout.graph_offset :], layout)
    assert sorted(g.externals) == ["W0", "W1", "b0"]  # b1 (40 bytes) stays in the graph
    assert EXTERNAL_ABOVE == 64 << 20
    # a Constant node holding a weight (as paddle2onnx writes them) becomes an initializer, external too
    m = onnx.load_model_from_string(model)
    w0 = next(t for t in m.graph.initializer if t.name == "W0")
    m.graph.node.insert(0, helper.make_node("Constant", [], ["W0"], value=w0))
    m.graph.initializer.remove(w0)
    plain, meta = upload_parts(m.SerializeToString(), layout="external")
    layout = parse_layout(meta, where="t")
    assert layout is not None and "W0" in SplitGraph(plain[layout.graph_offset :], layout).externals
    with pytest.raises(FormatError, match="layout must be one of auto, inline, external"):
        upload_parts(model, layout="zip")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("location", "../etc/passwd", "names location '../etc/passwd', not 'weights.bin'"),
        ("offset", "99999999", "lie outside the weights"),
        ("length", "12", "12 bytes for dims [16, 256] of float32"),
        ("offset", "-4", "has offset '-4'"),
        ("basepath", "/", "has external-data fields ['basepath', 'length', 'location', 'offset']"),
    ],
)
def test_a_hostile_graph_is_refused_before_any_weight_is_read(field: str, value: str, message: str) -> None:
    from confide.enclave.infer.split import SplitError, SplitGraph

    plain, meta = upload_parts(mlp(6, (16, 256, 10)), layout="external")
    layout = parse_layout(meta, where="t")
    assert layout is not None
    g = onnx.load_model_from_string(plain[layout.graph_offset :])
    t = next(t for t in g.graph.initializer if t.name == "W0")
    entry = next((e for e in t.external_data if e.key == field), None) or t.external_data.add()
    entry.key, entry.value = field, value
    with pytest.raises(SplitError, match=None) as info:
        SplitGraph(g.SerializeToString(), layout)
    assert message in str(info.value), str(info.value)


# ---- the weight stream, played by a hostile child and a host changing the file ------------------


class Child:
    """The sandbox child's two ends of the weight stream, each closed once."""

    def __init__(self, fds: tuple[int, int]) -> None:
        self.r, self.w = fds
        self.open = {self.r, self.w}

    def close(self, fd: int) -> None:
        if fd in self.open:
            self.open.discard(fd)
            os.close(fd)


@pytest.fixture
def served(small: Any, tmp_path: Path) -> Any:
    s = seal(tmp_path, "m", small.plain, small.meta, chunk=1 << 12)
    pinned, server, _ = _served(s.path, s.sha256, s.data_key)
    child = Child(server.child_fds)
    yield s, pinned, server, child
    for fd in (child.r, child.w):
        child.close(fd)
    server.stop()
    pinned.close()


def _ask(r: int, w: int, raw: bytes) -> tuple[int, bytes]:
    os.write(w, raw)
    head = b""
    while len(head) < REPLY.size and (got := os.read(r, REPLY.size - len(head))):
        head += got
    status, length = REPLY.unpack(head)
    body = b""
    while len(body) < length and (got := os.read(r, length - len(body))):
        body += got
    return status, body


@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [
        (0, 0, "a read of 0 bytes (1..1048576 allowed)"),
        (0, MAX_READ + 1, "a read of 1048577 bytes"),
        (2**64 - 1, 16, "lie outside the weights region"),
        (None, 16, "lie outside the weights region"),  # the graph's first bytes
        (-16, 32, "lie outside the weights region"),  # across the end of the weights
    ],
)
def test_a_hostile_weight_read_is_refused_and_the_stream_closed(
    served: Any, small: Any, offset: Any, length: int, message: str
) -> None:
    _s, pinned, server, child = served
    r, w = child.r, child.w
    weights = pinned.layout.weights_bytes
    status, body = _ask(r, w, REQUEST.pack(0, 64))  # an honest read first: the exact plaintext
    assert status == OK and body == bytes(small.plain[:64])
    at = weights if offset is None else weights + offset if offset < 0 else offset
    status, body = _ask(r, w, REQUEST.pack(at, length))
    assert status == REFUSED and message in body.decode(), body
    assert os.read(r, 1) == b""  # the enclave closed the stream
    server.stop()
    assert server.refused is not None and server.requests == 1


def test_a_request_cut_short_is_refused(served: Any) -> None:
    _s, _pinned, _server, child = served
    r, w = child.r, child.w
    os.write(w, b"\x00" * 5)
    child.close(w)
    head = os.read(r, 64)
    assert REPLY.unpack(head[: REPLY.size])[0] == REFUSED and b"a request of 5 bytes, not 12" in head


def _weights_chunk(pinned: PinnedModel) -> tuple[int, int]:
    """A chunk in the weights region (index, its file offset)."""
    stride = pinned.reader.header.chunk_size + 16
    return 5, pinned.reader.header.body_offset + 5 * stride


def test_a_file_changed_after_the_check_fails_the_read(served: Any) -> None:
    s, pinned, _server, child = served
    r, w = child.r, child.w
    index, at = _weights_chunk(pinned)
    with open(s.path, "r+b") as fh:
        fh.seek(at + 10)
        b = fh.read(1)
        fh.seek(at + 10)
        fh.write(bytes([b[0] ^ 0x80]))
    cs = pinned.reader.header.chunk_size
    status, body = _ask(r, w, REQUEST.pack(index * cs, 64))
    assert status == REFUSED
    assert (
        f"chunk {index} of {pinned.reader.n_chunks} is not the ciphertext whose digest was checked"
        in body.decode()
    )


def test_even_a_valid_chunk_under_the_same_key_cannot_be_swapped_in(served: Any) -> None:
    """The model owner (who holds the data key) and the host collude: after the check they replace a
    weights chunk with another one sealed correctly under the file's key, index and header. AES-GCM
    alone would accept it; the digest recorded in the checked pass does not."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from confide.enclave.sealed_file import _derive, _nonce

    s, pinned, _server, child = served
    r, w = child.r, child.w
    index, at = _weights_chunk(pinned)
    header = pinned.reader.header
    aead = AESGCM(_derive(s.data_key, header.file_id, b"chunks"))
    forged = aead.encrypt(_nonce(index, False), bytes(header.chunk_size), header.digest)  # all-zero weights
    assert aead.decrypt(_nonce(index, False), forged, header.digest) == bytes(header.chunk_size)
    with open(s.path, "r+b") as fh:
        fh.seek(at)
        fh.write(forged)
    status, body = _ask(r, w, REQUEST.pack(index * header.chunk_size, 64))
    assert (
        status == REFUSED
        and f"chunk {index} of {pinned.reader.n_chunks} is not the ciphertext" in body.decode()
    )


def test_the_pass_refuses_a_file_that_is_not_the_approved_one(small: Any, tmp_path: Path) -> None:
    s = seal(tmp_path, "m", small.plain, small.meta)
    with pytest.raises(IntegrityError, match="not the approved 00000000"):
        PinnedModel(str(s.path), data_key=s.data_key, ciphertext_sha256="0" * 64, where="input 'model'")
    with pytest.raises(ConfideError, match="header authentication failed"):
        PinnedModel(str(s.path), data_key=os.urandom(32), ciphertext_sha256=s.sha256, where="input 'model'")


def test_the_approval_text_says_what_split_reveals() -> None:
    svc = Identity.generate("svc")
    m = build_manifest(
        service=svc.public,
        creator=LAB.public,
        function=mf.builtin_descriptor("infer"),
        params={"mode": "split"},
        inputs=[
            mf.TaskInput("model", "d" * 32, VENDOR.fingerprint, "0" * 64),
            mf.TaskInput("data", "e" * 32, CLINIC.fingerprint, "1" * 64),
        ],
        outputs=[mf.TaskOutput("outputs", (LAB.fingerprint,)), mf.TaskOutput("report", (LAB.fingerprint,))],
        participants=PARTIES,
    )
    text = "\n".join(inference.describe(m))
    assert "mode split" in text and "no accelerator sees anything" in text
    assert "the layer boundaries, which layers' weights each submodel holds, and each submodel's time" in text
    assert "nothing of the data" in text and "report -> its recipients" in text
    assert (
        "split (a model larger than the enclave's memory budget" in mf.builtin_descriptor("infer").description
    )
