"""join-aggregate reads Parquet inputs (issue 10, data formats), run as tasks in a real enclave worker
(sandboxed): typed Parquet columns give exactly what the same table as CSV gives, Parquet and CSV mix,
an independent pandas computation agrees, and encrypted (PME) or broken Parquet gets a clear error."""

from __future__ import annotations

import io
import json
from decimal import Decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest

from confide.enclave import parquet_keys as pk
from confide.enclave.builtins import join_aggregate
from confide.enclave.keys import Identity
from confide.enclave.sandbox.context import Context

LAB = Identity.generate("lab")
BANK = Identity.generate("bank")
SHOP = Identity.generate("shop")
PARTIES = {"lab": LAB.public, "bank": BANK.public, "shop": SHOP.public}
OWNERS = {"bank": BANK, "shop": SHOP}
PARAMS = {
    "key": {"bank": "id", "shop": "customer"},
    "k": 3,
    "group_by": ["region", "segment"],
    "aggregates": [
        {"op": "count"},
        {"op": "sum", "column": "balance"},
        {"op": "avg", "column": "score"},
        {"op": "max", "column": "spend"},
        {"op": "count", "column": "spend", "as": "spenders"},
    ],
    "avg_places": 4,
}


def tables(seed: int, n: int) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(seed)
    ids = [f"Id-{int(i)}" if i % 3 else f" ID-{int(i)} " for i in rng.integers(0, 80, n)]
    cents = rng.integers(-50_000, 500_000, n)
    balance = pa.array(
        [None if i % 11 == 0 else Decimal(int(c)).scaleb(-2) for i, c in enumerate(cents)],
        pa.decimal128(12, 2),
    )
    score = pa.array([None if i % 13 == 0 else float(x) for i, x in enumerate(rng.normal(0, 1e3, n))])
    bank = pa.table(
        {"id": ids, "region": rng.choice(["north", "south", "east"], n), "balance": balance, "score": score}
    )
    customers = [f"id-{int(i)}" for i in rng.integers(0, 100, n)]
    spend = pa.array([None if x % 7 == 0 else int(x) for x in rng.integers(0, 10**12, n)], pa.int64())
    shop = pa.table({"customer": customers, "segment": rng.choice([True, False], n), "spend": spend})
    return bank, shop


def as_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, table.num_rows // 3))  # several row groups
    return bytes(sink.getvalue().to_pybytes())


def as_csv(table: pa.Table) -> bytes:
    """The CSV a person would write for the table: empty cells for nulls, floats as shortest decimals."""
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if pa.types.is_floating(table.column(name).type):
            columns[name] = ["" if v is None else format(Decimal(repr(v)), "f") for v in values]
        elif pa.types.is_boolean(table.column(name).type):
            columns[name] = ["" if v is None else str(v).lower() for v in values]
        else:
            columns[name] = ["" if v is None else str(v) for v in values]
    return pd.DataFrame(columns).to_csv(index=False).encode()


def run(kit, inputs: dict[str, bytes], params: dict):
    return kit.run_builtin(
        "join-aggregate",
        inputs,
        params,
        owners=OWNERS,
        creator=LAB,
        outputs=("result", "report"),
        participants=PARTIES,
    )


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def test_parquet_inputs_give_what_the_same_tables_as_csv_give(kit) -> None:
    bank, shop = tables(1, 400)
    results = []
    for inputs in (
        {"bank": as_csv(bank), "shop": as_csv(shop)},
        {"bank": as_parquet(bank), "shop": as_parquet(shop)},
        {"bank": as_parquet(bank), "shop": as_csv(shop)},
    ):
        result, _, outs = run(kit, inputs, PARAMS)
        assert result["ok"], kit.read(outs["_error"], LAB).replace(b"\x00", b"").decode()[:3000]
        results.append((kit.read(outs["result"], LAB), json.loads(kit.read(outs["report"], LAB))))
    assert results[0] == results[1] == results[2]
    frame = pd.read_csv(io.BytesIO(results[1][0]), dtype=str, keep_default_na=False)
    assert len(frame) >= 3 and results[1][1]["suppressed_groups"] >= 0
    # independent: pandas on the Arrow tables, keys normalised as the built-in does
    b, s = bank.to_pandas(), shop.to_pandas()
    b["key"], s["key"] = b["id"].str.strip().str.casefold(), s["customer"].str.strip().str.casefold()
    joined = b.merge(s, on="key")
    for _, row in frame.iterrows():
        group = joined[
            (joined["region"] == row["region"]) & (joined["segment"] == (row["segment"] == "true"))
        ]
        assert group["key"].nunique() >= PARAMS["k"]
        assert int(row["count"]) == len(group)
        assert Decimal(row["sum(balance)"]) == sum((v for v in group["balance"] if v is not None), Decimal(0))
        assert int(row["spenders"]) == int(group["spend"].notna().sum())
        assert row["max(spend)"] == str(int(group["spend"].max()))


