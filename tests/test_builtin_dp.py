"""Differential privacy on join-aggregate's count and sums (params.dp, OpenDP in the sandbox child)
and each dataset's privacy budget in the enclave's sealed state, in a real enclave worker: noisy
results within the mechanism's error of pandas' exact ones, rows per key truncated, the budget
charged and a task past it refused naming the dataset, bad dp params refused naming the field, a
host that edits or swaps the sealed budget refused; and the documented limit: a host that rolls the
sealed state back gets the budget back."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.backend import SIM_SIGNER, EnclaveIdentity, SimBackend
from confide.enclave.errors import EnclaveError, IntegrityError
from confide.enclave.keys import Identity
from confide.enclave.privacy_budget import PrivacyBudget
from confide.enclave.sim_platform import SimPlatform

LAB = Identity.generate("lab")
BANK = Identity.generate("bank")
SHOP = Identity.generate("shop")
PARTIES = {"lab": LAB.public, "bank": BANK.public, "shop": SHOP.public}
OWNERS = {"bank": BANK, "shop": SHOP}
KEY = {"bank": "id", "shop": "customer"}


def tables(seed: int, n: int = 800) -> dict[str, bytes]:
    """Each id once per table (so max_contributions 1 truncates nothing), 3 regions of 100+ ids."""
    rng = np.random.default_rng(seed)
    ids = [f"c{i}" for i in rng.permutation(2 * n)[:n]]
    region = rng.choice(["north", "south", "east"], n)
    balance = rng.integers(-50, 1200, n)  # clamped to [0, 1000] below
    bank = pd.DataFrame({"id": ids, "region": region, "balance": balance})
    shop = pd.DataFrame({"customer": ids[: n * 3 // 4], "spend": rng.integers(0, 100, n * 3 // 4)})
    shop = shop.sample(frac=1, random_state=seed)
    return {"bank": bank.to_csv(index=False).encode(), "shop": shop.to_csv(index=False).encode()}


def exact(t: dict[str, bytes], group_by: list[str]) -> pd.DataFrame:
    bank, shop = (pd.read_csv(io.BytesIO(t[n])) for n in ("bank", "shop"))
    joined = bank.merge(shop, left_on="id", right_on="customer")
    joined["balance"] = joined["balance"].clip(0, 1000)
    if not group_by:
        return pd.DataFrame({"count": [len(joined)], "sum(balance)": [joined["balance"].sum()]})
    g = joined.groupby(group_by)
    return pd.DataFrame({"count": g.size(), "sum(balance)": g["balance"].sum()}).reset_index()


def dp_params(**dp) -> dict:
    base = {"epsilon": 1.0, "max_contributions": 1, "bounds": {"balance": [0, 1000]}}
    base["budget"] = {"bank": 100, "shop": 100}
    return {
        "key": KEY,
        "k": 5,
        "group_by": ["region"],
        "aggregates": [{"op": "count"}, {"op": "sum", "column": "balance"}],
        "dp": {**base, "delta": 1e-7, **dp},
    }


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


@pytest.fixture(scope="module")
def state_dir(service_worker) -> Path:
    return service_worker[1].state_dir


def task(kit, datasets: dict, params: dict):
    """A join-aggregate task over already uploaded `datasets` (the same ids across tasks)."""
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("join-aggregate"),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput("result", (LAB.fingerprint,)), mf.TaskOutput("report", (LAB.fingerprint,))],
        participants=PARTIES,
    )
    approvals = [sign_approval(ds.owner, m) for ds in datasets.values()] + [sign_approval(LAB, m)]
    return kit.run(m, approvals, datasets)


def upload(kit, t: dict[str, bytes]) -> dict:
    return {n: kit.dataset(OWNERS[n], data) for n, data in t.items()}


def outputs(kit, outs) -> tuple[pd.DataFrame, dict]:
    result = pd.read_csv(io.BytesIO(kit.read(outs["result"], LAB)), dtype={"region": str})
    return result, json.loads(kit.read(outs["report"], LAB))


def refused(result, body, check: str = "privacy") -> str:
    assert not result["ok"] and result["category"] == "refused" and result["outputs"] == {}
    assert body["error"]["check"] == check, body["error"]
    return body["error"]["message"]


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_noisy_results_are_within_the_mechanisms_error(kit, mechanism: str) -> None:
    """Over 3 runs (OpenDP draws from the OS: each run its own noise), grouped and ungrouped: every
    released value is within 12 noise scales of pandas' exact one (a Laplace variable passes that
    with probability e^-12 = 6e-6, a Gaussian far less), the scales are the ones the mechanism
    needs for epsilon/2 each, and some value is noisy (not all 12 exact: at most ~0.12^12)."""
    t = tables(7)
    noisy_values = 0
    for run_no, group_by in enumerate((["region"], ["region"], [])):
        params = dp_params(mechanism=mechanism)
        params["group_by"] = group_by
        result, body, outs = task(kit, upload(kit, t), params)
        assert result["ok"], (body, kit.read(outs["_error"], LAB).rstrip(b"\0").decode())
        got, report = outputs(kit, outs)
        dp = report["dp"]
        assert "suppressed_groups" not in report  # the count of groups in the data is not DP
        assert dp["mechanism"] == mechanism and dp["epsilon_spent"] == 1.0 and dp["delta"] == 1e-7
        assert dp["epsilon_measured"] <= 1.0 and dp["delta_measured"] <= 1e-7
        count_m, sum_m = dp["measurements"]
        assert sum_m["column"] == "balance"
        if mechanism == "laplace":  # scale = sensitivity / epsilon share (count: 1, sum: 1000)
            assert count_m["scale"] == pytest.approx(2.0, rel=1e-4)
            assert sum_m["scale"] == pytest.approx(2000.0, rel=1e-4)
        else:  # the analytic Gaussian scale for (0.5, 5e-8) is between the classic bound's half and it
            classic = math.sqrt(2 * math.log(1.25 / 5e-8)) / 0.5
            assert classic / 2 < count_m["scale"] < classic * 1.05
        want = exact(t, group_by)
        assert dp["threshold"] >= 5 and report["groups"] == len(got) == len(want)  # 200+ per group
        assert list(got.columns) == [*group_by, "count", "sum(balance)"]
        if group_by:
            assert got["region"].tolist() == sorted(want["region"])
            want = want.set_index("region").loc[got["region"]].reset_index()
        for column, m in (("count", count_m), ("sum(balance)", sum_m)):
            err = (got[column] - want[column]).abs()
            assert (err <= 12 * m["scale"]).all(), (run_no, column, err.tolist(), m)
            noisy_values += int((err > 0).sum())
        assert got["count"].dtype.kind == "i"  # discrete noise on counts
    assert noisy_values > 0


def test_small_groups_are_suppressed_on_the_noisy_count(kit) -> None:
    """A group of 3 ids (k 5) and one id repeated 40 times (max_contributions 2: 2 rows count)."""
    bank = "id,region,balance\n" + "".join(f"b{i},big,10\n" for i in range(300))
    bank += "".join(f"s{i},small,10\n" for i in range(3)) + "lone,lone,10\n" * 40
    shop = "customer,spend\n" + "".join(f"b{i},1\n" for i in range(300))
    shop += "".join(f"s{i},1\n" for i in range(3)) + "lone,1\n"
    params = dp_params(max_contributions=2, epsilon=2.0)
    result, body, outs = task(kit, upload(kit, {"bank": bank.encode(), "shop": shop.encode()}), params)
    assert result["ok"], body
    got, report = outputs(kit, outs)
    assert got["region"].tolist() == ["big"]  # small (3 ids) and lone (2 rows kept) below threshold
    assert report["dp"]["threshold"] > 5 and report["dp"]["max_contributions"] == 2
    assert abs(int(got["count"][0]) - 300) <= 12 * report["dp"]["measurements"][0]["scale"]


def test_budget_is_charged_and_a_task_past_it_is_refused_naming_the_dataset(kit) -> None:
    data = upload(kit, tables(3, 400))
    params = dp_params(epsilon=0.4, budget={"bank": 1, "shop": 50})
    for _ in range(2):
        result, body, _ = task(kit, data, params)
        assert result["ok"], body
    result, body, outs = task(kit, data, params)  # 0.8 spent + 0.4 > 1
    message = refused(result, body)
    assert f"dataset {data['bank'].dataset_id}" in message and "privacy budget exhausted" in message
    assert "spent epsilon 0.8 of its total 1" in message
    assert not outs["result"].exists() and not outs["report"].exists()
    result, body, _ = task(kit, data, dp_params(epsilon=0.2, budget={"bank": 1, "shop": 50}))
    assert result["ok"], body  # 0.4 + 0.4 + 0.2 is exactly 1 (decimal accounting)
    result, body, _ = task(kit, data, dp_params(epsilon=0.01, budget={"bank": 1, "shop": 50}))
    refused(result, body)
    # the owner raises the total by approving a manifest that says so; the host cannot (signed)
    result, body, _ = task(kit, data, dp_params(epsilon=0.5, budget={"bank": 1.5, "shop": 50}))
    assert result["ok"], body


def test_a_task_without_dp_is_not_charged(kit) -> None:
    data = upload(kit, tables(4, 300))
    params = dp_params(epsilon=1.0, budget={"bank": 1, "shop": 1})
    assert task(kit, data, params)[0]["ok"]
    plain = {k: v for k, v in params.items() if k != "dp"}
    result, body, _ = task(kit, data, plain)  # exact release: the owners approved it as such
    assert result["ok"], body
    refused(*task(kit, data, params)[:2])


@pytest.mark.parametrize(
    ("dp", "field"),
    [
        ({"epsilon": 0}, "params.dp.epsilon must be in (0, 100]"),
        ({"epsilon": -1.0}, "params.dp.epsilon must be in (0, 100]"),
        ({"epsilon": "1"}, "params.dp.epsilon must be a number"),
        ({"epsilon": 1e9}, "params.dp.epsilon must be in (0, 100]"),
        ({"mechanism": "exponential"}, "params.dp.mechanism must be one of laplace, gaussian"),
        ({"delta": 0.5}, "params.dp.delta must be in (0, 0.001]"),
        ({"delta": None}, "params.dp.delta must be a number"),
        ({"max_contributions": 0}, "params.dp.max_contributions must be an integer in 1..1000000"),
        ({"budget": {"bank": 1}}, "params.dp.budget must give each input's total epsilon"),
        ({"budget": {"bank": 1, "shop": 0}}, "params.dp.budget.shop must be in (0, 1e+06]"),
        ({"bounds": {}}, "params.dp.bounds must give [lo, hi] for exactly the summed columns ['balance']"),
        ({"bounds": {"balance": [5, 5]}}, "params.dp.bounds.balance must have lo < hi"),
        ({"bounds": {"balance": [0, "9"]}}, "params.dp.bounds.balance must be a number"),
        ({"bounds": {"balance": [0, 1e16]}}, "params.dp.bounds.balance must be in [-1e+15, 1e+15]"),
        ({"bounds": {"balance": [0, 1, 2]}}, "params.dp.bounds.balance must be [lo, hi]"),
        ({"noise": "none"}, "params.dp has unknown field(s) noise"),
    ],
)
def test_bad_dp_params_are_refused_naming_the_field(kit, dp: dict, field: str) -> None:
    params = dp_params(**dp)
    result, body, _ = task(kit, upload(kit, tables(5, 50)), params)
    assert field in refused(result, body)


def test_dp_params_that_need_a_delta_or_allow_only_counts_and_sums(kit) -> None:
    data = upload(kit, tables(6, 50))
    no_delta = dp_params()
    del no_delta["dp"]["delta"]
    assert "params.dp.delta is required with group_by" in refused(*task(kit, data, no_delta)[:2])
    no_delta["dp"]["mechanism"], no_delta["group_by"] = "gaussian", []
    assert "params.dp.delta is required with the gaussian mechanism" in refused(
        *task(kit, data, no_delta)[:2]
    )
    avg = dp_params()
    avg["aggregates"].append({"op": "avg", "column": "balance"})
    assert "aggregates[2] is not allowed with dp" in refused(*task(kit, data, avg)[:2])


def budget_files(state_dir: Path, dataset_id: str) -> list[Path]:
    return sorted((state_dir / "privacy").glob(f"{dataset_id}-*.sealed"))


def test_a_host_that_edits_or_swaps_the_sealed_budget_is_refused(kit, state_dir: Path) -> None:
    a, b = upload(kit, tables(8, 300)), upload(kit, tables(9, 300))
    for data in (a, b):
        assert task(kit, data, dp_params(budget={"bank": 5, "shop": 5}))[0]["ok"]
    (record,) = budget_files(state_dir, a["bank"].dataset_id)
    blob = bytearray(record.read_bytes())
    blob[-1] ^= 1
    record.write_bytes(bytes(blob))
    message = refused(*task(kit, a, dp_params(budget={"bank": 5, "shop": 5}))[:2])
    assert "sealed privacy budget does not unseal" in message and a["bank"].dataset_id in message
    # b's shop record (1 spent) put in place of a's shop record: bound to its dataset id, refused
    (b_shop,) = budget_files(state_dir, b["shop"].dataset_id)
    (a_shop,) = budget_files(state_dir, a["shop"].dataset_id)
    shutil.copyfile(b_shop, a_shop)
    a_only_shop = {"bank": upload(kit, tables(10, 300))["bank"], "shop": a["shop"]}
    message = refused(*task(kit, a_only_shop, dp_params(budget={"bank": 5, "shop": 5}))[:2])
    assert "does not unseal" in message and a["shop"].dataset_id in message


def test_a_host_that_rolls_the_state_back_gets_the_budget_back_documented_limit(kit, state_dir: Path) -> None:
    """docs/ARCHITECTURE.md: without a TEE-backed monotonic counter the enclave cannot tell an older
    sealed record (or none) from the current one; this test pins that limit so a fix shows."""
    data = upload(kit, tables(11, 300))
    params = dp_params(epsilon=1.0, budget={"bank": 1, "shop": 1})
    assert task(kit, data, params)[0]["ok"]
    refused(*task(kit, data, params)[:2])  # spent
    for record in budget_files(state_dir, data["bank"].dataset_id) + budget_files(
        state_dir, data["shop"].dataset_id
    ):
        record.unlink()  # the host "rolls back" to before the first task
    result, body, _ = task(kit, data, params)
    assert result["ok"], body  # the same budget spent a second time


# ---- the sealed budget in-process (a record that cannot be read or written stops the task) -------


@pytest.fixture
def budget(tmp_path: Path) -> PrivacyBudget:
    plat = SimPlatform.create(tmp_path / "platform")
    backend = SimBackend(plat, EnclaveIdentity("sim", "cd" * 32, SIM_SIGNER, 1, 1, False))
    return PrivacyBudget(backend, tmp_path / "state")


def test_a_budget_that_cannot_be_recorded_or_read_refuses(budget: PrivacyBudget, monkeypatch) -> None:
    from decimal import Decimal

    from confide.enclave import privacy_budget

    totals = {"ab" * 16: (Decimal(2), "input 'a'"), "cd" * 16: (Decimal(2), "input 'b'")}
    assert budget.charge(Decimal("0.5"), totals) == {"ab" * 16: Decimal("0.5"), "cd" * 16: Decimal("0.5")}

    def full_disk(path, fill):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(privacy_budget, "write_atomically", full_disk)
    with pytest.raises(EnclaveError, match="cannot record the privacy budget .No space left on device."):
        budget.charge(Decimal("0.5"), totals)
    monkeypatch.undo()
    with pytest.raises(IntegrityError, match="input 'b': privacy budget exhausted"):
        budget.charge(
            Decimal(1), {"ab" * 16: (Decimal(5), "input 'a'"), "cd" * 16: (Decimal(1), "input 'b'")}
        )
    assert budget.spent("ab" * 16) == Decimal("0.5")  # refused before anything was written
    budget.path("ab" * 16).unlink()
    budget.path("ab" * 16).mkdir()
    with pytest.raises(EnclaveError, match="cannot read the privacy budget"):
        budget.spent("ab" * 16)


def test_the_approval_text_states_epsilon_and_each_inputs_budget(kit) -> None:
    from confide.client.approval import describe_manifest

    data = upload(kit, tables(12, 20))
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("join-aggregate"),
        params=dp_params(epsilon=0.5, budget={"bank": 2, "shop": 7}),
        inputs=[kit.task_input(n, ds) for n, ds in data.items()],
        outputs=[mf.TaskOutput(o, (LAB.fingerprint,)) for o in ("result", "report")],
        participants=PARTIES,
    )
    text = describe_manifest(m)
    assert "laplace noise drawn by OpenDP in the enclave): this task spends epsilon 0.5, delta 1e-07" in text
    assert "budget of input bank: total epsilon 2 for its dataset" in text
    assert "budget of input shop: total epsilon 7 for its dataset" in text
    assert "can spend it again" in text and "at most 1 joined row(s) per key are kept" in text
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("sql"),
        params=sql_params(epsilon=0.25),
        inputs=[kit.task_input(n, ds) for n, ds in data.items()],
        outputs=[mf.TaskOutput(o, (LAB.fingerprint,)) for o in ("result", "report")],
        participants=PARTIES,
    )
    text = describe_manifest(m)
    assert "this task spends epsilon 0.25" in text and "at most 1 row(s) of each table per id" in text
    assert "budget of input shop: total epsilon 100 for its dataset" in text


# ---- join-aggregate's dp path and dp_noise in this process (coverage cannot see the child) --------


def call_in_process(params: dict, t: dict[str, bytes]) -> tuple[pd.DataFrame, dict]:
    from confide.enclave.builtins import join_aggregate
    from confide.enclave.sandbox.context import Context

    outs = {"result": io.BytesIO(), "report": io.BytesIO()}
    join_aggregate.run(Context(params, {k: io.BytesIO(v) for k, v in t.items()}, outs))  # type: ignore[arg-type]
    return pd.read_csv(io.BytesIO(outs["result"].getvalue())), json.loads(outs["report"].getvalue())


def test_in_process_an_empty_join_and_two_sums() -> None:
    """No group_by and nothing joined: the one public group is measured (count 0, released only if
    its noisy count reaches k; at scale 2 and k 50 it does not), and both sums' shares are spent."""
    t = {"bank": b"id,balance,region\nx,1,r\n", "shop": b"customer,spend\ny,1\n"}
    params = dp_params(epsilon=0.9, bounds={"balance": [-5, 5], "spend": [0, 1]})
    params.update(group_by=[], k=50)
    params["aggregates"] += [{"op": "sum", "column": "spend"}]
    got, report = call_in_process(params, t)
    assert got.empty and list(got.columns) == ["count", "sum(balance)", "sum(spend)"]
    dp = report["dp"]
    assert [m["statistic"] for m in dp["measurements"]] == ["count", "sum", "sum"]
    assert [m.get("column") for m in dp["measurements"]] == [None, "balance", "spend"]
    assert dp["epsilon_measured"] == pytest.approx(0.9, rel=1e-5) and dp["epsilon_measured"] <= 0.9
    assert report["groups"] == 0 and dp["threshold"] == 50


