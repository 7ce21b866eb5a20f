"""psi, join-aggregate and sql in the enclave (sim backend, real sandbox) vs the plain tool, side by
side in one run, at the issue's sizes by default; results in bench/results/analytics.json.

Enclave time is the host's whole `task` call: consent checks, decrypting the inputs, the sandboxed
built-in, sealing its outputs, the receipt; its peak memory is the enclave process tree's resident
set (enclave, zygote, sandbox child), sampled every 20 ms (bench/common.PeakRss).
- psi on 2 x 10 M ids: plain is pandas reading the same CSV bytes from memory, normalising the ids
  (strip, NFC, casefold) and intersecting.
- join-aggregate on two 5 M-row tables: plain DuckDB (one thread, as the built-ins run) joining the
  same CSV files on the lower-cased trimmed key and summing per group with the k filter, and plain
  pandas (merge + groupby, int64 sums; the enclave's sums are exact decimals).
- sql: TPC-H lineitem at scale factor 1 (6,001,215 rows) from tpchgen-cli (the TPC-H generator of
  datafusion-contrib; DuckDB's tpch extension downloads from the internet), and TPC-H Q1 and Q6 under
  a rule with aggregate_arithmetic (Q1's sum(l_extendedprice * (1 - l_discount)), Q6's
  sum(l_extendedprice * l_discount)); plain is DuckDB reading
  the same CSV file (read_csv) and running the same query, with one thread (as the built-in) and
  with its default threads; the built-in parses with Arrow's CSV reader on one thread (also timed).

The enclave runs with an 8 GiB memory budget (--memory-mib; the default enclave has 1 GiB, which two
10 M-id inputs exceed: the run fails closed with category memory-limit).

Usage: python bench/analytics.py [--ids 10000000] [--rows 5000000] [--sf 1] [--memory-mib 8192]
       [--only psi|join-aggregate|sql ...] [--out bench/results/analytics.json]
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

from common import PeakRss, machine
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
    def __init__(self, root: Path, memory_mib: int) -> None:
        self.root = root
        # a larger enclave than the default 1 GiB (two 10 M-id inputs do not fit it), with the per-run
        # CPU and wall limits raised to match
        self.config = {"memory_budget_mib": memory_mib, "cpu_seconds": 1800, "wall_seconds": 3600.0}
        config = root / "enclave.toml"
        config.write_text("".join(f"{k} = {v}\n" for k, v in self.config.items()))
        self.enclave = Home(root / "home").start_enclave(config=config)
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
        with PeakRss(self.enclave.proc.pid) as self.peak:
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


def lineitem_csv(sf: float, tmp: Path) -> bytes:
    """TPC-H lineitem at scale factor `sf`, as CSV with a header, from tpchgen-cli."""
    import shutil
    import subprocess

    exe = shutil.which("tpchgen-cli") or str(Path(sys.executable).with_name("tpchgen-cli"))
    if not Path(exe).exists():
        sys.exit("error: tpchgen-cli is missing (pip install tpchgen-cli; `make install` does)")
    subprocess.run(
        [exe, "csv", "-s", str(sf), "--tables", "lineitem", "--output-dir", str(tmp / "tpch")], check=True
    )
    return (tmp / "tpch" / "lineitem.csv").read_bytes()


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
    "aggregate_arithmetic": True,  # Q1's sum(l_extendedprice * (1 - l_discount)), Q6's price * discount
}
SQL_QUERIES = {  # TPC-H Q1 and Q6 as the spec writes them (Q1 without its avg(l_discount) rounding)
    "q1": "SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty, sum(l_extendedprice) AS sum_base_price, "
    "sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price, "
    "sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge, "
    "avg(l_quantity) AS avg_qty, avg(l_extendedprice) AS avg_price, avg(l_discount) AS avg_disc, "
    "count(*) AS count_order FROM lineitem WHERE l_shipdate <= DATE '1998-09-02' "
    "GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus",
    "q6": "SELECT sum(l_extendedprice * l_discount) AS revenue, count(*) AS n FROM lineitem "
    "WHERE l_shipdate >= DATE '1994-01-01' AND l_shipdate < DATE '1995-01-01' "
    "AND l_discount BETWEEN 0.05 AND 0.07 AND l_quantity < 24",
}


def plain_duckdb(data: bytes, query: str, tmp: Path, threads: int | None) -> tuple[float, Any]:
    """(seconds reading the CSV file with read_csv and running `query`, the result): DuckDB with
    `threads` threads (None: its default, one per core)."""
    import duckdb

    path = tmp / "lineitem.csv"
    if not path.exists():
        path.write_bytes(data)
    con = duckdb.connect(config={"threads": threads} if threads else {})
    t0 = time.perf_counter()
    con.execute(f"CREATE TABLE lineitem AS SELECT * FROM read_csv('{path}')")
    frame = con.execute(query).df()
    plain = time.perf_counter() - t0
    con.close()
    return plain, frame


def arrow_parse(data: bytes) -> float:
    """Seconds Arrow's CSV reader takes on one thread, as the built-in parses."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    t0 = time.perf_counter()
    pcsv.read_csv(pa.BufferReader(data), read_options=pcsv.ReadOptions(use_threads=False))
    return time.perf_counter() - t0


