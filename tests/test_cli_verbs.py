"""The everyday verbs (issue 13) against a real `confide serve` on loopback (SQLite, one sim worker):
free-text party names and rename, whoami, the lists (tasks, pending approvals, datasets, functions,
parties), function show --source, names for functions and recipients, --max-output, cancel,
withdraw, dataset delete, --json, and the refusals each verb owes: a hostile party cannot list,
cancel or delete others' objects; a withdrawn approval makes the enclave refuse; a cancelled task
cannot run; a deleted dataset's blob is gone; bad input is one error line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from confide.attest.anchors import load_trust_anchors
from confide.cli.main import main
from confide.client import ApiError, Client
from confide.client.manifest_build import build_manifest
from confide.client.policy import Policy
from confide.enclave import manifest as mf
from confide.enclave.errors import FormatError
from confide.enclave.keys import Identity
from platform_support import UPPER_FN, ServerProcess

UPPER = UPPER_FN


@pytest.fixture(scope="module")
def env(server, dev_policy, tmp_path_factory):
    root = tmp_path_factory.mktemp("verbs-env")
    policy = root / "dev-policy.toml"
    policy.write_text(dev_policy.to_toml())
    return {
        "CONFIDE_HOME": str(root / "home"),
        "CONFIDE_URL": server.url,
        "CONFIDE_POLICY": str(policy),
        "CONFIDE_SIM_ROOT": str(server.data_dir / "platform" / "vendor_root.crt"),
        "COLUMNS": "200",  # tables fit their columns to the terminal: a pytest-xdist worker's is 80 wide
    }


def cli(env: dict[str, str], key: Path, *args: str, input: str | None = None):
    full = {**env, "CONFIDE_IDENTITY": str(key)}
    return CliRunner().invoke(main, list(args), env=full, input=input, catch_exceptions=False)


def ok(env: dict[str, str], key: Path, *args: str) -> str:
    r = cli(env, key, *args)
    assert r.exit_code == 0, r.output
    return r.stdout


def party(env, tmp: Path, stem: str, name: str) -> Path:
    assert CliRunner().invoke(main, ["keygen", stem, "--out-dir", str(tmp)]).exit_code == 0
    key = tmp / f"{stem}.key"
    ok(env, key, "party", "register", "--name", name)
    return key


def client_for(server: ServerProcess, policy: Policy, key: Path) -> Client:
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    return Client(server.url, Identity.load(key), policy=policy, anchors=anchors)


def blob_files(server: ServerProcess, sha256: str) -> list[Path]:
    return list((server.data_dir / "blobs").rglob(sha256))


@pytest.fixture(scope="module")
def world(env, server, tmp_path_factory):
    """Hospital A owns a dataset; Lab One registers a clear and a confidential function; an
    outsider takes part in nothing."""
    tmp = tmp_path_factory.mktemp("verbs-keys")
    hosp = party(env, tmp, "hosp", "Hospital A")
    lab = party(env, tmp, "lab", "Lab One")
    outsider = party(env, tmp, "out", "Mallory")
    src = tmp / "upper.py"
    src.write_text(UPPER)
    ok(env, lab, "function", "register", str(src), "--name", "upper", "--output", "out")
    ok(env, lab, "function", "register", str(src), "--name", "secret", "--output", "out", "--confidential")
    return {"tmp": tmp, "hosp": hosp, "lab": lab, "outsider": outsider, "src": src}


def upload(env, key: Path, tmp: Path, name: str, text: str = "x,y\n1,2\n3,4\n") -> str:
    csv = tmp / f"{name}.csv"
    csv.write_text(text)
    return ok(env, key, "dataset", "upload", str(csv), "--name", name).strip().splitlines()[-1]


def create(env, world, dataset_id: str, *extra: str, function: str = "upper") -> str:
    out = ok(
        env, world["lab"], "task", "create", "--function", function, "--input", f"data={dataset_id}",
        "--output", "out=Lab One", *extra,
    )  # fmt: skip
    return out.strip().splitlines()[-1]


def fp(key: Path) -> str:
    return Identity.load(key).fingerprint


# ---- names ------------------------------------------------------------------------------------------


def test_free_text_names_run_a_task_end_to_end_and_name_recipients(env, world, tmp_path):
    """`party register --name "Hospital A"` (the README's example) used to make every task fail:
    manifest participant names had to be identifiers. Now the whole flow runs, with the function
    and the recipient given by name."""
    ds = upload(env, world["hosp"], tmp_path, "names")
    task_id = create(env, world, ds)
    shown = ok(env, world["hosp"], "task", "show", task_id)
    assert "Lab One" in shown and fp(world["lab"]) in shown and "waiting for: Hospital A" in shown
    for key in (world["hosp"], world["lab"]):
        ok(env, key, "task", "approve", task_id, "--yes")
    assert "succeeded" in ok(env, world["lab"], "task", "run", task_id)
    ok(env, world["lab"], "task", "results", task_id, "--out", str(tmp_path / "res"))
    assert (tmp_path / "res" / "out").read_text() == "X,Y\n1,2\n3,4\n"


def test_manifest_names_are_free_text_but_bounded_and_printable():
    a, b = Identity.generate(), Identity.generate()

    def build(name: str) -> mf.Manifest:
        m = build_manifest(
            service=Identity.generate().public,
            creator=a.public,
            function=mf.builtin_descriptor("gbdt-train"),
            inputs=[],
            outputs=[("model", [a.fingerprint], 100), ("report", [a.fingerprint], 100)],
            participants={name: a.public, "B": b.public},
        )
        return mf.parse_manifest(m.text)

    assert build("Hospital A — Zürich").participant(a.fingerprint).name == "Hospital A — Zürich"
    for bad in ("a\nb", "evil\u202etxt.exe", " padded", "x" * 129, "nul\x00"):
        with pytest.raises(FormatError, match="participant name"):
            build(bad)


def test_rename_is_signed_audited_and_only_for_yourself(env, world, server, dev_policy):
    key = party(env, world["tmp"], "renamer", "Old Name")
    out = json.loads(ok(env, key, "party", "rename", "Clinic B", "--json"))
    assert out == {"fingerprint": fp(key), "name": "Clinic B", "previous": "Old Name"}
    me = json.loads(ok(env, key, "whoami", "--json"))
    assert me["name"] == "Clinic B" and me["fingerprint"] == fp(key)
    listed = json.loads(ok(env, key, "party", "list", "--name", "Clinic B", "-o", "json"))
    assert [p["fingerprint"] for p in listed] == [fp(key)] and listed[0]["created_at"].endswith("Z")
    events = json.loads(ok(env, key, "audit", "--json"))
    assert events["verified"] is True
    assert any(e["kind"] == "party.renamed" and e["detail"]["to"] == "Clinic B" for e in events["events"])
    # a hostile party cannot rename another
    mallory = client_for(server, dev_policy, world["outsider"])
    with mallory, pytest.raises(ApiError) as info:
        mallory.api.call("PATCH", f"/v1/parties/{fp(key)}", {"name": "Pwned"})
    assert info.value.status == 403
    # a control character is a usage error naming the argument, before anything is sent
    r = cli(env, key, "party", "rename", "bad\tname")
    assert r.exit_code == 2 and "error: a party name is" in r.output and "(NEW)" in r.output


def test_an_ambiguous_recipient_name_is_an_error_listing_the_parties(env, world, tmp_path):
    twins = [party(env, tmp_path, f"twin{i}", "Twin") for i in (1, 2)]
    ds = upload(env, world["hosp"], tmp_path, "ambiguous")
    r = cli(
        env, world["lab"], "task", "create", "--function", "upper", "--input", f"data={ds}",
        "--output", "out=Twin",
    )  # fmt: skip
    assert r.exit_code == 1 and "2 parties are named 'Twin'" in r.output
    assert all(fp(t) in r.output for t in twins) and "(--output out)" in r.output
    # a .pub file or the fingerprint picks one
    pub = str(twins[0].with_suffix(".pub"))
    r = cli(
        env, world["lab"], "task", "create", "--function", "upper", "--input", f"data={ds}",
        "--output", f"out={pub}",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli(env, world["lab"], "task", "create", "--function", "nosuch", "--input", f"data={ds}")
    assert r.exit_code == 1 and "no function of yours named 'nosuch'" in r.output


def test_another_partys_function_name_is_not_yours(env, world, tmp_path):
    """Names resolve among your own functions only: Mallory registering `upper` too changes
    nothing for the lab, and Mallory cannot use the lab's name to mean the lab's function."""
    ok(
        env,
        world["outsider"],
        "function",
        "register",
        str(world["src"]),
        "--name",
        "upper",
        "--output",
        "out",
    )
    ds = upload(env, world["hosp"], tmp_path, "own-names")
    task_id = create(env, world, ds)
    info = json.loads(ok(env, world["lab"], "task", "show", task_id, "--json"))
    lab_fns = json.loads(ok(env, world["lab"], "function", "list", "--mine", "--json"))
    assert info["function"]["digest"] in {f["digest"] for f in lab_fns if f["name"] == "upper"}


# ---- lists and show ----------------------------------------------------------------------------------


def test_lists_show_your_objects_and_hide_others(env, world, tmp_path):
    ref = upload(env, world["hosp"], tmp_path, "listed")
    task_id = create(env, world, ref)
    ds = ref.split(":")[1]  # the dataset id inside the cds1: reference the upload printed
    mine = json.loads(ok(env, world["hosp"], "dataset", "list", "--json"))
    assert ds in {d["dataset_id"] for d in mine} and all("key_envelope" not in d for d in mine)
    assert next(d for d in mine if d["dataset_id"] == ds)["owner_name"] == "Hospital A"
    table = ok(env, world["hosp"], "dataset", "list")
    assert ds in table and "Hospital A" in table
    tasks = json.loads(ok(env, world["lab"], "task", "list", "-o", "json"))
    row = next(t for t in tasks if t["task_id"] == task_id)
    assert row["function_name"] == "upper" and row["creator_name"] == "Lab One"
    assert row["created_at"].endswith("Z") and "T" in row["created_at"]
    assert task_id in ok(env, world["lab"], "task", "list")
    # the outsider sees none of it
    for what in ("dataset", "task"):
        listed = ok(env, world["outsider"], what, "list", "--json")
        assert ds not in listed and task_id not in listed
    fns = json.loads(ok(env, world["outsider"], "function", "list", "--json"))
    assert "secret" not in {f["name"] for f in fns} and "gbdt-train" in {f["name"] for f in fns}
    names = {p["name"] for p in json.loads(ok(env, world["outsider"], "party", "list", "--json"))}
    assert {"Hospital A", "Lab One", "Mallory"} <= names


def test_pending_lists_tasks_waiting_for_my_approval(env, world, tmp_path):
    ds = upload(env, world["hosp"], tmp_path, "pending")
    task_id = create(env, world, ds)
    pending = json.loads(ok(env, world["hosp"], "task", "list", "--pending", "--json"))
    assert task_id in {t["task_id"] for t in pending}
    assert task_id not in ok(env, world["outsider"], "task", "list", "--pending", "--json")
    ok(env, world["hosp"], "task", "approve", task_id, "--yes")
    pending = json.loads(ok(env, world["hosp"], "task", "list", "--pending", "--json"))
    assert task_id not in {t["task_id"] for t in pending}


def test_function_show_source_only_for_clear_functions(env, world):
    # by name@version among functions the caller can see; the digest works for anyone
    digest = ok(env, world["lab"], "function", "register", str(world["src"]), "--name", "upper",
                "--output", "out").strip().splitlines()[-1]  # fmt: skip
    assert ok(env, world["lab"], "function", "show", digest, "--source") == UPPER
    info = json.loads(ok(env, world["lab"], "function", "show", "upper@1", "--json"))
    assert info["digest"] == digest and info["owner_name"] == "Lab One"
    assert "Trains an XGBoost" in ok(env, world["lab"], "function", "show", "gbdt-train")
    assert "xgb.train" in ok(env, world["lab"], "function", "show", "gbdt-train", "--source")
    r = cli(env, world["lab"], "function", "show", "secret", "--source")
    assert r.exit_code == 1 and "confidential" in r.output and "(--source)" in r.output


def test_max_output_is_written_in_the_manifest(env, world, tmp_path):
    ds = upload(env, world["hosp"], tmp_path, "capped")
    task_id = create(env, world, ds, "--max-output", "out=64KiB")
    info = json.loads(ok(env, world["lab"], "task", "show", task_id, "--json"))
    assert info["manifest"]["outputs"][0]["max_bytes"] == 65536
    for size, message in (("lots", "not a size"), ("0", "1 byte .. 1 TiB"), ("2TiB", "1 byte .. 1 TiB")):
        r = cli(
            env, world["lab"], "task", "create", "--function", "upper", "--input", f"data={ds}",
            "--output", "out=Lab One", "--max-output", f"out={size}",
        )  # fmt: skip
        assert r.exit_code == 2 and message in r.output and "(--max-output out)" in r.output
    r = cli(
        env, world["lab"], "task", "create", "--function", "upper", "--input", f"data={ds}",
        "--output", "out=Lab One", "--max-output", "other=1MB",
    )  # fmt: skip
    assert r.exit_code == 2 and "no --output named 'other'" in r.output


# ---- cancel, withdraw, delete ----------------------------------------------------------------------------


def test_a_cancelled_task_cannot_run_and_only_its_creator_cancels(env, world, tmp_path):
    ds = upload(env, world["hosp"], tmp_path, "cancel")
    task_id = create(env, world, ds)
    for key in (world["hosp"], world["lab"]):
        ok(env, key, "task", "approve", task_id, "--yes")
    r = cli(env, world["hosp"], "task", "cancel", task_id)  # a participant, not the creator
    assert r.exit_code == 1 and "only the task's creator" in r.output
    r = cli(env, world["outsider"], "task", "cancel", task_id)
    assert r.exit_code == 1 and "no task" in r.output
    assert "cancelled" in ok(env, world["lab"], "task", "cancel", task_id)
    r = cli(env, world["lab"], "task", "run", task_id)
    assert r.exit_code == 1 and "cancelled" in r.output and "Traceback" not in r.output
    info = json.loads(ok(env, world["lab"], "task", "show", task_id, "--json"))
    assert info["state"] == "cancelled" and info["attempts"] == 0
    r = cli(env, world["lab"], "task", "cancel", task_id)
    assert r.exit_code == 1 and "is cancelled" in r.output
    events = json.loads(ok(env, world["hosp"], "audit", "--task", task_id, "--json"))["events"]
    assert "task.cancelled" in [e["kind"] for e in events] and "task.running" not in [
        e["kind"] for e in events
    ]


def test_a_withdrawn_approval_makes_the_enclave_refuse(env, world, tmp_path):
    ds = upload(env, world["hosp"], tmp_path, "withdraw")
    task_id = create(env, world, ds)
    for key in (world["hosp"], world["lab"]):
        ok(env, key, "task", "approve", task_id, "--yes")
    r = cli(env, world["outsider"], "task", "withdraw", task_id)
    assert r.exit_code == 1 and "no task" in r.output
    assert "withdrew" in ok(env, world["hosp"], "task", "withdraw", task_id)
    r = cli(env, world["hosp"], "task", "withdraw", task_id)
    assert r.exit_code == 1 and "no approval" in r.output
    # the creator runs it anyway: the enclave itself refuses for the missing approval
    r = cli(env, world["lab"], "task", "run", task_id)
    assert r.exit_code == 1 and "(approval)" in r.output
    assert "approval" in cli(env, world["lab"], "task", "withdraw", "--help").output


def test_withdraw_after_a_run_says_it_cannot_undo_it(env, world, tmp_path):
    ds = upload(env, world["hosp"], tmp_path, "ran")
    task_id = create(env, world, ds)
    for key in (world["hosp"], world["lab"]):
        ok(env, key, "task", "approve", task_id, "--yes")
    ok(env, world["lab"], "task", "run", task_id)
    r = cli(env, world["hosp"], "task", "withdraw", task_id)
    assert r.exit_code == 1 and "cannot undo" in r.output


def test_dataset_delete_removes_the_blob_and_only_its_owner_may(env, world, server, tmp_path, dev_policy):
    ds = upload(env, world["hosp"], tmp_path, "doomed")
    task_id = create(env, world, ds)  # the lab now may see the dataset's metadata
    sha = json.loads(ok(env, world["hosp"], "dataset", "show", ds))["ciphertext_sha256"]
    assert len(blob_files(server, sha)) == 1
    r = cli(env, world["lab"], "dataset", "delete", ds, "--yes")
    assert r.exit_code == 1 and "only the dataset's owner" in r.output
    r = cli(env, world["outsider"], "dataset", "delete", ds, "--yes")
    assert r.exit_code == 1 and "no dataset" in r.output
    r = cli(env, world["hosp"], "dataset", "delete", ds, input="n\n")
    assert r.exit_code == 1 and "not deleted" in r.output
    assert "ciphertext removed" in ok(env, world["hosp"], "dataset", "delete", ds, "--yes")
    assert blob_files(server, sha) == []
    hosp = client_for(server, dev_policy, world["hosp"])
    with hosp, pytest.raises(ApiError) as info:
        hosp.api.call("GET", f"/v1/blobs/{sha}")
    assert info.value.status == 404
    assert ds not in ok(env, world["hosp"], "dataset", "list", "--json")
    # a task that read it fails cleanly if run after
    for key in (world["hosp"], world["lab"]):
        ok(env, key, "task", "approve", task_id, "--yes")
    r = cli(env, world["lab"], "task", "run", task_id)
    assert r.exit_code == 1 and "Traceback" not in r.output
    help_text = cli(env, world["hosp"], "dataset", "delete", "--help").output
    assert "recall anything already derived" in " ".join(help_text.split())


# ---- output and errors ------------------------------------------------------------------------------


def test_audit_says_the_chain_was_verified(env, world):
    out = ok(env, world["lab"], "audit")
    assert "audit chain verified" in out and "event(s)" in out and "Lab One" in out


def test_bad_input_is_one_error_line(env, world, tmp_path):
    r = cli(env, world["lab"], "task", "list", "--json", "-o", "table")
    assert r.exit_code == 2 and "error: --json and -o table contradict each other (-o)" in r.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ds = upload(env, world["hosp"], tmp_path, "outpath")
    task_id = create(env, world, ds)
    for key in (world["hosp"], world["lab"]):
        ok(env, key, "task", "approve", task_id, "--yes")
    ok(env, world["lab"], "task", "run", task_id)
    r = cli(env, world["lab"], "task", "results", task_id, "--out", str(blocker / "sub"))
    assert r.exit_code == 1 and r.output.startswith("error: cannot create the output directory")
    assert "Traceback" not in r.output
