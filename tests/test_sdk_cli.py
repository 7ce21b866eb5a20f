"""The client SDK and the party CLI against a real `confide serve` on loopback (SQLite, one sim worker).

Covers the whole flow a party runs (register, attest, upload, register a function, create, review,
approve, run, results, receipt, audit) and what the client itself must refuse: a service key other
than the attested one, a manifest other than the reviewed one, a blob that does not match its
digest, a receipt signed by another key, a tampered audit event, and bad CLI input.
"""

from __future__ import annotations

import base64
import copy
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from confide.attest.anchors import load_trust_anchors
from confide.cli.main import main
from confide.client import ApiError, Client, check_audit_chain
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.policy import Policy
from confide.client.receipts import verify_task_receipt
from confide.enclave import manifest as mf
from confide.enclave.encoding import b64e, canonical_json
from confide.enclave.errors import ConfideError, FormatError, IntegrityError, PolicyError
from confide.enclave.keys import Identity, short_fingerprint
from platform_support import UPPER_FN, ServerProcess, run_upper_task

UPPER = UPPER_FN


def _client(server: ServerProcess, policy: Policy, name: str) -> Client:
    """A party with its own home directory (its record of the manifests it created or approved)."""
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    home = server.data_dir.parent / f"home-{name}"
    client = Client(server.url, Identity.generate(name), policy=policy, anchors=anchors, home=home)
    client.register(name)
    return client


@pytest.fixture(scope="module")
def parties(server: ServerProcess, dev_policy: Policy):
    owner, lab = _client(server, dev_policy, "owner"), _client(server, dev_policy, "lab")
    yield owner, lab
    owner.close()
    lab.close()


@pytest.fixture(scope="module")
def mallory(server: ServerProcess, dev_policy: Policy):
    """The hostile host's own party (it may register as many as it likes)."""
    client = _client(server, dev_policy, "mallory")
    yield client
    client.close()


@pytest.fixture(scope="module")
def finished_task(parties, tmp_path_factory: pytest.TempPathFactory):
    """One task run to completion through the SDK: (task id, dataset ref, function digest)."""
    owner, lab = parties
    return run_upper_task(owner, lab, tmp_path_factory.mktemp("data"))


# ---- the SDK flow ---------------------------------------------------------------------------------


def test_sdk_round_trip_decrypts_the_result_and_checks_the_receipt(parties, finished_task, tmp_path):
    _, lab = parties
    task, ds, fn = finished_task
    result = lab.results(task, tmp_path / "out")
    assert result.outputs["out"].read_text() == "NAME,SCORE\nADA,1\nGRACE,2\n"
    receipt = result.receipt
    assert receipt["status"] == "ok" and receipt["function_digest"] == fn
    assert [i["dataset_id"] for i in receipt["inputs"]] == [ds.dataset_id]
    assert ds.rows == 2 and ds.columns == ("name", "score")


def test_only_recipients_get_outputs(parties, finished_task, tmp_path):
    owner, _lab = parties
    task, _, _ = finished_task
    assert owner.results(task, tmp_path / "owner").outputs == {}


def test_attest_refuses_simulation_under_a_production_policy(server):
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    strict = Client(server.url, Identity.generate("strict"), policy=Policy(), anchors=anchors)
    with strict, pytest.raises(PolicyError, match="SIMULATED"):
        strict.attest()


def test_attest_refuses_an_unknown_measurement(server):
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    other = Policy(backends=("sim",), measurements=("00" * 32,), allow_simulation=True)
    picky = Client(server.url, Identity.generate("picky"), policy=other, anchors=anchors)
    with picky, pytest.raises(PolicyError, match="measurement"):
        picky.attest()


def test_client_notices_a_changed_service_key(parties):
    _owner, lab = parties
    real = lab.service
    object.__setattr__(real, "public", Identity.generate("impostor").public)
    try:
        with pytest.raises(PolicyError, match="service key changed"):
            lab.attest()
    finally:
        lab._service = None
        lab.attest()


def test_approve_refuses_a_manifest_other_than_the_reviewed_one(parties, finished_task):
    owner, _ = parties
    task, _, _ = finished_task
    with pytest.raises(PolicyError, match="not the reviewed"):
        owner.approve(task, expect_digest="0" * 64)


