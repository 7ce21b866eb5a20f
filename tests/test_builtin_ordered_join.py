"""The built-in ordered-set-join v1 (a streaming merge join of inputs sorted by their ids), run as
tasks in a real enclave worker and checked against an independent pandas merge; the same membership
as psi on the same data; every refusal (unsorted, a duplicate id, a bad row, members sealed to the
wrong party) names what and where; one task through the generic CLI on a real server."""

from __future__ import annotations

import dataclasses
import io
import json
import unicodedata
from typing import Any

import numpy as np
import pandas as pd
import pytest

from confide.client import ordered_join
from confide.client.approval import describe_manifest
from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.builtins import ordered_set_join
from confide.enclave.errors import ConfideError, IntegrityError
from confide.enclave.keys import Identity
from confide.enclave.sandbox.context import Context
from platform_support import CliParties

LAB = Identity.generate("lab")
BANK = Identity.generate("bank")
SHOP = Identity.generate("shop")
TELCO = Identity.generate("telco")
PARTIES = {"lab": LAB.public, "bank": BANK.public, "shop": SHOP.public, "telco": TELCO.public}
OWNERS = {"bank": BANK, "shop": SHOP, "telco": TELCO}
NAME = "ordered-set-join"

POOL = ["ann@example.com", "Zoë@example.com", "straße@example.de", "李@例子.中国", "bob@x.org"]
POOL += [f"user{i}@example.com" for i in range(60)]


def norm(s: str) -> str:
    """psi's rule, written independently: strip, NFC, casefold."""
    return unicodedata.normalize("NFC", s.strip()).casefold()


def variant(rng: np.random.Generator, s: str) -> str:
    """The same id written another way: case, whitespace, decomposed accents."""
    choice = int(rng.integers(0, 4))
    return [s, s.upper(), f"  {s}\t", unicodedata.normalize("NFD", s)][choice]


