"""The enclave process: start-up, sealed state, the framed channel, and the run pipeline."""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from pathlib import Path

import pytest

from confide.client.home import Home
from confide.client.local import attest, check_receipt, new_request_id, run_function
from confide.client.policy import Policy
from confide.client.sealing import encrypt_file, open_reader
from confide.enclave.errors import ConfideError, EnclaveError, IntegrityError, PolicyError
from confide.enclave.keys import Identity
from confide.enclave.request import InputGrant, OutputSpec, RunRequest, function_digest
from confide.enclave.sealed_file import SealedReader
from confide.host.enclave_process import EnclaveProcess

COPY_UPPER = """
def run(ctx):
    data = ctx.inputs["data"].read()
    ctx.outputs["out"].write(data.upper() + ctx.params.get("suffix", "").encode())
"""
FAILING = """
def run(ctx):
    secret = ctx.inputs["data"].read()
    raise ValueError("leaking " + secret.decode())
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("enclave")
    home = Home(root / "home")
    enclave = home.start_enclave()
    policy = Policy(backends=("sim",), measurements=(enclave.info["measurement"],), allow_simulation=True)
    yield home, enclave, policy, root
    enclave.close()


@pytest.fixture
def owner() -> Identity:
    return Identity.generate("owner")


def sealed_input(path: Path, data: bytes, owner: Identity) -> Path:
    plain = path.with_suffix(".plain")
    plain.write_bytes(data)
    encrypt_file(plain, path, recipients=[owner.public])
    plain.unlink()
    return path


def open_output(path: Path, who: Identity) -> bytes:
    fh, reader = open_reader(path)
    with fh:
        return b"".join(bytes(c) for c in reader.unlock(identity=who).iter_chunks())


def run_one(
    home, enclave, policy, owner: Identity, source: str, src: Path, out: Path, *, to=None, params=None
):
    """The client's whole run: attest, seal the request, run, check the receipt."""
    return run_function(
        enclave,
        source=source,
        inputs={"data": src},
        outputs={"out": out},
        recipients=[(to or owner).public],
        params=params or {},
        identity=owner,
        policy=policy,
        anchors=home.anchors(),
    )


# ---- start-up, evidence, sealed state -------------------------------------------------------------


def test_info_and_sandbox_layers(env) -> None:
    _, enclave, _, _ = env
    info = enclave.call("info")
    assert info["simulated"] is True and info["backend"] == "sim"
    assert all(v.startswith("ok") for v in info["sandbox_layers"].values()), info["sandbox_layers"]


def test_evidence_verifies_under_dev_policy_and_not_under_default(env) -> None:
    home, enclave, policy, _ = env
    att = attest(enclave, policy, home.anchors())
    claims, key = att.claims, att.enclave
    assert key.to_line() == enclave.info["enclave"]
    assert claims.measurement == enclave.info["measurement"]
    with pytest.raises(PolicyError, match="SIMULATED"):
        attest(enclave, Policy(measurements=policy.measurements), home.anchors())


