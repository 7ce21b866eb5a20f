"""The client side: what a party runs on its own machine. Verifies evidence, seals requests to the
attested enclave, checks the receipt. Trusted by the party that runs it, and nothing else is."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.attest import Claims, TrustAnchors, verify_evidence
from confide.client.policy import Policy, evaluate
from confide.client.receipts import verify_receipt
from confide.client.sealing import open_reader
from confide.enclave.encoding import b64d, b64e
from confide.enclave.errors import EvidenceError, IntegrityError
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.request import InputGrant, OutputSpec, RunRequest, function_digest, params_digest
from confide.host.enclave_process import EnclaveProcess

DEFAULT_MAX_OUTPUT = 256 << 20


def new_request_id() -> str:
    """A run request's id (16 random bytes): the enclave refuses one it has seen (a replay)."""
    return os.urandom(16).hex()


@dataclass(frozen=True)
class Attestation:
    claims: Claims
    enclave: PublicIdentity  # the enclave key the evidence vouches for
    nonce: bytes  # fresh, 32 bytes; a run request spends it


def attest(enclave: EnclaveProcess, policy: Policy, anchors: TrustAnchors) -> Attestation:
    """Fresh-nonce attestation: verified claims, the enclave key they vouch for, and the nonce."""
    nonce = os.urandom(32)
    return check_attestation(enclave.evidence(nonce), nonce, policy, anchors)


def check_attestation(
    evidence: bytes,
    nonce: bytes,
    policy: Policy,
    anchors: TrustAnchors,
    *,
    keys_line: str | None = None,
    collateral: bytes | None = None,
) -> Attestation:
    """Verify evidence fetched with our fresh `nonce` and apply the policy. The enclave keys come from
    the evidence itself (sim) or from `keys_line` sent beside it; either way the report data must bind
    them, so the key we encrypt to is the one the TEE vouched for."""
    now = int(time.time())
    claims = verify_evidence(evidence, at=now, anchors=anchors, collateral=collateral)
    line = keys_line if keys_line is not None else claims.extra.get("enclave")
    if not isinstance(line, str):
        raise EvidenceError("evidence names no enclave key", where="evidence")
    enclave_pub = PublicIdentity.from_line(line, where="evidence: enclave key")
    evaluate(policy, claims, at=now, nonce=nonce, enclave_keys=enclave_pub)
    return Attestation(claims, enclave_pub, nonce)


@dataclass(frozen=True)
class RunOutcome:
    ok: bool
    category: str
    receipt: dict[str, Any] | None
    claims: Claims
    duration_s: float


def run_function(
    enclave: EnclaveProcess,
    *,
    source: str,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    recipients: list[PublicIdentity],
    params: dict[str, Any],
    identity: Identity,
    policy: Policy,
    anchors: TrustAnchors,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    error_report: Path | None = None,
    confidential_code: bool = True,
    say: Callable[[str], None] = lambda _msg: None,
) -> RunOutcome:
    """Attest, seal the request to the attested key, run, and check the receipt. With
    `confidential_code` the function travels inside the sealed request and the host never sees it;
    otherwise the host relays it in clear and the enclave checks it against the approved digest."""
    say("attesting the enclave (fresh nonce)")
    att = attest(enclave, policy, anchors)
    claims, enclave_pub = att.claims, att.enclave
    say(
        f"enclave {enclave_pub.fingerprint} accepted: {claims.backend} measurement {claims.measurement[:16]}…"
    )
    grants: dict[str, InputGrant] = {}
    for name, path in inputs.items():
        fh, reader = open_reader(path)
        with fh:
            reader.unlock(identity=identity)
            grants[name] = InputGrant(reader.data_key, reader.header.digest.hex())
    req = RunRequest(
        request_id=new_request_id(),
        attestation_nonce=att.nonce.hex(),
        function_sha256=function_digest(source),
        params=params,
        inputs=grants,
        outputs={n: OutputSpec(tuple(recipients), max_output_bytes) for n in outputs},
        error_recipients=(identity.public, *recipients),
        client=identity.public,
        source=source if confidential_code else None,
    )
    args: dict[str, Any] = {
        "request": b64e(req.seal_to(enclave_pub)),
        "inputs": {n: str(p.resolve()) for n, p in inputs.items()},
        "outputs": {n: str(p.resolve()) for n, p in outputs.items()},
    }
    if not confidential_code:
        args["source"] = source
    if error_report is not None:
        args["error_report"] = str(error_report.resolve())
    say(f"running the function on {len(inputs)} sealed input(s)")
    result = enclave.call("run", **args)
    if not result.get("ok"):
        return RunOutcome(
            False, str(result.get("category")), None, claims, float(result.get("duration_s", 0))
        )
    receipt = check_receipt(
        b64d(result["receipt"], field="receipt", where="enclave reply"),
        enclave_pub,
        req,
        outputs,
        where="receipt",
    )
    return RunOutcome(True, "ok", receipt, claims, float(result.get("duration_s", 0)))


def check_receipt(
    data: bytes, enclave_pub: PublicIdentity, req: RunRequest, outputs: dict[str, Path], *, where: str
) -> dict[str, Any]:
    body = verify_receipt(data, enclave_pub, where=where)
    expect = {
        "request_id": req.request_id,
        "function_sha256": req.function_sha256,
        "params_sha256": params_digest(req.params),
        "inputs": {n: g.header_sha256 for n, g in sorted(req.inputs.items())},
    }
    for key, value in expect.items():
        if body.get(key) != value:
            raise IntegrityError(f"receipt field {key!r} does not match the request", where=where)
    for name, path in outputs.items():
        try:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise IntegrityError(
                f"cannot read output to check it ({exc.strerror})", where=str(path)
            ) from None
        if body["outputs"].get(name) != digest:
            raise IntegrityError(
                f"output {name!r} on disk is not the output the enclave signed", where=str(path)
            )
    return {**body, "raw": data.decode()}