def pme_file(table: pa.Table) -> bytes:
    keys = {"kf": b"0" * 16, "kc": b"1" * 16}
    kms = pk.EnclaveKms(keys, where="test")
    config = pe.EncryptionConfiguration(footer_key="kf", column_keys={"kc": ["balance"]})
    props = pe.CryptoFactory(lambda _c: kms).file_encryption_properties(pe.KmsConnectionConfig(), config)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, encryption_properties=props)
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize(
    ("bank", "message"),
    [
        ("pme", "input 'bank' is Parquet with modular encryption but not a Confide PME dataset"),
        ("truncated", "input 'bank' is not a readable Parquet file"),
        ("nan", "input 'bank', column 'score', data row 2: nan is not a number"),
        ("nested", "input 'bank', column 'balance': a list<element: int64> column cannot be read as text"),
    ],
)
def test_encrypted_or_broken_parquet_gets_a_clear_error(kit, bank: str, message: str) -> None:
    good, shop = tables(2, 30)
    data = {
        "pme": lambda: pme_file(good),
        "truncated": lambda: as_parquet(good)[:-40] + b"PAR1",
        "nan": lambda: as_parquet(good.set_column(3, "score", pa.array([1.0, float("nan")] + [0.0] * 28))),
        "nested": lambda: as_parquet(good.set_column(2, "balance", pa.array([[1, 2]] * 30))),
    }[bank]()
    result, _, outs = run(kit, {"bank": data, "shop": as_parquet(shop)}, PARAMS)
    assert result["ok"] is False and result["category"] == "exception"
    error = kit.read(outs["_error"], LAB).decode()
    assert message in error, error.replace("\x00", "")[:3000]
    assert not outs["result"].exists()


def call_in_process(inputs: dict[str, bytes], params: dict) -> tuple[bytes, bytes]:
    """run(ctx) in this process, where coverage sees the lines (the sandboxed runs above are the real ones)."""
    outs = {"result": io.BytesIO(), "report": io.BytesIO()}
    join_aggregate.run(Context(dict(params), {k: io.BytesIO(v) for k, v in inputs.items()}, dict(outs)))  # type: ignore[arg-type]
    return outs["result"].getvalue(), outs["report"].getvalue()


def test_in_process_parquet_and_csv_agree_and_errors_name_input_and_column() -> None:
    bank, shop = tables(3, 120)
    assert call_in_process({"bank": as_parquet(bank), "shop": as_csv(shop)}, PARAMS) == call_in_process(
        {"bank": as_csv(bank), "shop": as_parquet(shop)}, PARAMS
    )
    twice = pa.Table.from_arrays([bank.column(0), bank.column(0)], names=["id", "id"])
    with pytest.raises(ValueError, match="input 'bank': a Parquet file with repeated column names"):
        call_in_process({"bank": as_parquet(twice), "shop": as_csv(shop)}, PARAMS)
    with pytest.raises(ValueError, match="input 'bank' is Parquet with modular encryption"):
        call_in_process({"bank": pme_file(bank), "shop": as_csv(shop)}, PARAMS)
    inf = bank.set_column(3, "score", pa.array([float("inf")] * bank.num_rows))
    with pytest.raises(ValueError, match="input 'bank', column 'score', data row 1: inf is not a number"):
        call_in_process({"bank": as_parquet(inf), "shop": as_csv(shop)}, PARAMS)