def test_in_process_clamping_and_truncation_bound_each_keys_share() -> None:
    """A key with 1000 rows of balance 10^9 adds at most m = 1 row clamped to 1000: the noisy sum
    stays within 12 scales of the clamped, truncated exact sum."""
    bank = (
        "id,region,balance\n"
        + "".join(f"k{i},r,{i % 900}\n" for i in range(400))
        + "huge,r,1000000000\n" * 1000
    )
    shop = "customer,spend\n" + "".join(f"k{i},1\n" for i in range(400)) + "huge,1\n"
    got, report = call_in_process(dp_params(epsilon=4.0), {"bank": bank.encode(), "shop": shop.encode()})
    count_m, sum_m = report["dp"]["measurements"]
    assert abs(int(got["count"][0]) - 401) <= 12 * count_m["scale"]
    exact_sum = sum(i % 900 for i in range(400)) + 1000
    assert abs(float(got["sum(balance)"][0]) - exact_sum) <= 12 * sum_m["scale"]


def test_dp_noise_refuses_a_delta_no_threshold_can_meet() -> None:
    from confide.enclave.builtins import dp_noise

    with pytest.raises(ValueError, match="no threshold meets the delta"):
        dp_noise.release(
            {'["a"]': 10}, [], public=False, k=2, epsilon=1e-6, mechanism="laplace", delta=1e-300,
            m=1000, sum_bounds=[], sum_ulp=[],
        )  # fmt: skip


