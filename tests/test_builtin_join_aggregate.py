"""The built-in join-aggregate v1 (private join and compute with a minimum cohort), run as tasks in a
real enclave worker (sandboxed like any party's function), checked against an independent pandas
computation; and one task end to end on a real server through the SDK helper."""

from __future__ import annotations

import io
import json
import unicodedata
from decimal import Context, Decimal
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from confide.client import analytics
from confide.client.approval import describe_manifest
from confide.client.manifest_build import build_manifest
from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity
from platform_support import ServerProcess, sdk_clients, upload_tables

LAB = Identity.generate("lab")
BANK = Identity.generate("bank")
SHOP = Identity.generate("shop")
PARTIES = {"lab": LAB.public, "bank": BANK.public, "shop": SHOP.public}
OWNERS = {"bank": BANK, "shop": SHOP}
NAMES = ["Ann", "Zoë", "Straße", "李", "Bob", "Carl", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida"]


def key_variant(rng: np.random.Generator, i: int) -> str:
    s = f"{NAMES[i % len(NAMES)]}-{i}"
    choice = int(rng.integers(0, 4))
    if choice == 1:
        s = s.upper()
    elif choice == 2:
        s = f" {s}  "
    elif choice == 3:
        s = unicodedata.normalize("NFD", s)
    return s


def bank_table(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    ids = [key_variant(rng, int(i)) for i in rng.integers(0, 150, n)]
    regions = rng.choice(["north", "south", "east", "west", "isle"], n, p=[0.3, 0.3, 0.2, 0.19, 0.01])
    cents = zip(rng.integers(-500, 5000, n), rng.integers(0, 100, n), strict=True)
    balances = [f"{int(c)}.{int(d):02d}" for c, d in cents]
    frame = pd.DataFrame({"id": ids, "region": regions, "balance": balances})
    return frame.to_csv(index=False).encode("utf-8")


def shop_table(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    ids = [key_variant(rng, int(i)) for i in rng.integers(0, 200, n)]
    segments = rng.choice(["gold", "plain"], n)
    spend = [str(int(x)) if x % 7 else "" for x in rng.integers(0, 10**6, n)]  # some missing
    frame = pd.DataFrame({"customer": ids, "segment": segments, "spend": spend})
    return frame.to_csv(index=False).encode("utf-8")


def norm(s: str) -> str:
    return unicodedata.normalize("NFC", s.strip()).casefold()


def reference(bank: bytes, shop: bytes, k: int) -> tuple[list[list[str]], int]:
    """pandas: read, merge, group; Decimal/Fraction for the numbers; cohorts by distinct keys."""
    b = pd.read_csv(io.BytesIO(bank), dtype=str, keep_default_na=False)
    s = pd.read_csv(io.BytesIO(shop), dtype=str, keep_default_na=False)
    b["key"], s["key"] = b["id"].map(norm), s["customer"].map(norm)
    joined = b[b["key"] != ""].merge(s[s["key"] != ""], on="key", how="inner")
    rows, suppressed = [], 0
    for (region, segment), g in joined.groupby(["region", "segment"], sort=True):
        if g["key"].nunique() < k:
            suppressed += 1
            continue
        balance = [Decimal(v) for v in g["balance"]]
        spend = [Decimal(v) for v in g["spend"] if v != ""]
        avg = round(Fraction(sum(spend, Decimal(0))) * 100 / len(spend)) if spend else None
        rows.append(
            [
                region,
                segment,
                str(len(g)),
                str(sum(balance, Decimal(0))),
                "" if avg is None else str(Decimal(avg).scaleb(-2)),
                str(min(balance)),
                str(max(spend)) if spend else "",
                str(len(spend)),
            ]
        )
    return rows, suppressed


AGGS = [
    {"op": "count"},
    {"op": "sum", "column": "balance"},
    {"op": "avg", "column": "spend", "as": "avg_spend"},
    {"op": "min", "column": "bank.balance"},
    {"op": "max", "column": "spend"},
    {"op": "count", "column": "spend", "as": "spenders"},
]
PARAMS = {
    "key": {"bank": "id", "shop": "customer"},
    "k": 5,
    "group_by": ["region", "segment"],
    "aggregates": AGGS,
    "avg_places": 2,
}


def manifest(kit, datasets: dict, params: dict):
    return build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("join-aggregate"),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput("result", (LAB.fingerprint,)), mf.TaskOutput("report", (LAB.fingerprint,))],
        participants=PARTIES,
    )


def run(kit, tables: dict[str, bytes], params: dict):
    return kit.run_builtin(
        "join-aggregate",
        tables,
        params,
        owners=OWNERS,
        creator=LAB,
        outputs=("result", "report"),
        participants=PARTIES,
    )


def result_rows(kit, outs) -> tuple[list[str], list[list[str]]]:
    frame = pd.read_csv(io.BytesIO(kit.read(outs["result"], LAB)), dtype=str, keep_default_na=False)
    return list(frame.columns), frame.to_numpy().tolist()


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def test_join_aggregate_agrees_with_pandas_and_suppresses_small_groups(kit) -> None:
    bank, shop = bank_table(1, 600), shop_table(2, 500)
    result, body, outs = run(kit, {"bank": bank, "shop": shop}, {**PARAMS, "k": 10})
    assert result["ok"], body
    expect, suppressed = reference(bank, shop, k=10)
    header, rows = result_rows(kit, outs)
    assert header == [
        *("region", "segment", "count", "sum(balance)", "avg_spend", "min(bank.balance)"),
        *("max(spend)", "spenders"),
    ]
    assert rows == expect
    assert suppressed >= 1 and len(expect) >= 4  # "isle" is rare: some groups fall below k
    report = json.loads(kit.read(outs["report"], LAB))
    assert report == {
        "function": "join-aggregate",
        "version": "1",
        "k": 10,
        "groups": len(expect),
        "suppressed_groups": suppressed,
    }


def test_cohorts_count_distinct_keys_not_rows(kit) -> None:
    """One customer repeated in many rows is still one id: its group is suppressed at k = 2."""
    bank = b"id,region,balance\n" + b"ann,solo,1\n" * 30 + b"bob,pair,1\ncat,pair,2\n"
    shop = b"customer,segment,spend\n" + b"ANN,x,1\n" * 30 + b"Bob ,x,1\n cat,x,1\n"
    params = {"key": PARAMS["key"], "k": 2, "group_by": ["region"], "aggregates": [{"op": "count"}]}
    result, body, outs = run(kit, {"bank": bank, "shop": shop}, params)
    assert result["ok"], body
    assert result_rows(kit, outs) == (["region", "count"], [["pair", "2"]])
    assert json.loads(kit.read(outs["report"], LAB))["suppressed_groups"] == 1


def test_sums_are_exact(kit) -> None:
    """Beyond int64 and float precision: 3 x 10^25 + 7 and 0.1 + 0.2 are exact (Teaclave overflowed)."""
    big = 10**25
    bank = f"id,region,balance\na,r,{big}\nb,r,{big}\nc,r,{big + 7}\nd,s,0.1\ne,s,0.2\n".encode()
    shop = b"customer,segment,spend\na,x,1\nb,x,1\nc,x,1\nd,x,1\ne,x,1\n"
    params = {
        "key": PARAMS["key"],
        "k": 2,
        "group_by": ["region"],
        "aggregates": [{"op": "sum", "column": "balance"}, {"op": "avg", "column": "balance"}],
        "avg_places": 3,
    }
    result, body, outs = run(kit, {"bank": bank, "shop": shop}, params)
    assert result["ok"], body
    _, rows = result_rows(kit, outs)
    third = Decimal(round(Fraction(3 * big + 7, 3) * 1000)).scaleb(-3, Context(prec=60))
    assert rows == [["r", str(3 * big + 7), str(third)], ["s", "0.3", "0.150"]]
    assert float(big) * 3 + 7 != 3 * big + 7  # what a float sum would have said


def test_empty_inputs_give_no_groups(kit) -> None:
    result, body, outs = run(kit, {"bank": b"id,region,balance\n", "shop": shop_table(3, 20)}, PARAMS)
    assert result["ok"], body
    header, rows = result_rows(kit, outs)
    assert rows == [] and header[:2] == ["region", "segment"]
    assert json.loads(kit.read(outs["report"], LAB))["groups"] == 0


@pytest.mark.parametrize(
    ("tables", "params", "message"),
    [
        (None, {**PARAMS, "k": 1}, "k must be an integer of at least 2"),
        (None, {**PARAMS, "k": 0}, "k must be an integer of at least 2"),
        (None, {**PARAMS, "k": True}, "k must be an integer of at least 2"),
        (None, {k: v for k, v in PARAMS.items() if k != "k"}, "parameter 'k'"),
        (
            {"bank": b"id,region,balance\n", "shop": b"cust,segment,spend\n"},
            PARAMS,
            "input 'shop' has no key column 'customer'",
        ),
        (
            {"bank": b"id,region\n", "shop": b"customer,segment,spend\n"},
            PARAMS,
            "no input has a column 'balance'",
        ),
        (
            {"bank": b"id,region,balance\na,r,1\nb,r,12x\n", "shop": b"customer,segment,spend\na,s,1\n"},
            PARAMS,
            "input 'bank', column 'balance', data row 2: '12x' is not a number",
        ),
        (
            {"bank": b"id,region,balance\na,r," + b"9" * 5000 + b"\n", "shop": b"customer,segment,spend\n"},
            PARAMS,
            "input 'bank', column 'balance', data row 1: a field of 5000 characters",
        ),
        (
            {"bank": b"id,region,balance\na,r\xe9gion,1\n", "shop": b"customer,segment,spend\n"},
            PARAMS,
            "input 'bank' is not UTF-8 text (byte 21, line 2)",
        ),
        (
            {"bank": b"id,region,balance\n", "shop": b"customer,segment,spend,region\n"},
            PARAMS,
            "column 'region' is in inputs ['bank', 'shop']: write it as input.column",
        ),
        (None, {**PARAMS, "aggregates": [{"op": "median", "column": "spend"}]}, "op 'median' is not one of"),
        (
            {
                "bank": b"id,region,balance\n" + b"a,r,1\n" * 300,
                "shop": b"customer,segment,spend\n" + b"A,s,1\n" * 400,
            },
            {**PARAMS, "max_join_rows": 100_000},
            "joining input 'shop' would make 120000 rows (max_join_rows is 100000)",
        ),
    ],
)
def test_bad_parameters_and_hostile_inputs_get_a_clear_error(kit, tables, params, message) -> None:
    tables = tables or {"bank": bank_table(4, 20), "shop": shop_table(5, 20)}
    result, body, outs = run(kit, tables, params)
    assert result["ok"] is False and result["category"] == "exception"
    assert body["error"]["check"] == "run"
    assert message in kit.read(outs["_error"], LAB).decode()
    assert not outs["result"].exists() and not outs["report"].exists()


def test_approval_text_names_k_groups_and_recipients(kit) -> None:
    datasets = {"bank": kit.dataset(BANK, bank_table(6, 5)), "shop": kit.dataset(SHOP, shop_table(7, 5))}
    text = describe_manifest(manifest(kit, datasets, PARAMS))
    assert "join: inner join of bank, shop on 'id' of bank, 'customer' of shop" in text
    assert f"result -> lab ({LAB.fingerprint}): per group of region, segment: count(*), sum(balance)" in text
    assert "only groups with at least k = 5 distinct keys" in text
    assert "how many groups were released and how many suppressed" in text
    assert "min and max release one row's exact value per group" in text


def test_join_aggregate_end_to_end_on_a_server(tmp_path) -> None:
    srv = ServerProcess(tmp_path / "data", workers=1).start()
    clients = []
    try:
        clients = sdk_clients(srv, tmp_path, ("bank", "shop", "lab"))
        bank, shop, lab = clients
        tables = {"bank": bank_table(8, 300), "shop": shop_table(9, 300)}
        refs = upload_tables({"bank": bank, "shop": shop}, tables, tmp_path)
        with pytest.raises(ConfideError, match="k must be an integer of at least 2"):
            analytics.join_aggregate(lab, inputs=refs, key=PARAMS["key"], k=1)
        task = analytics.join_aggregate(
            lab,
            inputs=refs,
            key=PARAMS["key"],
            k=5,
            group_by=PARAMS["group_by"],
            aggregates=AGGS,
            avg_places=2,
        )
        for c in clients:
            c.approve(task)
        lab.run(task)
        assert lab.wait(task, timeout=120)["state"] == "succeeded"
        got = lab.results(task, tmp_path / "out").outputs
        expect, suppressed = reference(tables["bank"], tables["shop"], k=5)
        frame = pd.read_csv(got["result"], dtype=str, keep_default_na=False)
        assert frame.to_numpy().tolist() == expect
        assert json.loads(got["report"].read_bytes())["suppressed_groups"] == suppressed
        assert bank.results(task, tmp_path / "bank-out").outputs == {}
    finally:
        for c in clients:
            c.close()
        srv.stop()
