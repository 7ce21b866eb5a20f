"""A platform flow task on the platform's Spark engine (issue 8): `confide serve --flow-engine spark`.

The enclave worker's `task` call checks everything and opens the job; the host runs the stages on
Spark with a node agent it started (an attested FlowEnclave process that gets the job key only by the
enclave's grant); `flow_finish` verifies the reports and seals the outputs. Played here:

- a real server on Spark local[2]: the job of tests/test_flow_platform.py gives the same records and
  the same signed per-stage counts as the local path (the same manifest run inside one enclave call);
- the test as a hostile host of its own enclave worker and node agent (the server's own host code,
  confide.host.flow_engine, with a malicious SparkEngine): a batch dropped or replayed inside Spark's
  shuffle, or a task report dropped, fails the task naming stage and partition, with no output; an
  agent whose evidence does not bind its key gets no grant; flow_finish with another task's reports
  fails that task, and is refused twice, or without a start, or after the enclave restarted (then the
  task runs again and succeeds);
- `confide flow run --engine spark` gives the local engine's result (last: it stops the test process's
  SparkSession when it is done).
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.receipts import verify_task_receipt
from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError, EnclaveError
from confide.enclave.keys import Identity
from confide.flow import Flow
from confide.flow.malicious import MaliciousSparkEngine
from confide.flow.platform import flow_task, job_params, read_records
from confide.flow.spark_engine import SparkEngine
from confide.host.flow_engine import NodeAgentProcess, SparkFlowEngine, read_agent_announcement, run_on_engine
from platform_support import ServerProcess
from test_flow_platform import BANK, FUNCTIONS, SHOP, world

__all__ = ["world"]  # fixture (on this module's server)

pytestmark = pytest.mark.timeout(300)

WANT = Counter(w for line in SHOP + BANK for w in line.lower().split())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("server") / "data",
        workers=1,
        extra_args=("--flow-engine", "spark", "--spark-master", "local[2]"),
    ).start()
    yield srv
    srv.stop()


def _job(fn: str = "one") -> tuple[Flow, Any]:
    flow = Flow(FUNCTIONS)
    both = flow.task_input("shop").union(flow.task_input("bank"))
    return flow, both.flat_map("words").map(fn).reduce_by_key("add", 2).save("wc")


# ---- the host played by the test: its own enclave worker, node agent and Spark ---------------------


@pytest.fixture(scope="module")
def host(service_worker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    kit, home = service_worker
    engine = SparkFlowEngine(
        master="local[2]", work_dir=tmp_path_factory.mktemp("engine"), platform_dir=home.platform_dir
    ).start()
    engine.agents()  # started
    shop, bank, lab = (Identity.generate(n) for n in ("shop", "bank", "lab"))
    yield SimpleNamespace(kit=kit, home=home, engine=engine, shop=shop, bank=bank, lab=lab)
    engine.stop()
    kit.enclave.close()  # the one the restart test started (service_worker closes its own)


def _manifest(host: SimpleNamespace, fn: str = "one") -> SimpleNamespace:
    kit = host.kit
    datasets = {
        "shop": kit.dataset(host.shop, ("\n".join(SHOP) + "\n").encode()),
        "bank": kit.dataset(host.bank, ("\n".join(BANK) + "\n").encode()),
    }
    flow, action = _job(fn)
    m = build_manifest(
        service=kit.service,
        creator=host.lab.public,
        function=mf.builtin_descriptor("flow"),
        params={"job": job_params(flow, [action], host.lab.public)},
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput("wc", (host.lab.fingerprint,))],
        participants={"shop": host.shop.public, "bank": host.bank.public, "lab": host.lab.public},
    )
    approvals = [sign_approval(p, m) for p in (host.shop, host.bank, host.lab)]
    return SimpleNamespace(m=m, approvals=approvals, datasets=datasets)


def _call_task(host: SimpleNamespace, t: SimpleNamespace, **extra: Any) -> tuple[dict[str, Any], Path]:
    kit = host.kit
    out = kit.path("wc.sealed")
    reply = kit.enclave.task(
        manifest=t.m.text,
        approvals=t.approvals,
        dataset_keys={n: ds.envelope for n, ds in t.datasets.items()},
        inputs={n: ds.path for n, ds in t.datasets.items()},
        outputs={"wc": out, "_error": kit.path("_error.sealed")},
        **extra,
    )
    return reply, out


def _start(host: SimpleNamespace, t: SimpleNamespace) -> tuple[dict[str, Any], Path]:
    reply, out = _call_task(host, t, flow_agents=host.engine.agents())
    assert reply["ok"] and reply["category"] == "flow-started" and "receipt" not in reply, reply
    return reply["flow"], out


def _inputs(t: SimpleNamespace) -> dict[str, str]:
    return {n: str(ds.path) for n, ds in t.datasets.items()}


def _receipt(host: SimpleNamespace, reply: dict[str, Any]) -> dict[str, Any]:
    return verify_task_receipt(base64.b64decode(reply["receipt"]), host.kit.service)


def _records(host: SimpleNamespace, path: Path) -> list[Any]:
    return [json.loads(x) for x in host.kit.read(path, host.lab).decode().splitlines()]


# ---- the server on Spark: the same outputs and counts as the local path --------------------------


def test_the_same_job_gives_the_local_paths_outputs_and_counts_on_spark(
    world: dict[str, Any], server: ServerProcess, host: SimpleNamespace
) -> None:
    shop, bank, lab, tmp = world["shop"], world["bank"], world["lab"], world["tmp"]
    flow, action = _job()
    task = flow_task(lab, flow, action, inputs=world["refs"], outputs={"wc": [lab.fingerprint]})
    shop.approve(task)
    bank.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    result = lab.results(task, tmp / "out")
    on_spark = read_records(result.outputs["wc"])
    assert dict(on_spark) == dict(WANT)
    assert f"task {task}: dataflow job opened in the enclave; its 4 stage(s) run on Spark" in server.log()
    # the same manifest's job, run whole inside one enclave call (the local path)
    local, out = _call_task(host, _manifest(host))
    assert local["ok"] and local["category"] == "ok"
    assert sorted(map(tuple, _records(host, out))) == sorted(on_spark)
    spark_counts = result.receipt["flow"]
    # batch counts depend on which buckets the job key's PRF filled (a fresh key per run): not compared
    assert [{**s, "batches_out": 0} for s in spark_counts] == [
        {**s, "batches_out": 0} for s in _receipt(host, local)["flow"]
    ]
    assert [s["tasks"] for s in spark_counts] == [1, 1, 2, 2] and spark_counts[-1]["records_out"] == len(WANT)
    assert shop.results(task, tmp / "shop-out").outputs == {}  # not a recipient


def test_a_failing_function_on_spark_fails_the_task_naming_stage_and_partition(
    world: dict[str, Any],
) -> None:
    lab = world["lab"]
    flow, action = _job("boom")
    task = flow_task(lab, flow, action, inputs=world["refs"], outputs={"wc": [lab.fingerprint]})
    for c in (world["shop"], world["bank"]):
        c.approve(task)
    lab.run(task)
    info = lab.wait(task, timeout=120)
    refusal = lab.receipt(task, info)
    assert info["state"] == "failed" and refusal["error"]["check"] == "run" and refusal["outputs"] == []
    message = refusal["error"]["message"]
    assert "on the engine" in message and "stage 2 partition 0" in message
    assert "ValueError" in message and "secret" not in message


# ---- a hostile host ---------------------------------------------------------------------------------

ATTACKS = {  # the partition named is the one the engine attacked (MaliciousSparkEngine.target)
    ("drop", 3): ("stage 3 partition {}", "stream from stage 2"),
    ("replay", 3): ("stage 3 partition {}", "batch from stage 0 delivered to stage 3"),
    ("drop_report", 0): ("stage 0 partition {}", "no report"),  # found by the enclave's verification
}


@pytest.mark.parametrize(("attack", "stage"), list(ATTACKS))
def test_tampering_inside_spark_fails_the_task_with_no_output(
    attack: str, stage: int, host: SimpleNamespace, tmp_path: Path
) -> None:
    t = _manifest(host)
    start, out = _start(host, t)
    engines: list[MaliciousSparkEngine] = []

    def malicious(spark: Any, sock: str) -> MaliciousSparkEngine:
        engines.append(MaliciousSparkEngine(spark, None, sock, attack=attack, stage=stage))
        return engines[-1]

    host.engine.make_engine = malicious
    try:
        reply = run_on_engine(host.engine, host.kit.enclave.call, t.m.task_id, start, _inputs(t), tmp_path)
    finally:
        host.engine.make_engine = None
    assert engines[0].done  # the attack happened
    receipt = _receipt(host, reply)
    assert not reply["ok"] and reply["outputs"] == {} and receipt["outputs"] == [] and not out.exists()
    where, what = ATTACKS[(attack, stage)]
    where = where.format(engines[0].target)
    assert where in receipt["error"]["message"] and what in receipt["error"]["message"]
    assert "flow" not in receipt and receipt["run"] == 1


def test_another_hosts_agent_runs_the_stages_by_the_enclaves_grant(
    host: SimpleNamespace, tmp_path: Path
) -> None:
    """`confide serve --flow-agent FILE`: another host's node agent (its own process and key, its
    announcement read from a file) is named to the enclave, which grants it the job key after
    checking its evidence; Spark's stubs there reach it (here: the engine's socket is that agent's),
    and the task succeeds. Not named, the same agent cannot run a stage: the task fails on the engine."""
    other = NodeAgentProcess(
        Path(tempfile.mkdtemp(prefix="cf-other-")) / "agent.sock",
        platform_dir=host.home.platform_dir,
        backend="sim",
        config=None,
        spill_dir=tmp_path / "spill",
        zygotes=1,
    )
    (tmp_path / "agent.txt").write_text(f"ready {other.public_line}\nevidence {other.evidence}\nserving\n")
    eng = host.engine
    try:
        eng.make_engine = lambda spark, sock: SparkEngine(spark, None, other.socket_path)
        for named in (False, True):
            eng.remote_agents = [list(read_agent_announcement(tmp_path / "agent.txt"))] if named else []
            t = _manifest(host)
            start, out = _start(host, t)
            assert len(start["grants"]) == 1 + named
            (tmp_path / f"{named}").mkdir()
            reply = run_on_engine(
                eng, host.kit.enclave.call, t.m.task_id, start, _inputs(t), tmp_path / f"{named}"
            )
            if named:
                assert reply["ok"] and dict(map(tuple, _records(host, out))) == dict(WANT)
            else:
                assert not reply["ok"] and not out.exists()
                assert "no job key grant is addressed to it" in _receipt(host, reply)["error"]["message"]
    finally:
        eng.make_engine, eng.remote_agents = None, []
        other.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read the node agent's announcement"),
        ("evidence AAAA\n", "no 'ready ...' line"),
        ("hello\n", "no 'ready ...' and no 'evidence ...' line"),
        ("ready not-a-key\nevidence AAAA\n", "--flow-agent"),
        ("ready {line}\nevidence ***\n", "not base64"),
    ],
)
def test_a_bad_agent_announcement_is_refused_with_its_file_named(
    tmp_path: Path, text: str | None, message: str
) -> None:
    f = tmp_path / "agent.txt"
    if text is not None:
        f.write_text(text.format(line=Identity.generate("a").public.to_line()))
    with pytest.raises(ConfideError, match=re.escape(message)) as info:
        read_agent_announcement(f)
    assert str(f) in str(info.value)


def test_an_agent_whose_evidence_does_not_bind_its_key_gets_no_grant(host: SimpleNamespace) -> None:
    t = _manifest(host)
    (line, evidence), impostor = host.engine.agents()[0], Identity.generate("impostor")
    reply, out = _call_task(host, t, flow_agents=[[impostor.public.to_line(), evidence]])
    receipt = _receipt(host, reply)
    assert reply["category"] == "refused" and receipt["error"]["check"] == "run" and not out.exists()
    assert "does not bind this worker's keys" in receipt["error"]["message"]
    reply, _ = _call_task(host, t, flow_agents=[[line, base64.b64encode(b"not evidence").decode()]])
    assert reply["category"] == "refused"
    assert _receipt(host, reply)["error"]["check"] == "run"


def test_flow_finish_with_another_tasks_reports_twice_or_unstarted_is_refused(
    host: SimpleNamespace, tmp_path: Path
) -> None:
    a, b = _manifest(host), _manifest(host)
    start_a, out_a = _start(host, a)
    start_b, out_b = _start(host, b)
    eng, enclave = host.engine, host.kit.enclave
    (tmp_path / "b").mkdir()
    b_reports = eng.run_stages(b.m.task_id, start_b, _inputs(b), tmp_path / "b")
    from confide.enclave.flow.in_enclave import write_reports

    write_reports(tmp_path / "b.bin", b_reports)
    # task a finished with b's reports (and b's part files): its verification fails, nothing published
    reply = enclave.flow_finish(a.m.task_id, tmp_path / "b.bin", tmp_path / "b")
    receipt = _receipt(host, reply)
    assert not reply["ok"] and receipt["task_id"] == a.m.task_id and not out_a.exists()
    assert "batch of another job" in receipt["error"]["message"]
    with pytest.raises(EnclaveError, match="no dataflow job of task .* is waiting to finish"):
        enclave.flow_finish(a.m.task_id, tmp_path / "b.bin", tmp_path / "b")  # consumed by the failure
    ok = enclave.flow_finish(b.m.task_id, tmp_path / "b.bin", tmp_path / "b")
    assert ok["ok"] and _receipt(host, ok)["flow"][-1]["records_out"] == len(WANT)
    assert dict(map(tuple, _records(host, out_b))) == dict(WANT)
    with pytest.raises(EnclaveError, match="no dataflow job of task .* is waiting to finish"):
        enclave.flow_finish(b.m.task_id, tmp_path / "b.bin", tmp_path / "b")  # twice
    with pytest.raises(EnclaveError, match="no dataflow job of task 'f+' is waiting"):
        enclave.flow_finish("f" * 32, tmp_path / "b.bin", tmp_path / "b")  # never started
    assert start_a["task_id"] == a.m.task_id


def test_a_restart_between_start_and_finish_fails_that_run_and_the_task_runs_again(
    host: SimpleNamespace, tmp_path: Path
) -> None:
    t = _manifest(host)
    start, out = _start(host, t)
    (tmp_path / "1").mkdir()
    reports = host.engine.run_stages(t.m.task_id, start, _inputs(t), tmp_path / "1")
    from confide.enclave.flow.in_enclave import write_reports

    write_reports(tmp_path / "1.bin", reports)
    host.kit.enclave.close()  # the worker's enclave restarts: the open job was in its memory only
    host.kit.enclave = host.home.start_enclave()
    with pytest.raises(EnclaveError, match="or the worker restarted"):
        host.kit.enclave.flow_finish(t.m.task_id, tmp_path / "1.bin", tmp_path / "1")
    assert not out.exists()
    start, out = _start(host, t)  # run 2 of the same task: a new job key; the agent takes its grant
    (tmp_path / "2").mkdir()
    reply = run_on_engine(host.engine, host.kit.enclave.call, t.m.task_id, start, _inputs(t), tmp_path / "2")
    receipt = _receipt(host, reply)
    assert reply["ok"] and receipt["run"] == 2 and dict(map(tuple, _records(host, out))) == dict(WANT)


# ---- the CLI's --engine spark (last: it stops the SparkSession of this process) ---------------------


def test_cli_flow_run_on_spark_gives_the_local_engines_result(tmp_path: Path, host: SimpleNamespace) -> None:
    from test_cli_flow import _cli, _run, make_world

    w = make_world(tmp_path)
    d = w["dir"]
    rows = {}
    for engine in ("local", "spark"):
        r = _run(w, "--engine", engine, "--master", "local[2]", out=f"res-{engine}")
        assert r.exit_code == 0, r.output
        assert "accepted: 3 stage(s), every partition consumed exactly once" in r.output
        opened = _cli(w["env"], "flow", "open", str(d / f"res-{engine}"), "word_counts", "--identity",
                      str(d / "reader.key"))  # fmt: skip
        assert opened.exit_code == 0, opened.output
        rows[engine] = [json.loads(line) for line in opened.output.splitlines()]
    assert rows["spark"] == rows["local"] == [["kiwi", 3], ["fig", 2], ["apple", 1], ["üñï", 1]]
