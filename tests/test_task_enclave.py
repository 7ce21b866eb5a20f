"""The `task` call against a real enclave worker: consent enforced in the enclave (PROTOCOL.md 5-6).

One worker (sim backend, service initialised) serves the whole module; every refusal must leave it
serving, publish nothing, and come back as a receipt signed by the service key naming the check and
the party or input at fault.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import xgboost

from confide.client.function_seal import seal_function_source
from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.keys import Identity
from confide.enclave.sealed_file import SealedReader

LAB = Identity.generate("lab")
HOSP_A = Identity.generate("hospital-a")
HOSP_B = Identity.generate("hospital-b")
ALGO = Identity.generate("algo")
MALLORY = Identity.generate("mallory")
PARTIES = {"lab": LAB.public, "hospital_a": HOSP_A.public, "hospital_b": HOSP_B.public, "algo": ALGO.public}

SCORER = """
import json

def run(ctx):
    # proprietary-scoring-4471
    rows = sum(ctx.inputs[name].read().count(b"\\n") - 1 for name in sorted(ctx.inputs))
    ctx.outputs["out"].write(json.dumps({"rows": rows, "tag": ctx.params.get("tag")}).encode())
"""
LEAKY = """
def run(ctx):
    raise ValueError("boom: " + ctx.inputs["hospital_a"].read()[:40].decode())
"""


def csv(seed: int, n: int = 150, header: str = "age,bp,chol,y") -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    rows = "".join(f"{a:.4f},{b:.4f},{c:.4f},{t}\n" for (a, b, c), t in zip(x, y, strict=True))
    return (header + "\n" + rows).encode()


@pytest.fixture(scope="module")
def world(service_worker):
    kit, _ = service_worker
    data = {
        "a": kit.dataset(HOSP_A, csv(1)),
        "b": kit.dataset(HOSP_B, csv(2)),
        "a2": kit.dataset(HOSP_A, csv(3)),  # another dataset of hospital a
        "b_secret": kit.dataset(HOSP_B, b"TOP-SECRET-ROW,1,2,3\n"),
    }
    return kit, data


def train_manifest(kit, data, **over) -> mf.Manifest:
    args = {
        "service": kit.service,
        "creator": LAB.public,
        "function": mf.builtin_descriptor("gbdt-train"),
        "params": {"label": "y", "rounds": 8, "seed": 7},
        "inputs": [kit.task_input("hospital_a", data["a"]), kit.task_input("hospital_b", data["b"])],
        "outputs": [
            mf.TaskOutput("model", (LAB.fingerprint,)),
            mf.TaskOutput("report", (LAB.fingerprint, HOSP_A.fingerprint)),
        ],
        "participants": PARTIES,
    }
    args.update(over)
    return build_manifest(**args)


IDENTITIES = {p.fingerprint: p for p in (LAB, HOSP_A, HOSP_B, ALGO, MALLORY)}


def approve(
    m: mf.Manifest, *who: Identity, creator: bool = True, max_runs: int = mf.DEFAULT_MAX_RUNS
) -> list[dict]:
    """Approvals by `who`, and (unless `creator` is False) by the manifest's creator last."""
    signers = list(who)
    if creator and IDENTITIES[m.creator] not in signers:
        signers.append(IDENTITIES[m.creator])
    return [sign_approval(p, m, max_runs=max_runs) for p in signers]


def assert_refused(result, body, outs, check: str, *needles: str) -> None:
    assert result["ok"] is False and result["category"] == "refused", result
    assert body["status"] == "error" and body["error"]["check"] == check, body["error"]
    for needle in needles:
        assert needle in body["error"]["message"], (needle, body["error"]["message"])
    assert body["outputs"] == [] and result["outputs"] == {}
    for path in outs.values():
        assert not path.exists()
        assert list(path.parent.glob(".*partial")) == []


# ---- happy paths ----------------------------------------------------------------------------------


