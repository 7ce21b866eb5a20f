"""The built-ins password-check v1 and sign v1 (key custody), run as tasks in a real enclave worker:
results equal hashlib's and pyca/cryptography's computed here; the check's result is sealed to the
password's owner only (a manifest sealing it to the corpus owner is refused by the enclave); bad
corpus lines and bad keys are refused naming what and where, and no password or key byte is in any
output or error."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from confide.client import custody
from confide.client.approval import describe_manifest
from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.builtins import password_check, sign
from confide.enclave.errors import ConfideError, IntegrityError
from confide.enclave.keys import Identity
from confide.enclave.sandbox.context import Context

ALICE = Identity.generate("alice")  # wants to know about her password; asks for signatures
HIBP = Identity.generate("hibp")  # owns the breach corpus
VAULT = Identity.generate("vault")  # owns the signing key
PARTIES = {"alice": ALICE.public, "hibp": HIBP.public, "vault": VAULT.public}
PASSWORD = "correct horse, battery staple ✓"


def sha1(password: str) -> str:
    return hashlib.sha1(password.encode("utf-8")).hexdigest().upper()


def corpus(seed: int, n: int, *, extra: dict[str, int] | None = None, crlf: bool = True) -> bytes:
    """HIBP's Pwned Passwords format: SHA1HEX:COUNT lines, sorted by hash, CRLF line endings."""
    rng = np.random.default_rng(seed)
    entries = {sha1(f"pw{seed}-{i}"): int(rng.integers(1, 10**6)) for i in range(n)}
    entries.update({sha1(p): c for p, c in (extra or {}).items()})
    end = "\r\n" if crlf else "\n"
    return "".join(f"{h}:{c}{end}" for h, c in sorted(entries.items())).encode()


def build(kit, function: str, datasets: dict, params: dict, outputs: dict[str, tuple[str, ...]]):
    return build_manifest(
        service=kit.service,
        creator=ALICE.public,
        function=mf.builtin_descriptor(function),
        params=params,
        inputs=[kit.task_input(n, ds) for n, ds in datasets.items()],
        outputs=[mf.TaskOutput(o, rs) for o, rs in outputs.items()],
        participants=PARTIES,
    )


def run_manifest(kit, m, datasets: dict):
    approvals = [
        sign_approval(who, m) for who in {ds.owner.fingerprint: ds.owner for ds in datasets.values()}.values()
    ]
    if ALICE not in [ds.owner for ds in datasets.values()]:
        approvals.append(sign_approval(ALICE, m))
    return kit.run(m, approvals, datasets)


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


# ---- password-check ---------------------------------------------------------------------------------


def check(kit, password: bytes, exposed: bytes):
    datasets = {"password": kit.dataset(ALICE, password), "exposed": kit.dataset(HIBP, exposed)}
    m = build(kit, "password-check", datasets, {}, {"result": (ALICE.fingerprint,)})
    return run_manifest(kit, m, datasets)


def test_password_check_agrees_with_hashlib(kit) -> None:
    data = corpus(1, 300, extra={PASSWORD: 4242})
    assert sha1(PASSWORD).encode() in data
    result, body, outs = check(kit, PASSWORD.encode() + b"\n", data)
    assert result["ok"], body
    exposed = kit.read(outs["result"], ALICE)
    assert json.loads(exposed) == {"exposed": True, "count": 4242}
    with pytest.raises(ConfideError):  # sealed to the password's owner only
        kit.read(outs["result"], HIBP)
    result, body, outs = check(kit, b"never leaked", data)
    assert result["ok"], body
    clean = kit.read(outs["result"], ALICE)
    assert json.loads(clean) == {"exposed": False, "count": 0}
    assert len(clean) == len(exposed) == 96  # the host cannot tell the answer from the size


def test_bare_hashes_lowercase_and_padding_count_once_each(kit) -> None:
    h = sha1(PASSWORD)
    data = f"\ufeff{'0' * 40}\n{h.lower()}\n\n{h}:3\n".encode()
    padded = PASSWORD.encode().ljust(custody.PASSWORD_PAD, b"\0")  # as upload_password writes it
    result, body, outs = check(kit, padded, data)
    assert result["ok"], body
    assert json.loads(kit.read(outs["result"], ALICE)) == {"exposed": True, "count": 4}


