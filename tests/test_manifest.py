"""Task objects shared by client, platform and enclave: descriptors, envelopes, manifests,
approvals, receipts (PROTOCOL.md sections 3-5), and fuzzing of their parsers."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client.approval import describe_manifest
from confide.client.dataset_keys import new_dataset_id, wrap_dataset_key
from confide.client.function_seal import seal_function_source
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.receipts import verify_task_receipt
from confide.enclave import manifest as mf
from confide.enclave.encoding import b64e, canonical_json
from confide.enclave.errors import ConfideError, FormatError, IntegrityError
from confide.enclave.keys import Identity

SERVICE = Identity.generate("service")
LAB = Identity.generate("lab")
HOSP_A = Identity.generate("hospital-a")
HOSP_B = Identity.generate("hospital-b")
ALGO = Identity.generate("algo-owner")
SOURCE = "def run(ctx):\n    ctx.outputs['out'].write(b'x')\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inputs_ab() -> list[mf.TaskInput]:
    return [
        mf.TaskInput("hospital_a", new_dataset_id(), HOSP_A.fingerprint, sha(b"a")),
        mf.TaskInput("hospital_b", new_dataset_id(), HOSP_B.fingerprint, sha(b"b")),
    ]


PARTIES = {"lab": LAB.public, "hospital_a": HOSP_A.public, "hospital_b": HOSP_B.public, "algo": ALGO.public}


def gbdt_manifest(**over: Any) -> mf.Manifest:
    args: dict[str, Any] = {
        "service": SERVICE.public,
        "creator": LAB.public,
        "function": mf.builtin_descriptor("gbdt-train"),
        "params": {"label": "y", "rounds": 10},
        "inputs": inputs_ab(),
        "outputs": [
            mf.TaskOutput("model", (LAB.fingerprint,)),
            mf.TaskOutput("report", (LAB.fingerprint, HOSP_A.fingerprint), 1 << 20),
        ],
        "participants": PARTIES,
    }
    args.update(over)
    return build_manifest(**args)


def python_manifest(confidential: bool = True) -> mf.Manifest:
    desc = mf.function_descriptor(
        name="scorer", source=SOURCE, owner=ALGO.public, description="writes x", outputs=["out"]
    )
    return build_manifest(
        service=SERVICE.public,
        creator=LAB.public,
        function=desc,
        inputs=inputs_ab()[:1],
        outputs=[mf.TaskOutput("out", (LAB.fingerprint,))],
        participants=PARTIES,
        confidential=confidential,
    )


def edited(m: mf.Manifest, edit: Any) -> dict[str, Any]:
    obj = copy.deepcopy(m.to_json())
    edit(obj)
    return obj


# ---- functions -------------------------------------------------------------------------------------


def test_builtin_descriptors_come_from_the_tcb_source() -> None:
    for name in ("gbdt-train", "gbdt-predict"):
        d = mf.builtin_descriptor(name)
        assert d.kind == "builtin" and d.owner == "" and d.version == "1"
        assert d.source_sha256 == sha(mf.builtin_source(name).encode())
        assert mf.function_digest(d) == mf.function_digest(d.to_json()) == sha(canonical_json(d.to_json()))
        assert mf.parse_function_descriptor(d.to_json()) == d
    assert mf.builtin_descriptor("gbdt-predict").inputs == ("model", "data")
    with pytest.raises(FormatError, match="unknown built-in function 'rm-rf'"):
        mf.builtin_descriptor("rm-rf")


def test_function_descriptor_and_source_checks() -> None:
    d = mf.function_descriptor(
        name="scorer",
        source=SOURCE,
        owner=ALGO.public,
        description="d",
        outputs=["out"],
        requirements=["xgboost", "numpy"],
    )
    assert d.requirements == ("numpy", "xgboost") and d.owner == ALGO.fingerprint
    mf.check_function_source(d, SOURCE)
    with pytest.raises(IntegrityError, match="source has SHA-256"):
        mf.check_function_source(d, SOURCE + "# changed\n")
    with pytest.raises(FormatError, match="not provided by the enclave"):
        mf.function_descriptor(
            name="f", source="", owner=ALGO.public, description="", outputs=["o"], requirements=["torch"]
        )
    with pytest.raises(FormatError, match="reserved"):
        mf.function_descriptor(name="f", source="", owner=ALGO.public, description="", outputs=["_error"])
    with pytest.raises(FormatError, match="must be an identifier"):
        mf.function_descriptor(name="f", source="", owner=ALGO.public, description="", outputs=["../x"])
    with pytest.raises(FormatError, match="unknown field"):
        mf.parse_function_descriptor({**d.to_json(), "extra": 1})
    with pytest.raises(FormatError, match="built-in has no owner"):
        mf.parse_function_descriptor(
            {**mf.builtin_descriptor("gbdt-train").to_json(), "owner": ALGO.fingerprint}
        )


def test_sealed_function_source_opens_only_for_its_descriptor_and_service() -> None:
    d = mf.function_descriptor(
        name="scorer", source=SOURCE, owner=ALGO.public, description="d", outputs=["out"]
    )
    sealed = seal_function_source(SOURCE, descriptor=d, service=SERVICE.public)
    assert mf.open_function_source(sealed, descriptor=d, service=SERVICE) == SOURCE
    other = mf.function_descriptor(
        name="scorer", source=SOURCE, owner=ALGO.public, description="e", outputs=["out"]
    )
    with pytest.raises(IntegrityError, match="does not open"):
        mf.open_function_source(sealed, descriptor=other, service=SERVICE)
    with pytest.raises(IntegrityError, match="does not open"):
        mf.open_function_source(sealed, descriptor=d, service=Identity.generate())
    with pytest.raises(IntegrityError, match="source has SHA-256"):
        seal_function_source(SOURCE + " ", descriptor=d, service=SERVICE.public)


# ---- dataset key envelopes ------------------------------------------------------------------------


def test_dataset_key_envelope_round_trip_and_bindings() -> None:
    key = os.urandom(32)
    ds = new_dataset_id()
    env = wrap_dataset_key(
        key, dataset_id=ds, owner=HOSP_A.public, service=SERVICE.public, ciphertext_sha256=sha(b"a")
    )
    assert env["format"] == "confide-dataset-key-v1" and env["owner"] == HOSP_A.fingerprint
    inp = mf.TaskInput("a", ds, HOSP_A.fingerprint, sha(b"a"))
    assert mf.open_dataset_key(env, SERVICE, expect=inp) == key
    assert mf.open_dataset_key(json.dumps(env), SERVICE) == key
    # moved to another dataset / claimed by another owner / another blob: refused before or by HPKE
    for field, value, message in (
        ("dataset_id", new_dataset_id(), "does not open"),
        ("owner", HOSP_B.fingerprint, "does not open"),
        ("ciphertext_sha256", sha(b"other"), "does not open"),
    ):
        with pytest.raises(IntegrityError, match=message):
            mf.open_dataset_key({**env, field: value}, SERVICE)
    with pytest.raises(IntegrityError, match="bound to owner .* manifest says the owner is"):
        mf.open_dataset_key(env, SERVICE, expect=mf.TaskInput("a", ds, HOSP_B.fingerprint, sha(b"a")))
    with pytest.raises(IntegrityError, match="is for dataset"):
        mf.open_dataset_key(
            env, SERVICE, expect=mf.TaskInput("a", new_dataset_id(), HOSP_A.fingerprint, sha(b"a"))
        )
    with pytest.raises(IntegrityError, match="not this service"):
        mf.open_dataset_key(env, Identity.generate(), expect=inp)
    with pytest.raises(FormatError, match="unknown field"):
        mf.parse_dataset_key({**env, "x": 1})
    with pytest.raises(FormatError, match="32 lowercase hex"):
        mf.parse_dataset_key({**env, "dataset_id": "../../etc"})


# ---- manifests ------------------------------------------------------------------------------------


def test_manifest_round_trip_and_digest() -> None:
    m = gbdt_manifest()
    again = mf.parse_manifest(m.text)
    assert again == m and again.digest == m.digest == sha(m.text.encode())
    # whitespace and key order do not matter; the digest is over the canonical form
    pretty = json.dumps(json.loads(m.text), indent=2)
    assert mf.parse_manifest(pretty).digest == m.digest
    assert m.error_recipients() == (LAB.fingerprint, HOSP_A.fingerprint)
    assert m.participant(HOSP_A.fingerprint).name == "hospital_a"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda o: o.update(extra=1), "unknown field"),
        (lambda o: o.pop("service"), "missing field"),
        (lambda o: o.update(format="confide-task-v0"), "unknown manifest format"),
        (lambda o: o.update(task_id="x" * 32), "32 lowercase hex"),
        (lambda o: o.update(created_at=True), "must be an integer"),
        (lambda o: o["inputs"][0].update(name="a b"), "must be an identifier"),
        (lambda o: o["inputs"][1].update(name="hospital_a"), "input name 'hospital_a' appears twice"),
        (
            lambda o: o["inputs"][1].update(dataset_id=o["inputs"][0]["dataset_id"]),
            "dataset .* appears twice",
        ),
        (
            lambda o: o["inputs"][0].update(owner=Identity.generate().fingerprint),
            "owner of input 'hospital_a' .* not among the participants",
        ),
        (
            lambda o: o["outputs"][0]["recipients"].append(Identity.generate().fingerprint),
            "recipient of output 'model' .* not among",
        ),
        (
            lambda o: o["outputs"][0]["recipients"].append(o["outputs"][0]["recipients"][0]),
            "recipient .* appears twice",
        ),
        (lambda o: o["outputs"][0].update(recipients=[]), "1..64 entries"),
        (lambda o: o["outputs"][0].update(max_bytes=0), "within 1.."),
        (lambda o: o["outputs"][0].update(name="_error"), "reserved"),
        (lambda o: o["outputs"].pop(), "differ from the outputs function 'gbdt-train' writes"),
        (lambda o: o.update(creator=Identity.generate().fingerprint), "creator .* not among"),
        (
            lambda o: o["participants"].append(dict(o["participants"][0])),
            "participant name 'lab' appears twice",
        ),
        (
            lambda o: o["participants"].append(
                {"name": "lab2", "identity": o["participants"][0]["identity"]}
            ),
            "fingerprint .* appears twice",
        ),
        (lambda o: o["participants"][0].update(identity="confide-pub1:AAAA"), "64 bytes of keys"),
        (lambda o: o["function"].update(digest="00" * 32), "does not match its descriptor"),
        (lambda o: o["function"]["descriptor"].update(description="nicer"), "does not match its descriptor"),
        (lambda o: o["function"].update(confidential=True), "can be confidential"),
        (lambda o: o.update(params=[]), "must be a JSON object"),
        (lambda o: o.update(params={"a": "x" * (70 << 10)}), "exceeds the"),
        (lambda o: o.update(params={"a": json.loads("[" * 20 + "]" * 20)}), "nested deeper"),
        (lambda o: o.update(params={"a": "\ud800"}), "not valid Unicode"),
        (lambda o: o.update(params={"a": float("inf")}), "out of range"),
    ],
)
def test_manifest_rules(edit, message: str) -> None:
    obj = edited(gbdt_manifest(), edit)
    with pytest.raises((FormatError, IntegrityError), match=message):
        mf.parse_manifest(obj)


def test_manifest_text_limits_and_strictness() -> None:
    m = gbdt_manifest()
    with pytest.raises(FormatError, match="duplicate key"):
        mf.parse_manifest(m.text[:-1] + ',"task_id":"' + m.task_id + '"}')
    with pytest.raises(FormatError, match="exceeds the 262144-byte limit"):
        mf.parse_manifest(" " * (300 << 10))
    with pytest.raises(FormatError, match="not valid JSON"):
        mf.parse_manifest("{")


def test_predict_manifest_needs_exactly_its_inputs() -> None:
    ds = new_dataset_id()
    good = [
        mf.TaskInput("model", ds, LAB.fingerprint, sha(b"m")),
        mf.TaskInput("data", new_dataset_id(), HOSP_A.fingerprint, sha(b"d")),
    ]
    outs = [mf.TaskOutput("predictions", (HOSP_A.fingerprint,))]
    m = gbdt_manifest(function=mf.builtin_descriptor("gbdt-predict"), inputs=good, outputs=outs, params={})
    assert [i.name for i in m.inputs] == ["model", "data"]
    with pytest.raises(FormatError, match="differ from the inputs function 'gbdt-predict' takes"):
        gbdt_manifest(function=mf.builtin_descriptor("gbdt-predict"), inputs=good[:1], outputs=outs)


def test_describe_manifest_shows_what_is_approved() -> None:
    m = python_manifest()
    text = describe_manifest(m)
    for needle in (
        m.task_id,
        m.digest,
        m.function_digest,
        "'scorer'",
        f"algo ({ALGO.fingerprint})",
        "CONFIDENTIAL",
        "writes x",
        f"hospital_a: dataset {m.inputs[0].dataset_id} of hospital_a ({HOSP_A.fingerprint})",
        f"out (at most 64 MiB) -> lab ({LAB.fingerprint})",
        # the creator (lab) approves too: the enclave runs only manifests their creator signed
        f"approvals of this exact manifest by: lab ({LAB.fingerprint}), hospital_a ({HOSP_A.fingerprint}), "
        f"algo ({ALGO.fingerprint})",
    ):
        assert needle in text, needle
    g = describe_manifest(gbdt_manifest())
    assert (
        'label = "y"' in g
        and "part of the measured enclave" in g
        and "readable" not in g.split("Parameters")[1]
    )
    assert "report (at most 1 MiB) -> lab" in g and "hospital_a (" in g
    # a hostile description cannot drive the terminal
    evil = mf.function_descriptor(
        name="f", source="", owner=ALGO.public, description="\x1b[2Jok", outputs=["out"]
    )
    m2 = build_manifest(
        service=SERVICE.public,
        creator=LAB.public,
        function=evil,
        inputs=[],
        outputs=[mf.TaskOutput("out", (LAB.fingerprint,))],
        participants=PARTIES,
    )
    assert "\x1b" not in describe_manifest(m2)


# ---- approvals ------------------------------------------------------------------------------------


def test_approval_sign_and_verify() -> None:
    m = gbdt_manifest()
    a = sign_approval(HOSP_A, m)
    assert set(a) == {"format", "task_id", "manifest_sha256", "party", "max_runs", "signature"}
    assert mf.verify_approval(a, m).party == HOSP_A.fingerprint
    assert mf.verify_approval(json.dumps(a), m).party == HOSP_A.fingerprint
    assert a["max_runs"] == mf.DEFAULT_MAX_RUNS
    assert mf.verify_approval(sign_approval(HOSP_A, m, max_runs=1), m).max_runs == 1


def test_max_runs_is_signed_and_bounded() -> None:
    """A host cannot raise an approval's run limit: max_runs is under the signature."""
    m = gbdt_manifest()
    raised = {**sign_approval(HOSP_A, m, max_runs=1), "max_runs": 1000}
    with pytest.raises(IntegrityError, match="does not verify"):
        mf.verify_approval(raised, m)
    for bad in (0, -1, mf.MAX_RUNS + 1, True, "2"):
        with pytest.raises(FormatError):
            sign_approval(HOSP_A, m, max_runs=bad)  # type: ignore[arg-type]
        with pytest.raises(FormatError):
            mf.parse_approval({**sign_approval(HOSP_A, m), "max_runs": bad})


