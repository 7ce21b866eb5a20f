"""The README's walkthrough works as written: its shell steps and its SDK snippet run against a real
server started with the README's own `confide serve` line (only the port differs), so the README
cannot drift from the code."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from platform_support import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def readme_block(label: str) -> str:
    """The fenced block that follows `<!-- readme-test: LABEL -->`."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- readme-test: {label} -->\n```[a-z]*\n(.*?)\n```", text, re.S)
    assert m, f"README has no block marked readme-test: {label}"
    return m.group(1)


def test_readme_blocks_are_marked() -> None:
    serve = shlex.split(readme_block("serve"))
    assert serve[:2] == ["confide", "serve"]
    assert "confide task run" in readme_block("walkthrough")
    assert "Client.from_env()" in readme_block("sdk")


def test_readme_walkthrough_and_sdk_snippet(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "make_dataset.py", tmp_path / "examples")
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path / "user"),
        "CONFIDE_HOME": str(tmp_path / "user" / ".confide"),
        "LANG": "C.UTF-8",
    }
    (tmp_path / "user").mkdir()
    serve = shlex.split(readme_block("serve"))
    server = ServerProcess(
        tmp_path / "walkthrough" / "platform-data",
        command=[str(BIN / "confide"), *serve[1:]],
        cwd=tmp_path,
        env=env,
    )
    (tmp_path / "walkthrough").mkdir()
    server.start()
    try:
        env["CONFIDE_URL"] = server.url
        script = (
            readme_block("walkthrough")
            + "\nexport A B\n"
            + f"{BIN / 'python'} - <<'PY'\n{readme_block('sdk')}\nPY\n"
        )
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
            stdin=subprocess.DEVNULL,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-6000:]
        assert "refused, as it should be" in out
        results = tmp_path / "walkthrough" / "results"
        assert (results / "model").exists() or any(results.iterdir()), out[-3000:]
        assert "model:" in done.stdout and "receipt: ok" in done.stdout, out[-3000:]
        walk = tmp_path / "walkthrough"
        assert json.loads((walk / "psi" / "size").read_text())["size"] == 200  # P00201-P00400
        rows = list(csv.DictReader((walk / "sql" / "result").open()))
        assert sorted(r["smoker"] for r in rows) == ["0", "1"], rows
        assert all(int(r["patients"]) >= 20 for r in rows) and sum(int(r["patients"]) for r in rows) == 200
        assert "Traceback" not in out
    finally:
        server.stop()