# ---- sql: COUNT(*) and SUM under dp --------------------------------------------------------------

SQL_RULE = {
    "tables": {
        "bank": {"columns": ["region", "balance"], "join_columns": ["id"], "id_column": "id"},
        "shop": {"columns": ["spend"], "join_columns": ["customer"], "id_column": "customer"},
    },
    "aggregates": ["count", "sum", "avg"],
    "min_group_size": 5,
}
SQL_QUERY = (
    "SELECT b.region, count(*) AS n, sum(b.balance) AS total FROM bank AS b "
    "JOIN shop AS s ON b.id = s.customer GROUP BY b.region"
)


def sql_params(query: str = SQL_QUERY, rule: dict | None = None, **dp) -> dict:
    base = {"epsilon": 1.0, "delta": 1e-7, "max_contributions": 1, "bounds": {"bank.balance": [0, 1000]}}
    base["budget"] = {"bank": 100, "shop": 100}
    return {"query": query, "rule": rule or SQL_RULE, "dp": {**base, **dp}}


def sql_task(kit, datasets: dict, params: dict):
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("sql"),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput(o, (LAB.fingerprint,)) for o in ("result", "report")],
        participants=PARTIES,
    )
    approvals = [sign_approval(ds.owner, m) for ds in datasets.values()] + [sign_approval(LAB, m)]
    return kit.run(m, approvals, datasets)