def test_receipt_of_a_run_beyond_its_limit_is_refused() -> None:
    body = verify_task_receipt(receipt(run=3, max_runs=3), SERVICE.public)
    assert (body["run"], body["max_runs"]) == (3, 3)
    with pytest.raises(IntegrityError, match="run 4 beyond the 3 run"):
        verify_task_receipt(receipt(run=4, max_runs=3), SERVICE.public)
    with pytest.raises(IntegrityError, match="run 0"):
        verify_task_receipt(receipt(run=0), SERVICE.public)


def test_forged_replayed_and_stale_approvals_fail() -> None:
    m = gbdt_manifest()
    # forged: says hospital_a, signed by someone else
    forged = {**sign_approval(HOSP_B, m), "party": HOSP_A.fingerprint}
    with pytest.raises(
        IntegrityError, match=f"approval by hospital_a \\({HOSP_A.fingerprint}\\).*does not verify"
    ):
        mf.verify_approval(forged, m)
    # replayed from another task
    other = gbdt_manifest()
    with pytest.raises(IntegrityError, match="replayed from another task"):
        mf.verify_approval(sign_approval(HOSP_A, other), m)
    # the manifest changed after approval (same task id)
    changed = mf.parse_manifest(edited(m, lambda o: o["params"].update(rounds=11)))
    with pytest.raises(IntegrityError, match="changed after approval"):
        mf.verify_approval(sign_approval(HOSP_A, m), changed)
    # an outsider
    with pytest.raises(IntegrityError, match="not a participant"):
        mf.verify_approval(sign_approval(Identity.generate(), m), m)
    with pytest.raises(FormatError, match="unknown field"):
        mf.verify_approval({**sign_approval(HOSP_A, m), "note": "x"}, m)