def plain_duckdb_join(a: bytes, b: bytes, k: int, tmp: Path) -> tuple[float, Any]:
    """join-aggregate's computation in plain DuckDB (one thread) on the same CSV files: keys trimmed
    and lower-cased (the ids are ASCII: casefold and NFC change nothing), groups of fewer than k
    distinct keys left out."""
    import duckdb

    pa_, pb = tmp / "join_a.csv", tmp / "join_b.csv"
    pa_.write_bytes(a)
    pb.write_bytes(b)
    con = duckdb.connect(config={"threads": 1})
    t0 = time.perf_counter()
    frame = con.execute(
        f"""SELECT g, count(*) AS n, sum(v::HUGEINT) AS s, sum(w::HUGEINT) AS w
        FROM (SELECT lower(trim(id::VARCHAR)) AS id, g, v FROM read_csv('{pa_}')) x
        JOIN (SELECT lower(trim(id::VARCHAR)) AS id, w FROM read_csv('{pb}')) y USING (id)
        GROUP BY g HAVING count(DISTINCT id) >= {k} ORDER BY g"""
    ).df()
    plain = time.perf_counter() - t0
    con.close()
    return plain, frame


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
    ap.add_argument("--ids", type=int, default=10_000_000)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--sf", type=float, default=1.0, help="TPC-H scale factor of lineitem (1: 6 M rows)")
    ap.add_argument("--memory-mib", type=int, default=8192, help="the enclave's memory budget")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "analytics.json")
    ap.add_argument(
        "--only",
        choices=["psi", "join-aggregate", "sql"],
        action="append",
        help="run only these (repeatable)",
    )
    args = ap.parse_args()
    only = set(args.only or ["psi", "join-aggregate", "sql"])
    lab, bank, shop = Identity.generate("lab"), Identity.generate("bank"), Identity.generate("shop")
    out: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        kit = Kit(Path(tmp), args.memory_mib)
        out["enclave_config"] = kit.config
        try:
            if "psi" in only:
                out["psi"] = bench_psi(kit, args.ids, lab, bank, shop)
            if "join-aggregate" in only:
                out["join_aggregate"] = bench_join(kit, args.rows, lab, bank, shop, Path(tmp))
            if "sql" in only:
                out["sql"] = bench_sql(kit, args.sf, lab, bank, Path(tmp))
        finally:
            kit.enclave.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and args.out.exists():  # a partial run replaces only its own parts of the file
        kept = json.loads(args.out.read_text())
        out = {
            **kept,
            **out,
            "machine_by_part": {**kept.get("machine_by_part", {}), **{p: out["machine"] for p in only}},
        }
    args.out.write_text(json.dumps(out, indent=2) + "\n")