def test_two_owner_gbdt_train(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    result, body, outs = kit.run(
        m, approve(m, HOSP_A, HOSP_B), {"hospital_a": data["a"], "hospital_b": data["b"]}
    )
    assert result["ok"] is True and result["category"] == "ok", body
    assert body["status"] == "ok" and body["error"] is None
    assert body["task_id"] == m.task_id and body["manifest_sha256"] == m.digest
    assert body["function_digest"] == m.function_digest
    assert body["inputs"] == [
        {"name": "hospital_a", "dataset_id": data["a"].dataset_id, "ciphertext_sha256": data["a"].sha256},
        {"name": "hospital_b", "dataset_id": data["b"].dataset_id, "ciphertext_sha256": data["b"].sha256},
    ]
    info = kit.enclave.info
    assert body["measurement"] == info["measurement"] and body["backend"] == "sim" and body["simulated"]
    assert body["evidence_sha256"] == hashlib.sha256(kit.enclave.service_evidence()).hexdigest()
    assert body["started_at"] <= body["ended_at"]
    for out in body["outputs"]:
        path = outs[out["name"]]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == out["sha256"]
        assert result["outputs"][out["name"]] == {"sha256": out["sha256"], "size": out["size"]}
    assert not outs["_error"].exists()

    # sealed to exactly the manifest's recipients
    for name, who in (("model", {LAB}), ("report", {LAB, HOSP_A})):
        with open(outs[name], "rb") as fh:
            header = SealedReader(fh).header
        assert set(header.recipients) == {p.fingerprint for p in who}
        assert header.metadata["task_id"] == m.task_id
    model = kit.read(outs["model"], LAB)
    assert len(model) == next(o["size"] for o in body["outputs"] if o["name"] == "model")
    booster = xgboost.Booster()
    booster.load_model(bytearray(model))
    assert booster.feature_names == ["age", "bp", "chol"] and booster.num_boosted_rounds() == 8
    report = json.loads(kit.read(outs["report"], HOSP_A))
    assert report["rows"] == {"hospital_a": 150, "hospital_b": 150} and report["features"] == [
        "age",
        "bp",
        "chol",
    ]
    assert sum(report["label_balance"].values()) == 300
    with pytest.raises(Exception, match="not addressed"):
        kit.read(outs["model"], HOSP_B)


def python_manifest(kit, data, *, confidential: bool, owner: Identity = ALGO, source: str = SCORER):
    desc = mf.function_descriptor(
        name="scorer",
        source=source,
        owner=owner.public,
        description="counts rows",
        requirements=["pandas"],
        outputs=["out"],
    )
    return build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=desc,
        params={"tag": "t1"},
        inputs=[kit.task_input("hospital_a", data["a"]), kit.task_input("hospital_b", data["b"])],
        outputs=[mf.TaskOutput("out", (LAB.fingerprint,))],
        participants=PARTIES,
        confidential=confidential,
    )


def inputs_ab(data) -> dict:
    return {"hospital_a": data["a"], "hospital_b": data["b"]}


def test_user_function_clear(world) -> None:
    kit, data = world
    m = python_manifest(kit, data, confidential=False)
    result, body, outs = kit.run(
        m, approve(m, HOSP_A, HOSP_B, ALGO), inputs_ab(data), function_source={"clear": SCORER}
    )
    assert result["ok"], body
    assert json.loads(kit.read(outs["out"], LAB)) == {"rows": 300, "tag": "t1"}


