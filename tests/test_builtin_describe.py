"""The `describe` built-in in a real enclave worker: per-column statistics equal pandas' on the
union of the inputs; a column with fewer than k values, and every category seen fewer than k times,
is suppressed; min and max leave only when the manifest says so; bad parameters are refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from confide.client.manifest_build import build_manifest
from confide.enclave import manifest as mf
from confide.enclave.keys import Identity

LAB = Identity.generate("lab")
A = Identity.generate("clinic-a")
B = Identity.generate("clinic-b")
PARTIES = {"lab": LAB.public, "a": A.public, "b": B.public}
OWNERS = {"a": A, "b": B}


def table(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    towns = rng.choice(["Lyon", "Köln", "Bergen", "Isle"], size=n, p=[0.5, 0.3, 0.18, 0.02])
    ages = rng.integers(18, 90, size=n)
    rare = ["" if i % 7 else f"n{i}" for i in range(n)]  # mostly empty, every value once
    frame = pd.DataFrame({"age": ages, "town": towns, "note": rare})
    return frame.to_csv(index=False).encode()


def run(kit, tables: dict[str, bytes], params: dict):
    return kit.run_builtin(
        "describe", tables, params, owners=OWNERS, creator=LAB, outputs=("report",), participants=PARTIES
    )


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def test_statistics_equal_pandas_and_small_cohorts_are_suppressed(kit) -> None:
    a, b = table(1, 400), table(2, 300)
    result, body, outs = run(kit, {"a": a, "b": b}, {"k": 20, "max_categories": 5})
    assert result["ok"], body
    report = json.loads(kit.read(outs["report"], LAB))
    both = pd.concat([pd.read_csv(pd.io.common.BytesIO(t)) for t in (a, b)], ignore_index=True)
    age = report["columns"]["age"]
    assert report["rows"] == 700 and age["kind"] == "numeric" and age["count"] == 700
    assert age["mean"] == pytest.approx(both["age"].mean(), rel=1e-12)
    assert age["std"] == pytest.approx(both["age"].std(ddof=0), rel=1e-12)
    assert "min" not in age and "max" not in age  # one row's exact value each: only with min_max
    town = report["columns"]["town"]
    counts = both["town"].value_counts()
    assert town["distinct"] == len(counts)
    assert town["top"] == [{"value": v, "count": int(n)} for v, n in counts.items() if n >= 20]
    assert "Isle" not in [t["value"] for t in town["top"]] or counts["Isle"] >= 20
    assert town["unnamed"] == int(counts[counts < 20].sum())
    note = report["columns"]["note"]  # 100 values, each seen once: none named
    assert note["count"] == both["note"].notna().sum() and note["top"] == []


def test_a_column_below_k_and_min_max_on_request(kit) -> None:
    small = b"age,town\n30,Lyon\n41,Lyon\n"
    result, body, outs = run(kit, {"a": small}, {"k": 5, "min_max": True})
    assert result["ok"], body
    report = json.loads(kit.read(outs["report"], LAB))
    assert report["rows"] is None and report["columns"]["age"] == {
        "kind": "numeric",
        "count": 2,
        "suppressed": True,
    }
    result, body, outs = run(kit, {"a": table(3, 50)}, {"k": 5, "min_max": True, "columns": ["age"]})
    age = json.loads(kit.read(outs["report"], LAB))["columns"]["age"]
    frame = pd.read_csv(pd.io.common.BytesIO(table(3, 50)))
    assert (age["min"], age["max"]) == (frame["age"].min(), frame["age"].max())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "k must be an integer of at least 2"),
        ({"k": 1}, "k must be an integer of at least 2"),
        ({"k": 5, "columns": ["nope"]}, "columns ['nope'] are not in the header"),
        ({"k": 5, "columns": []}, "columns must be a non-empty list"),
        ({"k": 5, "min_max": "yes"}, "min_max must be true or false"),
        ({"k": 5, "bins": 3}, "unknown parameter(s) bins"),
    ],
)
def test_bad_parameters_are_refused(kit, params: dict, message: str) -> None:
    result, _body, outs = run(kit, {"a": table(4, 30)}, params)
    assert not result["ok"] and result["category"] == "exception"
    assert message in kit.read(outs["_error"], LAB).decode()


def test_the_approval_text_says_what_leaves(kit) -> None:
    from confide.client.approval import describe_manifest

    datasets = {"a": kit.dataset(A, table(5, 10))}
    m = build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("describe"),
        params={"k": 7, "min_max": True, "columns": ["age"]},
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput("report", (LAB.fingerprint,))],
        participants=PARTIES,
    )
    text = describe_manifest(m)
    assert "What leaves (describe, enforced in the enclave):" in text
    assert "for age of the union of the inputs" in text and "at least k = 7 values" in text
    assert "min_max: each numeric column's minimum and maximum, one row's exact value each" in text


def _in_process(params: dict, tables: dict[str, bytes]) -> dict:
    """run(ctx) in this process (coverage sees it here; in the sandbox child it is compiled as text)."""
    import io

    from confide.enclave.builtins import describe as describe_builtin
    from confide.enclave.sandbox.context import Context

    out = io.BytesIO()
    describe_builtin.run(
        Context(dict(params), {n: io.BytesIO(t) for n, t in tables.items()}, {"report": out})
    )  # type: ignore[arg-type]
    return json.loads(out.getvalue())


def test_in_process_run_matches_the_sandboxed_run(kit) -> None:
    tables = {"a": table(6, 120), "b": table(7, 80)}
    params = {"k": 10, "min_max": True, "max_categories": 2}
    result, body, outs = run(kit, tables, params)
    assert result["ok"], body
    assert _in_process(params, tables) == json.loads(kit.read(outs["report"], LAB))
    for bad, message in [
        ({"k": 5, "max_categories": -1}, "max_categories must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"k": 5, "columns": ["age", "age"]}, "distinct column names"),
    ]:
        with pytest.raises(ValueError, match=message):
            _in_process(bad, tables)
    with pytest.raises(ValueError, match="has header"):
        _in_process({"k": 5}, {"a": table(1, 10), "b": b"x,y\n1,2\n"})
    with pytest.raises(ValueError, match="no inputs"):
        _in_process({"k": 5}, {})
