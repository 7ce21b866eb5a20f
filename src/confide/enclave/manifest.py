"""Multi-party task objects (docs/PROTOCOL.md sections 3-5): one piece of code for platform and
enclave (and the client, which builds with these objects), so every side computes the same digests
and checks the same signatures.

Everything parsed here may come from a hostile party or host: unknown fields are rejected, types
checked, sizes capped, names must be identifiers, and fingerprints are recomputed from the
participants' public lines (a fingerprint written in a manifest is only a reference to one of them).

What only a party's machine does lives outside the TCB, in ``confide.client``, built on these
objects: ``manifest_build`` (``build_manifest``, ``sign_approval``, ``new_task_id``), ``receipts``
(``verify_task_receipt``), ``dataset_keys`` (``wrap_dataset_key``, ``new_dataset_id``),
``function_seal`` (``seal_function_source``) and ``approval`` (what a party approves, for people).

Public API (the objects live in task_fields, function_desc, dataset_keys and here; import them
all from this module)
----------
Functions (section 4)
    ``FunctionDescriptor``                         the descriptor; ``.to_json()``, ``.digest``
    ``function_descriptor(name=, source=, ...)``   build a descriptor for a party's Python function
    ``function_digest(descriptor)``                H(canonical_json(descriptor)); accepts a dict too
    ``parse_function_descriptor(obj)``             strict parse of a descriptor object
    ``builtin_descriptor(name)``, ``builtin_source(name)``, ``BUILTINS``   the built-ins of this build
    ``check_function_source(descriptor, source)``  the source hashes to ``source_sha256``
    ``open_function_source(sealed, descriptor=, service=)`` -> str     (enclave side; checks the hash)
Datasets (section 3)
    ``DatasetKeyEnvelope`` (``.binding()``: what the wrapped key is bound to); ``parse_dataset_key(obj)``;
    ``open_dataset_key(envelope, service, expect=)`` -> data key (enclave)
Tasks (section 5)
    ``TaskInput``, ``TaskOutput``, ``Participant``, ``Manifest`` (``.digest``, ``.text``, ``.to_json()``,
    ``.participant(fp)``, ``.name_of(fp)``, ``.input(name)``, ``.output(name)``, ``.required_approvals()``,
    ``.error_recipients()``); ``parse_manifest(text)``
Approvals
    ``Approval`` (``.signed_part()``: the message a party signs); ``parse_approval(obj)``;
    ``verify_approval(approval, manifest)`` -> Approval (signature by a participant, over this manifest)
Receipts
    ``make_task_receipt(service, ...)`` -> bytes (enclave); ``RECEIPT_FIELDS`` (its body's fields);
    ``parse_audit_head(obj, where)``
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .dataset_keys import (
    DatasetKeyEnvelope,
    check_dataset_key,
    open_dataset_key,
    parse_dataset_key,
)
from .encoding import b64d, b64e, canonical_json, check_fields, get_typed
from .errors import FormatError, IntegrityError
from .function_desc import (
    BUILTIN_VERSION,
    BUILTINS,
    FunctionDescriptor,
    _output_name,
    builtin_descriptor,
    builtin_source,
    check_function_source,
    check_task_outputs,
    function_descriptor,
    function_digest,
    open_function_source,
    parse_function_descriptor,
)
from .keys import Identity, PublicIdentity
from .padding import check_pad
from .task_fields import (
    APPROVAL_FORMAT,
    BUILTINS_DIR,
    DATASET_KEY_FORMAT,
    DATASET_KEY_PURPOSE,
    DEFAULT_MAX_OUTPUT_BYTES,
    DEFAULT_MAX_RUNS,
    ERROR_OUTPUT,
    FUNCTION_FORMAT,
    FUNCTION_KINDS,
    FUNCTION_SOURCE_PURPOSE,
    HEX32_RE,
    HEX64_RE,
    MAX_APPROVAL_BYTES,
    MAX_DESCRIPTION_LEN,
    MAX_ENVELOPE_BYTES,
    MAX_ERROR_MESSAGE_LEN,
    MAX_IDENTITY_LINE_LEN,
    MAX_INPUTS,
    MAX_MANIFEST_BYTES,
    MAX_NAME_LEN,
    MAX_OUTPUT_BYTES,
    MAX_OUTPUTS,
    MAX_PARAMS_BYTES,
    MAX_PARAMS_DEPTH,
    MAX_PARTICIPANTS,
    MAX_RECEIPT_BYTES,
    MAX_RECIPIENTS,
    MAX_REQUIREMENTS,
    MAX_RUNS,
    MAX_SOURCE_BYTES,
    MAX_VERSION_LEN,
    PROVIDED_REQUIREMENTS,
    RECEIPT_CHECKS,
    RECEIPT_FORMAT,
    TASK_FORMAT,
    as_object,
    check_unique,
    fingerprint_field,
    fingerprint_value,
    hex_field,
    identifier,
    int_field,
    list_field,
    load_object,
    params_value,
    party_name,
    sha256_hex,
    text_field,
)

# ---- manifests (section 5) -------------------------------------------------------------------------

DEFAULT_ERROR_MAX_BYTES = 4 << 10  # `_error` cap when the manifest names none
MAX_ERROR_OUTPUT_BYTES = 1 << 20
MIN_ERROR_MAX_BYTES = 64  # room for the padding trailer and a line of text


@dataclass(frozen=True)
class TaskInput:
    name: str
    dataset_id: str
    owner: str  # fingerprint
    ciphertext_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dataset_id": self.dataset_id,
            "owner": self.owner,
            "ciphertext_sha256": self.ciphertext_sha256,
        }


@dataclass(frozen=True)
class TaskOutput:
    name: str
    recipients: tuple[str, ...]  # fingerprints
    max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    pad: str | int | None = None  # "pow2" or a bucket size: the host sees only the bucket (padding.py)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "recipients": list(self.recipients),
            "max_bytes": self.max_bytes,
        }
        if self.pad is not None:
            out["pad"] = self.pad
        return out


@dataclass(frozen=True)
class Participant:
    name: str
    line: str  # the public line exactly as written in the manifest
    identity: PublicIdentity

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "identity": self.line}


@dataclass(frozen=True)
class Manifest:
    task_id: str
    service: str
    creator: str
    created_at: int
    function: FunctionDescriptor
    function_digest: str
    confidential: bool
    params: dict[str, Any]
    inputs: tuple[TaskInput, ...]
    outputs: tuple[TaskOutput, ...]
    participants: tuple[Participant, ...]
    error_max_bytes: int | None = None  # the approved cap of `_error`; None: DEFAULT_ERROR_MAX_BYTES

    @property
    def error_cap(self) -> int:
        """How many bytes of a failed function's error text may leave (sealed to error_recipients)."""
        return DEFAULT_ERROR_MAX_BYTES if self.error_max_bytes is None else self.error_max_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "format": TASK_FORMAT,
            "task_id": self.task_id,
            "service": self.service,
            "creator": self.creator,
            "created_at": self.created_at,
            "function": {
                "descriptor": self.function.to_json(),
                "digest": self.function_digest,
                "confidential": self.confidential,
            },
            "params": self.params,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "participants": [p.to_json() for p in self.participants],
            **({} if self.error_max_bytes is None else {"error_max_bytes": self.error_max_bytes}),
        }

    @property
    def text(self) -> str:
        """The canonical text: what the creator uploads and the platform stores verbatim."""
        return canonical_json(self.to_json()).decode("utf-8")

    @property
    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_json()))

    def participant(self, fingerprint: str) -> Participant:
        for p in self.participants:
            if p.fingerprint == fingerprint:
                return p
        raise IntegrityError(f"{fingerprint} is not a participant of task {self.task_id}", where="manifest")

    def name_of(self, fingerprint: str) -> str:
        """'name (fp)' for messages."""
        for p in self.participants:
            if p.fingerprint == fingerprint:
                return f"{p.name} ({fingerprint})"
        return fingerprint

    def input(self, name: str) -> TaskInput:
        for i in self.inputs:
            if i.name == name:
                return i
        raise FormatError(f"no input named {name!r}", where=f"manifest of task {self.task_id}")

    def output(self, name: str) -> TaskOutput:
        for o in self.outputs:
            if o.name == name:
                return o
        raise FormatError(f"no output named {name!r}", where=f"manifest of task {self.task_id}")

    def required_approvals(self) -> tuple[str, ...]:
        """Whose approvals the enclave requires: the creator, each input's owner, and the function's
        owner."""
        fps: list[str] = []
        owners = [i.owner for i in self.inputs] + ([self.function.owner] if self.function.owner else [])
        for fp in [self.creator, *owners]:
            if fp not in fps:
                fps.append(fp)
        return tuple(fps)

    def error_recipients(self) -> tuple[str, ...]:
        """Who receives a failed function's error text: the creator and every output recipient."""
        fps = [self.creator]
        for o in self.outputs:
            fps += [r for r in o.recipients if r not in fps]
        return tuple(fps)