def test_receipt_signed_by_another_key_is_rejected(parties, finished_task):
    _, lab = parties
    task, _, _ = finished_task
    info = lab.task(task)
    body = verify_task_receipt(
        __import__("base64").b64decode(info["receipt"]), lab.service.public, where="receipt"
    )
    forger = Identity.generate("forger")
    forged = canonical_json({"body": body, "signature": b64e(forger.sign(canonical_json(body)))})
    info["receipt"] = b64e(forged)
    with pytest.raises(ConfideError, match="signature"):
        lab.receipt(task, info)


def test_downloaded_blob_must_match_its_digest(parties, finished_task, server, tmp_path):
    _, lab = parties
    task, _, _ = finished_task
    sha = lab.receipt(task)["outputs"][0]["sha256"]
    blob = next(p for p in (server.data_dir).rglob(sha) if p.is_file())
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(ConfideError, match="does not match its digest"):
            lab.results(task, tmp_path / "tampered")
        assert not (tmp_path / "tampered" / "out").exists()
    finally:
        blob.write_bytes(original)


def test_audit_chain_is_checked(parties, finished_task):
    _, lab = parties
    task, _, _ = finished_task
    events = lab.audit(task)
    kinds = [e["kind"] for e in events]
    assert "task.created" in kinds and "task.succeeded" in kinds
    tampered = copy.deepcopy(events)
    tampered[-1]["detail"] = {"forged": True}
    with pytest.raises(IntegrityError, match="does not match its hash"):
        check_audit_chain(tampered, where="test")


def test_sdk_logistic_regression_train_then_predict_with_the_model_as_a_dataset(parties, tmp_path):
    """ml_tasks' helpers on a real server: the trained model (portable JSON) is uploaded by its
    recipient as a dataset and scores the owner's rows; both owners approve the second task."""
    from confide.client import ml_tasks

    owner, lab = parties
    rows = "".join(f"p{i},{(i * 7) % 11},{i % 5},{int((i * 7) % 11 > 5)}\n" for i in range(60))
    (tmp_path / "train.csv").write_text("id,a,b,y\n" + rows)
    data = owner.upload_dataset(tmp_path / "train.csv")
    task = ml_tasks.logistic_regression_train(lab, inputs={"data": data.ref}, label="y", exclude=["id"])
    for c in (owner, lab):
        c.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    got = lab.results(task, tmp_path / "trained").outputs
    assert json.loads(got["report"].read_text())["total_rows"] == 60
    model = lab.upload_dataset(got["model"])
    task = ml_tasks.logistic_regression_predict(lab, model=model.ref, data=data.ref, label="y")
    for c in (owner, lab):
        c.approve(task)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "succeeded"
    lines = lab.results(task, tmp_path / "scored").outputs["predictions"].read_text().splitlines()
    assert lines[0] == "probability,class" and len(lines) == 61
    truth = [line.rsplit(",", 1)[1] for line in rows.splitlines()]
    hits = sum(p.rsplit(",", 1)[1] == t for p, t in zip(lines[1:], truth, strict=True))
    assert hits >= 54  # y is a threshold on column a: the model learns it


def test_platform_refusal_is_an_api_error_with_status(parties):
    _, lab = parties
    with pytest.raises(ApiError) as info:
        lab.task("0" * 32)
    assert info.value.status == 404


# ---- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(server, tmp_path, dev_policy):
    policy = tmp_path / "dev-policy.toml"
    policy.write_text(dev_policy.to_toml())
    return {
        "CONFIDE_HOME": str(tmp_path / "home"),
        "CONFIDE_URL": server.url,
        "CONFIDE_POLICY": str(policy),
        "CONFIDE_SIM_ROOT": str(server.data_dir / "platform" / "vendor_root.crt"),
    }


def _cli(env: dict[str, str], *args: str, identity: Path | None = None, input: str | None = None):
    full = {**env, **({"CONFIDE_IDENTITY": str(identity)} if identity else {})}
    return CliRunner().invoke(main, list(args), env=full, input=input, catch_exceptions=False)


