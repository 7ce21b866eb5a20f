"""The run request a client seals to an attested enclave, and the receipt the enclave signs back.

The request carries what only the client may decide: the function (by digest), its parameters,
each input's data key bound to that input's header digest, and who receives each output. The host
relays it but cannot read or change it (HPKE to the enclave's attested key), so it cannot swap
inputs, swap the function, or redirect outputs. A request id makes each request single-use.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from . import hpke_box
from .encoding import b64d, b64e, canonical_json, check_fields, get_typed, hexd, parse_json_object
from .errors import FormatError
from .keys import Identity, PublicIdentity

REQUEST_FORMAT = "confide-run-request-v1"
RECEIPT_FORMAT = "confide-receipt-v1"
REQUEST_PURPOSE = "run-request"
MAX_RECIPIENTS = 64


@dataclass(frozen=True)
class InputGrant:
    data_key: bytes
    header_sha256: str


@dataclass(frozen=True)
class OutputSpec:
    recipients: tuple[PublicIdentity, ...]
    max_bytes: int


@dataclass(frozen=True)
class RunRequest:
    request_id: str
    attestation_nonce: str  # hex: the nonce of the attestation this request follows (single use, this boot)
    function_sha256: str
    params: dict[str, Any]
    inputs: dict[str, InputGrant]
    outputs: dict[str, OutputSpec]
    error_recipients: tuple[PublicIdentity, ...]
    client: PublicIdentity
    source: str | None = None  # the function itself, when its code is confidential (never seen by the host)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REQUEST_FORMAT,
            "request_id": self.request_id,
            "attestation_nonce": self.attestation_nonce,
            "function_sha256": self.function_sha256,
            "params": self.params,
            "inputs": {
                n: {"data_key": b64e(g.data_key), "header_sha256": g.header_sha256}
                for n, g in self.inputs.items()
            },
            "outputs": {
                n: {"recipients": [r.to_line() for r in o.recipients], "max_bytes": o.max_bytes}
                for n, o in self.outputs.items()
            },
            "error_recipients": [r.to_line() for r in self.error_recipients],
            "client": self.client.to_line(),
            **({"source": self.source} if self.source is not None else {}),
        }

    def seal_to(self, enclave: PublicIdentity) -> bytes:
        return hpke_box.seal(
            canonical_json(self.to_json()), enclave.kem_key, REQUEST_PURPOSE, enclave=enclave.fingerprint
        )


def function_digest(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def params_digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(params)).hexdigest()


def _recipients(value: Any, where: str) -> tuple[PublicIdentity, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_RECIPIENTS:
        raise FormatError(f"recipients must be a list of 1..{MAX_RECIPIENTS} public identities", where=where)
    return tuple(PublicIdentity.from_line(v, where=where) for v in value)


def open_request(sealed: bytes, enclave: Identity) -> RunRequest:
    """Enclave side: open and strictly parse a sealed run request."""
    w = "run request"
    plain = hpke_box.open_sealed(
        sealed, enclave.kem_key, REQUEST_PURPOSE, where=w, enclave=enclave.fingerprint
    )
    obj = parse_json_object(plain, where=w)
    check_fields(
        obj,
        required=(
            "format",
            "request_id",
            "attestation_nonce",
            "function_sha256",
            "params",
            "inputs",
            "outputs",
            "error_recipients",
            "client",
        ),
        optional=("source",),
        where=w,
    )
    if obj["format"] != REQUEST_FORMAT:
        raise FormatError(f"unknown request format {obj['format']!r}", where=w)
    inputs: dict[str, InputGrant] = {}
    for name, g in get_typed(obj, "inputs", dict, where=w).items():
        gw = f"{w}: input {name!r}"
        if not isinstance(g, dict):
            raise FormatError("must be an object", where=gw)
        check_fields(g, required=("data_key", "header_sha256"), where=gw)
        inputs[name] = InputGrant(
            b64d(g["data_key"], field="data_key", where=gw, length=32),
            hexd(g["header_sha256"], field="header_sha256", where=gw, length=32).hex(),
        )
    outputs: dict[str, OutputSpec] = {}
    for name, o in get_typed(obj, "outputs", dict, where=w).items():
        ow = f"{w}: output {name!r}"
        if not isinstance(o, dict):
            raise FormatError("must be an object", where=ow)
        check_fields(o, required=("recipients", "max_bytes"), where=ow)
        max_bytes = get_typed(o, "max_bytes", int, where=ow)
        if max_bytes <= 0:
            raise FormatError("max_bytes must be positive", where=ow)
        outputs[name] = OutputSpec(_recipients(o["recipients"], ow), max_bytes)
    return RunRequest(
        request_id=hexd(obj["request_id"], field="request_id", where=w, length=16).hex(),
        attestation_nonce=hexd(obj["attestation_nonce"], field="attestation_nonce", where=w, length=32).hex(),
        function_sha256=hexd(obj["function_sha256"], field="function_sha256", where=w, length=32).hex(),
        params=get_typed(obj, "params", dict, where=w),
        inputs=inputs,
        outputs=outputs,
        error_recipients=_recipients(obj["error_recipients"], f"{w}: error_recipients"),
        client=PublicIdentity.from_line(get_typed(obj, "client", str, where=w), where=f"{w}: client"),
        source=get_typed(obj, "source", str, where=w) if "source" in obj else None,
    )


# ---- receipts ---------------------------------------------------------------------------------


def make_receipt(
    enclave: Identity,
    *,
    request: RunRequest,
    outputs: dict[str, str],
    measurement: str,
    backend: str,
    simulated: bool,
) -> bytes:
    body = {
        "format": RECEIPT_FORMAT,
        "request_id": request.request_id,
        "function_sha256": request.function_sha256,
        "params_sha256": params_digest(request.params),
        "inputs": {n: g.header_sha256 for n, g in sorted(request.inputs.items())},
        "outputs": outputs,
        "enclave": enclave.public.to_line(),
        "measurement": measurement,
        "backend": backend,
        "simulated": simulated,
        "time": int(time.time()),
    }
    return canonical_json({"body": body, "signature": b64e(enclave.sign(canonical_json(body)))})
