"""Parquet sources of a dataflow job (issue 8, sources): plain Parquet and Parquet with modular
encryption packed with its master keys (parquet-mr's file from ../shared/testvectors), read in the
enclave's sandbox one share of the row groups per partition; every row read exactly once whatever the
partition count, values typed as documented, and a wrong master key fails the job naming stage and
partition."""

from __future__ import annotations

import datetime
import decimal
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from confide.client import pme_dataset
from confide.enclave.flow import FlowTaskError
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.enclave.sandbox.zygote import PARQUET_READER
from confide.flow import Flow, LocalEngine, seal_text
from flow_support import enclave_identity, make_enclave, recipient, run_and_open

__all__ = ["enclave_identity", "recipient"]  # fixtures

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "parquet"
JAVA_FILE = VECTORS / "external_key_material_java.parquet.encrypted"
JAVA_KEY_MATERIAL = VECTORS / "_KEY_MATERIAL_FOR_external_key_material_java.parquet.encrypted.json"
MASTER_KEYS = {"kf": b"0123456789012345", "kc1": b"1234567890123450", "kc2": b"1234567890123451"}

FUNCTIONS = """
def ident(r):
    return r

def by_city(r):
    return (r["city"], r["amount"])

def add(a, b):
    return a + b

def integers(r):
    return ("all", r["integers"])
"""


@pytest.fixture(scope="module")
def engine(enclave_identity: Identity):
    zygote = Zygote.start(preimport=(PARQUET_READER,))  # as the flow workers start theirs
    yield LocalEngine([make_enclave(zygote, enclave_identity)])
    zygote.close()


def table(n: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "city": pa.array([["Lyon", "Köln", "東京"][i % 3] for i in range(n)]),
            "amount": pa.array([i * 0.5 for i in range(n)]),
            "paid": pa.array([i % 2 == 0 for i in range(n)]),
            "price": pa.array([decimal.Decimal(i).scaleb(-2) for i in range(n)], pa.decimal128(10, 2)),
            "day": pa.array([datetime.date(2026, 1, 1) + datetime.timedelta(days=i) for i in range(n)]),
            "tags": pa.array([[i, i + 1] if i % 4 else None for i in range(n)], pa.list_(pa.int64())),
        }
    )


def parquet_bytes(t: pa.Table, row_group_size: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, row_group_size=row_group_size)
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("partitions", [1, 3, 7])
def test_every_row_once_typed_as_documented(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity, partitions: int
) -> None:
    t = table(50)
    path = seal_text(tmp_path / "in.sealed", parquet_bytes(t, 10), [enclave_identity.public], chunk_size=4096)
    flow = Flow(FUNCTIONS)
    rows = flow.parquet(path, partitions=partitions)
    got = run_and_open(
        flow,
        {"rows": rows.map("ident"), "sums": rows.map("by_city").reduce_by_key("add")},
        engine,
        recipient,
        tmp_path / "out",
    )
    want = [
        {
            "id": i,
            "city": ["Lyon", "Köln", "東京"][i % 3],
            "amount": i * 0.5,
            "paid": i % 2 == 0,
            "price": str(decimal.Decimal(i).scaleb(-2)),
            "day": (datetime.date(2026, 1, 1) + datetime.timedelta(days=i)).isoformat(),
            "tags": [i, i + 1] if i % 4 else None,
        }
        for i in range(50)
    ]
    assert sorted(got["rows"], key=lambda r: r["id"]) == want  # 5 row groups over 1, 3 or 7 partitions
    sums: Counter[str] = Counter()
    for r in want:
        sums[r["city"]] += r["amount"]
    assert dict(got["sums"]) == dict(sums)


pme = pytest.mark.skipif(not JAVA_FILE.exists(), reason="../shared/testvectors/parquet is missing")


def java_bundle(keys: dict[str, bytes]) -> bytes:
    return pme_dataset.pack(JAVA_FILE.read_bytes(), keys, JAVA_KEY_MATERIAL.read_bytes())


@pme
def test_parquet_mrs_encrypted_file_as_a_source(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    path = seal_text(
        tmp_path / "in.sealed", java_bundle(MASTER_KEYS), [enclave_identity.public], chunk_size=1024
    )
    flow = Flow(FUNCTIONS)
    total = flow.parquet(path, partitions=2).map("integers").reduce_by_key("add")
    got = run_and_open(flow, {"total": total}, engine, recipient, tmp_path / "out")
    assert got["total"] == [("all", 4950)]  # the documented contents: integers 0..99


@pme
def test_a_wrong_master_key_fails_the_job_naming_stage_and_partition(
    tmp_path: Path, engine: LocalEngine, enclave_identity: Identity, recipient: Identity
) -> None:
    bad = java_bundle({**MASTER_KEYS, "kc1": b"7" * 16})
    path = seal_text(tmp_path / "in.sealed", bad, [enclave_identity.public])
    flow = Flow(FUNCTIONS)
    with pytest.raises(
        FlowTaskError, match=r"stage 0 partition 0: .*exception \(confide.enclave.errors.IntegrityError\)"
    ):
        run_and_open(flow, {"total": flow.parquet(path).map("integers")}, engine, recipient, tmp_path / "out")
    assert not (tmp_path / "out" / "total").exists()