def test_cli_whole_flow(cli_env, tmp_path):
    for name in ("hosp", "lab"):
        assert _cli(cli_env, "keygen", name, "--out-dir", str(tmp_path)).exit_code == 0
    hosp, lab = tmp_path / "hosp.key", tmp_path / "lab.key"
    for name, key in (("hosp", hosp), ("lab", lab)):
        r = _cli(cli_env, "party", "register", "--name", name, identity=key)
        assert r.exit_code == 0, r.output
    r = _cli(cli_env, "service", "attest", "--json", identity=lab)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["claims"]["simulated"] is True
    csv = tmp_path / "patients.csv"
    csv.write_text("x,y\n1,2\n3,4\n")
    r = _cli(cli_env, "dataset", "upload", str(csv), identity=hosp)
    assert r.exit_code == 0, r.output
    dataset_id = r.stdout.strip().splitlines()[-1]
    src = tmp_path / "upper.py"
    src.write_text(UPPER)
    r = _cli(
        cli_env,
        "function",
        "register",
        str(src),
        "--name",
        "upper",
        "--output",
        "out",
        "--confidential",
        identity=lab,
    )
    assert r.exit_code == 0, r.output
    digest = r.stdout.strip().splitlines()[-1]
    lab_fp = Identity.load(lab).fingerprint
    r = _cli(
        cli_env, "task", "create", "--function", digest, "--input", f"data={dataset_id}",
        "--output", f"out={lab_fp}", "--param", "limit=3", identity=lab,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    task_id = r.stdout.strip().splitlines()[-1]
    # the hospital reviews: the summary says the code is confidential and names the output recipient
    r = _cli(cli_env, "task", "show", task_id, identity=hosp)
    assert r.exit_code == 0 and "confidential" in r.stdout.lower() and lab_fp in r.stdout
    # declining at the prompt approves nothing
    r = _cli(cli_env, "task", "approve", task_id, identity=hosp, input="n\n")
    assert r.exit_code == 1 and "not approved" in r.output
    for key in (hosp, lab):
        r = _cli(cli_env, "task", "approve", task_id, "--yes", identity=key)
        assert r.exit_code == 0, r.output
    r = _cli(cli_env, "task", "run", task_id, identity=lab)
    assert r.exit_code == 0 and "succeeded" in r.stdout, r.output
    r = _cli(cli_env, "task", "results", task_id, "--out", str(tmp_path / "res"), identity=lab)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "res" / "out").read_text() == "X,Y\n1,2\n3,4\n"
    r = _cli(cli_env, "task", "receipt", task_id, identity=lab)
    assert json.loads(r.stdout)["status"] == "ok"
    r = _cli(cli_env, "audit", "--task", task_id, identity=hosp)
    assert r.exit_code == 0 and "task.succeeded" in r.stdout


def test_cli_run_before_approval_is_refused_by_the_enclave(cli_env, tmp_path):
    for name in ("own", "req"):
        _cli(cli_env, "keygen", name, "--out-dir", str(tmp_path))
        _cli(cli_env, "party", "register", "--name", name, identity=tmp_path / f"{name}.key")
    csv = tmp_path / "d.csv"
    csv.write_text("a\n1\n")
    dataset_id = _cli(cli_env, "dataset", "upload", str(csv), identity=tmp_path / "own.key").stdout.split()[
        -1
    ]
    req_fp = Identity.load(tmp_path / "req.key").fingerprint
    task_id = _cli(
        cli_env, "task", "create", "--function", "gbdt-train", "--input", f"data={dataset_id}",
        "--output", f"model={req_fp}", "--output", f"report={req_fp}", "--param", "label=a",
        identity=tmp_path / "req.key",
    ).stdout.split()[-1]  # fmt: skip
    r = _cli(cli_env, "task", "run", task_id, identity=tmp_path / "req.key")
    assert r.exit_code == 1
    assert "approval" in r.output and "Traceback" not in r.output