def test_keys_survive_restart_of_the_same_build_only(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    with home.start_enclave() as a:
        first = a.info["enclave"]
    with home.start_enclave() as b:
        assert b.info["enclave"] == first  # unsealed, not regenerated
    cfg = tmp_path / "other.toml"
    cfg.write_text("[enclave]\nmemory_budget_mib = 64\n")
    with home.start_enclave(cfg) as c:
        assert c.info["measurement"] != b.info["measurement"]
        assert c.info["enclave"] != first
    # tampered sealed state: the enclave refuses to start and says why
    state = next(home.state_dir.glob(f"enclave-{b.info['measurement'][:16]}.sealed"))
    blob = bytearray(state.read_bytes())
    blob[-1] ^= 1
    state.write_bytes(bytes(blob))
    with pytest.raises(EnclaveError, match="does not unseal"):
        home.start_enclave()


def test_unknown_backend_is_refused_at_start(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.platform()
    with pytest.raises(EnclaveError, match="unknown TEE backend 'sgx-magic'"):
        EnclaveProcess(platform_dir=home.platform_dir, state_dir=home.state_dir, backend="sgx-magic")


def test_missing_platform_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EnclaveError, match="no simulated platform here"):
        EnclaveProcess(platform_dir=tmp_path / "nowhere", state_dir=tmp_path / "state")


# ---- malformed frames -----------------------------------------------------------------------------


def raw_call(enclave: EnclaveProcess, payload: bytes) -> dict:
    enclave.send_raw(struct.pack(">I", len(payload)) + payload)
    return enclave.read_reply()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1,2]", "expected a JSON object"),
        (b'{"id":1,"call":"ping"}', "missing field(s) args"),
        (b'{"id":1,"call":"ping","args":{},"x":1}', "unknown field(s) x"),
        (b'{"id":1,"call":"format_disk","args":{}}', "unknown enclave call 'format_disk'"),
        (b'{"id":1,"call":"evidence","args":{}}', "missing field(s) nonce"),
        (b'{"id":1,"call":"evidence","args":{"nonce":5}}', "must be str"),
        (b'{"id":1,"call":"evidence","args":{"nonce":"zz"}}', "not valid hex"),
        (b'{"id":1,"call":"evidence","args":{"nonce":"' + b"00" * 65 + b'"}}', "nonce longer than 64"),
        (b'{"id":true,"call":"ping","args":{}}', "must be an integer"),
        (b'{"id":1,"id":2,"call":"ping","args":{}}', "duplicate key"),
        (b'{"id":1,"call":"ping","args":{"a":NaN}}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (
            b'{"id":1,"call":"run","args":{"source":"","request":"","inputs":{"../x":"/etc/passwd"},"outputs":{}}}',
            "must be an identifier",
        ),
        (
            b'{"id":1,"call":"run","args":{"source":"","request":"!!","inputs":{},"outputs":{}}}',
            "not valid base64",
        ),
        (
            b'{"id":1,"call":"run","args":{"source":"","request":"AAAA","inputs":{},"outputs":{}}}',
            "too short",
        ),
        (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    ],
)
def test_malformed_frames_are_rejected_and_the_enclave_keeps_serving(
    env, payload: bytes, message: str
) -> None:
    _, enclave, _, _ = env
    reply = raw_call(enclave, payload)
    assert reply["ok"] is False and message in reply["error"]["message"], reply
    assert enclave.call("ping") == {"pong": True}


def test_oversized_frame_is_skipped_without_buffering(env) -> None:
    _, enclave, _, _ = env
    big = b'{"id":1,"call":"ping","args":{"pad":"' + b"a" * (2 << 20) + b'"}}'
    reply = raw_call(enclave, big)
    assert reply["ok"] is False and "exceeds the 1048576-byte limit" in reply["error"]["message"]
    assert enclave.call("ping") == {"pong": True}


def test_host_closing_mid_frame_ends_the_enclave_cleanly(tmp_path: Path) -> None:
    enc = Home(tmp_path / "h").start_enclave()
    enc.send_raw(struct.pack(">I", 100) + b"{")
    enc.sock.shutdown(2)
    assert enc.proc.wait(30) == 0
    enc.sock.close()


# ---- the run pipeline -----------------------------------------------------------------------------


def test_run_end_to_end_with_receipt(env, owner: Identity, tmp_path: Path) -> None:
    home, enclave, policy, _ = env
    bob = Identity.generate("bob")
    src = sealed_input(tmp_path / "in.sealed", b"hello enclave", owner)
    before = src.read_bytes()
    out = tmp_path / "out.sealed"
    outcome = run_one(home, enclave, policy, owner, COPY_UPPER, src, out, to=bob, params={"suffix": "!"})
    assert outcome.ok and outcome.receipt is not None
    assert open_output(out, bob) == b"HELLO ENCLAVE!"
    with pytest.raises(ConfideError, match="not addressed"):
        open_output(out, owner)  # outputs go to the named recipient only
    assert outcome.receipt["function_sha256"] == function_digest(COPY_UPPER)
    assert outcome.receipt["measurement"] == enclave.info["measurement"]
    assert src.read_bytes() == before


def _request(env, owner: Identity, src: Path, recipients, *, source: str = COPY_UPPER):
    """A fresh attestation and a request that spends it: (enclave key, request)."""
    home, enclave, policy, _ = env
    att = attest(enclave, policy, home.anchors())
    return att.enclave, _request_for(att.nonce, owner, src, recipients, source=source)


