"""`confide run --builtin infer` (issue 9): the infer built-in on one owner's sealed model and data,
in a local enclave, all-in-enclave and with its linear layers on a local accelerator process
(`--accelerator numpy`); without one, an outsourced mode is refused before anything is decrypted."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from confide.cli.main import main
from infer_support import mlp, ort_run
from test_cli import cli

X = np.random.default_rng(5).normal(size=(4, 32)).astype(np.float32)


@pytest.fixture
def sealed(tmp_path: Path, home: Path) -> dict[str, Path]:
    """alice's keys, her model and data sealed to herself, and a dev policy (the simulated enclave)."""
    cli("keygen", "alice", "--out-dir", str(tmp_path))
    (tmp_path / "model.onnx").write_bytes(mlp())
    buf = io.BytesIO()
    np.savez(buf, x=X)
    (tmp_path / "data.npz").write_bytes(buf.getvalue())
    for name in ("model.onnx", "data.npz"):
        cli(
            "encrypt",
            str(tmp_path / name),
            "--to",
            str(tmp_path / "alice.pub"),
            "--out",
            str(tmp_path / f"{name}.sealed"),
        )
    cli("policy", "init", "--dev", "--out", str(tmp_path / "dev.toml"))
    return {
        "dir": tmp_path,
        "model": tmp_path / "model.onnx.sealed",
        "data": tmp_path / "data.npz.sealed",
    }


def _args(s: dict[str, Path], out: str, *extra: str) -> list[str]:
    d = s["dir"]
    return [
        "run",
        "--builtin",
        "infer",
        "--input",
        f"model={s['model']}",
        "--input",
        f"data={s['data']}",
        "--output",
        f"outputs={d / out}",
        "--to",
        str(d / "alice.pub"),
        "--identity",
        str(d / "alice.key"),
        "--policy",
        str(d / "dev.toml"),
        *extra,
    ]


def _opened(s: dict[str, Path], out: str) -> np.ndarray:
    d = s["dir"]
    cli("decrypt", str(d / out), "--identity", str(d / "alice.key"), "--out", str(d / f"{out}.npz"))
    with np.load(d / f"{out}.npz", allow_pickle=False) as z:
        return np.array(z["y"])


def test_builtin_infer_all_in_enclave_equals_onnxruntime(sealed: dict[str, Path]) -> None:
    _, out = cli(*_args(sealed, "a.sealed"))
    assert "ran built-in infer in enclave" in out, out
    np.testing.assert_allclose(_opened(sealed, "a.sealed"), ort_run(mlp(), {"x": X})[0], atol=1e-5)


def test_builtin_infer_outsourced_on_a_local_accelerator(sealed: dict[str, Path]) -> None:
    _, out = cli(
        *_args(sealed, "b.sealed", "--param", "mode=outsourced-blinded+verified", "--accelerator", "numpy")
    )
    assert "ran built-in infer" in out, out
    got, want = _opened(sealed, "b.sealed"), ort_run(mlp(), {"x": X})[0]
    assert np.abs(got - want).max() < 0.01  # the 8-bit weights' quantization error (softmax outputs)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_outsourced_mode_without_an_accelerator_is_refused_before_anything_runs(
    sealed: dict[str, Path],
) -> None:
    before = {p: p.read_bytes() for p in (sealed["model"], sealed["data"])}
    code, out = cli(*_args(sealed, "c.sealed", "--param", "mode=outsourced-verified"), ok=False)
    assert code == 1 and "needs an accelerator and this enclave has none" in out, out
    assert "--accelerator numpy|cuda|auto" in out and "Traceback" not in out
    assert not (sealed["dir"] / "c.sealed").exists()
    assert all(p.read_bytes() == b for p, b in before.items())  # inputs untouched: it can be retried


def test_a_users_own_function_gets_no_accelerator_stream(sealed: dict[str, Path]) -> None:
    """Only this build's infer built-in gets the stream: a user's function asking for an outsourced
    mode, on an enclave that has an accelerator, sees none."""
    d = sealed["dir"]
    fn = d / "peek.py"
    fn.write_text("def run(ctx):\n    ctx.outputs['outputs'].write(repr(ctx.accelerator).encode())\n")
    args = _args(sealed, "d.sealed", "--param", "mode=outsourced-verified", "--accelerator", "numpy")
    args[1:3] = [str(fn)]
    cli(*args)
    cli("decrypt", str(d / "d.sealed"), "--identity", str(d / "alice.key"), "--out", str(d / "d.txt"))
    assert (d / "d.txt").read_text() == "None"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: [*a[:1], "fn.py", *a[1:]], "give either FUNCTION"),
        (lambda a: a[:1] + a[3:], "give either FUNCTION"),
        (lambda a: [*a[:2], "no-such-builtin", *a[3:]], "unknown built-in function 'no-such-builtin'"),
        (lambda a: [*a, "--accelerator", "tpu"], "Invalid value for '--accelerator'"),
    ],
)
def test_bad_builtin_arguments_are_refused_clearly(sealed: dict[str, Path], change, message: str) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, change(_args(sealed, "e.sealed")), catch_exceptions=False)
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output and not (sealed["dir"] / "e.sealed").exists()