# ---- receipts -------------------------------------------------------------------------------------


def receipt(error: dict | None = None, *, run: int = 1, max_runs: int = 3) -> bytes:
    m = gbdt_manifest()
    return mf.make_task_receipt(
        SERVICE,
        task_id=m.task_id,
        manifest_sha256=m.digest,
        function_digest=m.function_digest,
        inputs=[i.to_json() for i in m.inputs],
        outputs=[] if error else [{"name": "model", "sha256": sha(b"m"), "size": 3}],
        measurement="ab" * 32,
        backend="sim",
        simulated=True,
        evidence_sha256=sha(b"ev"),
        started_at=1,
        ended_at=2,
        run=0 if error else run,
        max_runs=max_runs,
        error=error,
    )


def test_receipt_round_trip_and_forgery() -> None:
    body = verify_task_receipt(receipt(), SERVICE.public)
    assert body["status"] == "ok" and body["error"] is None and body["outputs"][0]["size"] == 3
    assert [i["name"] for i in body["inputs"]] == ["hospital_a", "hospital_b"]
    err = verify_task_receipt(receipt({"check": "approval", "message": "no"}), SERVICE.public)
    assert err["status"] == "error" and err["error"] == {"check": "approval", "message": "no"}
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_task_receipt(receipt(), Identity.generate().public)
    obj = json.loads(receipt())
    obj["body"]["outputs"][0]["sha256"] = sha(b"x")
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_task_receipt(json.dumps(obj), SERVICE.public)
    # signed by the right key but naming another service line
    body = json.loads(receipt())["body"]
    body["service"] = LAB.public.to_line()
    resigned = canonical_json({"body": body, "signature": b64e(SERVICE.sign(canonical_json(body)))})
    with pytest.raises(IntegrityError, match="names another service key"):
        verify_task_receipt(resigned, SERVICE.public)


