"""Failures a user can act on (issue 13): each one says what went wrong and where, on the user's
own machine where possible, before anything costs an approval round.

- a failed function's traceback (sealed by the enclave) reaches its recipients via `task logs`,
  `task results` and `task run`, and nobody else;
- `function register` refuses a syntax error by line, and a failing dry run, before sending anything;
- `dataset upload` names ragged rows, binary/empty files and type drift; --strict refuses;
- `task wait` follows a task across a server restart; the server logs its drain and readiness;
- attestation is cached within the policy's freshness window, and a changed key is noticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from confide.cli.main import main
from confide.client.attest_cache import SIGNING_CONTEXT
from confide.client.identity_file import save_identity
from confide.client.policy import Policy
from confide.client.transport import Transport
from confide.enclave.config import EnclaveConfig
from confide.enclave.encoding import b64e, canonical_json
from confide.enclave.keys import Identity
from confide.enclave.measurement import measure
from platform_support import UPPER_FN, ServerProcess

UPPER = UPPER_FN
FAILING = (
    "def run(ctx):\n"
    "    rows = ctx.inputs['data'].read().decode().splitlines()\n"
    "    raise ValueError(f'the function broke on {len(rows)} lines')\n"
)
SLEEPY = (
    "import time\n"
    "def run(ctx):\n"
    "    time.sleep(float(ctx.params.get('sleep', 0)))\n"
    "    ctx.outputs['out'].write(ctx.inputs['data'].read().upper())\n"
)
NOWHERE = "http://127.0.0.1:9"  # nothing listens: a command that works offline never notices


def _env(url: str, root: Path, sim_root: Path | None, **policy: Any) -> dict[str, str]:
    dev = Policy(
        backends=("sim",), measurements=(measure(EnclaveConfig()).value,), allow_simulation=True, **policy
    )
    path = root / "dev-policy.toml"
    path.write_text(dev.to_toml())
    env = {"CONFIDE_HOME": str(root / "home"), "CONFIDE_URL": url, "CONFIDE_POLICY": str(path)}
    return {**env, "CONFIDE_SIM_ROOT": str(sim_root)} if sim_root is not None else env


@pytest.fixture
def env(server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    return _env(server.url, tmp_path, server.data_dir / "platform" / "vendor_root.crt")


def _cli(env: dict[str, str], *args: str, identity: Path | None = None):
    full = {**env, **({"CONFIDE_IDENTITY": str(identity)} if identity else {})}
    return CliRunner().invoke(main, list(args), env=full, catch_exceptions=False)


def _party(env: dict[str, str], tmp_path: Path, name: str, *, register: bool = True) -> Path:
    assert _cli(env, "keygen", name, "--out-dir", str(tmp_path)).exit_code == 0
    key = tmp_path / f"{name}.key"
    if register:
        r = _cli(env, "party", "register", "--name", name, identity=key)
        assert r.exit_code == 0, r.output
    return key


def _last(output: str) -> str:
    return output.strip().splitlines()[-1]


def _task(env: dict[str, str], tmp_path: Path, source: str, *, params: tuple[str, ...] = ()):
    """A data owner, a lab, an uploaded dataset, a registered function and an approved task."""
    owner, lab = _party(env, tmp_path, "owner"), _party(env, tmp_path, "lab")
    data = tmp_path / "rows.csv"
    data.write_text("name,score\nada,1\ngrace,2\n")
    r = _cli(env, "dataset", "upload", str(data), identity=owner)
    assert r.exit_code == 0, r.output
    dataset_id = _last(r.stdout)
    src = tmp_path / "fn.py"
    src.write_text(source)
    r = _cli(env, "function", "register", str(src), "--name", "fn", "--output", "out", identity=lab)
    assert r.exit_code == 0, r.output
    lab_fp = Identity.load(lab).fingerprint
    args = ["task", "create", "--function", _last(r.stdout), "--input", f"data={dataset_id}"]
    r = _cli(env, *args, "--output", f"out={lab_fp}", *params, identity=lab)
    assert r.exit_code == 0, r.output
    task_id = _last(r.stdout)
    for key in (owner, lab):
        r = _cli(env, "task", "approve", task_id, "--yes", identity=key)
        assert r.exit_code == 0, r.output
    return owner, lab, task_id


# ---- a failed function's sealed error text ------------------------------------------------------------


def test_a_failing_functions_traceback_reaches_its_recipients_only(env, tmp_path, server):
    owner, lab, task_id = _task(env, tmp_path, FAILING)
    r = _cli(env, "task", "run", task_id, identity=lab)
    assert r.exit_code == 1
    assert "ValueError: the function broke on 3 lines" in r.output and "Traceback" in r.output
    r = _cli(env, "task", "logs", task_id, identity=lab)
    assert r.exit_code == 0, r.output
    assert "failed" in r.stdout and "run 1 attempt 1" in r.stdout
    assert "Traceback (most recent call last)" in r.stdout
    assert 'File "<function>", line 3, in run' in r.stdout
    assert "ValueError: the function broke on 3 lines" in r.stdout
    r = _cli(env, "task", "results", task_id, "--out", str(tmp_path / "res"), identity=lab)
    assert r.exit_code == 1 and "ValueError: the function broke" in r.output
    assert not (tmp_path / "res" / "out").exists()
    # the data owner is no recipient: it sees the category, never the text
    r = _cli(env, "task", "logs", task_id, identity=owner)
    assert r.exit_code == 0 and "the function failed (exception)" in r.output
    assert "ValueError" not in r.output and "sealed to the task's creator and output recipients" in r.output
    # and the host holds only ciphertext and the category
    plain = json.dumps(_cli(env, "task", "receipt", task_id, identity=lab).stdout)
    assert "the function broke" not in plain
    for blob in (server.data_dir / "blobs").rglob("*"):
        if blob.is_file():
            assert b"the function broke" not in blob.read_bytes()


# ---- function register: checked and tried on this machine ---------------------------------------------


def test_register_refuses_a_syntax_error_by_line_before_anything_is_sent(tmp_path, home):
    env = _env(NOWHERE, tmp_path, None)
    key = _party(env, tmp_path, "dev", register=False)
    src = tmp_path / "broken.py"
    src.write_text("import json\n\ndef run(ctx):\n    x = json.loads(ctx.params['j']\n    return x\n")
    r = _cli(env, "function", "register", str(src), "--name", "b", "--output", "out", identity=key)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{src}:4" in r.output and "syntax error" in r.output
    assert "cannot reach" not in r.output  # refused before any call to the platform
    src.write_text("def main(ctx):\n    pass\n")
    r = _cli(env, "function", "register", str(src), "--name", "b", "--output", "out", identity=key)
    assert r.exit_code == 1 and "no top-level `def run(ctx)`" in r.output and "cannot reach" not in r.output


def test_a_dry_run_that_fails_shows_the_traceback_and_registers_nothing(tmp_path, home):
    env = _env(NOWHERE, tmp_path, None)
    key = _party(env, tmp_path, "dev", register=False)
    sample = tmp_path / "sample.csv"
    sample.write_text("age,weight\n61,80\n")
    src = tmp_path / "fn.py"
    src.write_text(
        "import csv, io\n"
        "def run(ctx):\n"
        "    rows = list(csv.DictReader(io.TextIOWrapper(ctx.inputs['data'])))\n"
        "    ctx.outputs['out'].write(str(sum(float(r[ctx.params['col']]) for r in rows)).encode())\n"
    )
    args = ["function", "register", str(src), "--name", "s", "--output", "out", "--try", f"data={sample}"]
    r = _cli(env, *args, "--param", "col=height", identity=key)
    assert r.exit_code == 1, r.output
    assert "KeyError: 'height'" in r.output and "Traceback" in r.output
    assert "dry run failed (exception); nothing was registered" in r.output
    assert "local enclave's sandbox" in r.output and "cannot reach" not in r.output
    # the same function with the right parameter passes the dry run, then goes on to register
    r = _cli(env, *args, "--param", "col=weight", identity=key)
    assert "dry run ok" in r.output and "out 4 bytes" in r.output
    assert r.exit_code == 1 and "cannot reach the platform" in r.output


def test_a_passing_dry_run_registers(env, tmp_path):
    key = _party(env, tmp_path, "author")
    sample, src = tmp_path / "s.csv", tmp_path / "upper.py"
    sample.write_text("a\nx\n")
    src.write_text(UPPER)
    r = _cli(
        env, "function", "register", str(src), "--name", "up", "--output", "out", "--try",
        f"data={sample}", identity=key,
    )  # fmt: skip
    assert r.exit_code == 0 and "dry run ok" in r.output and len(_last(r.stdout)) == 64, r.output


# ---- dataset upload: the CSV checked locally -------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"a,b\n1,2\n3\n", "row has 1 field(s), the header has 2 ({d}:3)"),
        (b"", "the file is empty"),
        (b"a,b\n1,2\n\x00\x01\x02binary", "not a text file (NUL byte): binary data, not CSV ({d}:3)"),
        (b"w\n1\n2\n3\nn/a\n", "type drift: column 'w' is numeric on 3 row(s) but not at line 5 ('n/a')"),
    ],
)
def test_strict_upload_refuses_and_names_the_line(tmp_path, home, content, expect):
    env = _env(NOWHERE, tmp_path, None)
    key = _party(env, tmp_path, "owner", register=False)
    data = tmp_path / "d.csv"
    data.write_bytes(content)
    r = _cli(env, "dataset", "upload", str(data), "--strict", identity=key)
    assert r.exit_code == 1 and expect.format(d=data) in r.output, r.output
    assert "nothing was uploaded (--strict)" in r.output and "cannot reach" not in r.output


def test_upload_without_strict_warns_and_proceeds(env, tmp_path):
    key = _party(env, tmp_path, "owner")
    data = tmp_path / "d.csv"
    data.write_text("id,weight\na,61\nb,n/a\nc,70\nd,72\ne,1,2\n")
    r = _cli(env, "dataset", "upload", str(data), identity=key)
    assert r.exit_code == 0, r.output
    assert "warning: " in r.output and f"row has 3 field(s), the header has 2 ({data}:6)" in r.output
    assert "type drift: column 'weight'" in r.output and "line 3 ('n/a')" in r.output
    assert len(_last(r.stdout)) > 8  # the dataset id


# ---- task wait across a server restart; the server's drain and readiness lines -----------------------


def test_task_wait_survives_a_server_restart(tmp_path):
    srv = ServerProcess(tmp_path / "data", workers=1).start()
    try:
        env = _env(srv.url, tmp_path, srv.data_dir / "platform" / "vendor_root.crt")
        _owner, lab, task_id = _task(env, tmp_path, SLEEPY, params=("--param", "sleep=3"))
        r = _cli(env, "task", "run", task_id, "--no-wait", identity=lab)
        assert r.exit_code == 0, r.output
        r = _cli(env, "task", "show", task_id, identity=lab)
        deadline = time.monotonic() + 60
        while "state: running" not in r.stdout and time.monotonic() < deadline:
            r = _cli(env, "task", "show", task_id, identity=lab)
        assert "running on " in r.stdout and "lease runs" in r.stdout, r.stdout
        srv.stop()  # SIGTERM: the running task is drained (finishes) before the server stops
        waiter = subprocess.Popen(
            [sys.executable, "-m", "confide.cli.main", "task", "wait", task_id, "--timeout", "300"],
            env={**os.environ, **env, "CONFIDE_IDENTITY": str(lab)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            srv.start()
            out, err = waiter.communicate(timeout=300)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        assert waiter.returncode == 0, err
        assert "succeeded" in out and "receipt signed by service" in out
        assert err.count("platform unavailable") == 1 and "platform is back" in err
        log = srv.log()
        assert f"draining 1 running task(s) (up to 30 s): {task_id}" in log
        assert "stopped" in log
        fp = srv.wait_workers(1)["fingerprint"]
        ready = f"1/1 workers ready, service key {fp}"
        deadline = time.monotonic() + 30  # the second start may log its line after the task's wait ended
        while srv.log().count(ready) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.log().count(ready) == 2  # once per start
    finally:
        srv.stop()


# ---- attestation cached within the policy's freshness ------------------------------------------------


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    original = Transport.call

    def recording(self: Transport, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(f"{method} {path}")
        return original(self, method, path, *args, **kwargs)

    monkeypatch.setattr(Transport, "call", recording)
    return seen


EVIDENCE = "POST /v1/service/evidence"


def _upload(env: dict[str, str], key: Path, tmp_path: Path) -> Any:
    data = tmp_path / "c.csv"
    data.write_text("a,b\n1,2\n")
    r = _cli(env, "dataset", "upload", str(data), identity=key)
    assert r.exit_code == 0, r.output
    return r


def test_attestation_is_cached_and_said_once(env, tmp_path, calls):
    key = _party(env, tmp_path, "cached")
    first = _upload(env, key, tmp_path)
    assert calls.count(EVIDENCE) == 1 and "attested enclave service" in first.output
    calls.clear()
    second = _upload(env, key, tmp_path)
    assert EVIDENCE not in calls and "attested enclave service" not in second.output
    assert "GET /v1/service" in calls  # the cheap check that the platform still names that key
    # `service attest` always attests afresh
    calls.clear()
    assert _cli(env, "service", "attest", identity=key).exit_code == 0 and calls.count(EVIDENCE) == 1


def _cache_file(env: dict[str, str]) -> Path:
    [path] = (Path(env["CONFIDE_HOME"]) / "attestations").glob("*.json")
    return path


def test_a_changed_service_key_is_detected(env, tmp_path, calls, monkeypatch):
    key = _party(env, tmp_path, "watchful")
    _upload(env, key, tmp_path)
    calls.clear()
    impostor = Identity.generate("impostor").public.to_line()
    original = Transport.call

    def other_key(self: Transport, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        reply = original(self, method, path, *args, **kwargs)
        return {**reply, "service": impostor} if path == "/v1/service" else reply

    monkeypatch.setattr(Transport, "call", other_key)
    r = _upload(env, key, tmp_path)
    assert "attesting again" in r.output and "attested enclave service" in r.output


def _resign(entry: dict[str, Any], key: Path) -> dict[str, Any]:
    """The entry as this party itself would sign it (what an attacker without the key cannot do)."""
    body = {k: v for k, v in entry.items() if k != "signature"}
    sig = Identity.load(key).sign(SIGNING_CONTEXT + canonical_json(body))
    return {**body, "signature": b64e(sig)}


def _uses_cache(env: dict[str, str], key: Path, tmp_path: Path, calls: list[str]) -> bool:
    calls.clear()
    _upload(env, key, tmp_path)
    return EVIDENCE not in calls


def test_a_cache_entry_not_signed_by_this_party_is_not_used(env, tmp_path, calls):
    key = _party(env, tmp_path, "careful")
    _upload(env, key, tmp_path)
    path = _cache_file(env)
    entry = json.loads(path.read_text())
    # another key, planted by someone who can write the file but does not hold the party's key
    path.write_text(json.dumps({**entry, "service": Identity.generate("impostor").public.to_line()}))
    assert not _uses_cache(env, key, tmp_path, calls)
    # a verdict signed by another party's key
    other = tmp_path / "other.key"
    save_identity(Identity.generate("other"), other)
    path.write_text(json.dumps(_resign(json.loads(path.read_text()), other)))
    assert not _uses_cache(env, key, tmp_path, calls)
    assert _uses_cache(env, key, tmp_path, calls)  # the fresh entry is used again


def test_a_signed_cache_entry_is_checked_again_now(env, tmp_path, calls):
    key = _party(env, tmp_path, "rechecked")
    _upload(env, key, tmp_path)
    path = _cache_file(env)
    entry = json.loads(path.read_text())
    # older than the policy's max_age_seconds (600), even though validly signed
    path.write_text(json.dumps(_resign({**entry, "attested_at": entry["attested_at"] - 601}, key)))
    assert not _uses_cache(env, key, tmp_path, calls)
    # claims that no longer pass the policy (another measurement)
    entry = json.loads(path.read_text())
    claims = {**entry["claims"], "measurement": "00" * 32}
    path.write_text(json.dumps(_resign({**entry, "claims": claims}, key)))
    assert not _uses_cache(env, key, tmp_path, calls)
    # a certificate of the evidence's chain expired since
    entry = json.loads(path.read_text())
    claims = {**entry["claims"], "valid_until": int(time.time()) - 1}
    path.write_text(json.dumps(_resign({**entry, "claims": claims}, key)))
    assert not _uses_cache(env, key, tmp_path, calls)
    # a service key the evidence's report data does not bind
    entry = json.loads(path.read_text())
    impostor = Identity.generate("impostor").public.to_line()
    path.write_text(json.dumps(_resign({**entry, "service": impostor}, key)))
    assert not _uses_cache(env, key, tmp_path, calls)
    assert _uses_cache(env, key, tmp_path, calls)


def test_a_cache_entry_is_tied_to_its_policy_and_anchors(env, tmp_path, calls):
    key = _party(env, tmp_path, "tied")
    _upload(env, key, tmp_path)
    assert _uses_cache(env, key, tmp_path, calls)
    # another policy (another digest) does not use this entry
    (tmp_path / "p2").mkdir()
    auditor = (Identity.generate("auditor").public.to_line(),)
    other = _env(env["CONFIDE_URL"], tmp_path / "p2", Path(env["CONFIDE_SIM_ROOT"]), auditor_keys=auditor)
    assert not _uses_cache({**other, "CONFIDE_HOME": env["CONFIDE_HOME"]}, key, tmp_path, calls)
    # other trust anchors: a copy of the simulated root with a trailing comment is another file
    root = tmp_path / "root-copy.crt"
    root.write_bytes(Path(env["CONFIDE_SIM_ROOT"]).read_bytes() + b"\n")
    moved = {**env, "CONFIDE_SIM_ROOT": str(root)}
    assert _uses_cache(env, key, tmp_path, calls)
    assert not _uses_cache(moved, key, tmp_path, calls)
    assert _uses_cache(moved, key, tmp_path, calls)


def test_max_age_zero_means_attest_every_time(server, tmp_path, calls):
    env = _env(server.url, tmp_path, server.data_dir / "platform" / "vendor_root.crt", max_age_seconds=0)
    key = _party(env, tmp_path, "fresh")
    _upload(env, key, tmp_path)
    calls.clear()
    _upload(env, key, tmp_path)
    assert calls.count(EVIDENCE) == 1