def error_text(kit, outs) -> str:
    return kit.read(outs["_error"], LAB).rstrip(b"\0").decode()


def test_sql_noisy_count_and_sum_within_the_mechanisms_error(kit) -> None:
    t = tables(21)
    want = exact(t, ["region"])
    for mechanism in ("laplace", "gaussian"):
        result, body, outs = sql_task(kit, upload(kit, t), sql_params(mechanism=mechanism))
        assert result["ok"], (body, error_text(kit, outs))
        got, report = outputs(kit, outs)
        dp = report["dp"]
        assert dp["mechanism"] == mechanism and dp["epsilon_spent"] == 1.0 and dp["rows_per_person"] == 1
        assert [m.get("column") for m in dp["measurements"]] == [None, "bank.balance"]
        assert list(got.columns) == ["region", "n", "total"] and got["region"].tolist() == sorted(
            want["region"]
        )
        want_by = want.set_index("region").loc[got["region"]]
        count_m, sum_m = dp["measurements"]
        assert ((got["n"] - want_by["count"].to_numpy()).abs() <= 12 * count_m["scale"]).all()
        assert ((got["total"] - want_by["sum(balance)"].to_numpy()).abs() <= 12 * sum_m["scale"]).all()


def test_sql_contributions_are_bounded_per_id_and_across_the_join(kit) -> None:
    """One id with 50 rows in each table would join to 2500 rows; with m = 2 it adds 2 x 2 = 4."""
    bank = "id,region,balance\n" + "".join(f"{i},r,1\n" for i in range(300)) + "7777,r,1\n" * 50
    shop = "customer,spend\n" + "".join(f"{i},1\n" for i in range(300)) + "7777,1\n" * 50
    t = {"bank": bank.encode(), "shop": shop.encode()}
    result, body, outs = sql_task(kit, upload(kit, t), sql_params(max_contributions=2, epsilon=4.0))
    assert result["ok"], (body, error_text(kit, outs))
    got, report = outputs(kit, outs)
    assert report["dp"]["rows_per_person"] == 4
    count_scale = report["dp"]["measurements"][0]["scale"]
    assert count_scale == pytest.approx(4 / 2.0, rel=1e-4)  # sensitivity 4, epsilon share 2
    assert abs(int(got["n"][0]) - 304) <= 12 * count_scale  # not 2800


