"""The measurement changes when code, dependencies or configuration change, and only then."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from confide.enclave import measurement as m
from confide.enclave.config import EnclaveConfig
from confide.enclave.errors import FormatError


def test_same_build_same_value() -> None:
    assert m.measure(EnclaveConfig()).value == m.measure(EnclaveConfig()).value


@pytest.mark.parametrize(
    "change", [{"memory_budget_mib": 2048}, {"sandbox": "weak"}, {"debug": True}, {"security_version": 2}]
)
def test_config_changes_the_value(change: dict) -> None:
    assert m.measure(EnclaveConfig(**change)).value != m.measure(EnclaveConfig()).value


def test_tcb_code_change_changes_the_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "enclave"
    shutil.copytree(m.TCB_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(m, "TCB_ROOT", copy)
    before = m.measure(EnclaveConfig()).value
    (copy / "keys.py").write_text((copy / "keys.py").read_text() + "\n# one more line\n")
    assert m.measure(EnclaveConfig()).value != before


def test_dependency_change_changes_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    before = m.measure(EnclaveConfig()).value
    real = m._dist_digest
    monkeypatch.setattr(
        m,
        "_dist_digest",
        lambda name, path=None: (
            {**real(name, path), "version": "0.0.0"} if name == "pyseccomp" else real(name, path)
        ),
    )
    assert m.measure(EnclaveConfig()).value != before


def test_manifest_lists_tcb_dependencies() -> None:
    manifest = m.measure(EnclaveConfig()).manifest
    for dist in ("cryptography", "pyseccomp", "numpy", "pandas", "xgboost-cpu"):
        assert dist in manifest["dependencies"]
        assert manifest["dependencies"][dist]["files"] > 0
    assert manifest["tcb"]["files"] == len(m.tcb_files()) > 10


def test_config_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "enclave.toml"
    p.write_text("[enclave]\nmemory_budget_mb = 10\n")
    with pytest.raises(FormatError, match="unknown enclave setting.*memory_budget_mb"):
        EnclaveConfig.load(p)
    p.write_text("[enclave]\nsandbox = 'none'\n")
    with pytest.raises(FormatError, match="sandbox must be one of"):
        EnclaveConfig.load(p)
    p.write_text("[enclave]\nmemory_budget_mib = 0\n")
    with pytest.raises(FormatError, match="positive integer"):
        EnclaveConfig.load(p)
    p.write_text("[enclave\n")
    with pytest.raises(FormatError, match="not valid TOML"):
        EnclaveConfig.load(p)
