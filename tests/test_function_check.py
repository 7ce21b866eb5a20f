"""Local checks of a function's source before registration: compiles, defines run(ctx)."""

from __future__ import annotations

import pytest

from confide.client.function_check import FunctionSourceError, check_function_source

GOOD = "import json\n\ndef helper(x):\n    return x\n\ndef run(ctx):\n    ctx.outputs['o'].write(b'')\n"


def _error(source: str) -> FunctionSourceError:
    with pytest.raises(FunctionSourceError) as info:
        check_function_source(source, filename="f.py")
    return info.value


@pytest.mark.parametrize(
    "source",
    [
        GOOD,
        "def run(ctx, limit=3):\n    pass\n",
        "def run(*args):\n    pass\n",
        "def run(ctx, /):\n    pass\n",
    ],
)
def test_callable_with_one_argument_is_accepted(source: str) -> None:
    check_function_source(source, filename="f.py")


def test_syntax_error_names_file_line_and_column() -> None:
    err = _error("def run(ctx):\n    x = [1, 2\n    return x\n")
    assert err.where is not None and err.where.startswith("f.py:2") and "syntax error" in err.message


def test_indentation_error_names_the_line() -> None:
    err = _error("def run(ctx):\n    a = 1\n      b = 2\n")
    assert err.where == "f.py:3:7" or (err.where or "").startswith("f.py:3")


def test_a_compile_stage_error_is_caught_too() -> None:
    # ast.parse accepts this; only the compiler refuses it (as the enclave would)
    err = _error("def run(ctx):\n    pass\nreturn 1\n")
    assert (err.where or "").startswith("f.py:3") and "return" in err.message


@pytest.mark.parametrize(
    ("source", "where", "words"),
    [
        ("def main(ctx):\n    pass\n", "f.py", "no top-level"),
        ("class C:\n    def run(self, ctx):\n        pass\n", "f.py:2", "not at the top level"),
        ("def run():\n    pass\n", "f.py:1", "run takes (no parameters)"),
        ("def run(ctx, extra):\n    pass\n", "f.py:1", "run takes (ctx, extra)"),
        ("def run(ctx, *, flag):\n    pass\n", "f.py:1", "flag"),
        ("\n\nasync def run(ctx):\n    pass\n", "f.py:3", "async"),
    ],
)
def test_run_must_be_a_top_level_function_of_one_argument(source: str, where: str, words: str) -> None:
    err = _error(source)
    assert err.where == where and words in err.message


def test_nul_byte_in_source_is_a_clear_error() -> None:
    err = _error("def run(ctx):\n    pass\x00\n")
    assert err.where is not None and err.where.startswith("f.py")