def test_the_result_may_go_only_to_the_passwords_owner(kit) -> None:
    """The corpus owner (or anyone but the password's owner) cannot be a recipient: no manifest is
    built, and a hand-made one that every party signed is refused by the enclave before it runs."""
    datasets = {"password": kit.dataset(ALICE, b"hunter2"), "exposed": kit.dataset(HIBP, corpus(2, 20))}
    for recipients in ((HIBP.fingerprint,), (ALICE.fingerprint, HIBP.fingerprint), (VAULT.fingerprint,)):
        with pytest.raises(IntegrityError, match="is for the owner of input 'password' only"):
            build(kit, "password-check", datasets, {}, {"result": recipients})
    good = build(kit, "password-check", datasets, {}, {"result": (ALICE.fingerprint,)})
    evil = dataclasses.replace(good, outputs=(mf.TaskOutput("result", (HIBP.fingerprint,)),))
    result, body, outs = run_manifest(kit, evil, datasets)
    assert result["ok"] is False
    assert "may be sealed only to that input's owner" in json.dumps(body)
    assert not outs["result"].exists()


@pytest.mark.parametrize(
    ("line", "number"),
    [
        (b"ABC:1", 2),  # too short
        (b"0" * 40 + b":0", 2),  # a count of 0
        (b"0" * 40 + b":-3", 2),
        (b"0" * 35 + b":7", 2),  # a range-API suffix, not a full hash
        (b"Z" * 40, 2),
        (b"0" * 40 + b":12 ", 2),
        (b"0" * 300, 2),  # longer than any corpus line
    ],
)
def test_a_malformed_corpus_line_is_refused_by_number(kit, line: bytes, number: int) -> None:
    data = b"1" * 40 + b":5\n" + line + b"\n" + b"2" * 40 + b":1\n"
    result, _body, outs = check(kit, PASSWORD.encode(), data)
    assert result["ok"] is False and result["category"] == "exception"
    error = kit.read(outs["_error"], ALICE).decode()
    assert f"input 'exposed', line {number}: not a corpus line" in error
    assert line.decode() not in error or len(line) < 6  # the line's text is not quoted
    assert not outs["result"].exists()
    with pytest.raises(ValueError, match=f"input 'exposed', line {number}: not a corpus line"):
        password_check.count_in_corpus(io.BytesIO(data), b"0" * 40)  # in this process too


@pytest.mark.parametrize(
    ("password", "message"),
    [
        (b"", "input 'password' is empty"),
        (b"\n", "input 'password' is empty"),
        (b"Sesame-123\nsecond line", "more than one line"),
        (b"Sesame-\xff123", "input 'password' is not UTF-8 text"),
        (b"Sesame-" * 700, "input 'password' is longer than 4096 bytes"),
        (b"Sesame-" * 1200, "input 'password' is longer than 8192 bytes"),
    ],
)
def test_a_bad_password_is_refused_without_quoting_it(kit, password: bytes, message: str) -> None:
    result, _body, outs = check(kit, password, corpus(3, 5))
    assert result["ok"] is False
    error = kit.read(outs["_error"], ALICE).decode()
    assert message in error and "Sesame" not in error
    with pytest.raises(ValueError, match=message):  # in this process too
        password_check.password_hash(io.BytesIO(password))


def test_password_check_in_process_and_bad_shapes() -> None:
    def call(params: dict, inputs: dict[str, bytes], outputs: tuple[str, ...]) -> bytes:
        outs = {o: io.BytesIO() for o in outputs}
        password_check.run(Context(params, {n: io.BytesIO(v) for n, v in inputs.items()}, dict(outs)))  # type: ignore[arg-type]
        return outs["result"].getvalue()

    data = corpus(4, 50, extra={"abc": 9}, crlf=False)
    got = json.loads(call({}, {"password": b"abc\r\n", "exposed": data}, ("result",)))
    assert got == {"exposed": True, "count": 9}
    with pytest.raises(ValueError, match="takes no parameters, got salt"):
        call({"salt": "x"}, {"password": b"abc", "exposed": data}, ("result",))
    with pytest.raises(ValueError, match="needs inputs 'password' and 'exposed'"):
        call({}, {"password": b"abc"}, ("result",))
    with pytest.raises(ValueError, match="writes output 'result' only"):
        call({}, {"password": b"abc", "exposed": data}, ("result", "hashes"))


def test_password_check_approval_text(kit) -> None:
    datasets = {"password": kit.dataset(ALICE, b"x"), "exposed": kit.dataset(HIBP, corpus(5, 3))}
    text = describe_manifest(build(kit, "password-check", datasets, {}, {"result": (ALICE.fingerprint,)}))
    assert "What leaves (password-check, enforced in the enclave):" in text
    assert f"result -> alice ({ALICE.fingerprint}): whether the password of alice (" in text
    assert "hibp (" in text and "learns only that a check ran" in text


