"""psi, join-aggregate and sql in the enclave (sim backend, real sandbox) vs the same computation in
plain pandas / plain DuckDB, side by side in one run; results in bench/results/analytics.json.

Enclave time is the host's whole `task` call: consent checks, decrypting both inputs, the sandboxed
built-in, sealing its outputs, the receipt. Plain time is pandas reading the same CSV bytes from
memory, normalising the ids (strip, NFC, casefold) and intersecting; for join-aggregate, pandas
merge + groupby with int64 sums (the enclave's sums are exact decimals). For sql: a lineitem-like
table generated with numpy (DuckDB's tpch extension downloads from the internet and is not used) and
two queries of TPC-H Q1 and Q6 shape as the analysis rule allows them (no arithmetic inside an
aggregate: Q1's sum(price * (1 - discount)) and Q6's sum(price * discount) are left out; dates are
ISO text, read as DATE by both); plain is DuckDB with one thread, reading the same CSV bytes from a
file (read_csv) and running the same query (the built-in parses with Arrow's CSV reader on one
thread, also timed on its own).
Peak RSS is not measured.

Usage: python bench/analytics.py [--ids 1000000] [--rows 200000] [--lineitem-rows 1000000]
       [--out bench/results/analytics.json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import machine
from confide.client.dataset_keys import new_dataset_id, wrap_dataset_key
from confide.client.home import Home
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.sealing import open_reader
from confide.enclave import manifest as mf
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.sealed_file import SealedWriter

HERE = Path(__file__).resolve().parent


def ids_csv(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, int(n * 1.5), n)  # two such inputs share about half their ids
    frame = pd.DataFrame({"email": [f" User{i}@Example.com" for i in ids], "x": 1})
    return frame.to_csv(index=False).encode()


def table_csv(seed: int, n: int, value: str, *, groups: bool) -> bytes:
    rng = np.random.default_rng(seed)
    columns = {"id": rng.integers(0, n, n), value: rng.integers(0, 10**6, n)}
    if groups:
        columns["g"] = rng.choice([f"g{i:02d}" for i in range(50)], n)
    return pd.DataFrame(columns).to_csv(index=False).encode()


class Kit:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.enclave = Home(root / "home").start_enclave()
        self.service = PublicIdentity.from_line(self.enclave.service_init()["service"])
        self.n = 0

    def dataset(self, owner: Identity, data: bytes) -> dict[str, Any]:
        self.n += 1
        key, ds_id, path = os.urandom(32), new_dataset_id(), self.root / f"in{self.n}.sealed"
        with open(path, "wb") as fh, SealedWriter(fh, data_key=key, recipients=[owner.public]) as w:
            w.write(data)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        env = wrap_dataset_key(
            key, dataset_id=ds_id, owner=owner.public, service=self.service, ciphertext_sha256=sha
        )
        return {"owner": owner, "id": ds_id, "sha": sha, "env": env, "path": path}

    def task(
        self,
        fn: str,
        lab: Identity,
        ds: dict[str, dict[str, Any]],
        outs: dict[str, Identity],
        params: dict[str, Any],
    ) -> tuple[float, dict[str, bytes]]:
        people = {"lab": lab.public, **{n: d["owner"].public for n, d in ds.items()}}
        m = build_manifest(
            service=self.service,
            creator=lab.public,
            function=mf.builtin_descriptor(fn),
            params=params,
            inputs=[mf.TaskInput(n, d["id"], d["owner"].fingerprint, d["sha"]) for n, d in ds.items()],
            outputs=[mf.TaskOutput(o, (who.fingerprint,), 1 << 29) for o, who in outs.items()],
            participants=people,
        )
        approvals = [sign_approval(d["owner"], m) for d in ds.values()] + [sign_approval(lab, m)]
        paths = {o: self.root / f"{m.task_id}-{o}.sealed" for o in [*outs, "_error"]}
        t0 = time.perf_counter()
        result = self.enclave.task(
            manifest=m.text,
            approvals=approvals,
            dataset_keys={n: d["env"] for n, d in ds.items()},
            inputs={n: d["path"] for n, d in ds.items()},
            outputs=paths,
            function_source=None,
        )
        elapsed = time.perf_counter() - t0
        if not result["ok"]:
            fh, reader = open_reader(paths["_error"])
            with fh:
                err = b"".join(bytes(c) for c in reader.unlock(identity=lab).iter_chunks())
            sys.exit(f"error: {fn} failed in the enclave: {err[:2000].decode(errors='replace')}")
        got = {}
        for o, who in outs.items():
            fh, reader = open_reader(paths[o])
            with fh:
                got[o] = b"".join(bytes(c) for c in reader.unlock(identity=who).iter_chunks())
        return elapsed, got


def lineitem_csv(seed: int, n: int) -> bytes:
    """TPC-H lineitem's columns that Q1 and Q6 read, with its value ranges (orderkey as the id)."""
    rng = np.random.default_rng(seed)
    days = rng.integers(0, 2526, n)  # 1992-01-02 .. 1998-12-01
    frame = pd.DataFrame(
        {
            "l_orderkey": rng.integers(1, max(2, n // 4), n),
            "l_quantity": rng.integers(1, 51, n),
            "l_extendedprice": np.round(rng.uniform(900, 105000, n), 2),
            "l_discount": rng.integers(0, 11, n) / 100,
            "l_tax": rng.integers(0, 9, n) / 100,
            "l_returnflag": rng.choice(["A", "N", "R"], n),
            "l_linestatus": rng.choice(["F", "O"], n),
            "l_shipdate": (np.datetime64("1992-01-02") + days).astype(str),
        }
    )
    return frame.to_csv(index=False).encode()


SQL_RULE = {
    "tables": {
        "lineitem": {
            "columns": [
                "l_quantity",
                "l_extendedprice",
                "l_discount",
                "l_tax",
                "l_returnflag",
                "l_linestatus",
                "l_shipdate",
            ],
            "id_column": "l_orderkey",
        }
    },
    "aggregates": ["count", "sum", "avg"],
    "min_group_size": 10,
}
SQL_QUERIES = {
    "q1": "SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty, sum(l_extendedprice) AS sum_base_price, "
    "avg(l_quantity) AS avg_qty, avg(l_extendedprice) AS avg_price, avg(l_discount) AS avg_disc, "
    "count(*) AS count_order FROM lineitem WHERE l_shipdate <= DATE '1998-09-02' "
    "GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus",
    "q6": "SELECT sum(l_extendedprice) AS revenue_base, count(*) AS n FROM lineitem "
    "WHERE l_shipdate >= DATE '1994-01-01' AND l_shipdate < DATE '1995-01-01' "
    "AND l_discount BETWEEN 0.05 AND 0.07 AND l_quantity < 24",
}


def plain_duckdb(data: bytes, query: str, tmp: Path) -> tuple[float, float, Any]:
    """(seconds reading the CSV file with read_csv and running `query`, seconds parsing the same
    bytes with Arrow's CSV reader on one thread as the built-in does, the result), DuckDB with one
    thread."""
    import duckdb
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = tmp / "lineitem.csv"
    path.write_bytes(data)
    con = duckdb.connect(config={"threads": 1})
    t0 = time.perf_counter()
    con.execute(f"CREATE TABLE lineitem AS SELECT * FROM read_csv('{path}')")
    frame = con.execute(query).df()
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    pcsv.read_csv(pa.BufferReader(data), read_options=pcsv.ReadOptions(use_threads=False))
    load = time.perf_counter() - t0
    con.close()
    return plain, load, frame


def plain_psi(a: bytes, b: bytes) -> tuple[int, Any]:
    def norm(raw: bytes) -> Any:
        s = pd.read_csv(io.BytesIO(raw), usecols=["email"], dtype=str, keep_default_na=False)["email"]
        return s.str.strip().str.normalize("NFC").str.casefold()

    na, nb = norm(a), norm(b)
    common = set(na) & set(nb)
    common.discard("")
    return len(common), na.isin(common)


def plain_join(a: bytes, b: bytes, k: int) -> Any:
    x, y = pd.read_csv(io.BytesIO(a)), pd.read_csv(io.BytesIO(b))
    for t in (x, y):  # the same key normalisation as the built-in
        t["id"] = t["id"].astype(str).str.strip().str.normalize("NFC").str.casefold()
    j = x.merge(y, on="id")
    g = j.groupby("g", sort=True).agg(ids=("id", "nunique"), n=("id", "size"), s=("v", "sum"), w=("w", "sum"))
    return g[g["ids"] >= k]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--lineitem-rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "analytics.json")
    args = ap.parse_args()
    lab, bank, shop = Identity.generate("lab"), Identity.generate("bank"), Identity.generate("shop")
    out: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        kit = Kit(Path(tmp))
        try:
            a, b = ids_csv(1, args.ids), ids_csv(2, args.ids)
            ds = {"bank": kit.dataset(bank, a), "shop": kit.dataset(shop, b)}
            t0 = time.perf_counter()
            size, bits = plain_psi(a, b)
            plain = time.perf_counter() - t0
            enclave, got = kit.task("psi", lab, ds, {"size": lab, "members_bank": bank}, {"column": "email"})
            assert json.loads(got["size"])["size"] == size
            assert got["members_bank"] == ("member\n" + "".join(f"{int(v)}\n" for v in bits)).encode()
            out["psi"] = {
                "ids_per_input": args.ids,
                "input_bytes": [len(a), len(b)],
                "intersection_size": size,
                "outputs": ["size", "members_bank"],
                "enclave_s": round(enclave, 3),
                "plain_pandas_s": round(plain, 3),
                "ratio": round(enclave / plain, 2),
            }
            print(json.dumps(out["psi"]))
            a, b = table_csv(3, args.rows, "v", groups=True), table_csv(4, args.rows, "w", groups=False)
            ds = {"bank": kit.dataset(bank, a), "shop": kit.dataset(shop, b)}
            t0 = time.perf_counter()
            groups = plain_join(a, b, 10)
            plain = time.perf_counter() - t0
            params = {
                "key": "id",
                "k": 10,
                "group_by": ["g"],
                "aggregates": [
                    {"op": "count"},
                    {"op": "sum", "column": "v"},
                    {"op": "sum", "column": "w"},
                ],
            }
            enclave, got = kit.task("join-aggregate", lab, ds, {"result": lab, "report": lab}, params)
            res = pd.read_csv(io.BytesIO(got["result"]))
            assert res["sum(v)"].tolist() == groups["s"].tolist() and len(res) == len(groups)
            out["join_aggregate"] = {
                "rows_per_input": args.rows,
                "groups": len(res),
                "enclave_s": round(enclave, 3),
                "plain_pandas_s": round(plain, 3),
                "ratio": round(enclave / plain, 2),
            }
            print(json.dumps(out["join_aggregate"]))
            data = lineitem_csv(5, args.lineitem_rows)
            ds = {"lineitem": kit.dataset(bank, data)}
            out["sql"] = {"lineitem_rows": args.lineitem_rows, "input_bytes": len(data), "queries": {}}
            for name, query in SQL_QUERIES.items():
                plain, load, expect = plain_duckdb(data, query, Path(tmp))
                enclave, got = kit.task(
                    "sql", lab, ds, {"result": lab, "report": lab}, {"query": query, "rule": SQL_RULE}
                )
                res = pd.read_csv(io.BytesIO(got["result"]))
                assert len(res) == len(expect) and res.iloc[:, -1].tolist() == expect.iloc[:, -1].tolist()
                out["sql"]["queries"][name] = {
                    "groups": len(res),
                    "enclave_s": round(enclave, 3),
                    "plain_duckdb_1thread_s": round(plain, 3),
                    "arrow_csv_parse_s": round(load, 3),
                    "ratio": round(enclave / plain, 2),
                }
            print(json.dumps(out["sql"]))
        finally:
            kit.enclave.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