def test_user_function_confidential(world, monkeypatch) -> None:
    kit, data = world
    m = python_manifest(kit, data, confidential=True)
    sealed = seal_function_source(SCORER, descriptor=m.function, service=kit.service)
    seen: list[str] = []
    real = kit.enclave.call

    def spy(name, **args):
        seen.append(json.dumps(args))
        return real(name, **args)

    monkeypatch.setattr(kit.enclave, "call", spy)
    result, body, outs = kit.run(
        m,
        approve(m, HOSP_A, HOSP_B, ALGO),
        inputs_ab(data),
        function_source={"sealed": __import__("base64").b64encode(sealed).decode()},
    )
    assert result["ok"], body
    assert json.loads(kit.read(outs["out"], LAB))["rows"] == 300
    assert seen and not any("proprietary-scoring-4471" in frame for frame in seen)
    # the host cannot substitute the clear source for a confidential function
    result, body, outs = kit.run(
        m, approve(m, HOSP_A, HOSP_B, ALGO), inputs_ab(data), function_source={"clear": SCORER}
    )
    assert_refused(result, body, outs, "function", "confidential")


def test_failing_function_seals_its_error_to_creator_and_recipients(world) -> None:
    kit, data = world
    m = python_manifest(kit, data, confidential=False, source=LEAKY)
    result, body, outs = kit.run(
        m, approve(m, HOSP_A, HOSP_B, ALGO), inputs_ab(data), function_source={"clear": LEAKY}
    )
    assert result["ok"] is False and result["category"] == "exception"
    assert body["status"] == "error" and body["error"]["check"] == "run"
    assert "age,bp" not in json.dumps(result) and "age,bp" not in json.dumps(body)
    assert not outs["out"].exists()
    assert [o["name"] for o in body["outputs"]] == ["_error"]
    assert hashlib.sha256(outs["_error"].read_bytes()).hexdigest() == body["outputs"][0]["sha256"]
    text = kit.read(outs["_error"], LAB).decode()
    assert "ValueError: boom: age,bp,chol,y" in text
    with pytest.raises(Exception, match="not addressed"):
        kit.read(outs["_error"], HOSP_B)  # not a recipient, not the creator


# ---- every enforced check ----------------------------------------------------------------------