def _participants(value: Any, where: str) -> tuple[Participant, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PARTICIPANTS:
        raise FormatError(f"participants must be a list of 1..{MAX_PARTICIPANTS} entries", where=where)
    out: list[Participant] = []
    for i, entry in enumerate(value):
        pw = f"{where}: participants[{i}]"
        e = as_object(entry, pw)
        check_fields(e, required=("name", "identity"), where=pw)
        name = party_name(e["name"], pw)
        line = text_field(e, "identity", pw, max_len=MAX_IDENTITY_LINE_LEN)
        out.append(Participant(name, line, PublicIdentity.from_line(line, where=f"{pw} ({name})")))
    check_unique([p.name for p in out], "participant name", where)
    check_unique([p.fingerprint for p in out], "participant fingerprint", where)
    return tuple(out)


def parse_manifest(data: str | bytes | Mapping[str, Any], *, where: str = "manifest") -> Manifest:
    """Strictly parse a task manifest and check every rule of PROTOCOL.md section 5 that needs no
    context (the service check needs the enclave's own key: compare ``manifest.service``)."""
    w = where
    obj = load_object(data, MAX_MANIFEST_BYTES, w)
    check_fields(
        obj,
        required=(
            "format",
            "task_id",
            "service",
            "creator",
            "created_at",
            "function",
            "params",
            "inputs",
            "outputs",
            "participants",
        ),
        optional=("error_max_bytes",),
        where=w,
    )
    if obj["format"] != TASK_FORMAT:
        raise FormatError(f"unknown manifest format {str(obj['format'])[:80]!r}", where=w)
    task_id = hex_field(obj, "task_id", HEX32_RE, w)
    w = f"{where} of task {task_id}" if where == "manifest" else f"{where}: manifest"
    service = fingerprint_field(obj, "service", w)
    creator = fingerprint_field(obj, "creator", w)
    created_at = int_field(obj, "created_at", w, low=0, high=1 << 40)

    fw = f"{w}: function"
    fn = as_object(obj["function"], fw)
    check_fields(fn, required=("descriptor", "digest", "confidential"), where=fw)
    descriptor = parse_function_descriptor(as_object(fn["descriptor"], f"{fw}.descriptor"))
    digest = hex_field(fn, "digest", HEX64_RE, fw)
    if digest != descriptor.digest:
        raise IntegrityError(
            f"function digest {digest} does not match its descriptor (which hashes to {descriptor.digest})",
            where=fw,
        )
    confidential = get_typed(fn, "confidential", bool, where=fw)
    if confidential and (descriptor.kind != "python" or not descriptor.owner):
        raise FormatError("only a party's Python function with an owner can be confidential", where=fw)

    params = params_value(obj["params"], f"{w}: params")

    inputs: list[TaskInput] = []
    for i, entry in enumerate(list_field(obj, "inputs", w, low=0, high=MAX_INPUTS)):
        iw = f"{w}: inputs[{i}]"
        e = as_object(entry, iw)
        check_fields(e, required=("name", "dataset_id", "owner", "ciphertext_sha256"), where=iw)
        name = identifier(e["name"], "input name", iw)
        iw = f"{w}: input {name!r}"
        inputs.append(
            TaskInput(
                name,
                hex_field(e, "dataset_id", HEX32_RE, iw),
                fingerprint_field(e, "owner", iw),
                hex_field(e, "ciphertext_sha256", HEX64_RE, iw),
            )
        )
    check_unique([i.name for i in inputs], "input name", w)
    check_unique([i.dataset_id for i in inputs], "dataset", w)

    outputs: list[TaskOutput] = []
    for i, entry in enumerate(list_field(obj, "outputs", w, low=1, high=MAX_OUTPUTS)):
        ow = f"{w}: outputs[{i}]"
        e = as_object(entry, ow)
        check_fields(e, required=("name", "recipients", "max_bytes"), optional=("pad",), where=ow)
        name = _output_name(e["name"], ow)
        ow = f"{w}: output {name!r}"
        recipients = list_field(e, "recipients", ow, low=1, high=MAX_RECIPIENTS)
        for r in recipients:
            fingerprint_value(r, f"{ow}: recipients")
        check_unique(recipients, "recipient", ow)
        outputs.append(
            TaskOutput(
                name,
                tuple(recipients),
                int_field(e, "max_bytes", ow, low=1, high=MAX_OUTPUT_BYTES),
                check_pad(e["pad"], f"{ow}: pad") if "pad" in e else None,
            )
        )
    check_unique([o.name for o in outputs], "output name", w)
    error_max_bytes = (
        int_field(obj, "error_max_bytes", w, low=MIN_ERROR_MAX_BYTES, high=MAX_ERROR_OUTPUT_BYTES)
        if "error_max_bytes" in obj
        else None
    )

    participants = _participants(obj["participants"], w)
    known = {p.fingerprint for p in participants}

    def named(fp: str, role: str) -> None:
        if fp not in known:
            raise IntegrityError(f"{role} {fp} is not among the participants (no public key for it)", where=w)

    named(creator, "creator")
    if descriptor.owner:
        named(descriptor.owner, f"function owner of {descriptor.name!r}")
    for inp in inputs:
        named(inp.owner, f"owner of input {inp.name!r}")
    for out in outputs:
        for r in out.recipients:
            named(r, f"recipient of output {out.name!r}")

    if not descriptor.any_inputs and sorted(i.name for i in inputs) != sorted(descriptor.inputs):
        raise FormatError(
            f"inputs {sorted(i.name for i in inputs)} differ from the inputs function "
            f"{descriptor.name!r} takes {sorted(descriptor.inputs)}",
            where=w,
        )
    check_task_outputs(
        descriptor, {i.name: i.owner for i in inputs}, {o.name: o.recipients for o in outputs}, w
    )
    return Manifest(
        task_id=task_id,
        service=service,
        creator=creator,
        created_at=created_at,
        function=descriptor,
        function_digest=digest,
        confidential=confidential,
        params=params,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        participants=participants,
        error_max_bytes=error_max_bytes,
    )


# ---- approvals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approval:
    task_id: str
    manifest_sha256: str
    party: str
    signature: bytes
    max_runs: int = DEFAULT_MAX_RUNS  # how many runs (per worker) this approval allows

    def signed_part(self) -> dict[str, Any]:
        return {
            "format": APPROVAL_FORMAT,
            "task_id": self.task_id,
            "manifest_sha256": self.manifest_sha256,
            "party": self.party,
            "max_runs": self.max_runs,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.signed_part(), "signature": b64e(self.signature)}


def parse_approval(data: str | bytes | Mapping[str, Any], *, where: str = "approval") -> Approval:
    obj = load_object(data, MAX_APPROVAL_BYTES, where)
    check_fields(
        obj, required=("format", "task_id", "manifest_sha256", "party", "max_runs", "signature"), where=where
    )
    if obj["format"] != APPROVAL_FORMAT:
        raise FormatError(f"unknown approval format {str(obj['format'])[:80]!r}", where=where)
    return Approval(
        task_id=hex_field(obj, "task_id", HEX32_RE, where),
        manifest_sha256=hex_field(obj, "manifest_sha256", HEX64_RE, where),
        party=fingerprint_field(obj, "party", where),
        signature=b64d(obj["signature"], field="signature", where=where, length=64),
        max_runs=int_field(obj, "max_runs", where, low=1, high=MAX_RUNS),
    )


def verify_approval(approval: Approval | str | bytes | Mapping[str, Any], manifest: Manifest) -> Approval:
    """The approval is by a participant, over this manifest's digest and task id, and its signature
    verifies under that participant's key (recomputed from the manifest's line)."""
    a = approval if isinstance(approval, Approval) else parse_approval(approval)
    who = manifest.name_of(a.party)
    w = f"approval by {who}"
    if a.task_id != manifest.task_id:
        raise IntegrityError(
            f"approval is for task {a.task_id}, not task {manifest.task_id} (replayed from another task)",
            where=w,
        )
    if a.manifest_sha256 != manifest.digest:
        raise IntegrityError(
            f"approval is over manifest {a.manifest_sha256}, not this manifest {manifest.digest} "
            "(the manifest changed after approval)",
            where=w,
        )
    party = manifest.participant(a.party)
    party.identity.verify(a.signature, canonical_json(a.signed_part()), what=w)
    return a


# ---- receipts -------------------------------------------------------------------------------------


def make_task_receipt(
    service: Identity,
    *,
    task_id: str,
    manifest_sha256: str,
    function_digest: str,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[Mapping[str, Any]],
    measurement: str,
    backend: str,
    simulated: bool,
    evidence_sha256: str,
    started_at: int,
    ended_at: int,
    run: int = 0,
    max_runs: int = 0,
    error: Mapping[str, str] | None = None,
    audit_head: Mapping[str, Any] | None = None,
    flow: Sequence[Mapping[str, Any]] | None = None,
) -> bytes:
    """Enclave side: the receipt body of section 5, signed with the service key. `audit_head` is the
    platform's audit head ({seq, sha256}) as the host passed it with the call: signing it makes a
    later chain without that event provable (PROTOCOL.md section 7)."""
    if error is not None and error.get("check") not in RECEIPT_CHECKS:
        raise ValueError(f"error check must be one of {RECEIPT_CHECKS}")
    body = {
        "format": RECEIPT_FORMAT,
        "task_id": task_id,
        "manifest_sha256": manifest_sha256,
        "function_digest": function_digest,
        "inputs": [
            {"name": i["name"], "dataset_id": i["dataset_id"], "ciphertext_sha256": i["ciphertext_sha256"]}
            for i in inputs
        ],
        "outputs": [{"name": o["name"], "sha256": o["sha256"], "size": o["size"]} for o in outputs],
        "service": service.public.to_line(),
        "measurement": measurement,
        "backend": backend,
        "simulated": simulated,
        "evidence_sha256": evidence_sha256,
        "started_at": started_at,
        "ended_at": ended_at,
        "run": run,
        "max_runs": max_runs,
        "status": "ok" if error is None else "error",
        "error": None
        if error is None
        else {"check": error["check"], "message": str(error["message"])[:MAX_ERROR_MESSAGE_LEN]},
        "audit_head": None
        if audit_head is None
        else {"seq": int(audit_head["seq"]), "sha256": str(audit_head["sha256"])},
    }
    if flow is not None:  # a dataflow task: the per-stage counts its completeness verification accepted
        body["flow"] = [
            {k: int(st[k]) for k in ("stage", "tasks", "records_out", "batches_out")} for st in flow
        ]
    return canonical_json({"body": body, "signature": b64e(service.sign(canonical_json(body)))})


# The fields of the body make_task_receipt signs: what confide.client.receipts.verify_task_receipt
# requires, no more and no less.
RECEIPT_FIELDS = (
    "format",
    "task_id",
    "manifest_sha256",
    "function_digest",
    "inputs",
    "outputs",
    "service",
    "measurement",
    "backend",
    "simulated",
    "evidence_sha256",
    "started_at",
    "ended_at",
    "run",
    "max_runs",
    "status",
    "error",
    "audit_head",
)
RECEIPT_OPTIONAL_FIELDS = ("flow",)  # present on dataflow tasks only


def parse_audit_head(value: Any, where: str) -> dict[str, Any]:
    """``{"seq": n >= 0, "sha256": 64 hex}``: an audit head as passed to or signed by the enclave."""
    obj = as_object(value, where)
    check_fields(obj, required=("seq", "sha256"), where=where)
    return {
        "seq": int_field(obj, "seq", where, low=0, high=(1 << 63) - 1),
        "sha256": hex_field(obj, "sha256", HEX64_RE, where),
    }


__all__ = [
    "APPROVAL_FORMAT",
    "BUILTINS",
    "BUILTINS_DIR",
    "BUILTIN_VERSION",
    "DATASET_KEY_FORMAT",
    "DATASET_KEY_PURPOSE",
    "DEFAULT_ERROR_MAX_BYTES",
    "DEFAULT_MAX_OUTPUT_BYTES",
    "ERROR_OUTPUT",
    "FUNCTION_FORMAT",
    "FUNCTION_KINDS",
    "FUNCTION_SOURCE_PURPOSE",
    "MAX_APPROVAL_BYTES",
    "MAX_DESCRIPTION_LEN",
    "MAX_ENVELOPE_BYTES",
    "MAX_ERROR_MESSAGE_LEN",
    "MAX_ERROR_OUTPUT_BYTES",
    "MAX_IDENTITY_LINE_LEN",
    "MAX_INPUTS",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME_LEN",
    "MAX_OUTPUTS",
    "MAX_OUTPUT_BYTES",
    "MAX_PARAMS_BYTES",
    "MAX_PARAMS_DEPTH",
    "MAX_PARTICIPANTS",
    "MAX_RECEIPT_BYTES",
    "MAX_RECIPIENTS",
    "MAX_REQUIREMENTS",
    "MAX_SOURCE_BYTES",
    "MAX_VERSION_LEN",
    "PROVIDED_REQUIREMENTS",
    "RECEIPT_CHECKS",
    "RECEIPT_FIELDS",
    "RECEIPT_FORMAT",
    "RECEIPT_OPTIONAL_FIELDS",
    "TASK_FORMAT",
    "Approval",
    "DatasetKeyEnvelope",
    "FunctionDescriptor",
    "Manifest",
    "Participant",
    "TaskInput",
    "TaskOutput",
    "builtin_descriptor",
    "builtin_source",
    "check_dataset_key",
    "check_function_source",
    "function_descriptor",
    "function_digest",
    "make_task_receipt",
    "open_dataset_key",
    "open_function_source",
    "parse_approval",
    "parse_audit_head",
    "parse_dataset_key",
    "parse_function_descriptor",
    "parse_manifest",
    "verify_approval",
]