# ---- sign (key custody) -------------------------------------------------------------------------------

ED = ed25519.Ed25519PrivateKey.generate()
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
MESSAGE = b"pay 100 EUR to account 42\n" * 3


def pkcs8(key: Any, encoding: Any = serialization.Encoding.PEM, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(encoding, serialization.PrivateFormat.PKCS8, enc)


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def secret_forms(key: Any) -> list[bytes]:
    """Pieces of the private key as they could show up in text or bytes: DER slices, their hex and
    base64, and the PEM body's lines."""
    der = pkcs8(key, serialization.Encoding.DER)
    pieces = [der[i : i + 12] for i in range(16, len(der) - 12, 12)]
    pem_lines = [ln for ln in pkcs8(key).splitlines() if not ln.startswith(b"-----")]
    return pieces + [p.hex().encode() for p in pieces] + [base64.b64encode(p) for p in pieces] + pem_lines


def run_sign(kit, key: bytes, algorithm: str, outputs=("signature", "public_key"), message: bytes = MESSAGE):
    datasets = {"key": kit.dataset(VAULT, key), "message": kit.dataset(ALICE, message)}
    m = build(kit, "sign", datasets, {"algorithm": algorithm}, {o: (ALICE.fingerprint,) for o in outputs})
    return run_manifest(kit, m, datasets)


def test_ed25519_signature_equals_local_signing(kit) -> None:
    result, body, outs = run_sign(kit, pkcs8(ED), "ed25519")
    assert result["ok"], body
    signature = kit.read(outs["signature"], ALICE)
    assert signature == ED.sign(MESSAGE)  # Ed25519 is deterministic
    assert kit.read(outs["public_key"], ALICE) == public_pem(ED)
    for piece in secret_forms(ED):
        assert piece not in signature and piece not in public_pem(ED)


def test_rsa_signatures_verify_with_the_public_key(kit) -> None:
    public = RSA.public_key()
    result, body, outs = run_sign(
        kit, pkcs8(RSA, serialization.Encoding.DER), "rsa-pss-sha256", ("signature",)
    )
    assert result["ok"], body
    pss = kit.read(outs["signature"], ALICE)
    assert len(pss) == 256
    public.verify(
        pss, MESSAGE, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
    result, body, outs = run_sign(kit, pkcs8(RSA), "rsa-pkcs1v15-sha256")
    assert result["ok"], body
    v15 = kit.read(outs["signature"], ALICE)
    assert v15 == RSA.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())  # deterministic too
    public.verify(v15, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    assert kit.read(outs["public_key"], ALICE) == public_pem(RSA)
    for piece in secret_forms(RSA):
        assert piece not in pss and piece not in v15


def _garbled(key: bytes) -> bytes:
    lines = key.splitlines(keepends=True)
    lines[3] = lines[3][::-1]  # one base64 line of the key's body reversed
    return b"".join(lines)


SMALL_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
PKCS1 = RSA.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
)


@pytest.mark.parametrize(
    ("key", "secret", "algorithm", "message"),
    [
        (pkcs8(ED, password=b"pw"), ED, "ed25519", "the key is encrypted"),
        (
            pkcs8(ED, serialization.Encoding.DER, b"pw"),
            ED,
            "ed25519",
            "not an unencrypted PKCS#8 private key",
        ),
        (
            _garbled(pkcs8(RSA)),
            RSA,
            "rsa-pss-sha256",
            "not a readable PKCS#8 private key (garbled or truncated)",
        ),
        (pkcs8(RSA, serialization.Encoding.DER)[:-40], RSA, "rsa-pss-sha256", "not a readable PKCS#8"),
        (pkcs8(SMALL_RSA), SMALL_RSA, "rsa-pss-sha256", "the key is RSA of 1024 bits: at least 2048"),
        (pkcs8(EC_KEY), EC_KEY, "ed25519", "signs with RSA or Ed25519 keys only"),
        (
            pkcs8(RSA),
            RSA,
            "ed25519",
            "algorithm 'ed25519' does not fit the key: it is an RSA key of 2048 bits",
        ),
        (
            pkcs8(ED),
            ED,
            "rsa-pss-sha256",
            "algorithm 'rsa-pss-sha256' does not fit the key: it is an Ed25519 key",
        ),
        (PKCS1, RSA, "rsa-pss-sha256", "the key's PEM label is '-----BEGIN RSA PRIVATE KEY-----'"),
        (pkcs8(ED), ED, "rsa-sha1", "parameter 'algorithm' must be one of"),
    ],
)
def test_a_bad_key_is_refused_and_no_key_byte_leaves(kit, key, secret, algorithm, message) -> None:
    result, _body, outs = run_sign(kit, key, algorithm)
    assert result["ok"] is False and result["category"] == "exception"
    error = kit.read(outs["_error"], ALICE)
    assert message in error.decode()
    body = b"".join(ln for ln in key.splitlines() if not ln.startswith(b"-----"))  # PEM armor is no secret
    for piece in secret_forms(secret) + [body[i : i + 12] for i in range(16, len(body) - 12, 12)]:
        assert piece not in error
    assert not outs["signature"].exists() and not outs["public_key"].exists()
    ctx = Context(
        {"algorithm": algorithm},
        {"key": io.BytesIO(key), "message": io.BytesIO(MESSAGE)},
        {"signature": io.BytesIO()},
    )
    with pytest.raises(ValueError) as local:  # in this process too (coverage sees it)
        sign.run(ctx)
    assert message in str(local.value)


def test_sign_approval_text_and_sdk_helpers(kit, tmp_path: Path) -> None:
    datasets = {"key": kit.dataset(VAULT, pkcs8(ED)), "message": kit.dataset(ALICE, MESSAGE)}
    m = build(kit, "sign", datasets, {"algorithm": "ed25519"}, {"signature": (ALICE.fingerprint,)})
    text = describe_manifest(m)
    assert "What leaves (sign, enforced in the enclave):" in text
    assert "the private key of vault (" in text and "with 'ed25519'; no byte of the key leaves" in text
    assert f"signature -> alice ({ALICE.fingerprint}): the signature's raw bytes" in text
    assert "public_key ->" not in text

    class Stub:
        fingerprint = ALICE.fingerprint

        def _dataset_pin(self, ref: str, where: str) -> Any:
            return type("Pin", (), {"owner": {"cds1:p": ALICE.fingerprint, "cds1:c": HIBP.fingerprint}[ref]})

        def create_task(self, **kw: Any) -> str:
            self.kw = kw
            return "task"

        def _upload(self, path: Path, name: str, schema: dict, rows: Any, metadata: dict, what: str) -> Any:
            self.uploaded = (path.read_bytes(), name, schema, rows, what)
            return "ref"

    stub = Stub()
    custody.sign_message(
        stub, key="cds1:k", message="cds1:m", algorithm="ed25519", outputs=("signature", "public_key")
    )  # type: ignore[arg-type]
    assert stub.kw["params"] == {"algorithm": "ed25519"} and stub.kw["function"] == "sign"
    assert stub.kw["outputs"] == {"signature": [ALICE.fingerprint], "public_key": [ALICE.fingerprint]}
    with pytest.raises(ConfideError, match="algorithm must be one of"):
        custody.sign_message(stub, key="cds1:k", message="cds1:m", algorithm="rsa")  # type: ignore[arg-type]
    with pytest.raises(ConfideError, match="sign outputs must be some of"):
        custody.sign_message(stub, key="cds1:k", message="cds1:m", algorithm="ed25519", outputs=("key",))  # type: ignore[arg-type]
    custody.password_check(stub, password="cds1:p", exposed="cds1:c")  # type: ignore[arg-type]
    assert stub.kw["outputs"] == {"result": [ALICE.fingerprint]}  # the password's owner, always
    assert stub.kw["inputs"] == {"password": "cds1:p", "exposed": "cds1:c"}
    custody.upload_password(stub, "a,b,c")  # type: ignore[arg-type]
    data, _name, schema, rows, _ = stub.uploaded
    assert data == b"a,b,c".ljust(8192, b"\0") and schema == {"columns": []} and rows is None
    with pytest.raises(ConfideError, match="on one line"):
        custody.upload_password(stub, "two\nlines")  # type: ignore[arg-type]
    (tmp_path / "vault.pem").write_bytes(pkcs8(ED))
    custody.upload_key(stub, tmp_path / "vault.pem")  # type: ignore[arg-type]
    assert stub.uploaded[1:] == ("vault", {"columns": []}, None, "key")


def _sign_here(algorithm: str, key: bytes, outputs=("signature",)) -> dict[str, bytes]:
    outs = {o: io.BytesIO() for o in outputs}
    inputs = {"key": io.BytesIO(key), "message": io.BytesIO(MESSAGE)}
    sign.run(Context({"algorithm": algorithm}, inputs, dict(outs)))  # type: ignore[arg-type]
    return {o: b.getvalue() for o, b in outs.items()}


def test_sign_in_process_equals_the_sandboxed_run(kit) -> None:
    """run(ctx) in this process (coverage sees it) gives the bytes the enclave gives."""
    got = _sign_here("rsa-pkcs1v15-sha256", pkcs8(RSA), ("signature", "public_key"))
    result, body, outs = run_sign(kit, pkcs8(RSA), "rsa-pkcs1v15-sha256")
    assert result["ok"], body
    assert got == {o: kit.read(outs[o], ALICE) for o in ("signature", "public_key")}
    pss = _sign_here("rsa-pss-sha256", pkcs8(RSA))["signature"]
    mgf = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    RSA.public_key().verify(pss, MESSAGE, mgf, hashes.SHA256())
    assert _sign_here("ed25519", pkcs8(ED))["signature"] == ED.sign(MESSAGE)
    with pytest.raises(ValueError, match="needs inputs 'key' and 'message'"):
        sign.run(Context({"algorithm": "ed25519"}, {"key": io.BytesIO(pkcs8(ED))}, {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown parameter"):
        sign.run(
            Context(
                {"algorithm": "ed25519", "salt": 1}, {"key": io.BytesIO(b""), "message": io.BytesIO(b"")}, {}
            )  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="writes signature and/or public_key, got"):
        _sign_here("ed25519", pkcs8(ED), ("key",))
    with pytest.raises(ValueError, match="longer than 65536 bytes: not a private key"):
        _sign_here("ed25519", b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 70000)


# ---- the CLI on a real server: a password typed at a prompt, a key uploaded as a secret -------------


def test_password_check_and_sign_through_the_cli(server, tmp_path) -> None:
    """`confide dataset upload-password` (hidden prompt) and `dataset upload --secret` show the
    platform no schema; `task create --function password-check` with the result sealed to the corpus
    owner is a clear error; the generic path runs both built-ins."""
    from platform_support import CliParties

    cli = CliParties(server, tmp_path, ("calice", "chibp"))
    fps = cli.fps

    def last(r: Any) -> str:
        assert r.exit_code == 0, r.output
        return str(r.stdout).strip().splitlines()[-1]

    r = cli("calice", "dataset", "upload-password", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    password_ref = last(r)
    assert PASSWORD not in r.output
    (tmp_path / "corpus.txt").write_bytes(corpus(6, 50, extra={PASSWORD: 77}))
    exposed_ref = last(cli("chibp", "dataset", "upload", str(tmp_path / "corpus.txt"), "--secret"))
    (tmp_path / "vault.pem").write_bytes(pkcs8(ED))
    (tmp_path / "msg.bin").write_bytes(MESSAGE)
    key_ref = last(cli("chibp", "dataset", "upload", str(tmp_path / "vault.pem"), "--secret"))
    message_ref = last(cli("calice", "dataset", "upload", str(tmp_path / "msg.bin"), "--secret"))
    r = cli("calice", "dataset", "show", password_ref)
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    assert listed["columns"] == [] and listed["rows"] is None and listed["size"] > 8192

    create = ["task", "create", "--function", "password-check"]
    create += ["--input", f"password={password_ref}", "--input", f"exposed={exposed_ref}"]
    r = cli("chibp", *create, "--output", f"result={fps['chibp']}")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "error: output 'result' is for the owner of input 'password' only" in r.output
    checks = last(cli("chibp", *create, "--output", f"result={fps['calice']}"))
    signs = [
        "task",
        "create",
        "--function",
        "sign",
        "--input",
        f"key={key_ref}",
        "--input",
        f"message={message_ref}",
    ]
    signs += ["--output", f"signature={fps['calice']}", "--param", "algorithm=ed25519"]
    signed = last(cli("calice", *signs))
    for task in (checks, signed):
        for who in ("calice", "chibp"):
            assert cli(who, "task", "approve", task, "--yes").exit_code == 0
        r = cli("calice", "task", "run", task)
        assert r.exit_code == 0 and "succeeded" in r.stdout, r.output
        assert cli("calice", "task", "results", task, "--out", str(tmp_path / task)).exit_code == 0
    assert json.loads((tmp_path / checks / "result").read_text()) == {"count": 77, "exposed": True}
    assert (tmp_path / signed / "signature").read_bytes() == ED.sign(MESSAGE)
