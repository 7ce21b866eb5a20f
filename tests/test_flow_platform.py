"""A dataflow job as a platform task (issue 8, multi-party): every input owner approves exactly the
job (its code is in the manifest), it runs inside the platform's enclave with the same completeness
verification, each output goes sealed to its recipients, and the receipt signs the per-stage counts.
Played against a real server: a run without an owner's approval is refused, a job whose outputs do
not match the manifest is refused, a failing function's task fails naming stage and partition."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from confide.enclave.errors import ConfideError
from confide.flow import Flow
from confide.flow.platform import flow_task, read_records
from platform_support import sdk_clients

FUNCTIONS = """
def words(line):
    return line.lower().split()

def one(w):
    return (w, 1)

def add(a, b):
    return a + b

def boom(w):
    raise ValueError("secret " + w)
"""
SHOP = ["Kiwi apple", "kiwi fig", "plum"]
BANK = ["fig kiwi", "apple"]


@pytest.fixture(scope="module")
def world(server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("flowtask")
    shop, bank, lab = sdk_clients(server, tmp, ("shop", "bank", "lab"))
    refs = {}
    for name, owner, lines in (("shop", shop, SHOP), ("bank", bank, BANK)):
        (tmp / f"{name}.txt").write_text("\n".join(lines) + "\n")
        refs[name] = owner.upload_dataset(tmp / f"{name}.txt").ref
    return {"shop": shop, "bank": bank, "lab": lab, "refs": refs, "tmp": tmp}


def _word_count(world: dict[str, Any], fn: str = "one", **task: Any) -> str:
    flow = Flow(FUNCTIONS)
    both = flow.task_input("shop").union(flow.task_input("bank"))
    counts = both.flat_map("words").map(fn).reduce_by_key("add", 2)
    lab = world["lab"]
    return flow_task(
        lab, flow, counts.save("wc"), inputs=world["refs"], outputs={"wc": [lab.fingerprint]}, **task
    )


def test_a_word_count_over_two_owners_data_runs_with_both_approvals(world: dict[str, Any]) -> None:
    shop, bank, lab, tmp = world["shop"], world["bank"], world["lab"], world["tmp"]
    task = _word_count(world)
    text = shop.describe(task)
    assert "Function 'flow'" in text and "def words(line)" in text  # the job's code is what is approved
    assert "Dataflow job (4 stages" in text
    assert (
        "stage 2: reads stages 0, 1; flat_map(words) -> map(one) -> reduce_local(add); then 2 partitions by key"
        in text
    )
    assert "stage 3: reads stages 2; reduce_local(add); then output wc" in text
    shop.approve(task)
    lab.run(task)  # without the bank's approval
    info = lab.wait(task, timeout=120)
    refusal = lab.receipt(task, info)
    assert info["state"] == "failed" and refusal["error"]["check"] == "approval"
    bank.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    result = lab.results(task, tmp / "out")
    got = dict(read_records(result.outputs["wc"]))
    assert got == dict(Counter(w for line in SHOP + BANK for w in line.lower().split()))
    stages = result.receipt["flow"]  # signed: what the completeness verification accepted
    # two sources (one partition each), the union's word counts (map-side combined), the reduce
    assert [s["stage"] for s in stages] == [0, 1, 2, 3] and stages[-1]["records_out"] == len(got)
    assert [s["tasks"] for s in stages] == [1, 1, 2, 2]
    assert shop.results(task, tmp / "shop-out").outputs == {}  # not a recipient


def test_outputs_that_are_not_the_jobs_are_refused(world: dict[str, Any]) -> None:
    flow = Flow(FUNCTIONS)
    counts = flow.task_input("shop").union(flow.task_input("bank")).flat_map("words").map("one")
    lab = world["lab"]
    with pytest.raises(ConfideError, match="the job reads inputs"):
        flow_task(
            lab,
            flow,
            counts.save("wc"),
            inputs={"shop": world["refs"]["shop"]},
            outputs={"wc": [lab.fingerprint]},
        )
    task = flow_task(lab, flow, counts.save("wc"), inputs=world["refs"], outputs={"other": [lab.fingerprint]})
    for c in (world["shop"], world["bank"]):
        c.approve(task)
    lab.run(task)
    info = lab.wait(task, timeout=120)
    refusal = lab.receipt(task, info)
    assert info["state"] == "failed" and refusal["error"]["check"] == "output"
    assert "the job writes outputs ['wc']" in refusal["error"]["message"]


def test_a_failing_function_fails_the_task_naming_stage_and_partition(world: dict[str, Any]) -> None:
    task = _word_count(world, fn="boom")
    for c in (world["shop"], world["bank"]):
        c.approve(task)
    lab = world["lab"]
    lab.run(task)
    info = lab.wait(task, timeout=120)
    refusal = lab.receipt(task, info)
    assert info["state"] == "failed" and refusal["error"]["check"] == "run"
    message = refusal["error"]["message"]
    assert "stage 2 partition 0" in message and "ValueError" in message and "secret" not in message


def test_a_local_file_source_cannot_be_a_platform_task(world: dict[str, Any], tmp_path: Path) -> None:
    from confide.flow import seal_text

    path = seal_text(tmp_path / "f.sealed", ["a"], [world["lab"].identity.public])
    flow = Flow(FUNCTIONS)
    with pytest.raises(ConfideError, match="reads only task inputs"):
        flow_task(world["lab"], flow, flow.text(path).save("o"), inputs={}, outputs={"o": []})


def test_the_same_job_file_runs_as_a_task_from_the_cli(
    world: dict[str, Any], server: Any, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from confide.cli.main import main
    from confide.client.identity_file import save_identity
    from platform_support import this_build_dev_policy

    lab = world["lab"]
    key, policy = tmp_path / "lab.key", tmp_path / "policy.toml"
    save_identity(lab.identity, key)
    policy.write_text(this_build_dev_policy().to_toml())
    env = {
        "CONFIDE_URL": server.url,
        "CONFIDE_IDENTITY": str(key),
        "CONFIDE_POLICY": str(policy),
        "CONFIDE_SIM_ROOT": str(server.data_dir / "platform" / "vendor_root.crt"),
        "CONFIDE_HOME": str(lab.home.root),  # the lab's own record of what it created
    }
    job = Path(__file__).resolve().parents[1] / "examples" / "wordcount_job.py"
    args = [
        "flow",
        "task",
        str(job),
        "--input",
        f"text={world['refs']['shop']}",
        "--output",
        f"word_counts={lab.fingerprint}",
    ]
    r = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    task = r.stdout.strip().splitlines()[-1]
    world["shop"].approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    got = read_records(lab.results(task, tmp_path / "out").outputs["word_counts"])
    assert got == sorted(
        Counter(w for line in SHOP for w in line.lower().split()).items(), key=lambda p: (-p[1], p[0])
    )
    wrong = [
        *args[:3],
        "--input",
        f"nope={world['refs']['shop']}",
        "--output",
        f"word_counts={lab.fingerprint}",
    ]
    bad = CliRunner().invoke(main, wrong, env=env)
    assert (
        bad.exit_code == 1 and "job(flow, inputs) failed: KeyError: 'text' (inputs given: nope)" in bad.output
    )