def test_forged_approval(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    forged = {**sign_approval(HOSP_B, m), "party": HOSP_A.fingerprint}  # B signs, claims to be A
    result, body, outs = kit.run(m, [forged, *approve(m, HOSP_B)], inputs_ab(data))
    assert_refused(result, body, outs, "approval", f"hospital_a ({HOSP_A.fingerprint})", "does not verify")


def test_missing_approval_of_one_input_owner(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    result, body, outs = kit.run(m, approve(m, HOSP_A, LAB), inputs_ab(data))
    assert_refused(
        result,
        body,
        outs,
        "approval",
        f"no approval by hospital_b ({HOSP_B.fingerprint})",
        "input 'hospital_b'",
    )


def test_manifest_changed_after_approval(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    approvals = approve(m, HOSP_A, HOSP_B)
    changed = mf.parse_manifest({**m.to_json(), "params": {"label": "y", "rounds": 500}})
    result, body, outs = kit.run(changed, approvals, inputs_ab(data))
    assert_refused(result, body, outs, "approval", "hospital_a", "changed after approval")
    assert body["manifest_sha256"] == changed.digest


def test_input_blob_swapped_for_another_dataset(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    swapped = {"hospital_a": data["a2"], "hospital_b": data["b"]}
    # the host passes another blob of the same owner, with its envelope
    result, body, outs = kit.run(m, approve(m, HOSP_A, HOSP_B), swapped)
    assert_refused(
        result, body, outs, "input", "input 'hospital_a'", f"dataset {data['a'].dataset_id}", "is for dataset"
    )
    # ... or only the blob, under the approved envelope
    blob_only = {"hospital_a": data["a"], "hospital_b": data["b"]}
    result, body, outs = kit.run(
        m,
        approve(m, HOSP_A, HOSP_B),
        blob_only,
        inputs={"hospital_a": data["a2"].path, "hospital_b": data["b"].path},
    )
    assert_refused(result, body, outs, "input", "input 'hospital_a'", "not the approved", "swapped")


def test_input_envelope_swapped_for_another_dataset(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    envelopes = {"hospital_a": data["a2"].envelope, "hospital_b": data["b"].envelope}
    result, body, outs = kit.run(m, approve(m, HOSP_A, HOSP_B), inputs_ab(data), dataset_keys=envelopes)
    assert_refused(result, body, outs, "input", "key envelope of input 'hospital_a'", "is for dataset")


def test_envelope_bound_to_another_owner(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    # B's own envelope for A's input, with every field rewritten to A's dataset: HPKE info still binds B
    forged = {**data["a"].envelope, "wrapped": data["b"].envelope["wrapped"]}
    forged_b = dict(data["b"].envelope, dataset_id=data["a"].dataset_id, ciphertext_sha256=data["a"].sha256)
    for env, needle in (
        ({**forged_b, "owner": HOSP_A.fingerprint}, "does not open"),
        (forged_b, f"bound to owner {HOSP_B.fingerprint}"),
        (forged, "does not open"),
    ):
        envelopes = {"hospital_a": env, "hospital_b": data["b"].envelope}
        result, body, outs = kit.run(m, approve(m, HOSP_A, HOSP_B), inputs_ab(data), dataset_keys=envelopes)
        assert_refused(result, body, outs, "input", "input 'hospital_a'", needle)


def test_recipient_added_after_approval(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    approvals = approve(m, HOSP_A, HOSP_B)
    obj = m.to_json()
    obj["participants"].append({"name": "mallory", "identity": MALLORY.public.to_line()})
    obj["outputs"][0]["recipients"].append(MALLORY.fingerprint)
    grown = mf.parse_manifest(obj)
    assert grown.task_id == m.task_id
    result, body, outs = kit.run(grown, [*approvals, sign_approval(MALLORY, grown)], inputs_ab(data))
    assert_refused(result, body, outs, "approval", "changed after approval")


def test_approval_replayed_from_another_task(world) -> None:
    kit, data = world
    earlier = train_manifest(kit, data)
    m = train_manifest(kit, data)
    result, body, outs = kit.run(m, approve(earlier, HOSP_A, HOSP_B), inputs_ab(data))
    assert_refused(result, body, outs, "approval", "hospital_a", "replayed from another task")


def test_function_source_not_matching_digest(world) -> None:
    kit, data = world
    m = python_manifest(kit, data, confidential=False)
    evil = SCORER.replace("rows = ", "rows = 0 * ")
    result, body, outs = kit.run(
        m, approve(m, HOSP_A, HOSP_B, ALGO), inputs_ab(data), function_source={"clear": evil}
    )
    assert_refused(result, body, outs, "function", "function 'scorer'", "source has SHA-256")
    # a built-in must come from this build; the host may not pass one
    t = train_manifest(kit, data)
    result, body, outs = kit.run(
        t, approve(t, HOSP_A, HOSP_B), inputs_ab(data), function_source={"clear": evil}
    )
    assert_refused(result, body, outs, "function", "gbdt-train", "source for a built-in")


def test_confidential_function_without_its_owners_approval(world) -> None:
    kit, data = world
    m = python_manifest(kit, data, confidential=True)
    sealed = seal_function_source(SCORER, descriptor=m.function, service=kit.service)
    result, body, outs = kit.run(
        m,
        approve(m, HOSP_A, HOSP_B, LAB),
        inputs_ab(data),
        function_source={"sealed": __import__("base64").b64encode(sealed).decode()},
    )
    assert_refused(
        result, body, outs, "approval", f"no approval by algo ({ALGO.fingerprint})", "function 'scorer'"
    )


def test_manifest_for_another_service(world) -> None:
    kit, data = world
    other = Identity.generate("other-service")
    m = train_manifest(kit, data, service=other.public)
    result, body, outs = kit.run(m, approve(m, HOSP_A, HOSP_B), inputs_ab(data))
    assert_refused(result, body, outs, "manifest", f"for service {other.fingerprint}", "not this service")


def test_corrupted_blob_names_the_dataset(world) -> None:
    kit, data = world
    victim = kit.dataset(HOSP_B, csv(9))
    blob = bytearray(victim.path.read_bytes())
    blob[-5] ^= 1
    victim.path.write_bytes(bytes(blob))
    m = train_manifest(
        kit, data, inputs=[kit.task_input("hospital_a", data["a"]), kit.task_input("hospital_b", victim)]
    )
    result, body, outs = kit.run(
        m, approve(m, HOSP_A, HOSP_B), {"hospital_a": data["a"], "hospital_b": victim}
    )
    assert_refused(
        result,
        body,
        outs,
        "input",
        f"input 'hospital_b' (dataset {victim.dataset_id} of hospital_b",
        "corrupted",
    )


def test_unparseable_manifest_still_gets_a_signed_receipt(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    result, body, outs = kit.run(
        m, [], inputs_ab(data), manifest=m.text.replace('"format"', '"x":1,"format"', 1)
    )
    assert_refused(result, body, outs, "manifest", "unknown field")
    assert body["task_id"] == ""
    assert kit.enclave.call("ping") == {"pong": True}


def test_output_cap_is_per_output(world) -> None:
    kit, data = world
    m = train_manifest(
        kit,
        data,
        outputs=[
            mf.TaskOutput("model", (LAB.fingerprint,), 100),
            mf.TaskOutput("report", (LAB.fingerprint,)),
        ],
    )
    result, body, outs = kit.run(m, approve(m, HOSP_A, HOSP_B), inputs_ab(data))
    assert result["ok"] is False and result["category"] == "output-limit", body
    assert not outs["model"].exists() and not outs["report"].exists()


@pytest.mark.parametrize(
    ("over", "check", "needle"),
    [
        ({"approvals": [5]}, "approval", "must be JSON text"),
        ({"approvals": ["{"]}, "approval", "not valid JSON"),
        ({"dataset_keys": {"hospital_a": [], "hospital_b": {}}}, "input", "must be JSON text"),
        ({"dataset_keys": {}}, "input", "host's dataset_keys [] differ"),
        ({"inputs": {"hospital_a": "/nonexistent/x"}}, "input", "host's inputs ['hospital_a'] differ"),
        ({"function_source": {"clear": "x", "sealed": "y"}}, "function", "source for a built-in"),
        ({"outputs": {"model": "/tmp/m"}}, "output", "host's outputs ['model'] differ"),
    ],
)
def test_hostile_task_arguments_get_receipts(world, over, check, needle) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    result, body, outs = kit.run(m, approve(m, HOSP_A, HOSP_B), inputs_ab(data), **over)
    assert_refused(result, body, outs, check, needle)
    assert kit.enclave.call("ping") == {"pong": True}


def test_input_changed_while_read_is_caught(tmp_path) -> None:
    """The second hash, taken over the bytes actually decrypted, catches a blob swapped after the check."""
    import os

    from confide.enclave.errors import IntegrityError
    from confide.enclave.memory import MemoryBudget
    from confide.enclave.pipeline import open_input
    from confide.enclave.sealed_file import SealedWriter

    key = os.urandom(32)
    path = tmp_path / "blob"
    with open(path, "wb") as fh, SealedWriter(fh, data_key=key, chunk_size=1024) as w:
        w.write(os.urandom(5000))
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    budget = MemoryBudget(1 << 20)
    fd, n = open_input(str(path), "x", data_key=key, budget=budget, ciphertext_sha256=good)
    assert n == 5000 and os.fstat(fd).st_size == 5000
    os.close(fd)
    budget.release(n)
    with pytest.raises(IntegrityError, match="input changed while it was read"):
        open_input(str(path), "x", data_key=key, budget=budget, ciphertext_sha256="00" * 32)
    assert budget.used == 0


# ---- the creator's approval and run limits (issue 12, items 1 and 7c) ------------------------------


def test_manifest_without_the_creators_approval_is_refused(world) -> None:
    """A host that writes its own manifest naming the creator cannot run it: the creator never
    signed it (the owners' approvals alone are not enough)."""
    kit, data = world
    m = train_manifest(kit, data)
    result, body, outs = kit.run(m, approve(m, HOSP_A, HOSP_B, creator=False), inputs_ab(data))
    assert_refused(result, body, outs, "approval", f"no approval by lab ({LAB.fingerprint})", "creator")
    assert body["run"] == 0 and body["manifest_sha256"] == m.digest


def test_host_substituted_manifest_with_its_own_input_is_refused(world) -> None:
    """The attack of issue 12 item 1 at the enclave: same task id, creator, outputs and recipients,
    plus an input the host owns and approves itself; the creator's approval is of the original."""
    kit, data = world
    original = train_manifest(kit, data)
    creator_approval = approve(original, creator=True)
    host_ds = kit.dataset(MALLORY, csv(9))
    swapped = train_manifest(
        kit,
        data,
        task_id=original.task_id,
        created_at=original.created_at,
        inputs=[kit.task_input("hospital_a", data["a"]), kit.task_input("hospital_b", host_ds)],
        participants={**PARTIES, "mallory": MALLORY.public},
    )
    assert swapped.task_id == original.task_id and swapped.digest != original.digest
    approvals = [*approve(swapped, HOSP_A, MALLORY, creator=False)]
    result, body, outs = kit.run(swapped, approvals, {"hospital_a": data["a"], "hospital_b": host_ds})
    assert_refused(result, body, outs, "approval", f"no approval by lab ({LAB.fingerprint})")
    # and the creator's approval of the original does not carry over to the substitute
    result, body, outs = kit.run(
        swapped, [*creator_approval, *approvals], {"hospital_a": data["a"], "hospital_b": host_ds}
    )
    assert_refused(result, body, outs, "approval", "changed after approval")


def test_runs_beyond_the_approved_count_are_refused(world) -> None:
    kit, data = world
    m = train_manifest(kit, data)
    # a refused attempt decrypts nothing and does not count
    result, body, outs = kit.run(m, approve(m, HOSP_A), inputs_ab(data))
    assert_refused(result, body, outs, "approval", "hospital_b")
    approvals = approve(m, HOSP_A) + approve(m, HOSP_B, creator=False, max_runs=2)
    for run in (1, 2):
        result, body, outs = kit.run(m, approvals, inputs_ab(data))
        assert result["ok"] is True, body
        assert (body["run"], body["max_runs"]) == (run, 2)
    result, body, outs = kit.run(m, approvals, inputs_ab(data))
    assert_refused(result, body, outs, "runs", "run 3 of this task exceeds the 2 run(s)")
    # another task's count is its own
    other = train_manifest(kit, data)
    result, body, _ = kit.run(other, approve(other, HOSP_A, HOSP_B, max_runs=1), inputs_ab(data))
    assert result["ok"] is True and (body["run"], body["max_runs"]) == (1, 1)


def test_run_count_that_does_not_unseal_stops_the_run(world, service_worker) -> None:
    """A count file moved from another task (or edited) is refused, not reset."""
    kit, data = world
    _, home = service_worker
    a, b = train_manifest(kit, data), train_manifest(kit, data)
    for m in (a, b):
        result, body, _ = kit.run(m, approve(m, HOSP_A, HOSP_B), inputs_ab(data))
        assert result["ok"] is True, body
    runs = home.state_dir / "runs"
    file_a = next(runs.glob(f"{a.task_id}-*.sealed"))
    file_b = next(runs.glob(f"{b.task_id}-*.sealed"))
    file_b.write_bytes(file_a.read_bytes())
    result, body, outs = kit.run(b, approve(b, HOSP_A, HOSP_B), inputs_ab(data))
    assert_refused(result, body, outs, "runs", "does not unseal")