def test_cli_logistic_regression_train_with_the_generic_flags(cli_env, tmp_path):
    """`task create --function logistic-regression-train --output model=PARTY --param label=y`: the
    generic flags build the manifest (one of the two optional outputs), `task show` says what leaves."""
    for name in ("clinic", "stats"):
        _cli(cli_env, "keygen", name, "--out-dir", str(tmp_path))
        _cli(cli_env, "party", "register", "--name", name, identity=tmp_path / f"{name}.key")
    clinic, stats = tmp_path / "clinic.key", tmp_path / "stats.key"
    csv = tmp_path / "visits.csv"
    csv.write_text("id,x,y\n" + "".join(f"p{i},{i % 7},{int(i % 7 > 3)}\n" for i in range(40)))
    dataset_id = _cli(cli_env, "dataset", "upload", str(csv), identity=clinic).stdout.split()[-1]
    stats_fp = Identity.load(stats).fingerprint
    r = _cli(
        cli_env, "task", "create", "--function", "logistic-regression-train", "--input", f"data={dataset_id}",
        "--output", f"model={stats_fp}", "--param", "label=y", "--param", 'exclude=["id"]', "--param", "C=2",
        identity=stats,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    task_id = r.stdout.strip().splitlines()[-1]
    r = _cli(cli_env, "task", "show", task_id, identity=clinic)
    assert r.exit_code == 0, r.output
    assert "What leaves (logistic-regression-train, enforced in the enclave):" in r.stdout
    assert "label 'y', every column but the label and id; C = 2" in r.stdout
    for key in (clinic, stats):
        assert _cli(cli_env, "task", "approve", task_id, "--yes", identity=key).exit_code == 0
    r = _cli(cli_env, "task", "run", task_id, identity=stats)
    assert r.exit_code == 0 and "succeeded" in r.stdout, r.output
    r = _cli(cli_env, "task", "results", task_id, "--out", str(tmp_path / "res"), identity=stats)
    assert r.exit_code == 0, r.output
    model = json.loads((tmp_path / "res" / "model").read_text())
    assert model["features"] == ["x"] and model["classes"] == [0, 1] and model["coef"][0][0] > 0
    assert not (tmp_path / "res" / "report").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("task", "create", "--function", "gbdt-train", "--input", "no-equals-sign"), "--input"),
        (("task", "create", "--function", "gbdt-train", "--params-json", "[1"), "--params-json"),
        (("task", "show", "0" * 32), "404"),
        (("dataset", "show", "not-an-id"), "platform refused"),
    ],
)
def test_cli_bad_input_is_a_clear_error(cli_env, tmp_path, args, message):
    _cli(cli_env, "keygen", "someone", "--out-dir", str(tmp_path))
    key = tmp_path / "someone.key"
    _cli(cli_env, "party", "register", "--name", "someone", identity=key)
    r = _cli(cli_env, *args, identity=key)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output


def test_cli_unreachable_platform_is_a_clear_error(cli_env, tmp_path):
    _cli(cli_env, "keygen", "x", "--out-dir", str(tmp_path))
    env = {**cli_env, "CONFIDE_URL": "http://127.0.0.1:9"}
    r = _cli(env, "service", "attest", identity=tmp_path / "x.key")
    assert r.exit_code == 1 and "cannot reach the platform" in r.output


def test_long_poll_answers_with_the_new_state(parties, finished_task):
    """Asking to wait while the task is 'queued' returns at once: it already left that state."""
    _, lab = parties
    task, _, _ = finished_task
    info = lab.api.call("GET", f"/v1/tasks/{task}?wait=30&state=queued")
    assert info["state"] == "succeeded"


def test_long_poll_rejects_an_unknown_state(parties, finished_task):
    _, lab = parties
    task, _, _ = finished_task
    with pytest.raises(ApiError) as info:
        lab.api.call("GET", f"/v1/tasks/{task}?wait=1&state=exploded")
    assert info.value.status in (400, 422)


def test_wait_reports_each_state_once(parties, tmp_path):
    owner, lab = parties
    data = tmp_path / "d.csv"
    data.write_text("a\n1\n")
    ds = owner.upload_dataset(data)
    fn = lab.register_function(UPPER, name="upper2", description="upper-cases", outputs=["out"])
    task = lab.create_task(function=fn, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]})
    owner.approve(task)
    lab.approve(task)
    lab.run(task)
    seen: list[str] = []
    final = lab.wait(task, timeout=120, on_state=lambda i: seen.append(i["state"]))
    assert final["state"] == "succeeded" and seen[-1] == "succeeded"
    assert len(seen) == len(set(seen))


# ---- issue 12: results only of the manifest a party created or approved; pinned datasets ---------


