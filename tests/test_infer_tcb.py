"""enclave/infer/ imports numpy and onnx, so it may run only in the sandbox child: no module of the
enclave process (outside enclave/infer/ and enclave/builtins/) may import it."""

from __future__ import annotations

import ast

from confide.enclave import measurement


def test_no_enclave_process_module_imports_the_inference_core() -> None:
    offenders = []
    for path in measurement.tcb_files():
        if path.suffix != ".py" or path.parent.name in {"infer", "builtins"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            if any(n.startswith("confide.enclave.infer") or n in {"infer", ".infer"} for n in names):
                offenders.append(str(path.relative_to(measurement.TCB_ROOT)))
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            if relative and (node.module == "infer" or any(a.name == "infer" for a in node.names)):  # type: ignore[union-attr]
                offenders.append(str(path.relative_to(measurement.TCB_ROOT)))
    assert offenders == []


def test_inference_core_files_are_in_the_measured_tree() -> None:
    names = {p.relative_to(measurement.TCB_ROOT).as_posix() for p in measurement.tcb_files()}
    for f in (
        "infer/field.py",
        "infer/slalom.py",
        "infer/wire.py",
        "infer/executor.py",
        "builtins/onnx_infer.py",
        "infer/split.py",
        "model_stream.py",
        "model_layout.py",
    ):
        assert f in names
