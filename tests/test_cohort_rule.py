"""An owner's standing cohort rule (issue 10: k "chosen by each owner, the strictest wins";
enclave/cohort.py): a dataset sealed with {"policy": {"min_k": k}} is read only by join-aggregate,
sql or describe with a threshold of at least k, whatever its owner approved later. Played by a
hasty approver (every owner and the creator approve each task here), a creator who picks a smaller
k, a function that enforces no threshold, and a host that swaps in a copy without the rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.enclave.keys import Identity
from platform_support import CliParties

LAB = Identity.generate("lab")
A = Identity.generate("clinic-a")
B = Identity.generate("clinic-b")
PARTIES = {"lab": LAB.public, "a": A.public, "b": B.public}
OWNERS = {"a": A, "b": B}
TABLE = ("id,town,x\n" + "".join(f"p{i},{['Lyon', 'Köln'][i % 2]},{i}\n" for i in range(60))).encode()


def rule(k: int) -> dict:
    return {"policy": {"min_k": k}}


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def run(kit, fn: str, params: dict, metadata: dict, outputs=("result", "report"), inputs=("a", "b")):
    return kit.run_builtin(
        fn,
        {n: TABLE for n in inputs},
        params,
        owners=OWNERS,
        creator=LAB,
        outputs=outputs,
        participants=PARTIES,
        metadata=metadata,
    )


def join(k: int) -> dict:
    return {"key": "id", "k": k, "group_by": ["a.town"], "aggregates": [{"op": "count"}]}


def refused(result: dict, body: dict, outs: dict) -> str:
    assert result["ok"] is False and body["error"]["check"] == "cohort", body
    assert not any(p.exists() for p in outs.values())  # nothing was decrypted, nothing released
    return body["error"]["message"]


def test_a_threshold_at_least_the_owners_runs(kit) -> None:
    result, body, _ = run(kit, "join-aggregate", join(10), {"a": rule(10)})
    assert result["ok"], body


def test_a_smaller_threshold_is_refused_though_everyone_approved(kit) -> None:
    message = refused(*run(kit, "join-aggregate", join(5), {"a": rule(10)}))
    assert "owner of input 'a' requires a cohort threshold of at least 10; this task's is 5" in message


def test_the_strictest_owner_wins(kit) -> None:
    message = refused(*run(kit, "join-aggregate", join(6), {"a": rule(5), "b": rule(8)}))
    assert "input 'b'" in message and "at least 8" in message
    result, body, _ = run(kit, "join-aggregate", join(8), {"a": rule(5), "b": rule(8)})
    assert result["ok"], body


def test_sql_and_describe_thresholds_count(kit) -> None:
    sql = {
        "query": "SELECT town, count(*) AS n FROM a GROUP BY town",
        "rule": {
            "tables": {"a": {"columns": ["town"], "id_column": "id"}},
            "aggregates": ["count"],
            "min_group_size": 4,
        },
    }
    message = refused(*run(kit, "sql", sql, {"a": rule(20)}, inputs=("a",)))
    assert "at least 20; this task's is 4" in message
    sql["rule"]["min_group_size"] = 20
    result, body, _ = run(kit, "sql", sql, {"a": rule(20)}, inputs=("a",))
    assert result["ok"], body
    result, body, _ = run(kit, "describe", {"k": 30}, {"a": rule(30)}, outputs=("report",), inputs=("a",))
    assert result["ok"], body


def test_a_function_without_a_threshold_is_refused(kit) -> None:
    message = refused(*run(kit, "psi", {"column": "id"}, {"b": rule(3)}, outputs=("size",)))
    assert "allows only aggregates over groups of at least 3" in message and "'psi' enforces none" in message


@pytest.mark.parametrize(
    "policy",
    [{"min_k": 1}, {"min_k": True}, {"min_k": "10"}, {"min_k": 10, "other": 1}, ["min_k", 10]],
)
def test_a_malformed_rule_fails_closed(kit, policy) -> None:
    message = refused(*run(kit, "join-aggregate", join(50), {"a": {"policy": policy}}))
    assert "policy" in message


def test_a_host_swapping_in_a_copy_without_the_rule_is_caught(kit) -> None:
    """The host rewrites the header (the rule dropped) and keeps the rest: the bytes no longer hash
    to the approved ciphertext, so the task is refused before any key is used."""
    from confide.client.manifest_build import build_manifest, sign_approval
    from confide.enclave import manifest as mf

    ds = {n: kit.dataset(OWNERS[n], TABLE, metadata=rule(10) if n == "a" else None) for n in ("a", "b")}
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("join-aggregate"),
        params=join(5),
        inputs=[kit.task_input(n, d) for n, d in ds.items()],
        outputs=[mf.TaskOutput(o, (LAB.fingerprint,)) for o in ("result", "report")],
        participants=PARTIES,
    )
    raw = ds["a"].path.read_bytes()
    forged = raw.replace(b'"policy":{"min_k":10}', b'"policy_":{"min_k":1}', 1)
    assert forged != raw and len(forged) == len(raw)
    ds["a"].path.write_bytes(forged)
    approvals = [sign_approval(d.owner, m) for d in ds.values()] + [sign_approval(LAB, m)]
    result, body, _ = kit.run(m, approvals, ds)
    assert result["ok"] is False and body["error"]["check"] == "input", body


def test_confide_dataset_upload_min_k_end_to_end(server, tmp_path: Path) -> None:
    cli = CliParties(server, tmp_path, ("owner", "lab"))
    data = tmp_path / "t.csv"
    data.write_bytes(TABLE)
    r = cli("owner", "dataset", "upload", str(data), "--min-k", "1")
    assert r.exit_code == 1 and "min_k must be an integer in 2..10^9" in r.output, r.output
    ref = cli.upload("owner", "t", TABLE, "--min-k", "25")
    listed = json.loads(cli("owner", "dataset", "list", "--mine", "--json").stdout)
    assert [d["schema"]["policy"] for d in listed if d.get("schema")] == [{"min_k": 25}], listed
    params = json.dumps({"key": "id", "k": 5, "group_by": ["town"], "aggregates": [{"op": "count"}]})
    lab = cli.fps["lab"]
    task = cli.ok(
        "lab", "task", "create", "--function", "join-aggregate", "--input", f"a={ref}",
        "--output", f"result={lab}", "--output", f"report={lab}", "--params-json", params,
    )  # fmt: skip
    cli.ok("owner", "task", "approve", task, "--yes")
    r = cli("lab", "task", "run", task)
    assert r.exit_code == 1 and "requires a cohort threshold of at least 25" in r.output, r.output
