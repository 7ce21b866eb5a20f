"""bench/tcb_coverage_hooks.py (test-only, not in the TCB): the coverage lines a sandboxed child
appends to its status pipe are stripped before the pipe is parsed, saved as coverage data, and a
malformed one is dropped; the status record the enclave classifies is left exactly as written."""

from __future__ import annotations

import base64
import importlib.util
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from confide.enclave.sandbox.outcome import parse_status

spec = importlib.util.spec_from_file_location(
    "confide_cov_hooks_under_test", Path(__file__).resolve().parents[1] / "bench" / "tcb_coverage_hooks.py"
)
assert spec is not None and spec.loader is not None
hooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hooks)


def _line(lines: dict[str, list[int]]) -> bytes:
    return b"\n" + hooks.MAGIC + base64.b64encode(zlib.compress(json.dumps(lines).encode())) + b"\n"


def test_coverage_lines_are_stripped_and_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coverage import CoverageData

    data_file = tmp_path / ".coverage"
    monkeypatch.setattr(
        hooks, "_current", lambda: SimpleNamespace(config=SimpleNamespace(data_file=str(data_file)))
    )
    src = str(Path(str(hooks.__file__)).resolve())
    record = b'{"outcome": "ok"}\n'
    junk = b"\n" + hooks.MAGIC + base64.b64encode(b"not zlib") + b"\n"  # stripped, nothing saved
    forged = hooks.MAGIC + b"!!not base64!!\n"  # not the pattern: left for the parser, which skips it
    out = hooks.strip_and_save(record + _line({src: [1, 2, 3]}) + junk + forged)
    assert out == record + forged
    assert parse_status(out) == {"outcome": "ok"}
    saved = list(tmp_path.glob(".coverage.*"))
    assert len(saved) == 1
    cd = CoverageData(str(saved[0]))
    cd.read()
    assert cd.lines(src) == [1, 2, 3]


def test_a_pipe_without_coverage_lines_is_untouched() -> None:
    data = b'{"outcome": "exception", "detail": "confide-coverage: in text"}\n'
    assert hooks.strip_and_save(data) == data


def test_the_hooks_install_nothing_without_coverage(monkeypatch: pytest.MonkeyPatch) -> None:
    from confide.enclave.sandbox import child, zygote

    monkeypatch.setattr(hooks, "_current", lambda: None)
    before = (child.child_main, zygote.classify, zygote._BOOT)
    hooks.install_zygote()
    hooks.install_enclave()
    assert (child.child_main, zygote.classify, zygote._BOOT) == before
