"""The `confide` console script (cli.main:entry) and click's usage errors in the CLI's one format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from confide.cli.main import main

BIN = Path(sys.executable).parent / "confide"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["nosuch"], "error: No such command 'nosuch'. (confide)"),
        (["keygen"], "error: Missing argument 'NAME'. (NAME)"),
        (["decrypt", "x.cnf"], "error: Missing option '--identity'. (--identity)"),
        (["task", "create", "--nope"], "(--nope)"),
        (["task", "list", "-o", "xml"], "(-o/--output-format)"),
    ],
)
def test_usage_errors_use_the_one_format_and_exit_2(args: list[str], line: str) -> None:
    r = CliRunner().invoke(main, args, prog_name="confide")
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith(line.removeprefix("error: "))
    assert "Traceback" not in r.output and "Error: " not in r.output


def test_the_console_script_exits_with_the_command_status(tmp_path: Path) -> None:
    ok = subprocess.run([BIN, "keygen", "alice", "--out-dir", str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "alice.key").stat().st_size > 0 and (tmp_path / "alice.pub").read_text().strip()
    again = subprocess.run(
        [BIN, "keygen", "alice", "--out-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert again.returncode == 1 and again.stderr.startswith("error: ")  # refuses to overwrite
    usage = subprocess.run([BIN, "nosuch"], capture_output=True, text=True)
    assert usage.returncode == 2 and "error: No such command 'nosuch'. (confide)" in usage.stderr


def test_the_console_script_flushes_everything_it_wrote(tmp_path: Path) -> None:
    full = subprocess.run([BIN, "--help"], capture_output=True, text=True, check=True).stdout
    assert full.rstrip().endswith("CONFIDE_PCCS_URL  Intel PCCS for SGX/TDX collateral")
    # a reader that stops early (| head -1) gets its line, and the command still exits 0
    piped = subprocess.run(f"'{BIN}' --help | head -1", shell=True, capture_output=True, text=True)
    assert piped.stdout.startswith("Usage: confide") and "Traceback" not in piped.stderr