def bench_psi(kit: Kit, n: int, lab: Identity, bank: Identity, shop: Identity) -> dict[str, Any]:
    a, b = ids_csv(1, n), ids_csv(2, n)
    ds = {"bank": kit.dataset(bank, a), "shop": kit.dataset(shop, b)}
    t0 = time.perf_counter()
    size, bits = plain_psi(a, b)
    plain = time.perf_counter() - t0
    enclave, got = kit.task("psi", lab, ds, {"size": lab, "members_bank": bank}, {"column": "email"})
    assert json.loads(got["size"])["size"] == size
    assert got["members_bank"] == ("member\n" + "".join(f"{int(v)}\n" for v in bits)).encode()
    res = {
        "ids_per_input": n,
        "input_bytes": [len(a), len(b)],
        "intersection_size": size,
        "outputs": ["size", "members_bank"],
        "enclave_s": round(enclave, 3),
        "enclave_peak_rss_mib": kit.peak.peak_mib,
        "plain_pandas_s": round(plain, 3),
        "ratio": round(enclave / plain, 2),
    }
    print(json.dumps(res), flush=True)
    return res


def bench_join(kit: Kit, n: int, lab: Identity, bank: Identity, shop: Identity, tmp: Path) -> dict[str, Any]:
    a, b = table_csv(3, n, "v", groups=True), table_csv(4, n, "w", groups=False)
    ds = {"bank": kit.dataset(bank, a), "shop": kit.dataset(shop, b)}
    t0 = time.perf_counter()
    groups = plain_join(a, b, 10)
    pandas_s = time.perf_counter() - t0
    duck_s, duck = plain_duckdb_join(a, b, 10, tmp)
    params = {
        "key": "id",
        "k": 10,
        "group_by": ["g"],
        "aggregates": [{"op": "count"}, {"op": "sum", "column": "v"}, {"op": "sum", "column": "w"}],
    }
    enclave, got = kit.task("join-aggregate", lab, ds, {"result": lab, "report": lab}, params)
    res_frame = pd.read_csv(io.BytesIO(got["result"]))
    assert res_frame["sum(v)"].tolist() == groups["s"].tolist() == [int(x) for x in duck["s"]]
    assert len(res_frame) == len(groups) == len(duck)
    res = {
        "rows_per_input": n,
        "groups": len(res_frame),
        "enclave_s": round(enclave, 3),
        "enclave_peak_rss_mib": kit.peak.peak_mib,
        "plain_duckdb_1thread_s": round(duck_s, 3),
        "plain_pandas_s": round(pandas_s, 3),
        "ratio_vs_duckdb": round(enclave / duck_s, 2),
        "ratio_vs_pandas": round(enclave / pandas_s, 2),
    }
    print(json.dumps(res), flush=True)
    return res


def bench_sql(kit: Kit, sf: float, lab: Identity, bank: Identity, tmp: Path) -> dict[str, Any]:
    data = lineitem_csv(sf, tmp)
    ds = {"lineitem": kit.dataset(bank, data)}
    res: dict[str, Any] = {
        "tpch_scale_factor": sf,
        "lineitem_rows": data.count(b"\n") - 1,
        "input_bytes": len(data),
        "arrow_csv_parse_1thread_s": round(arrow_parse(data), 3),
        "queries": {},
    }
    for name, query in SQL_QUERIES.items():
        one, expect = plain_duckdb(data, query, tmp, 1)
        default, _ = plain_duckdb(data, query, tmp, None)
        enclave, got = kit.task(
            "sql", lab, ds, {"result": lab, "report": lab}, {"query": query, "rule": SQL_RULE}
        )
        frame = pd.read_csv(io.BytesIO(got["result"]))
        assert len(frame) == len(expect) and frame.iloc[:, -1].tolist() == expect.iloc[:, -1].tolist()
        for col in frame.columns:  # Arrow reads prices as doubles, DuckDB's read_csv as DECIMAL
            if pd.api.types.is_numeric_dtype(frame[col]):
                assert np.allclose(frame[col], expect[col].astype(float), rtol=1e-9), col
        res["queries"][name] = {
            "groups": len(frame),
            "enclave_s": round(enclave, 3),
            "enclave_peak_rss_mib": kit.peak.peak_mib,
            "plain_duckdb_1thread_s": round(one, 3),
            "plain_duckdb_default_threads_s": round(default, 3),
            "ratio_vs_1thread": round(enclave / one, 2),
            "ratio_vs_default_threads": round(enclave / default, 2),
        }
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
