"""The enclave runs only checked-hash bytecode of its measured sources (confide.enclave.bytecode):
bytecode compiled from other source, timestamp bytecode beside the source, and a cache that was
never completed are all never executed."""

from __future__ import annotations

import py_compile
import subprocess
import sys
from pathlib import Path

from confide.enclave import bytecode

PROBE = "import sys; sys.path.insert(0, sys.argv[1]); import probe.mod as m; print(m.VALUE)"


def _value(flags: tuple[str, ...], where: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-I", *flags, "-c", PROBE, str(where)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def _package(tmp_path: Path, value: str) -> Path:
    pkg = tmp_path / "src" / "probe"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(f"VALUE = {value!r}\n")
    return pkg


def _checked_pyc_in_cache(cache: Path, source: Path, code_source: str) -> None:
    """What a hostile or stale cache holds: checked-hash bytecode of `code_source` filed for `source`."""
    real = source.read_text()
    source.write_text(code_source)
    subprocess.run(
        [sys.executable, "-I", "-X", f"pycache_prefix={cache}", "-c",
         "import py_compile, sys; py_compile.compile(sys.argv[1], invalidation_mode="
         "py_compile.PycInvalidationMode.CHECKED_HASH, doraise=True)", str(source)],
        check=True,
    )  # fmt: skip
    source.write_text(real)


def test_cached_bytecode_of_other_source_is_not_run(tmp_path: Path) -> None:
    pkg = _package(tmp_path, "measured")
    cache = tmp_path / "cache"
    _checked_pyc_in_cache(cache, pkg / "mod.py", "VALUE = 'stale'\n")
    assert list(cache.rglob("mod.*.pyc")), "the stale bytecode is in the cache"
    assert _value(bytecode.args_for(str(cache)), tmp_path / "src") == "measured"
    # the same cache without the hash check runs the stale code
    assert (
        _value(("-X", f"pycache_prefix={cache}", "--check-hash-based-pycs", "never"), tmp_path / "src")
        == "stale"
    )


def test_cached_bytecode_of_the_same_source_is_used(tmp_path: Path) -> None:
    pkg = _package(tmp_path, "measured")
    cache = tmp_path / "cache"
    _checked_pyc_in_cache(cache, pkg / "mod.py", (pkg / "mod.py").read_text())
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.pyc")}
    assert _value(bytecode.args_for(str(cache)), tmp_path / "src") == "measured"
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.pyc")} == before  # -B: nothing written


def test_timestamp_bytecode_beside_the_source_is_ignored(tmp_path: Path) -> None:
    pkg = _package(tmp_path, "planted")
    py_compile.compile(str(pkg / "mod.py"), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    st = (pkg / "mod.py").stat()
    (pkg / "mod.py").write_text("VALUE = 'genuine'\n")  # same size as the planted source
    import os

    os.utime(pkg / "mod.py", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime and size: CPython trusts it
    assert _value((), tmp_path / "src") == "planted"
    assert _value(bytecode.args_for(str(tmp_path / "cache")), tmp_path / "src") == "genuine"
    assert _value(bytecode.NO_CACHE_ARGS, tmp_path / "src") == "genuine"


def test_an_incomplete_cache_is_not_used(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(bytecode.CACHE_ENV, str(tmp_path / "c"))
    (bytecode.cache_dir()).mkdir(parents=True)
    assert bytecode.interpreter_args() == bytecode.NO_CACHE_ARGS
    (bytecode.cache_dir() / bytecode.STAMP).write_text("done\n")
    assert bytecode.interpreter_args() == bytecode.args_for(str(bytecode.cache_dir()))
    assert "--check-hash-based-pycs" in bytecode.interpreter_args()


def test_the_zygote_inherits_the_enclaves_cache() -> None:
    out = subprocess.run(
        [sys.executable, "-I", *bytecode.args_for("/some/cache"), "-c",
         "from confide.enclave import bytecode; print(' '.join(bytecode.inherited_args()))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == list(bytecode.args_for("/some/cache"))


def test_the_installed_cache_holds_only_checked_hash_bytecode() -> None:
    """make install built it; timestamp bytecode there would be trusted by mtime, not by hash."""
    assert bytecode.cache_ready(), "make install builds the cache (python -m confide.enclave.bytecode)"
    files = list(bytecode.cache_dir().rglob("*.pyc"))
    assert len(files) > 1000
    flags = {p: int.from_bytes(p.read_bytes()[4:8], "little") for p in files}
    assert [p for p, f in flags.items() if f != 0b11] == []  # PEP 552: hash-based, check_source