def _db(server: ServerProcess) -> sqlite3.Connection:
    """The hostile host's own access to its database."""
    return sqlite3.connect(server.data_dir / "confide.db", timeout=30, isolation_level=None)


def _numbers_csv(path: Path, seed: int) -> Path:
    rows = "".join(f"{(i * 37 + seed) % 11},{(i * 53 + seed) % 7},{i % 2}\n" for i in range(40))
    path.write_text("a,b,y\n" + rows)
    return path


def test_host_substituted_manifest_is_refused_naming_both_digests(parties, mallory, server, tmp_path):
    """The host writes another manifest under the lab's task id (same creator, outputs and
    recipients) whose only input is its own dataset, which it approves itself; it runs it. The lab
    refuses the result: it accepts only the manifest it created, and names both digests."""
    owner, lab = parties
    ds = owner.upload_dataset(_numbers_csv(tmp_path / "owner.csv", 1))
    task = lab.create_task(
        function="gbdt-train",
        inputs={"data": ds.ref},
        outputs={"model": [lab.fingerprint], "report": [lab.fingerprint]},
        params={"label": "y", "rounds": 2},
    )
    owner.approve(task)
    created = lab.manifest(task)
    # the host's substitute: its own data, its own approval as that data's owner
    own = mallory.upload_dataset(_numbers_csv(tmp_path / "host.csv", 5))
    swapped = build_manifest(
        service=lab.service.public,
        creator=lab.identity.public,
        function=mf.builtin_descriptor("gbdt-train"),
        params=created.params,
        inputs=[("data", own.dataset_id, mallory.fingerprint, own.ciphertext_sha256)],
        outputs=[(o.name, o.recipients, o.max_bytes) for o in created.outputs],
        participants={"lab": lab.identity.public, "mallory": mallory.identity.public},
        task_id=task,
        created_at=created.created_at,
    )
    assert swapped.digest != created.digest
    approval = sign_approval(mallory.identity, swapped)
    with _db(server) as db:
        db.execute(
            "UPDATE tasks SET manifest = ?, manifest_sha256 = ? WHERE task_id = ?",
            (swapped.text, swapped.digest, task),
        )
        db.execute("DELETE FROM approvals WHERE task_id = ?", (task,))
        db.execute(
            "INSERT INTO approvals (task_id, party, manifest_sha256, approval, created_at) "
            "VALUES (?, ?, ?, ?, 0)",
            (task, mallory.fingerprint, swapped.digest, canonical_json(approval).decode()),
        )
    lab.run(task)
    lab.wait(task, timeout=120)
    with pytest.raises(IntegrityError) as refused:
        lab.results(task, tmp_path / "out")
    assert created.digest in str(refused.value) and swapped.digest in str(refused.value)
    with pytest.raises(IntegrityError, match=created.digest):
        lab.receipt(task)
    assert not (tmp_path / "out" / "model").exists()
    # the enclave refused to run it too: the lab never approved the substitute
    body = verify_task_receipt(base64.b64decode(lab.task(task)["receipt"]), lab.service.public)
    assert body["status"] == "error" and body["error"]["check"] == "approval"
    assert f"no approval by lab ({lab.fingerprint})" in body["error"]["message"]
    # a script elsewhere names the manifest it expects; this home's record still disagrees
    with pytest.raises(PolicyError, match=created.digest):
        lab.results(task, tmp_path / "out", expect_manifest=swapped.digest)


def test_results_need_a_known_manifest(parties, finished_task, server, dev_policy, tmp_path):
    """A party with no record of the task (another home) must name the manifest it expects."""
    _, lab = parties
    task, _, _ = finished_task
    anchors = load_trust_anchors(sim=[server.data_dir / "platform" / "vendor_root.crt"])
    elsewhere = Client(server.url, lab.identity, policy=dev_policy, anchors=anchors, home=tmp_path / "h")
    with elsewhere:
        with pytest.raises(PolicyError, match="neither created nor approved"):
            elsewhere.results(task, tmp_path / "out")
        with pytest.raises(IntegrityError, match="receipt is for manifest"):
            elsewhere.results(task, tmp_path / "out", expect_manifest="0" * 64)
        digest = lab.manifest(task).digest
        result = elsewhere.results(task, tmp_path / "out", expect_manifest=digest)
        assert result.outputs["out"].read_text() == "NAME,SCORE\nADA,1\nGRACE,2\n"
        with pytest.raises(PolicyError, match="not a SHA-256"):
            elsewhere.results(task, tmp_path / "out", expect_manifest="abc")


