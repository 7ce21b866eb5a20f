"""Verification policy: which verified evidence a client accepts.

A policy is a TOML file (all keys optional; unknown keys are an error)::

    backends = ["sgx", "tdx", "sev-snp", "nitro"]  # evidence kinds accepted ("sim" only with allow_simulation)
    measurements = ["<hex>", ...]                   # accepted measurements
    auditor_keys = ["confide-pub1:...", ...]        # or: measurements endorsed by one of these auditors
    min_security_version = 0
    allow_debug = false
    allow_simulation = false                        # the sim backend protects nothing against the host
    max_age_seconds = 600                           # evidence older than this is stale (0: no limit)
    require_nonce = true                            # evidence must bind the verifier's fresh nonce
    accepted_tcb_status = ["UpToDate"]              # DCAP TCB levels accepted (real SGX/TDX only)

The defaults are a production policy: simulated and debug evidence are rejected, a nonce is required.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from confide.attest.claims import Claims
from confide.enclave.backend import keys_binding, nonce_binding
from confide.enclave.encoding import (
    b64d,
    b64e,
    canonical_json,
    check_fields,
    get_typed,
    hexd,
    parse_json_object,
)
from confide.enclave.errors import ConfideError, FormatError, PolicyError
from confide.enclave.keys import Identity, PublicIdentity

CLOCK_SKEW_SECONDS = 60
ENDORSEMENT_FORMAT = "confide-endorsement-v1"


@dataclass(frozen=True)
class Policy:
    backends: tuple[str, ...] = ("sgx", "tdx", "sev-snp", "nitro")
    measurements: tuple[str, ...] = ()
    auditor_keys: tuple[str, ...] = ()
    min_security_version: int = 0
    allow_debug: bool = False
    allow_simulation: bool = False
    max_age_seconds: int = 600
    require_nonce: bool = True
    accepted_tcb_status: tuple[str, ...] = ("UpToDate",)
    source: str = field(default="built-in production policy", compare=False)

    @classmethod
    def from_toml(cls, text: str, *, where: str) -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FormatError(f"not valid TOML ({exc})", where=where) from None
        data = data.get("policy", data)
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FormatError(f"unknown policy key(s) {', '.join(unknown)}", where=where)
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("backends", "measurements", "auditor_keys", "accepted_tcb_status"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise FormatError(f"{f.name} must be a list of strings", where=where)
                value = tuple(v.lower() if f.name == "measurements" else v for v in value)
            elif f.name in ("allow_debug", "allow_simulation", "require_nonce"):
                if not isinstance(value, bool):
                    raise FormatError(f"{f.name} must be true or false", where=where)
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FormatError(f"{f.name} must be a non-negative integer", where=where)
            kwargs[f.name] = value
        for m in kwargs.get("measurements", ()):
            hexd(m, field="measurements", where=where, length=32)
        for line in kwargs.get("auditor_keys", ()):
            PublicIdentity.from_line(line, where=f"{where}: auditor_keys")
        return cls(**kwargs, source=where)

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfideError(f"cannot read policy ({exc})", where=str(path)) from None
        return cls.from_toml(text, where=str(path))

    def to_toml(self) -> str:
        def q(values: tuple[str, ...]) -> str:
            return "[" + ", ".join(f'"{v}"' for v in values) + "]"

        return "\n".join(
            [
                f"backends = {q(self.backends)}",
                f"measurements = {q(self.measurements)}",
                f"auditor_keys = {q(self.auditor_keys)}",
                f"min_security_version = {self.min_security_version}",
                f"allow_debug = {str(self.allow_debug).lower()}",
                f"allow_simulation = {str(self.allow_simulation).lower()}",
                f"max_age_seconds = {self.max_age_seconds}",
                f"require_nonce = {str(self.require_nonce).lower()}",
                f"accepted_tcb_status = {q(self.accepted_tcb_status)}",
                "",
            ]
        )


# ---- auditor endorsements --------------------------------------------------------------------


def make_endorsement(measurement: str, auditor: Identity, statement: str = "") -> bytes:
    hexd(measurement, field="measurement", where="endorsement", length=32)
    body = {
        "format": ENDORSEMENT_FORMAT,
        "measurement": measurement.lower(),
        "auditor": auditor.public.to_line(),
        "statement": statement,
    }
    sig = auditor.sign(canonical_json(body))
    return canonical_json({**body, "signature": b64e(sig)})


def check_endorsement(data: bytes, *, where: str) -> tuple[str, PublicIdentity]:
    """Returns (measurement, auditor) of an authentic endorsement."""
    obj = parse_json_object(data, where=where)
    check_fields(obj, required=("format", "measurement", "auditor", "statement", "signature"), where=where)
    if obj["format"] != ENDORSEMENT_FORMAT:
        raise FormatError(f"not an endorsement (format {obj['format']!r})", where=where)
    measurement = hexd(obj["measurement"], field="measurement", where=where, length=32).hex()
    auditor = PublicIdentity.from_line(get_typed(obj, "auditor", str, where=where), where=where)
    get_typed(obj, "statement", str, where=where)
    sig = b64d(obj.pop("signature"), field="signature", where=where, length=64)
    auditor.verify(sig, canonical_json(obj), what=where)
    return measurement, auditor


# ---- evaluation --------------------------------------------------------------------------------


def evaluate(
    policy: Policy,
    claims: Claims,
    *,
    at: int,
    nonce: bytes | None = None,
    endorsements: tuple[tuple[str, PublicIdentity], ...] = (),
    enclave_keys: PublicIdentity | None = None,
) -> None:
    """Raise PolicyError listing every way `claims` fail `policy`."""
    problems: list[str] = []
    if claims.simulated and not policy.allow_simulation:
        problems.append(
            "evidence is SIMULATED (sim backend: no protection against the host) and the policy does not "
            "allow simulation (allow_simulation = false)"
        )
    if claims.backend not in policy.backends and not (claims.simulated and policy.allow_simulation):
        problems.append(
            f"backend {claims.backend!r} not accepted (policy accepts: {', '.join(policy.backends)})"
        )
    if claims.debug and not policy.allow_debug:
        problems.append(
            "evidence comes from a DEBUG enclave (its memory is readable by the host); allow_debug = false"
        )
    if claims.security_version < policy.min_security_version:
        problems.append(
            f"security version {claims.security_version} below the minimum {policy.min_security_version}"
        )
    auditors = {PublicIdentity.from_line(k).fingerprint for k in policy.auditor_keys}
    endorsed = any(m == claims.measurement and a.fingerprint in auditors for m, a in endorsements)
    if claims.measurement not in policy.measurements and not endorsed:
        why = (
            "no measurements or auditor keys in the policy"
            if not (policy.measurements or policy.auditor_keys)
            else "not in the policy's measurements and not endorsed by an accepted auditor"
        )
        problems.append(f"measurement {claims.measurement} not accepted ({why})")
    if claims.tcb_status and claims.tcb_status not in policy.accepted_tcb_status:
        problems.append(
            f"TCB status {claims.tcb_status!r} not accepted (policy accepts: "
            f"{', '.join(policy.accepted_tcb_status)}; advisories: {', '.join(claims.advisories) or 'none'})"
        )
    if claims.issued_at is not None:
        if claims.issued_at > at + CLOCK_SKEW_SECONDS:
            problems.append(f"evidence is dated {claims.issued_at - at} s in the future")
        elif policy.max_age_seconds and at - claims.issued_at > policy.max_age_seconds:
            problems.append(
                f"evidence is {at - claims.issued_at} s old; policy allows {policy.max_age_seconds} s"
            )
    elif policy.max_age_seconds and not nonce:
        problems.append("evidence carries no time and no nonce was checked: freshness unknown")
    if nonce is not None:
        if claims.report_data[32:] != nonce_binding(nonce):
            problems.append(
                "nonce mismatch: the evidence does not bind the nonce given (replayed or stale evidence)"
            )
    elif policy.require_nonce:
        problems.append("policy requires a nonce (require_nonce = true) and none was given")
    if enclave_keys is not None and claims.report_data[:32] != keys_binding(enclave_keys):
        problems.append("the enclave keys presented are not the keys bound in the evidence's report data")
    if problems:
        raise PolicyError("; ".join(problems), where=f"policy {policy.source}")