def sorted_table(seed: int, n: int, *, column: str = "email") -> bytes:
    """About `n` rows sorted by normalised id: some of the shared pool, some own, a few empty ids."""
    rng = np.random.default_rng(seed)
    ids = {norm(p): p for p in rng.choice(POOL, size=min(n // 2, len(POOL)), replace=False)}
    while len(ids) < n:
        own = f"only{seed}-{int(rng.integers(0, 10**6))}@example.com"
        ids[norm(own)] = own
    rows = []
    for key in sorted(ids):
        rows.append({column: variant(rng, ids[key]), "score": int(rng.integers(0, 100)), "tag": f"t{seed}"})
        if rng.random() < 0.05:
            rows.append({column: "  ", "score": -1, "tag": "empty"})
    return pd.DataFrame(rows).to_csv(index=False).encode("utf-8")


def reference(tables: dict[str, bytes], columns: dict[str, str], carried: list[str]):
    """The independent computation: pandas reads, Python normalises, pandas merges."""
    frames = {}
    for n, t in tables.items():
        f = pd.read_csv(io.BytesIO(t), dtype=str, keep_default_na=False)
        f["_id"] = f[columns[n]].map(norm)
        frames[n] = f
    merged = None
    for n, f in frames.items():
        part = f[f["_id"] != ""].rename(columns={c: f"{n}.{c}" for c in f.columns if c != "_id"})
        merged = part if merged is None else merged.merge(part, on="_id", how="inner")
    assert merged is not None
    joined = merged.sort_values("_id")[["_id", *carried]].rename(columns={"_id": "id"})
    common = set(joined["id"])
    members = {n: f["_id"].isin(common).astype(int).tolist() for n, f in frames.items()}
    return joined.reset_index(drop=True), members


def manifest(kit, datasets: dict, params: dict, outputs: dict[str, tuple[str, ...]], name: str = NAME):
    return build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor(name),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput(o, rs) for o, rs in outputs.items()],
        participants=PARTIES,
    )


def run(kit, datasets: dict, params: dict, outputs: dict[str, tuple[str, ...]] | None = None, name=NAME):
    m = manifest(kit, datasets, params, outputs or {"size": (LAB.fingerprint,)}, name)
    approvals = [sign_approval(ds.owner, m) for ds in datasets.values()] + [sign_approval(LAB, m)]
    return kit.run(m, approvals, datasets)


def members_to_owners(datasets: dict) -> dict[str, tuple[str, ...]]:
    return {f"members_{n}": (ds.owner.fingerprint,) for n, ds in datasets.items()}


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def test_merge_join_agrees_with_pandas_on_three_inputs(kit) -> None:
    tables = {
        "bank": sorted_table(1, 300),
        "shop": sorted_table(2, 200),
        "telco": sorted_table(3, 150, column="mail"),
    }
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    columns = {"bank": "email", "shop": "email", "telco": "mail"}
    carried = ["bank.score", "telco.tag", "shop.email"]
    outs = {"size": (LAB.fingerprint,), "joined": (LAB.fingerprint,), **members_to_owners(datasets)}
    result, body, paths = run(kit, datasets, {"column": columns, "columns": carried}, outs)
    assert result["ok"], body
    expect, members = reference(tables, columns, carried)
    assert len(expect) > 10  # the generated data does overlap
    assert json.loads(kit.read(paths["size"], LAB)) == {
        "size": len(expect),
        "inputs": ["bank", "shop", "telco"],
    }
    got = pd.read_csv(io.BytesIO(kit.read(paths["joined"], LAB)), dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(got, expect)
    assert "strasse@example.de" in set(got["id"]) or "strasse@example.de" not in set(expect["id"])
    for n in tables:
        bits = pd.read_csv(io.BytesIO(kit.read(paths[f"members_{n}"], OWNERS[n])))
        assert bits["member"].tolist() == members[n]
        with pytest.raises(ConfideError):  # sealed to its owner only: the lab cannot open it
            kit.read(paths[f"members_{n}"], LAB)


def test_same_membership_as_psi_on_the_same_data(kit) -> None:
    """The rule is written out in both built-ins (a built-in's approved source is one file): both
    must give every row the same bit."""
    tables = {"bank": sorted_table(4, 200), "shop": sorted_table(5, 180)}
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    outs = {"size": (LAB.fingerprint,), **members_to_owners(datasets)}
    got = {}
    for name in (NAME, "psi"):
        result, body, paths = run(kit, datasets, {"column": "email"}, outs, name=name)
        assert result["ok"], body
        got[name] = {o: kit.read(paths[o], datasets[o[8:]].owner) for o in outs if o != "size"}
        got[name]["size"] = json.loads(kit.read(paths["size"], LAB))["size"]
    assert got[NAME] == got["psi"] and got["psi"]["size"] > 10


@pytest.mark.parametrize(
    "odd",
    [
        b"email\na\n   \nb\n",  # a line of spaces is no row (pandas skips it for psi)
        b"\n\nemail,x\r\na,1\r\n\r\n \t \r\nb,2\r\n",  # blank lines before the header, CRLF
        b'email,x\na,1\n"   ",0\n"b",2\n',  # a quoted blank id is a row with no id
        b'\xef\xbb\xbfemail,x\n"a",1\n"b\nc",2\n',  # a BOM; an id over two lines
    ],
)
def test_odd_rows_count_as_psi_counts_them(odd: bytes) -> None:
    from confide.enclave.builtins import psi

    tables = {"a": odd, "b": b"email\nb\n"}
    outs = ("members_a", "members_b", "size")
    mine = _in_process({"column": "email"}, tables, outs)
    theirs = _in_process({"column": "email"}, tables, outs, module=psi)
    assert mine["members_a"] == theirs["members_a"] and mine["members_b"] == theirs["members_b"]
    assert json.loads(mine["size"])["size"] == json.loads(theirs["size"])["size"]


def test_members_may_go_only_to_their_inputs_owner(kit) -> None:
    datasets = {
        "bank": kit.dataset(BANK, sorted_table(6, 20)),
        "shop": kit.dataset(SHOP, sorted_table(7, 20)),
    }
    with pytest.raises(IntegrityError, match="may be sealed only to that input's owner"):
        manifest(kit, datasets, {"column": "email"}, {"members_shop": (LAB.fingerprint,)})
    with pytest.raises(ConfideError, match="not one the function 'ordered-set-join' writes"):
        manifest(kit, datasets, {"column": "email"}, {"intersection": (LAB.fingerprint,)})
    good = manifest(kit, datasets, {"column": "email"}, {"members_shop": (SHOP.fingerprint,)})
    evil = dataclasses.replace(good, outputs=(mf.TaskOutput("members_shop", (LAB.fingerprint,)),))
    approvals = [sign_approval(who, evil) for who in (BANK, SHOP, LAB)]
    result, body, paths = kit.run(evil, approvals, datasets)
    assert result["ok"] is False
    assert "may be sealed only to that input's owner" in json.dumps(body)
    assert not paths["members_shop"].exists()


GOOD = b"email,n\na@x,1\nb@x,2\n"


@pytest.mark.parametrize(
    ("bank", "params", "message"),
    [
        (
            b"email,n\na@x,1\nc@x,2\n B@X ,3\n",
            {"column": "email"},
            "input 'bank' is not sorted by its id column: line 4 has an id that sorts before the id on line 3",
        ),
        (
            b"email,n\na@x,1\n,0\nA@x ,2\n",
            {"column": "email"},
            "input 'bank' is not sorted by its id column: line 4 has the same id as line 2",
        ),
        (
            b"email,n\na@x,1\nb@x\n",
            {"column": "email"},
            "input 'bank', line 3: 1 fields, but the header has 2",
        ),
        (b"email,n\na@x,1\nb\xff@x,2\n", {"column": "email"}, "input 'bank', line 3: not UTF-8 text"),
        (b'email,n\n"a@x,1\n', {"column": "email"}, "input 'bank', line 2: not CSV"),
        (
            b"mail,n\na@x,1\n",
            {"column": "email"},
            "input 'bank' has no column 'email' (its header: ['mail', 'n'])",
        ),
        (b"", {"column": "email"}, "input 'bank' is empty (no header line)"),
        (GOOD, {"column": "email", "columns": ["bank.zz"]}, "columns: input 'bank' has no column 'zz'"),
        (GOOD, {"column": "email", "columns": ["zz.n"]}, "columns: 'zz.n' is not 'input.column'"),
        (GOOD, {"column": "email", "hash": True}, "unknown parameter(s) hash"),
        (GOOD, {}, "parameter 'column'"),
        (
            b"email,n\n" + b"c" * 2000 + b",1\n",
            {"column": "email"},
            "input 'bank', line 2: an id of 2000 characters (max_id_chars is 1024)",
        ),
    ],
)
def test_bad_input_is_refused_naming_input_and_line(kit, bank, params, message) -> None:
    datasets = {"bank": kit.dataset(BANK, bank), "shop": kit.dataset(SHOP, GOOD)}
    outs = {"size": (LAB.fingerprint,)}
    if "columns" in params:
        outs["joined"] = (LAB.fingerprint,)
    result, _body, paths = run(kit, datasets, params, outs)
    assert result["ok"] is False and result["category"] == "exception"
    error = kit.read(paths["_error"], LAB).decode()
    assert message in error
    assert "b@x" not in error.casefold() or "b@x" in message  # ids are never quoted
    assert not paths["size"].exists()
    with pytest.raises(ValueError) as local:  # the same refusal in this process (coverage sees it)
        _in_process(params, {"bank": bank, "shop": GOOD}, tuple(outs))
    assert message in str(local.value)


def test_an_unsorted_input_after_the_last_common_id_is_still_refused() -> None:
    """The whole input is checked, not just the part the merge needed."""
    a = b"id\na\nb\n"
    b = b"id\na\nz\ny\n"
    with pytest.raises(ValueError, match="input 'b' is not sorted by its id column: line 4"):
        _in_process({"column": "id"}, {"a": a, "b": b}, ("size",))


def _in_process(
    params: dict, tables: dict[str, bytes], outputs: tuple[str, ...], module: Any = ordered_set_join
) -> dict[str, bytes]:
    outs = {o: io.BytesIO() for o in outputs}
    ctx = Context(dict(params), {n: io.BytesIO(t) for n, t in tables.items()}, dict(outs))  # type: ignore[arg-type]
    module.run(ctx)
    return {o: b.getvalue() for o, b in outs.items()}


def test_in_process_run_matches_the_sandboxed_run(kit) -> None:
    tables = {"bank": sorted_table(8, 60), "shop": sorted_table(9, 60)}
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    params = {"column": "email", "columns": ["shop.score"]}
    outs = {"joined": (LAB.fingerprint,), "size": (LAB.fingerprint,), **members_to_owners(datasets)}
    result, body, paths = run(kit, datasets, params, outs)
    assert result["ok"], body
    local = _in_process(params, tables, tuple(outs))
    assert local == {
        o: kit.read(paths[o], BANK if o == "members_bank" else SHOP if o == "members_shop" else LAB)
        for o in outs
    }
    with pytest.raises(ValueError, match="needs two or more inputs, got 1"):
        _in_process({"column": "email"}, {"bank": GOOD}, ("size",))
    with pytest.raises(ValueError, match="columns names what the joined output carries"):
        _in_process({"column": "email", "columns": ["bank.n"]}, {"bank": GOOD, "shop": GOOD}, ("size",))


def test_approval_text_says_what_leaves_to_whom(kit) -> None:
    datasets = {"bank": kit.dataset(BANK, GOOD), "shop": kit.dataset(SHOP, GOOD)}
    outs = {"size": (LAB.fingerprint,), "joined": (LAB.fingerprint,), "members_bank": (BANK.fingerprint,)}
    params = {"column": "email", "columns": ["bank.n", "bank.email"]}
    text = describe_manifest(manifest(kit, datasets, params, outs))
    assert f"What leaves ({NAME}, enforced in the enclave):" in text
    assert f"size -> lab ({LAB.fingerprint}): one number, how many ids are in all of bank, shop" in text
    assert f"members_bank -> bank ({BANK.fingerprint}): for each row of bank, one bit" in text
    assert "from bank (of bank (" in text and ": n, email" in text
    assert "from shop (of shop (" in text and "): no column" in text
    assert "members_shop" not in text


def test_sdk_helper_builds_the_outputs_and_pads_the_sizes() -> None:
    class Stub:
        fingerprint = LAB.fingerprint

        def _dataset_pin(self, ref: str, where: str) -> Any:
            return type("Pin", (), {"owner": {"cds1:x": BANK.fingerprint, "cds1:y": SHOP.fingerprint}[ref]})

        def create_task(self, **kw: Any) -> str:
            self.kw = kw
            return "task"

    stub = Stub()
    refs = {"bank": "cds1:x", "shop": "cds1:y"}
    ordered_join.ordered_set_join(
        stub, inputs=refs, column="email", outputs=("size", "members", "joined"), columns=["bank.n"]
    )  # type: ignore[arg-type]
    assert stub.kw["function"] == NAME and stub.kw["params"] == {"column": "email", "columns": ["bank.n"]}
    assert stub.kw["outputs"] == {
        "size": [LAB.fingerprint],
        "joined": [LAB.fingerprint],
        "members_bank": [BANK.fingerprint],
        "members_shop": [SHOP.fingerprint],
    }
    assert stub.kw["pad"] == {"size": 256, "joined": "pow2"}
    with pytest.raises(ConfideError, match="outputs must be some of"):
        ordered_join.ordered_set_join(stub, inputs=refs, column="email", outputs=("ids",))  # type: ignore[arg-type]
    with pytest.raises(ConfideError, match="ask for joined too"):
        ordered_join.ordered_set_join(stub, inputs=refs, column="email", columns=["bank.n"])  # type: ignore[arg-type]


# ---- the generic CLI on a real server -------------------------------------------------------------


def test_ordered_set_join_through_the_cli(server, tmp_path) -> None:
    """`confide task create --function ordered-set-join` through the generic path: --param for each
    parameter, one --output per output; members sealed to the wrong party is a clear error."""
    cli = CliParties(server, tmp_path, ("obank", "oshop", "olab"))
    fps = cli.fps
    tables = {"obank": sorted_table(10, 40), "oshop": sorted_table(11, 40)}
    refs = {n: cli.upload(n, n, t) for n, t in tables.items()}
    create = ["task", "create", "--function", NAME, "--input", f"bank={refs['obank']}"]
    create += ["--input", f"shop={refs['oshop']}", "--output", f"joined={fps['olab']}"]
    create += ["--param", "column=email", "--param", 'columns=["shop.score"]']
    r = cli("olab", *create, "--output", f"members_bank={fps['olab']}")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "error: output 'members_bank' describes the rows of input 'bank'" in r.output
    r = cli("olab", *create, "--output", f"members_bank={fps['obank']}")
    assert r.exit_code == 0, r.output
    task = r.stdout.strip().splitlines()[-1]
    r = cli("oshop", "task", "show", task)
    assert r.exit_code == 0 and f"What leaves ({NAME}, enforced in the enclave):" in r.stdout
    assert "from shop (of oshop" in r.stdout and "score" in r.stdout
    for n in ("obank", "oshop", "olab"):
        r = cli(n, "task", "approve", task, "--yes")
        assert r.exit_code == 0, r.output
    r = cli("olab", "task", "run", task)
    assert r.exit_code == 0 and "succeeded" in r.stdout, r.output
    expect, members = reference(
        {"bank": tables["obank"], "shop": tables["oshop"]}, {"bank": "email", "shop": "email"}, ["shop.score"]
    )
    r = cli("olab", "task", "results", task, "--out", str(tmp_path / "lab"))
    assert r.exit_code == 0, r.output
    got = pd.read_csv(tmp_path / "lab" / "joined", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(got, expect)
    r = cli("obank", "task", "results", task, "--out", str(tmp_path / "bank"))
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "bank" / "members_bank")["member"].tolist() == members["bank"]