# ---- fuzzing: hostile input raises Confide errors only -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
BASE = gbdt_manifest()
BASE_JSON = BASE.to_json()
APPROVAL = sign_approval(HOSP_A, BASE)
ENVELOPE = wrap_dataset_key(
    os.urandom(32),
    dataset_id=BASE.inputs[0].dataset_id,
    owner=HOSP_A.public,
    service=SERVICE.public,
    ciphertext_sha256=BASE.inputs[0].ciphertext_sha256,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(obj: Any, path: tuple, value: Any, delete: bool) -> Any:
    obj = copy.deepcopy(obj)
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    path = draw(st.sampled_from(_paths(base)))
    return _mutate(base, path, draw(json_values), bool(path) and draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(mutated(BASE_JSON))
def test_fuzz_parse_manifest_structured(obj: Any) -> None:
    with contextlib.suppress(ConfideError):
        m = mf.parse_manifest(json.dumps(obj))
        describe_manifest(m)
        assert m.digest == sha(canonical_json(m.to_json()))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.text(max_size=300))
def test_fuzz_parse_manifest_bytes(data: bytes | str) -> None:
    with contextlib.suppress(ConfideError):
        mf.parse_manifest(data)


@settings(max_examples=300, deadline=None)
@given(mutated(APPROVAL) | json_values)
def test_fuzz_approval(obj: Any) -> None:
    with contextlib.suppress(ConfideError):
        mf.verify_approval(obj if isinstance(obj, dict) else json.dumps(obj), BASE)


@settings(max_examples=300, deadline=None)
@given(mutated(ENVELOPE) | json_values)
def test_fuzz_envelope(obj: Any) -> None:
    with contextlib.suppress(ConfideError):
        mf.open_dataset_key(obj if isinstance(obj, dict) else json.dumps(obj), SERVICE, expect=BASE.inputs[0])


@settings(max_examples=200, deadline=None)
@given(mutated(json.loads(receipt())))
def test_fuzz_receipt(obj: Any) -> None:
    with contextlib.suppress(ConfideError):
        verify_task_receipt(json.dumps(obj), SERVICE.public)


@settings(max_examples=200, deadline=None)
@given(mutated(BASE.function.to_json()))
def test_fuzz_descriptor(obj: Any) -> None:
    with contextlib.suppress(ConfideError):
        mf.function_digest(obj)
