"""`confide flow`: a job file run on this machine's enclave workers (local engine), its result opened
by the recipient only; bad job files, inputs and policies give one clear error line, never a
traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from confide.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "wordcount_job.py"


def _cli(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False, prog_name="confide")


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    return make_world(tmp_path)


def make_world(tmp_path: Path) -> dict[str, Any]:
    """Keys of an owner, a reader and another party, the owner's sealed text, a development policy."""
    env = {"CONFIDE_HOME": str(tmp_path / "home"), "CONFIDE_POLICY": "", "CONFIDE_SIM_ROOT": ""}
    for who in ("owner", "reader", "other"):
        assert _cli(env, "keygen", who, "--out-dir", str(tmp_path)).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text("Kiwi apple kiwi\nfig KIWI\n\nüñï fig\n", encoding="utf-8")
    r = _cli(env, "encrypt", str(text), "--to", str(tmp_path / "owner.pub"), "--out", str(tmp_path / "t.cnf"))
    assert r.exit_code == 0, r.output
    dev = _cli(env, "policy", "init", "--dev", "--out", str(tmp_path / "home" / "policy.toml"))
    assert dev.exit_code == 0, dev.output
    return {"env": env, "dir": tmp_path}


def _run(world: dict[str, Any], *extra: str, job: Path = JOB, out: str = "res") -> Any:
    d = world["dir"]
    return _cli(
        world["env"], "flow", "run", str(job), "--input", f"text={d / 't.cnf'}", "--identity", str(d / "owner.key"),
        "--to", str(d / "reader.pub"), "--out", str(d / out), "--workers", "1", *extra,
    )  # fmt: skip


def test_a_word_count_runs_and_only_the_recipient_opens_it(world: dict[str, Any]) -> None:
    r = _run(world)
    assert r.exit_code == 0, r.output
    assert "accepted: 3 stage(s), every partition consumed exactly once" in r.output
    assert "stage 2: 1/1 task(s) done" in r.output  # progress per stage
    d = world["dir"]
    opened = _cli(
        world["env"], "flow", "open", str(d / "res"), "word_counts", "--identity", str(d / "reader.key")
    )
    assert opened.exit_code == 0, opened.output
    rows = [json.loads(line) for line in opened.output.splitlines()]
    assert rows == [["kiwi", 3], ["fig", 2], ["apple", 1], ["üñï", 1]]
    for who in ("owner", "other"):  # the owner of the input is not a recipient of the result
        denied = _cli(
            world["env"], "flow", "open", str(d / "res"), "word_counts", "--identity", str(d / f"{who}.key")
        )
        assert denied.exit_code == 1 and denied.output.startswith("error: file is not addressed to identity")
    as_json = _run(world, "-o", "json", "--memory-budget", "1", out="res-json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["accepted"] is True


def test_the_workers_keys_are_stable_and_listed(world: dict[str, Any]) -> None:
    first = _cli(world["env"], "flow", "workers", "--count", "2", "-o", "json")
    again = _cli(world["env"], "flow", "workers", "--count", "2", "-o", "json")
    assert first.exit_code == 0 and json.loads(first.output) == json.loads(again.output)
    assert len({w["fingerprint"] for w in json.loads(first.output)}) == 2


def test_bad_job_files_inputs_and_policies_are_one_clear_error(world: dict[str, Any]) -> None:
    d = world["dir"]
    broken = d / "broken.py"
    broken.write_text("def job(flow, inputs)\n    return None\n")
    r = _run(world, job=broken)
    assert (
        r.exit_code == 1 and "error: the job file does not parse" in r.output and "Traceback" not in r.output
    )
    nojob = d / "nojob.py"
    nojob.write_text("def words(x):\n    return x.split()\n")
    r = _run(world, job=nojob)
    assert r.exit_code == 1 and "defines no job(flow, inputs) function" in r.output
    lam = d / "lam.py"
    lam.write_text(
        "def job(flow, inputs):\n    return flow.text(inputs['text']).map(lambda x: x).save('o')\n"
    )
    r = _run(world, job=lam)
    assert r.exit_code == 1 and "a lambda cannot run in the enclave" in r.output and f"({lam})" in r.output
    r = _cli(world["env"], "flow", "run", str(JOB), "--input", "text=/nonexistent.cnf", "--to", str(d / "reader.pub"),
             "--out", str(d / "x"))  # fmt: skip
    assert r.exit_code == 1 and "no such file" in r.output and "(--input text)" in r.output
    r = _run(world, "--policy", str(ROOT / "tests" / "nonexistent-policy.toml"))
    assert r.exit_code == 1 and r.output.startswith("error: ")
    (d / "home" / "policy.toml").unlink()  # the production defaults refuse the simulated workers
    r = _run(world, out="refused")
    assert r.exit_code == 1 and "SIMULATED" in r.output and "policy init --dev" in r.output
    assert not (d / "refused").exists() or not any((d / "refused").iterdir())