def _request_for(
    nonce: bytes, owner: Identity, src: Path, recipients, *, source: str = COPY_UPPER
) -> RunRequest:
    fh, reader = open_reader(src)
    with fh:
        reader.unlock(identity=owner)
        grant = InputGrant(reader.data_key, reader.header.digest.hex())
    return RunRequest(
        request_id=new_request_id(),
        attestation_nonce=nonce.hex(),
        function_sha256=function_digest(source),
        params={},
        inputs={"data": grant},
        outputs={"out": OutputSpec(tuple(recipients), 1 << 20)},
        error_recipients=(owner.public,),
        client=owner.public,
    )


def _send(enclave: EnclaveProcess, req_blob: bytes, src: Path, out: Path, source: str = COPY_UPPER, **extra):
    return enclave.call(
        "run",
        source=source,
        request=base64.b64encode(req_blob).decode(),
        inputs={"data": str(src)},
        outputs={"out": str(out)},
        **extra,
    )


def test_replayed_request_is_rejected(env, owner: Identity, tmp_path: Path) -> None:
    _, enclave, _, _ = env
    src = sealed_input(tmp_path / "in.sealed", b"x", owner)
    key, req = _request(env, owner, src, [owner.public])
    blob = req.seal_to(key)
    assert _send(enclave, blob, src, tmp_path / "o1.sealed")["ok"]
    with pytest.raises(EnclaveError, match="replay rejected"):
        _send(enclave, blob, src, tmp_path / "o2.sealed")
    assert not (tmp_path / "o2.sealed").exists()


def test_request_must_spend_a_fresh_attestation_of_this_boot(tmp_path: Path, owner: Identity) -> None:
    home = Home(tmp_path / "home")
    src = sealed_input(tmp_path / "in.sealed", b"x", owner)
    with home.start_enclave() as enclave:
        policy = Policy(backends=("sim",), measurements=(enclave.info["measurement"],), allow_simulation=True)
        env = (home, enclave, policy, tmp_path)
        key, req = _request(env, owner, src, [owner.public])
        blob = req.seal_to(key)
        # a nonce the enclave never attested to
        forged = _request_for(os.urandom(32), owner, src, [owner.public]).seal_to(key)
        with pytest.raises(EnclaveError, match="does not follow an attestation"):
            _send(enclave, forged, src, tmp_path / "o0.sealed")
    with home.start_enclave() as restarted:  # same build: same keys, so the old request still opens
        assert restarted.info["enclave"] == key.to_line()
        with pytest.raises(EnclaveError, match="replayed after a restart"):
            _send(restarted, blob, src, tmp_path / "o.sealed")
    assert not (tmp_path / "o.sealed").exists()


def test_host_cannot_swap_function_inputs_or_outputs(env, owner: Identity, tmp_path: Path) -> None:
    _, enclave, _, _ = env
    src = sealed_input(tmp_path / "in.sealed", b"approved data", owner)
    other = sealed_input(tmp_path / "other.sealed", b"other data", owner)
    evil = COPY_UPPER.replace("upper()", "lower()")
    key, req = _request(env, owner, src, [owner.public])
    with pytest.raises(EnclaveError, match="not the function the client approved"):
        _send(enclave, req.seal_to(key), src, tmp_path / "o.sealed", source=evil)
    key, req = _request(env, owner, src, [owner.public])
    with pytest.raises(EnclaveError, match="not the file the client approved"):
        _send(enclave, req.seal_to(key), other, tmp_path / "o.sealed")
    key, req = _request(env, owner, src, [owner.public])
    with pytest.raises(EnclaveError, match="differ from the approved"):
        enclave.call(
            "run",
            source=COPY_UPPER,
            request=base64.b64encode(req.seal_to(key)).decode(),
            inputs={"data": str(src)},
            outputs={"out": str(tmp_path / "o.sealed"), "leak": str(tmp_path / "leak")},
        )
    assert not (tmp_path / "o.sealed").exists() and not (tmp_path / "leak").exists()


def test_request_sealed_to_another_key_does_not_open(env, owner: Identity, tmp_path: Path) -> None:
    _, enclave, _, _ = env
    impostor = Identity.generate()
    src = sealed_input(tmp_path / "in.sealed", b"x", owner)
    _, req = _request(env, owner, src, [owner.public])
    with pytest.raises(EnclaveError, match="does not open"):
        _send(enclave, req.seal_to(impostor.public), src, tmp_path / "o")


