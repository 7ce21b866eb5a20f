"""The TCB package imports only the standard library, itself, and its listed third-party packages."""

from __future__ import annotations

import ast
import sys

from confide.enclave import measurement

ALLOWED_THIRD_PARTY = {
    "cryptography",
    "pyseccomp",
}
# Code under enclave/builtins/ is never imported by the enclave process: it is read as text and run
# in the sandbox child, like a party's function, where the zygote provides these (all measured).
SANDBOX_THIRD_PARTY = {"numpy", "pandas", "xgboost", "sklearn", "duckdb", "opendp"}
# Protected inference (issue 9) runs in the sandbox child too: enclave/infer/ (the Slalom core and the
# numpy ONNX executor; tests/test_infer_tcb.py checks that no enclave-process module imports it) and
# builtins/onnx_infer.py, which imports ONNX Runtime in the child (it cannot be pre-imported: it starts
# a thread in the zygote). These distributions must be measured like the others (second test below).
INFER_THIRD_PARTY = {"numpy", "onnx", "onnxruntime"}
SANDBOX_FOLDERS = {"builtins", "infer"}
# Parquet modular encryption (enclave/parquet_keys.py) parses hostile Parquet files with pyarrow, so it
# runs in the sandbox child only (tests/test_parquet_pme.py checks no enclave-process module imports it).
SANDBOX_MODULES = {"parquet_keys.py": {"pyarrow"}}
# builtins/join_aggregate.py reads Parquet inputs with pyarrow, in the sandbox child.
PARQUET_THIRD_PARTY = {"pyarrow"}


def test_tcb_imports_only_what_is_listed() -> None:
    offenders = []
    for path in measurement.tcb_files():
        if path.suffix != ".py":
            continue
        in_sandbox = path.parent.name in SANDBOX_FOLDERS
        sandboxed = SANDBOX_THIRD_PARTY | INFER_THIRD_PARTY | PARQUET_THIRD_PARTY
        allowed = ALLOWED_THIRD_PARTY | (sandboxed if in_sandbox else set())
        allowed |= SANDBOX_MODULES.get(path.name, set()) if path.parent == measurement.TCB_ROOT else set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in allowed:
                    continue
                if top == "confide" and name.startswith("confide.enclave"):
                    continue
                offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_listed_distributions_are_measured() -> None:
    listed = {d.replace("-cpu", "").replace("scikit-learn", "sklearn") for d in measurement.TCB_DISTRIBUTIONS}
    assert listed >= ALLOWED_THIRD_PARTY | SANDBOX_THIRD_PARTY | INFER_THIRD_PARTY | {"pyarrow"}
