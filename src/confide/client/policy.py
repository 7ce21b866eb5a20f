"""Verification policy: which verified evidence a client accepts.

A policy is a TOML file (all keys optional; unknown keys are an error)::

    backends = ["sgx", "tdx", "sev-snp", "nitro"]  # evidence kinds accepted ("sim" only with allow_simulation)
    measurements = ["<hex>", ...]                   # accepted primary measurements (MRENCLAVE, MRTD, SNP
                                                    # MEASUREMENT, Nitro PCR0, sim measurement)
    auditor_keys = ["confide-pub1:...", ...]        # or: measurements endorsed by one of these auditors
    min_security_version = 0
    allow_debug = false
    allow_simulation = false                        # the sim backend protects nothing against the host
    max_age_seconds = 600                           # evidence older than this is stale (0: no limit)
    require_nonce = true                            # evidence must bind the verifier's fresh nonce
    accepted_tcb_status = ["UpToDate"]              # Intel DCAP TCB levels accepted (SGX/TDX)
    tolerated_advisories = ["INTEL-SA-00615"]       # if present: the only Intel advisories accepted

    [sgx]                                           # per-format tables; each key overrides the one above
    measurements = { mrsigner = "<hex>", mrenclave = ["<hex>", "<hex>"] }
    product_id = 1
    min_security_version = 2
    accepted_tcb_status = ["UpToDate", "SWHardeningNeeded"]
    tolerated_advisories = ["INTEL-SA-00615"]

    [tdx]
    measurements = { mrtd = "<hex>", rtmr0 = "<hex>", rtmr1 = "<hex>", rtmr2 = "<hex>" }

    [sev-snp]
    measurements = { measurement = "<hex>", host_data = "<hex>" }
    min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }   # REPORTED_TCB must be at least this

    [nitro]
    measurements = { pcr0 = "<hex>", pcr1 = "<hex>", pcr2 = "<hex>", pcr8 = "<hex>" }
    allow_debug = false

A format table's `measurements` must all match the evidence's registers (Claims.measurements). The
enclave's identity is accepted when its primary measurement is listed in `measurements`, endorsed by
an accepted auditor, or pinned in its format table by an identity register (sgx: mrenclave or
mrsigner; tdx: mrtd; sev-snp: measurement or id_key_digest; nitro: pcr0 or pcr8; sim: measurement).

The defaults are a production policy: simulated and debug evidence are rejected, a nonce is required,
only the UpToDate TCB level is accepted.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from confide.attest.claims import Claims
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
from confide.enclave.report_data import keys_binding, nonce_binding

CLOCK_SKEW_SECONDS = 60
ENDORSEMENT_FORMAT = "confide-endorsement-v1"
PRIMARY_MEASUREMENT_LENGTHS = (32, 48)  # SGX/sim: SHA-256; TDX, SEV-SNP, Nitro: SHA-384

# register name -> byte length, per format (the names verifiers use in Claims.measurements)
REGISTERS: dict[str, dict[str, int]] = {
    "sim": {"measurement": 32, "signer": 32},
    "sgx": {"mrenclave": 32, "mrsigner": 32},
    "tdx": {
        "mrtd": 48,
        "rtmr0": 48,
        "rtmr1": 48,
        "rtmr2": 48,
        "rtmr3": 48,
        "mrconfigid": 48,
        "mrowner": 48,
        "mrownerconfig": 48,
        "mrseam": 48,
        "mrsignerseam": 48,
        "mrservicetd": 48,
    },
    "sev-snp": {
        "measurement": 48,
        "host_data": 32,
        "id_key_digest": 48,
        "author_key_digest": 48,
        "family_id": 16,
        "image_id": 16,
        "chip_id": 64,
    },
    "nitro": {f"pcr{i}": 48 for i in range(32)},
}
# registers that name the code (or its signer): pinning one of them accepts the enclave's identity
IDENTITY_REGISTERS: dict[str, tuple[str, ...]] = {
    "sim": ("measurement",),
    "sgx": ("mrenclave", "mrsigner"),
    "tdx": ("mrtd",),
    "sev-snp": ("measurement", "id_key_digest"),
    "nitro": ("pcr0", "pcr8"),
}
SNP_TCB_PARTS = ("bootloader", "tee", "snp", "microcode", "fmc")
_LIST_KEYS = ("backends", "measurements", "auditor_keys", "accepted_tcb_status", "tolerated_advisories")
_BOOL_KEYS = ("allow_debug", "allow_simulation", "require_nonce")


@dataclass(frozen=True)
class FormatPolicy:
    """One evidence format's table in a policy: expectations and overrides of the top-level keys."""

    measurements: dict[str, tuple[str, ...]] = field(default_factory=dict)  # register -> accepted hex
    product_id: int | None = None
    min_security_version: int | None = None
    allow_debug: bool | None = None
    accepted_tcb_status: tuple[str, ...] | None = None
    tolerated_advisories: tuple[str, ...] | None = None
    min_tcb: dict[str, int] | None = None  # sev-snp only

    @classmethod
    def from_table(cls, backend: str, table: Any, *, where: str) -> FormatPolicy:
        w = f"{where}: [{backend}]"
        if not isinstance(table, dict):
            raise FormatError(f"[{backend}] must be a table", where=where)
        allowed = {"measurements", "product_id", "min_security_version", "allow_debug"}
        if backend in ("sgx", "tdx"):
            allowed |= {"accepted_tcb_status", "tolerated_advisories"}
        if backend == "sev-snp":
            allowed.add("min_tcb")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise FormatError(
                f"unknown key(s) {', '.join(unknown)} (this table takes: {', '.join(sorted(allowed))})",
                where=w,
            )
        kwargs: dict[str, Any] = {}
        regs = REGISTERS[backend]
        if "measurements" in table:
            meas = table["measurements"]
            if not isinstance(meas, dict):
                raise FormatError("measurements must be a table of register = hex (or list of hex)", where=w)
            out: dict[str, tuple[str, ...]] = {}
            for name, value in meas.items():
                if name not in regs:
                    raise FormatError(
                        f"unknown {backend} register {name!r} (known: {', '.join(regs)})", where=w
                    )
                values = [value] if isinstance(value, str) else value
                if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                    raise FormatError(
                        f"measurements.{name} must be hex text or a non-empty list of it", where=w
                    )
                out[name] = tuple(
                    hexd(v, field=f"measurements.{name}", where=w, length=regs[name]).hex() for v in values
                )
            kwargs["measurements"] = out
        for key in ("product_id", "min_security_version"):
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise FormatError(f"{key} must be a non-negative integer", where=w)
                kwargs[key] = value
        if "allow_debug" in table:
            if not isinstance(table["allow_debug"], bool):
                raise FormatError("allow_debug must be true or false", where=w)
            kwargs["allow_debug"] = table["allow_debug"]
        for key in ("accepted_tcb_status", "tolerated_advisories"):
            if key in table:
                kwargs[key] = _str_list(table[key], key, where=w)
        if "min_tcb" in table:
            tcb = table["min_tcb"]
            if not isinstance(tcb, dict):
                raise FormatError("min_tcb must be a table such as { bootloader = 3, snp = 8 }", where=w)
            for part, value in tcb.items():
                if part not in SNP_TCB_PARTS:
                    raise FormatError(
                        f"unknown min_tcb part {part!r} (known: {', '.join(SNP_TCB_PARTS)})", where=w
                    )
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                    raise FormatError(f"min_tcb.{part} must be an integer 0..255", where=w)
            kwargs["min_tcb"] = dict(tcb)
        return cls(**kwargs)

    def to_toml(self, backend: str) -> list[str]:
        lines = [f"[{backend}]"]
        if self.measurements:
            items = ", ".join(f"{k} = {_q(v)}" for k, v in self.measurements.items())
            lines.append(f"measurements = {{ {items} }}")
        for key in ("product_id", "min_security_version"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {value}")
        if self.allow_debug is not None:
            lines.append(f"allow_debug = {str(self.allow_debug).lower()}")
        for key in ("accepted_tcb_status", "tolerated_advisories"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {_q(value)}")
        if self.min_tcb is not None:
            lines.append("min_tcb = { " + ", ".join(f"{k} = {v}" for k, v in self.min_tcb.items()) + " }")
        return lines


def _q(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _str_list(value: Any, key: str, *, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{key} must be a list of strings", where=where)
    return tuple(value)


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
    tolerated_advisories: tuple[str, ...] | None = None  # None: any advisory of an accepted TCB level
    formats: dict[str, FormatPolicy] = field(default_factory=dict)  # per-format tables
    source: str = field(default="built-in production policy", compare=False)

    @classmethod
    def from_toml(cls, text: str, *, where: str) -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FormatError(f"not valid TOML ({exc})", where=where) from None
        data = data.get("policy", data)
        known = ({f.name for f in fields(cls)} - {"source", "formats"}) | set(REGISTERS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise FormatError(f"unknown policy key(s) {', '.join(unknown)}", where=where)
        kwargs: dict[str, Any] = {}
        formats: dict[str, FormatPolicy] = {}
        for key, value in data.items():
            if key in REGISTERS:
                formats[key] = FormatPolicy.from_table(key, value, where=where)
            elif key in _LIST_KEYS:
                items = _str_list(value, key, where=where)
                kwargs[key] = tuple(v.lower() for v in items) if key == "measurements" else items
            elif key in _BOOL_KEYS:
                if not isinstance(value, bool):
                    raise FormatError(f"{key} must be true or false", where=where)
                kwargs[key] = value
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FormatError(f"{key} must be a non-negative integer", where=where)
            else:
                kwargs[key] = value
        for m in kwargs.get("measurements", ()):
            raw = hexd(m, field="measurements", where=where)
            if len(raw) not in PRIMARY_MEASUREMENT_LENGTHS:
                raise FormatError(
                    f"measurement {m[:16]}… is {len(raw)} bytes; expected 32 (SGX, sim) or 48 (TDX, "
                    "SEV-SNP, Nitro PCR0)",
                    where=where,
                )
        for line in kwargs.get("auditor_keys", ()):
            PublicIdentity.from_line(line, where=f"{where}: auditor_keys")
        return cls(**kwargs, formats=formats, source=where)

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfideError(f"cannot read policy ({exc})", where=str(path)) from None
        return cls.from_toml(text, where=str(path))

    def to_toml(self) -> str:
        lines = [
            f"backends = {_q(self.backends)}",
            f"measurements = {_q(self.measurements)}",
            f"auditor_keys = {_q(self.auditor_keys)}",
            f"min_security_version = {self.min_security_version}",
            f"allow_debug = {str(self.allow_debug).lower()}",
            f"allow_simulation = {str(self.allow_simulation).lower()}",
            f"max_age_seconds = {self.max_age_seconds}",
            f"require_nonce = {str(self.require_nonce).lower()}",
            f"accepted_tcb_status = {_q(self.accepted_tcb_status)}",
        ]
        if self.tolerated_advisories is not None:
            lines.append(f"tolerated_advisories = {_q(self.tolerated_advisories)}")
        for backend, fp in self.formats.items():
            lines += ["", *fp.to_toml(backend)]
        return "\n".join([*lines, ""])

    def for_format(self, backend: str) -> FormatPolicy:
        return self.formats.get(backend) or FormatPolicy()


# ---- auditor endorsements --------------------------------------------------------------------


def make_endorsement(measurement: str, auditor: Identity, statement: str = "") -> bytes:
    raw = hexd(measurement, field="measurement", where="endorsement")
    if len(raw) not in PRIMARY_MEASUREMENT_LENGTHS:
        raise FormatError(f"measurement is {len(raw)} bytes; expected 32 or 48", where="endorsement")
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
    raw = hexd(obj["measurement"], field="measurement", where=where)
    if len(raw) not in PRIMARY_MEASUREMENT_LENGTHS:
        raise FormatError(f"measurement is {len(raw)} bytes; expected 32 or 48", where=where)
    measurement = raw.hex()
    auditor = PublicIdentity.from_line(get_typed(obj, "auditor", str, where=where), where=where)
    get_typed(obj, "statement", str, where=where)
    sig = b64d(obj.pop("signature"), field="signature", where=where, length=64)
    auditor.verify(sig, canonical_json(obj), what=where)
    return measurement, auditor


# ---- evaluation --------------------------------------------------------------------------------


def _check_tcb(policy: Policy, fp: FormatPolicy, claims: Claims, problems: list[str]) -> None:
    if not claims.tcb_status:
        return
    accepted = fp.accepted_tcb_status if fp.accepted_tcb_status is not None else policy.accepted_tcb_status
    tolerated = (
        fp.tolerated_advisories if fp.tolerated_advisories is not None else policy.tolerated_advisories
    )
    if claims.tcb_status not in accepted:
        problems.append(
            f"TCB status {claims.tcb_status!r} not accepted (policy accepts: {', '.join(accepted) or 'none'}; "
            f"advisories: {', '.join(claims.advisories) or 'none'})"
        )
        return
    if tolerated is not None and "*" not in tolerated:
        allowed = {a.upper() for a in tolerated}
        untolerated = [a for a in claims.advisories if a.upper() not in allowed]
        if untolerated:
            problems.append(
                f"TCB status {claims.tcb_status!r} comes with advisories the policy does not tolerate: "
                f"{', '.join(untolerated)} (tolerated_advisories: {', '.join(tolerated) or 'none'})"
            )


def _check_registers(fp: FormatPolicy, claims: Claims, problems: list[str]) -> bool:
    """Every expected register matches; returns whether an identity register was pinned."""
    pinned = False
    for name, accepted in fp.measurements.items():
        got = claims.measurements.get(name)
        if got is None:
            problems.append(f"{claims.backend} evidence has no {name} (the policy expects one)")
        elif got.lower() not in accepted:
            shown = ", ".join(a[:16] + "…" for a in accepted)
            problems.append(f"{name} {got} not accepted (policy expects {shown})")
        elif name in IDENTITY_REGISTERS.get(claims.backend, ()):
            pinned = True
    return pinned


def _check_min_tcb(fp: FormatPolicy, claims: Claims, problems: list[str]) -> None:
    if not fp.min_tcb:
        return
    reported = claims.extra.get("reported_tcb")
    if not isinstance(reported, Mapping):
        problems.append("the policy sets min_tcb but the evidence reports no TCB version")
        return
    for part, minimum in fp.min_tcb.items():
        value = reported.get(part)
        if not isinstance(value, int):
            problems.append(
                f"the evidence's REPORTED_TCB has no {part} component (min_tcb.{part} = {minimum})"
            )
        elif value < minimum:
            problems.append(f"REPORTED_TCB {part} {value} is below the minimum {minimum}")


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
    fp = policy.for_format(claims.backend)
    if claims.simulated and not policy.allow_simulation:
        problems.append(
            "evidence is SIMULATED (sim backend: no protection against the host) and the policy does not "
            "allow simulation (allow_simulation = false); for development only, `confide policy init --dev "
            "--out dev-policy.toml` writes a policy pinned to this build that accepts it"
        )
    if claims.backend not in policy.backends and not (claims.simulated and policy.allow_simulation):
        problems.append(
            f"backend {claims.backend!r} not accepted (policy accepts: {', '.join(policy.backends)})"
        )
    allow_debug = fp.allow_debug if fp.allow_debug is not None else policy.allow_debug
    if claims.debug and not allow_debug:
        problems.append(
            "evidence comes from a DEBUG enclave (its memory is readable by the host); allow_debug = false"
        )
    min_svn = fp.min_security_version if fp.min_security_version is not None else policy.min_security_version
    if claims.security_version < min_svn:
        problems.append(f"security version {claims.security_version} below the minimum {min_svn}")
    if fp.product_id is not None and claims.product_id != fp.product_id:
        problems.append(f"product id {claims.product_id} is not the policy's {fp.product_id}")
    pinned = _check_registers(fp, claims, problems)
    auditors = {PublicIdentity.from_line(k).fingerprint for k in policy.auditor_keys}
    endorsed = any(m == claims.measurement and a.fingerprint in auditors for m, a in endorsements)
    if claims.measurement not in policy.measurements and not endorsed and not pinned:
        why = (
            "no measurements or auditor keys in the policy"
            if not (policy.measurements or policy.auditor_keys or fp.measurements)
            else "not in the policy's measurements, not pinned in its format table and not endorsed by an "
            "accepted auditor"
        )
        problems.append(f"measurement {claims.measurement} not accepted ({why})")
    _check_tcb(policy, fp, claims, problems)
    _check_min_tcb(fp, claims, problems)
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


# Appended (commented out) to `confide policy init`'s production policy: one table per real format.
POLICY_FORMAT_EXAMPLES = """
# Per-format tables (uncomment and fill in). Each key overrides the top-level one for that format;
# every listed register must match, and pinning an identity register accepts the enclave's code.
#
# [sgx]                      # Gramine-SGX: MRENCLAVE is printed by gramine-sgx-sign
# measurements = { mrenclave = "<64 hex>", mrsigner = "<64 hex>" }
# product_id = 1
# accepted_tcb_status = ["UpToDate", "SWHardeningNeeded"]
# tolerated_advisories = ["INTEL-SA-00615"]
#
# [tdx]
# measurements = { mrtd = "<96 hex>", rtmr0 = "<96 hex>", rtmr1 = "<96 hex>", rtmr2 = "<96 hex>" }
#
# [sev-snp]                  # expected MEASUREMENT: sev-snp-measure for your OVMF, kernel, initrd, cmdline
# measurements = { measurement = "<96 hex>" }
# min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }
#
# [nitro]                    # PCR0/1/2 are printed by nitro-cli build-enclave
# measurements = { pcr0 = "<96 hex>", pcr1 = "<96 hex>", pcr2 = "<96 hex>" }
"""
