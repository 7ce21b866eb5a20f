"""The built-in psi v1 (private set intersection), run as tasks in a real enclave worker (sandboxed
like any party's function), checked against an independent pandas computation; and one psi task
end to end on a real server through the SDK helper."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import unicodedata
from typing import Any

import numpy as np
import pandas as pd
import pytest

from confide.client import analytics
from confide.client.approval import describe_manifest
from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.errors import ConfideError, IntegrityError
from confide.enclave.keys import Identity
from platform_support import CliParties, sdk_clients, upload_tables

LAB = Identity.generate("lab")
BANK = Identity.generate("bank")
SHOP = Identity.generate("shop")
TELCO = Identity.generate("telco")
PARTIES = {"lab": LAB.public, "bank": BANK.public, "shop": SHOP.public, "telco": TELCO.public}
OWNERS = {"bank": BANK, "shop": SHOP, "telco": TELCO}

BASE = ["ann@example.com", "Zoë@example.com", "straße@example.de", "李@例子.中国", "bob@x.org", "carl@x.org"]


def variant(rng: np.random.Generator, s: str) -> str:
    """The same person written another way: case, whitespace, decomposed accents, ß vs SS."""
    choice = int(rng.integers(0, 5))
    if choice == 1:
        s = s.upper()
    elif choice == 2:
        s = f"  {s}\t"
    elif choice == 3:
        s = unicodedata.normalize("NFD", s)
    elif choice == 4:
        s = s.replace("ß", "SS").swapcase()
    return s


def id_table(seed: int, n: int, *, column: str = "email", shared: int = 40) -> bytes:
    """`n` rows: some of a shared pool (so inputs overlap), some own ids, duplicates, empty ids."""
    rng = np.random.default_rng(seed)
    pool = BASE + [f"user{i}@example.com" for i in range(shared)]
    ids = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            ids.append(variant(rng, pool[int(rng.integers(0, len(pool)))]))
        elif r < 0.95:
            ids.append(f"only{seed}-{int(rng.integers(0, 10**6))}@example.com")
        else:
            ids.append("   " if r < 0.97 else "")
    frame = pd.DataFrame({"row": range(n), column: ids, "score": rng.integers(0, 100, n)})
    return frame.to_csv(index=False).encode("utf-8")


def reference(tables: dict[str, bytes], columns: dict[str, str], *, hashed: bool = False):
    """The independent computation: pandas reads, Python normalises, pandas merges."""

    def norm(s: str) -> str:
        out = unicodedata.normalize("NFC", s.strip()).casefold()
        return hashlib.sha256(out.encode()).hexdigest() if hashed and out else out

    frames = {
        n: pd.read_csv(io.BytesIO(t), dtype=str, keep_default_na=False)[columns[n]].map(norm)
        for n, t in tables.items()
    }
    common = None
    for ids in frames.values():
        uniq = pd.DataFrame({"id": ids[ids != ""].unique()})
        common = uniq if common is None else common.merge(uniq, on="id", how="inner")
    assert common is not None
    ids_sorted = sorted(common["id"].tolist())
    members = {n: ids.isin(set(ids_sorted)).astype(int).tolist() for n, ids in frames.items()}
    return ids_sorted, members


def manifest(kit, datasets: dict, params: dict, outputs: dict[str, tuple[str, ...]], **kw):
    return build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=mf.builtin_descriptor("psi"),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput(o, rs) for o, rs in outputs.items()],
        participants=PARTIES,
        **kw,
    )


def run(kit, datasets: dict, params: dict, outputs: dict[str, tuple[str, ...]] | None = None):
    outputs = outputs or {"size": (LAB.fingerprint,)}
    m = manifest(kit, datasets, params, outputs)
    approvals = [sign_approval(ds.owner, m) for ds in datasets.values()] + [sign_approval(LAB, m)]
    return kit.run(m, approvals, datasets)


def every_output(datasets: dict) -> dict[str, tuple[str, ...]]:
    outs = {"size": (LAB.fingerprint,), "intersection": (LAB.fingerprint,)}
    outs.update({f"members_{n}": (ds.owner.fingerprint,) for n, ds in datasets.items()})
    return outs


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def test_psi_agrees_with_pandas_on_three_inputs(kit) -> None:
    tables = {"bank": id_table(1, 400), "shop": id_table(2, 300), "telco": id_table(3, 250, column="mail")}
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    columns = {"bank": "email", "shop": "email", "telco": "mail"}
    result, body, outs = run(kit, datasets, {"column": columns}, every_output(datasets))
    assert result["ok"], body
    expect_ids, expect_members = reference(tables, columns)
    assert len(expect_ids) > 10  # the generated data does overlap
    size = json.loads(kit.read(outs["size"], LAB))
    assert size == {"size": len(expect_ids), "inputs": ["bank", "shop", "telco"], "hashed": False}
    got = pd.read_csv(io.BytesIO(kit.read(outs["intersection"], LAB)), dtype=str, keep_default_na=False)
    assert got["id"].tolist() == expect_ids
    assert "strasse@example.de" in expect_ids and any(not s.isascii() for s in expect_ids)
    for n in tables:
        bits = pd.read_csv(io.BytesIO(kit.read(outs[f"members_{n}"], OWNERS[n])))
        assert bits["member"].tolist() == expect_members[n]
        with pytest.raises(ConfideError):  # sealed to its owner only: the lab cannot open it
            kit.read(outs[f"members_{n}"], LAB)


def test_psi_hash_releases_unsalted_sha256_of_normalised_ids(kit) -> None:
    tables = {"bank": id_table(4, 200), "shop": id_table(5, 200)}
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    outs_spec = {"intersection": (LAB.fingerprint,), "size": (LAB.fingerprint,)}
    result, body, outs = run(kit, datasets, {"column": "email", "hash": True}, outs_spec)
    assert result["ok"], body
    expect_ids, _ = reference(tables, {"bank": "email", "shop": "email"}, hashed=True)
    got = pd.read_csv(io.BytesIO(kit.read(outs["intersection"], LAB)), dtype=str)
    assert got["id"].tolist() == expect_ids
    assert hashlib.sha256(b"ann@example.com").hexdigest() in expect_ids
    assert json.loads(kit.read(outs["size"], LAB))["hashed"] is True


def test_psi_with_an_empty_input_is_empty(kit) -> None:
    tables = {"bank": id_table(6, 50), "shop": b"email,score\n"}
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    result, body, outs = run(kit, datasets, {"column": "email"}, every_output(datasets))
    assert result["ok"], body
    assert json.loads(kit.read(outs["size"], LAB))["size"] == 0
    assert kit.read(outs["intersection"], LAB) == b"id\n"
    assert kit.read(outs["members_shop"], SHOP) == b"member\n"
    assert pd.read_csv(io.BytesIO(kit.read(outs["members_bank"], BANK)))["member"].sum() == 0


# ---- the rules the enclave enforces -------------------------------------------------------------


def test_members_may_go_only_to_their_inputs_owner(kit) -> None:
    """A creator who wants the shop's membership bits (or adds itself as a second recipient) gets no
    manifest built, and a hand-made manifest that says so is refused by the enclave before it runs."""
    datasets = {"bank": kit.dataset(BANK, id_table(7, 20)), "shop": kit.dataset(SHOP, id_table(8, 20))}
    for recipients in ((LAB.fingerprint,), (SHOP.fingerprint, LAB.fingerprint), (BANK.fingerprint,)):
        with pytest.raises(IntegrityError, match="may be sealed only to that input's owner"):
            manifest(kit, datasets, {"column": "email"}, {"members_shop": recipients})
    with pytest.raises(ConfideError, match="for input 'zz', which the task does not have"):
        manifest(kit, datasets, {"column": "email"}, {"members_zz": (LAB.fingerprint,)})
    with pytest.raises(ConfideError, match="not one the function 'psi' writes"):
        manifest(kit, datasets, {"column": "email"}, {"ids": (LAB.fingerprint,)})
    # the hostile creator builds the manifest object itself (no parser) and everyone signs it
    good = manifest(kit, datasets, {"column": "email"}, {"members_shop": (SHOP.fingerprint,)})
    evil = dataclasses.replace(good, outputs=(mf.TaskOutput("members_shop", (LAB.fingerprint,)),))
    approvals = [sign_approval(who, evil) for who in (BANK, SHOP, LAB)]
    result, body, outs = kit.run(evil, approvals, datasets)
    assert result["ok"] is False
    assert "may be sealed only to that input's owner" in json.dumps(body)
    assert not outs["members_shop"].exists()


@pytest.mark.parametrize(
    ("tables", "params", "message"),
    [
        (
            {"bank": b"email\na@x\n", "shop": b"mail\na@x\n"},
            {"column": "email"},
            "input 'shop' has no column 'email' (its header: ['mail'])",
        ),
        (
            {"bank": b"email\na@x\nb@x\n" + b"c" * 5000 + b"\n", "shop": b"email\na@x\n"},
            {"column": "email"},
            "input 'bank', column 'email', data row 3: an id of 5000 characters (max_id_chars is 1024)",
        ),
        (
            {"bank": b"email\na@x\n", "shop": b"email\na@x\nb\xff\xfe@x\n"},
            {"column": "email"},
            "input 'shop' is not UTF-8 text (byte 11, line 3)",
        ),
        ({"bank": b"email\na@x\n", "shop": b"email\na@x\n"}, {}, "parameter 'column'"),
        ({"bank": b"email\na@x\n", "shop": b"email\na@x\n"}, {"column": "email", "salt": "x"}, "unknown"),
        (
            {"bank": b"email\na@x\n", "shop": b"email\na@x\n"},
            {"column": {"bank": "email"}},
            "column names inputs ['bank'], but the task's inputs are ['bank', 'shop']",
        ),
        ({"bank": b"email\na@x\n"}, {"column": "email"}, "needs two or more inputs, got 1"),
    ],
)
def test_hostile_input_gets_a_clear_error(kit, tables, params, message) -> None:
    datasets = {n: kit.dataset(OWNERS[n], t) for n, t in tables.items()}
    result, body, outs = run(kit, datasets, params)
    assert result["ok"] is False and result["category"] == "exception"
    assert body["error"]["check"] == "run"
    assert message in kit.read(outs["_error"], LAB).decode()
    assert not outs["size"].exists()


def test_approval_text_says_what_leaves_to_whom(kit) -> None:
    datasets = {"bank": kit.dataset(BANK, id_table(9, 5)), "shop": kit.dataset(SHOP, id_table(10, 5))}
    outs = {"size": (LAB.fingerprint,), "members_bank": (BANK.fingerprint,)}
    text = describe_manifest(manifest(kit, datasets, {"column": "email", "hash": True}, outs))
    assert (
        f"size -> lab ({LAB.fingerprint}): one number, how many distinct ids are in all of bank, shop" in text
    )
    assert f"members_bank -> bank ({BANK.fingerprint}): for each row of bank, one bit" in text
    assert "intersection ->" not in text and "members_shop" not in text
    assert "ids: column 'email' of every input; normalised in the enclave" in text


def test_sdk_helper_pads_what_would_tell_the_host_the_overlap() -> None:
    class Stub:
        fingerprint = LAB.fingerprint

        def create_task(self, **kw: Any) -> str:
            self.kw = kw
            return "task"

    stub = Stub()
    refs = {"bank": "cds1:x", "shop": "cds1:y"}
    analytics.psi(stub, inputs=refs, column="email", outputs=("size", "intersection"))  # type: ignore[arg-type]
    assert stub.kw["pad"] == {"size": 256, "intersection": "pow2"}
    assert stub.kw["outputs"] == {"size": [LAB.fingerprint], "intersection": [LAB.fingerprint]}
    analytics.psi(stub, inputs=refs, column="email", pad={"size": "pow2"})  # type: ignore[arg-type]
    assert stub.kw["pad"] == {"size": "pow2"} and stub.kw["params"] == {"column": "email"}
    with pytest.raises(ConfideError, match="psi outputs must be some of"):
        analytics.psi(stub, inputs=refs, column="email", outputs=("ids",))  # type: ignore[arg-type]


# ---- end to end: a real server, the SDK helper ----------------------------------------------------


def test_psi_end_to_end_on_a_server(server, tmp_path) -> None:
    srv = server
    clients = []
    try:
        clients = sdk_clients(srv, tmp_path, ("bank", "shop", "lab"))
        bank, shop, lab = clients
        tables = {"bank": id_table(11, 120), "shop": id_table(12, 90)}
        refs = upload_tables({"bank": bank, "shop": shop}, tables, tmp_path)
        task = analytics.psi(lab, inputs=refs, column="email", outputs=("size", "members"))
        for c in clients:
            c.approve(task)
        lab.run(task)
        assert lab.wait(task, timeout=120)["state"] == "succeeded"
        expect_ids, expect_members = reference(tables, {"bank": "email", "shop": "email"})
        got = lab.results(task, tmp_path / "out-lab").outputs
        assert set(got) == {"size"} and json.loads(got["size"].read_bytes())["size"] == len(expect_ids)
        for n, owner in (("bank", bank), ("shop", shop)):
            mine = owner.results(task, tmp_path / f"out-{n}").outputs
            assert set(mine) == {f"members_{n}"}
            assert pd.read_csv(mine[f"members_{n}"])["member"].tolist() == expect_members[n]
    finally:
        for c in clients:
            c.close()


def test_psi_through_the_cli(server, tmp_path) -> None:
    """`confide task create --function psi` through the generic path: plain --param, one --output per
    output; a members_<input> output sealed to the wrong party is refused with a clear error."""
    cli = CliParties(server, tmp_path, ("cbank", "cshop", "clab"))
    fps = cli.fps
    tables = {"cbank": id_table(13, 60), "cshop": id_table(14, 60)}
    refs = {n: cli.upload(n, n, t) for n, t in tables.items()}
    create = ["task", "create", "--function", "psi", "--input", f"bank={refs['cbank']}"]
    create += [
        "--input",
        f"shop={refs['cshop']}",
        "--output",
        f"size={fps['clab']}",
        "--param",
        "column=email",
    ]
    r = cli("clab", *create, "--output", f"members_shop={fps['clab']}")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "error: output 'members_shop' describes the rows of input 'shop'" in r.output
    r = cli("clab", *create, "--output", f"members_shop={fps['cshop']}")
    assert r.exit_code == 0, r.output
    task = r.stdout.strip().splitlines()[-1]
    r = cli("cshop", "task", "show", task)
    assert r.exit_code == 0 and "What leaves (psi, enforced in the enclave):" in r.stdout
    assert "members_shop -> cshop" in r.stdout and "for each row of shop, one bit" in r.stdout
    for n in ("cbank", "cshop", "clab"):
        r = cli(n, "task", "approve", task, "--yes")
        assert r.exit_code == 0, r.output
    r = cli("clab", "task", "run", task)
    assert r.exit_code == 0 and "succeeded" in r.stdout, r.output
    expect_ids, expect_members = reference(
        {"bank": tables["cbank"], "shop": tables["cshop"]}, {"bank": "email", "shop": "email"}
    )
    r = cli("clab", "task", "results", task, "--out", str(tmp_path / "lab"))
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lab" / "size").read_text())["size"] == len(expect_ids)
    r = cli("cshop", "task", "results", task, "--out", str(tmp_path / "shop"))
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "shop" / "members_shop")["member"].tolist() == expect_members["shop"]
