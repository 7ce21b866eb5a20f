"""confide.enclave.bytecode: filling the checked-hash cache (the roots it covers, the compile step,
the stamp), and failing soft when it cannot be built (enclaves then compile their sources)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from confide.enclave import bytecode, measurement


def _package(tmp_path: Path) -> Path:
    root = tmp_path / "src" / "pkg"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("VALUE = 1\n")
    (root / "mod.py").write_text("def f():\n    return 2\n")
    return root


def _checked_hash(pyc: Path) -> bool:
    flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
    return flags == 0b11  # hash-based (bit 0) and checked (bit 1), PEP 552


def test_roots_are_the_stdlib_the_confide_package_and_the_measured_distributions() -> None:
    roots = bytecode._roots()
    assert Path(sysconfig.get_paths()["stdlib"]) in roots
    assert measurement.TCB_ROOT.parent in roots
    assert roots == sorted(roots) and len(roots) > 2


def test_compile_writes_checked_hash_bytecode(tmp_path: Path) -> None:
    root = _package(tmp_path)
    single = tmp_path / "single.py"
    single.write_text("X = 3\n")
    assert bytecode.main(["--compile", "1", str(root), str(single), str(tmp_path / "absent")]) == 0
    pycs = sorted((root / "__pycache__").glob("*.pyc")) + sorted((tmp_path / "__pycache__").glob("*.pyc"))
    assert len(pycs) == 3 and all(_checked_hash(p) for p in pycs)


def test_compile_reports_a_source_that_does_not_compile(tmp_path: Path) -> None:
    root = _package(tmp_path)
    (root / "bad.py").write_text("def (:\n")
    assert bytecode._compile([root], 1) is False


def test_build_cache_fills_the_directory_and_stamps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _package(tmp_path)
    monkeypatch.setattr(bytecode, "_roots", lambda: [root])
    cache = tmp_path / "cache"
    assert bytecode.build_cache(cache, workers=1) == cache
    assert bytecode.cache_ready(cache)
    pycs = list(cache.rglob("src/pkg/*.pyc"))
    assert len(pycs) == 2 and all(_checked_hash(p) for p in pycs)
    assert not (root / "__pycache__").exists()  # nothing written beside the sources


def test_ensure_cache_builds_once_and_uses_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _package(tmp_path)
    monkeypatch.setattr(bytecode, "_roots", lambda: [root])
    monkeypatch.setenv(bytecode.CACHE_ENV, str(tmp_path / "env-cache"))
    assert bytecode.cache_dir() == tmp_path / "env-cache" / sys.implementation.cache_tag
    assert not bytecode.cache_ready()
    bytecode.ensure_cache()
    assert bytecode.cache_ready()
    assert bytecode.interpreter_args()[-2:] == ("--check-hash-based-pycs", "always")
    calls: list[object] = []
    monkeypatch.setattr(bytecode, "build_cache", lambda *a, **k: calls.append(a))
    bytecode.ensure_cache()
    assert calls == []  # a ready cache is not rebuilt


def test_a_cache_that_cannot_be_built_leaves_enclaves_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args: object, **kw: object) -> None:
        raise subprocess.CalledProcessError(1, ["python"])

    monkeypatch.setenv(bytecode.CACHE_ENV, str(tmp_path / "c"))
    monkeypatch.setattr(bytecode, "build_cache", fail)
    bytecode.ensure_cache()
    assert "bytecode cache not built" in capsys.readouterr().err
    assert bytecode.interpreter_args() == bytecode.NO_CACHE_ARGS


def test_main_builds_the_default_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bytecode, "build_cache", lambda: tmp_path / "built")
    assert bytecode.main([]) == 0
    assert str(tmp_path / "built") in capsys.readouterr().out


def test_args_for() -> None:
    assert bytecode.args_for(None) == bytecode.NO_CACHE_ARGS
    assert bytecode.args_for("/dev/null") == bytecode.NO_CACHE_ARGS
    assert bytecode.args_for("/c") == ("-B", "-X", "pycache_prefix=/c", "--check-hash-based-pycs", "always")