@pytest.mark.parametrize(
    ("query", "rule", "message"),
    [
        (SQL_QUERY + " HAVING count(*) > 3", None, "(HAVING): with dp a filter on exact aggregates"),
        (SQL_QUERY + " ORDER BY total", None, "(ORDER BY/LIMIT)"),
        (SQL_QUERY.replace("sum(b.balance)", "avg(b.balance)"), None, "(SELECT): with dp only GROUP BY"),
        (SQL_QUERY.replace("count(*)", "count(DISTINCT b.balance)"), None, "(SELECT): with dp only GROUP BY"),
        (SQL_QUERY.replace("sum(b.balance)", "sum(s.spend)"), None, "bounds must give [lo, hi] for exactly"),
        (
            SQL_QUERY,
            {
                **SQL_RULE,
                "tables": {
                    **SQL_RULE["tables"],
                    "shop": {"columns": ["spend"], "join_columns": ["customer"]},
                },
            },
            "(FROM): with dp table 'shop' needs an id_column",
        ),
        (
            SQL_QUERY,
            {
                **SQL_RULE,
                "tables": {
                    **SQL_RULE["tables"],
                    "bank": {
                        "columns": ["region", "balance"],
                        "join_columns": ["id", "region"],
                        "id_column": "id",
                    },
                },
            },
            "(JOIN): with dp table 'bank' may be joined on its id_column 'id' only",
        ),
    ],
)
def test_sql_queries_dp_cannot_bound_are_refused_naming_the_clause(kit, query, rule, message) -> None:
    result, _, outs = sql_task(kit, upload(kit, tables(22, 60)), sql_params(query, rule))
    assert not result["ok"] and result["category"] == "exception"
    assert message in error_text(kit, outs)