def test_tampered_input_fails_and_nothing_is_published(env, owner: Identity, tmp_path: Path) -> None:
    _, enclave, _, _ = env
    src = sealed_input(tmp_path / "in.sealed", os.urandom(3 << 20), owner)
    key, req = _request(env, owner, src, [owner.public])
    data = bytearray(src.read_bytes())
    data[-100] ^= 1
    src.write_bytes(bytes(data))
    with pytest.raises(EnclaveError, match="chunk 2 of 3 failed authentication"):
        _send(enclave, req.seal_to(key), src, tmp_path / "o.sealed")
    assert not (tmp_path / "o.sealed").exists()
    assert list(tmp_path.glob(".*partial")) == []


def test_failing_function_reports_only_a_category_to_the_host(env, owner: Identity, tmp_path: Path) -> None:
    _, enclave, _, _ = env
    src = sealed_input(tmp_path / "in.sealed", b"TOP-SECRET", owner)
    before = src.read_bytes()
    report = tmp_path / "err.sealed"
    key, req = _request(env, owner, src, [owner.public], source=FAILING)
    result = _send(
        enclave, req.seal_to(key), src, tmp_path / "o.sealed", source=FAILING, error_report=str(report)
    )
    assert result["ok"] is False and result["category"] == "exception"
    assert "TOP-SECRET" not in json.dumps(result)
    assert b"TOP-SECRET" not in report.read_bytes()  # sealed
    text = open_output(report, owner).decode()
    assert "ValueError: leaking TOP-SECRET" in text
    assert not (tmp_path / "o.sealed").exists() and src.read_bytes() == before  # retry possible


def test_receipt_check_catches_a_swapped_output(env, owner: Identity, tmp_path: Path) -> None:
    _, enclave, _, _ = env
    src = sealed_input(tmp_path / "in.sealed", b"abc", owner)
    key, req = _request(env, owner, src, [owner.public])
    out = tmp_path / "o.sealed"
    result = _send(enclave, req.seal_to(key), src, out)
    receipt = base64.b64decode(result["receipt"])
    check_receipt(receipt, key, req, {"out": out}, where="receipt")
    sealed_input(out, b"ABC", owner)  # the host swaps in a file of its own
    with pytest.raises(IntegrityError, match="not the output the enclave signed"):
        check_receipt(receipt, key, req, {"out": out}, where="receipt")
    forged = json.loads(receipt)
    forged["body"]["function_sha256"] = "00" * 32
    with pytest.raises(IntegrityError, match="does not verify"):
        check_receipt(json.dumps(forged).encode(), key, req, {"out": out}, where="receipt")


def test_memory_budget_is_enforced(tmp_path: Path, owner: Identity) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text("[enclave]\nmemory_budget_mib = 20\n")
    home = Home(tmp_path / "home")
    with home.start_enclave(cfg) as enclave:
        policy = Policy(backends=("sim",), measurements=(enclave.info["measurement"],), allow_simulation=True)
        src = sealed_input(tmp_path / "big.sealed", os.urandom(8 << 20), owner)
        with pytest.raises(EnclaveError, match=r"needs 16\.0 MiB of enclave memory but only 12\.0 MiB"):
            run_one(home, enclave, policy, owner, COPY_UPPER, src, tmp_path / "o")
        assert enclave.call("ping") == {"pong": True}
        # the budget was released: a small input still runs
        small = sealed_input(tmp_path / "small.sealed", b"ok", owner)
        outcome = run_one(home, enclave, policy, owner, COPY_UPPER, small, tmp_path / "o")
        assert outcome.ok and open_output(tmp_path / "o", owner) == b"OK"


def test_function_exceeding_its_memory_allowance(env, owner: Identity, tmp_path: Path) -> None:
    home, enclave, policy, _ = env
    hog = "def run(ctx):\n    x = bytearray(8 << 30)\n    ctx.outputs['out'].write(b'never')\n"
    src = sealed_input(tmp_path / "in.sealed", b"x", owner)
    outcome = run_one(home, enclave, policy, owner, hog, src, tmp_path / "o")
    assert not outcome.ok and outcome.category in ("memory-limit", "exception")
    assert not (tmp_path / "o").exists()
    assert enclave.call("ping") == {"pong": True}