@pytest.mark.parametrize("field", ["owner", "ciphertext_sha256"])
def test_host_substituting_the_dataset_behind_a_reference_is_refused(
    parties, mallory, server, tmp_path, field
):
    owner, lab = parties
    ds = owner.upload_dataset(_numbers_csv(tmp_path / "d.csv", 2))
    other = mallory.upload_dataset(_numbers_csv(tmp_path / "m.csv", 3))
    value = mallory.fingerprint if field == "owner" else other.ciphertext_sha256
    with _db(server) as db:
        db.execute(f"UPDATE datasets SET {field} = ? WHERE dataset_id = ?", (value, ds.dataset_id))
    with pytest.raises(IntegrityError, match=f"{field} {value}, not the {getattr(ds, field)}"):
        lab.create_task(
            function="gbdt-train",
            inputs={"data": ds.ref},
            outputs={"model": [lab.fingerprint], "report": [lab.fingerprint]},
            params={"label": "y"},
        )


def test_bare_dataset_ids_and_short_fingerprints_do_not_pin(parties, finished_task):
    owner, lab = parties
    _, ds, fn = finished_task
    with pytest.raises(PolicyError, match="bare dataset id"):
        lab.create_task(function=fn, inputs={"data": ds.dataset_id}, outputs={"out": [lab.fingerprint]})
    short = short_fingerprint(lab.fingerprint)
    with pytest.raises(FormatError, match="128-bit"):
        lab.create_task(function=fn, inputs={"data": ds.ref}, outputs={"out": [short]})
    with pytest.raises(FormatError, match="128-bit"):
        lab.party(short_fingerprint(owner.fingerprint))
    assert ds.ref == f"cds1:{ds.dataset_id}:{owner.fingerprint.replace('-', '')}:{ds.ciphertext_sha256}"
    assert lab.dataset(ds.ref) == lab.dataset(ds.dataset_id)


FAILING = 'def run(ctx):\n    raise ValueError("no")\n'


def test_reruns_beyond_the_approved_count_are_refused(parties, tmp_path):
    """The owner approves one run; the (failed) task is queued again: the enclave refuses the
    second run with a signed receipt, before decrypting anything for it."""
    owner, lab = parties
    data = tmp_path / "d.csv"
    data.write_text("a\n1\n")
    ds = owner.upload_dataset(data)
    fn = lab.register_function(FAILING, name="fails", description="always fails", outputs=["out"])
    task = lab.create_task(function=fn, inputs={"data": ds.ref}, outputs={"out": [lab.fingerprint]})
    owner.approve(task, max_runs=1)
    lab.run(task)
    assert lab.wait(task, timeout=120)["state"] == "failed"
    first = lab.receipt(task)
    assert first["error"]["check"] == "run" and (first["run"], first["max_runs"]) == (1, 1)
    lab.run(task)  # a failed task may be queued again
    assert lab.wait(task, timeout=120)["state"] == "failed"
    second = lab.receipt(task)
    assert second["error"]["check"] == "runs", second["error"]
    assert "run 2 of this task exceeds the 1 run(s)" in second["error"]["message"]
    assert second["outputs"] == [] and second["run"] == 0


def test_a_second_receipt_for_the_same_run_is_refused(tmp_path):
    """Rollback detection on the client: two different receipts for run n of one worker."""
    from confide.client.task_store import TaskStore

    store = TaskStore(tmp_path / "client.db")
    store.check_receipt("p", "t", "worker-evidence", 1, "a" * 64)
    store.check_receipt("p", "t", "worker-evidence", 1, "a" * 64)  # the same receipt again is fine
    store.check_receipt("p", "t", "worker-evidence", 2, "b" * 64)
    with pytest.raises(IntegrityError, match="rolled back"):
        store.check_receipt("p", "t", "worker-evidence", 1, "c" * 64)
    store.remember_manifest("p", "t", "d" * 64, "created")
    with pytest.raises(IntegrityError, match="d" * 64):
        store.remember_manifest("p", "t", "e" * 64, "approved", 3)