def test_sql_dp_is_charged_and_needs_a_delta(kit) -> None:
    data = upload(kit, tables(23, 200))
    params = sql_params(epsilon=0.6, budget={"bank": 1, "shop": 1})
    assert sql_task(kit, data, params)[0]["ok"]
    message = refused(*sql_task(kit, data, params)[:2])
    assert f"dataset {data['bank'].dataset_id}" in message or f"dataset {data['shop'].dataset_id}" in message
    no_delta = sql_params()
    del no_delta["dp"]["delta"]
    assert "params.dp.delta is required with sql" in refused(*sql_task(kit, data, no_delta)[:2])


def test_sql_dp_in_process_without_group_by() -> None:
    """sql's dp path in this process (the child's lines are invisible to coverage): one public
    group, its noisy count within 12 scales, two sums of one bounded column both measured."""
    from confide.enclave.builtins import sql as sql_builtin
    from confide.enclave.sandbox.context import Context

    t = tables(24, 300)
    query = (
        "SELECT count(*), sum(b.balance), sum(b.balance) FROM bank AS b JOIN shop AS s ON b.id = s.customer"
    )
    outs = {"result": io.BytesIO(), "report": io.BytesIO()}
    sql_builtin.run(Context(sql_params(query), {k: io.BytesIO(v) for k, v in t.items()}, outs))  # type: ignore[arg-type]
    got = pd.read_csv(io.BytesIO(outs["result"].getvalue()))
    report = json.loads(outs["report"].getvalue())
    want = exact(t, [])
    assert report["rows"] == len(got) == 1 and report["dp"]["threshold"] == 5
    count_m, first, second = report["dp"]["measurements"]
    assert first["column"] == second["column"] == "bank.balance"
    assert abs(int(got.iloc[0, 0]) - int(want["count"][0])) <= 12 * count_m["scale"]
    for col in (1, 2):
        assert abs(float(got.iloc[0, col]) - float(want["sum(balance)"][0])) <= 12 * first["scale"]