def test_sealed_reader_of_enclave_output_has_metadata(env, owner: Identity, tmp_path: Path) -> None:
    home, enclave, policy, _ = env
    src = sealed_input(tmp_path / "in.sealed", b"m", owner)
    out = tmp_path / "o.sealed"
    outcome = run_one(home, enclave, policy, owner, COPY_UPPER, src, out)
    with open(out, "rb") as fh:
        meta = SealedReader(fh).header.metadata
    assert meta["output"] == "out" and meta["request_id"] == outcome.receipt["request_id"]
    assert time.time() - outcome.receipt["time"] < 60


def test_function_cannot_read_enclave_secrets_or_ciphertext_by_path(
    env, owner: Identity, tmp_path: Path
) -> None:
    """The platform secret, the sealed enclave state and the host's files are out of the sandbox's reach."""
    home, enclave, policy, _ = env
    probe = (
        "def run(ctx):\n"
        "    got = []\n"
        "    for p in ctx.params['paths']:\n"
        "        try:\n"
        "            open(p, 'rb').read(1)\n"
        "            got.append(p)\n"
        "        except OSError:\n"
        "            pass\n"
        "    ctx.outputs['out'].write(repr(got).encode())\n"
    )
    src = sealed_input(tmp_path / "in.sealed", b"x", owner)
    targets = [
        str(home.platform_dir / "platform_secret"),
        str(home.platform_dir / "pak.key"),
        *(str(p) for p in home.state_dir.glob("*.sealed")),
        str(src),
        "/etc/shadow",
        "/proc/1/environ",
    ]
    out = tmp_path / "o.sealed"
    outcome = run_one(home, enclave, policy, owner, probe, src, out, params={"paths": targets})
    assert outcome.ok
    assert open_output(out, owner) == b"[]"  # every open failed
    assert len(targets) >= 5


def test_confidential_code_never_reaches_the_host(env, owner: Identity, tmp_path: Path, monkeypatch) -> None:
    """ScriptShield-style: the function travels sealed to the enclave; the host relays ciphertext only."""
    home, enclave, policy, _ = env
    secret_code = COPY_UPPER.replace("def run(ctx):", "def run(ctx):\n    # proprietary-algorithm-7731")
    seen: list[str] = []
    real_call = enclave.call

    def spy(name: str, **args):
        seen.append(json.dumps(args))
        return real_call(name, **args)

    monkeypatch.setattr(enclave, "call", spy)
    src = sealed_input(tmp_path / "in.sealed", b"data", owner)
    outcome = run_one(home, enclave, policy, owner, secret_code, src, tmp_path / "o.sealed")
    assert outcome.ok and open_output(tmp_path / "o.sealed", owner) == b"DATA"
    assert outcome.receipt["function_sha256"] == function_digest(secret_code)
    assert seen and not any("proprietary-algorithm-7731" in frame for frame in seen)
    # a host that adds a function of its own next to the sealed one is refused
    key, req = _request(env, owner, src, [owner.public], source=secret_code)
    sealed = RunRequest(**{**req.__dict__, "source": secret_code}).seal_to(key)
    with pytest.raises(EnclaveError, match="other than the sealed one"):
        _send(enclave, sealed, src, tmp_path / "o2.sealed", source=COPY_UPPER)
    key, req = _request(env, owner, src, [owner.public])
    with pytest.raises(EnclaveError, match="neither the request nor the call"):
        enclave.call(
            "run",
            request=base64.b64encode(req.seal_to(key)).decode(),
            inputs={"data": str(src)},
            outputs={"out": str(tmp_path / "o3.sealed")},
        )


def test_output_in_a_missing_directory_is_a_clear_error(env, owner: Identity, tmp_path: Path) -> None:
    home, enclave, policy, _ = env
    src = sealed_input(tmp_path / "in.sealed", b"x", owner)
    with pytest.raises(EnclaveError, match="nope.o.sealed: cannot create output .No such file or directory"):
        run_one(home, enclave, policy, owner, COPY_UPPER, src, tmp_path / "nope" / "o.sealed")
    assert enclave.call("ping") == {"pong": True}
