"""The `infer` built-in on a real platform (issue 9): a model is uploaded like a dataset by its owner
(sealed here, key wrapped to the service, only its metadata visible), an inference task runs only
with the model owner's and the data owner's approvals, its outputs equal plain ONNX Runtime's, the
approval text says what the mode reveals, and an unknown mode is refused by the enclave with its
error text for the recipients. The server runs with `--accelerator numpy`, so an outsourced mode
runs end to end (its adversarial tests: test_builtin_infer_outsourced.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from confide.cli.main import main
from confide.client import inference
from confide.enclave.errors import ConfideError
from infer_support import mlp, ort_run
from platform_support import sdk_clients

X = np.random.default_rng(5).normal(size=(8, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def server(accelerator_server: Any) -> Any:
    return accelerator_server


@pytest.fixture(scope="module")
def world(server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("infer")
    vendor, clinic, lab = sdk_clients(server, tmp, ("vendor", "clinic", "lab"))
    (tmp / "m.onnx").write_bytes(mlp())
    buf = io.BytesIO()
    np.savez(buf, x=X)
    (tmp / "x.npz").write_bytes(buf.getvalue())
    model = vendor.upload_model(tmp / "m.onnx")
    data = clinic.upload_dataset(tmp / "x.npz")
    return {"vendor": vendor, "clinic": clinic, "lab": lab, "model": model, "data": data, "tmp": tmp}


def test_the_model_shows_only_its_metadata(world: dict[str, Any]) -> None:
    record = world["lab"].dataset(world["model"].ref)
    assert record.columns == () and record.rows is None
    listed = next(d for d in world["vendor"].datasets() if d["dataset_id"] == world["model"].dataset_id)
    meta = listed["schema"]["model"]
    assert (
        listed["schema"]["kind"] == "onnx-model"
        and meta["parameters"] == 32 * 64 + 64 + 64 * 48 + 48 + 48 * 10 + 10
    )
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 32]}]


def test_inference_runs_only_with_both_owners_approval(world: dict[str, Any]) -> None:
    vendor, clinic, lab, tmp = world["vendor"], world["clinic"], world["lab"], world["tmp"]
    task = lab.infer(model=world["model"].ref, data=world["data"].ref)
    text = vendor.describe(task)
    assert "What runs and what it reveals (infer, mode all-in-enclave):" in text
    assert "are decrypted only in the enclave" in text and "no accelerator and no other party" in text
    clinic.approve(task)
    lab.run(task)  # without the model owner's approval
    info = lab.wait(task, timeout=120)
    refusal = lab.receipt(task, info)
    assert info["state"] == "failed" and refusal["error"]["check"] == "approval"
    assert vendor.fingerprint in refusal["error"]["message"]
    vendor.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    out = lab.results(task, tmp / "out").outputs["outputs"]
    got = np.load(out, allow_pickle=False)["y"]
    np.testing.assert_allclose(got, ort_run(mlp(), {"x": X})[0], rtol=1e-6, atol=1e-6)
    assert clinic.results(task, tmp / "clinic-out").outputs == {}  # not a recipient


def test_an_outsourced_mode_runs_on_the_servers_accelerator(world: dict[str, Any]) -> None:
    vendor, clinic, lab, tmp = world["vendor"], world["clinic"], world["lab"], world["tmp"]
    task = inference.infer(
        lab, model=world["model"].ref, data=world["data"].ref, mode="outsourced-blinded+verified"
    )
    text = vendor.describe(task)
    assert "mode outsourced-blinded+verified" in text and "are sent in clear to the host's untrusted" in text
    assert "is hidden from the accelerator" in clinic.describe(task)
    for c in (vendor, clinic):
        c.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    got = np.load(lab.results(task, tmp / "out-blinded").outputs["outputs"], allow_pickle=False)["y"]
    ref = ort_run(mlp(), {"x": X})[0]
    assert np.max(np.abs(got - ref)) < 0.01 and np.array_equal(got.argmax(1), ref.argmax(1))


def test_an_unavailable_mode_is_refused_in_the_enclave(world: dict[str, Any]) -> None:
    vendor, clinic, lab = world["vendor"], world["clinic"], world["lab"]
    with pytest.raises(ConfideError, match="mode must be one of all-in-enclave"):
        inference.infer(lab, model=world["model"].ref, data=world["data"].ref, mode="outsourced-blinded")
    task = lab.create_task(  # a creator bypassing the helper
        function="infer",
        inputs={"model": world["model"].ref, "data": world["data"].ref},
        outputs={"outputs": [lab.fingerprint]},
        params={"mode": "outsourced-blinded"},
    )
    assert "this mode is not available for platform tasks" in vendor.describe(task)
    for c in (vendor, clinic):
        c.approve(task)
    lab.run(task)
    info = lab.wait(task, timeout=120)
    assert info["state"] == "failed"
    assert "mode 'outsourced-blinded' is not one of all-in-enclave, outsourced-verified, " in (
        lab.error_report(task, info) or ""
    )


def test_model_inspect_and_a_bad_model_upload(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(mlp())
    r = CliRunner().invoke(main, ["model", "inspect", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0 and '"flops_per_sample"' in r.output
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x01not a model")
    r = CliRunner().invoke(main, ["model", "inspect", str(tmp_path / "bad.onnx")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "not a valid ONNX model" in r.output
