"""Multi-party task objects (docs/PROTOCOL.md sections 3-5): one piece of code for client, platform
and enclave, so every side computes the same digests and checks the same signatures.

Everything parsed here may come from a hostile party or host: unknown fields are rejected, types
checked, sizes capped, names must be identifiers, and fingerprints are recomputed from the
participants' public lines (a fingerprint written in a manifest is only a reference to one of them).

Public API
----------
Functions (section 4)
    ``FunctionDescriptor``                         the descriptor; ``.to_json()``, ``.digest``
    ``function_descriptor(name=, source=, ...)``   build a descriptor for a party's Python function
    ``function_digest(descriptor)``                H(canonical_json(descriptor)); accepts a dict too
    ``parse_function_descriptor(obj)``             strict parse of a descriptor object
    ``builtin_descriptor(name)``, ``builtin_source(name)``, ``BUILTINS``   the built-ins of this build
    ``check_function_source(descriptor, source)``  the source hashes to ``source_sha256``
    ``seal_function_source(source, descriptor=, service=)`` -> bytes   (confidential functions)
    ``open_function_source(sealed, descriptor=, service=)`` -> str     (enclave side; checks the hash)
Datasets (section 3)
    ``DatasetKeyEnvelope``; ``wrap_dataset_key(data_key, dataset_id=, owner=, service=, ciphertext_sha256=)``
    -> envelope dict (client); ``parse_dataset_key(obj)``; ``open_dataset_key(envelope, service,
    expect=)`` -> data key (enclave); ``new_dataset_id()``
Tasks (section 5)
    ``TaskInput``, ``TaskOutput``, ``Participant``, ``Manifest`` (``.digest``, ``.text``, ``.to_json()``,
    ``.participant(fp)``, ``.name_of(fp)``, ``.input(name)``, ``.output(name)``, ``.required_approvals()``,
    ``.error_recipients()``); ``build_manifest(...)``; ``parse_manifest(text)``;
    ``describe_manifest(manifest)`` -> what a party approves, for people; ``new_task_id()``
Approvals
    ``Approval``; ``sign_approval(identity, manifest)`` -> approval dict; ``parse_approval(obj)``;
    ``verify_approval(approval, manifest)`` -> Approval (signature by a participant, over this manifest)
Receipts
    ``make_task_receipt(service, ...)`` -> bytes (enclave); ``verify_task_receipt(data, service_public)``
    -> the receipt body (after checking the service's signature)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hpke_box
from .encoding import b64d, b64e, canonical_json, check_fields, get_typed, json_depth, parse_json_object
from .errors import FormatError, IntegrityError
from .keys import Identity, PublicIdentity

FUNCTION_FORMAT = "confide-function-v1"
DATASET_KEY_FORMAT = "confide-dataset-key-v1"
TASK_FORMAT = "confide-task-v1"
APPROVAL_FORMAT = "confide-approval-v1"
RECEIPT_FORMAT = "confide-task-receipt-v1"
DATASET_KEY_PURPOSE = "dataset-key"
FUNCTION_SOURCE_PURPOSE = "function-source"

FUNCTION_KINDS = ("builtin", "python")
PROVIDED_REQUIREMENTS = ("numpy", "pandas", "scikit-learn", "xgboost")  # what the sandbox offers
RECEIPT_CHECKS = ("approval", "manifest", "function", "input", "output", "run")
ERROR_OUTPUT = "_error"  # the extra output carrying a failed function's (sealed) error text

MAX_NAME_LEN = 64
MAX_VERSION_LEN = 32
MAX_DESCRIPTION_LEN = 4096
MAX_IDENTITY_LINE_LEN = 512
MAX_INPUTS = 64
MAX_OUTPUTS = 32
MAX_PARTICIPANTS = 64
MAX_RECIPIENTS = 64
MAX_REQUIREMENTS = 16
MAX_PARAMS_BYTES = 64 << 10
MAX_PARAMS_DEPTH = 16
MAX_MANIFEST_BYTES = 256 << 10
MAX_APPROVAL_BYTES = 4 << 10
MAX_ENVELOPE_BYTES = 4 << 10
MAX_SOURCE_BYTES = 1 << 20
MAX_RECEIPT_BYTES = 256 << 10
MAX_OUTPUT_BYTES = 1 << 40
MAX_ERROR_MESSAGE_LEN = 2048
DEFAULT_MAX_OUTPUT_BYTES = 64 << 20

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
_FINGERPRINT = re.compile(r"[0-9a-f]{4}(?:-[0-9a-f]{4}){4}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

BUILTINS_DIR = Path(__file__).resolve().parent / "builtins"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- field checks (hostile input) -----------------------------------------------------------------


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"must be a JSON object, got {type(value).__name__}", where=where)
    return value


def _load(data: str | bytes | Mapping[str, Any], cap: int, where: str) -> dict[str, Any]:
    """A JSON object from text (size-capped, strictly parsed) or an already parsed mapping."""
    if isinstance(data, Mapping):
        obj = dict(data)
    else:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        if not isinstance(data, bytes):
            raise FormatError(f"must be JSON text, got {type(data).__name__}", where=where)
        if len(data) > cap:
            raise FormatError(f"{len(data)} bytes exceeds the {cap}-byte limit", where=where)
        obj = parse_json_object(data, where=where)
    try:
        size = len(canonical_json(obj))  # what gets hashed and signed must encode (no lone surrogates)
        json.dumps(obj, allow_nan=False)  # and be standard JSON: 1e400 parses as infinity
    except (UnicodeEncodeError, RecursionError, ValueError, TypeError):
        raise FormatError(
            "holds text that is not valid Unicode, a number out of range, or nesting too deep", where=where
        ) from None
    if size > cap:
        raise FormatError(f"{size} bytes exceeds the {cap}-byte limit", where=where)
    return obj


def _str(obj: Mapping[str, Any], key: str, where: str, *, max_len: int) -> str:
    value = get_typed(obj, key, str, where=where)
    if len(value) > max_len:
        raise FormatError(f"field {key!r} longer than {max_len} characters", where=where)
    return value


def _match(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], what: str, where: str) -> str:
    value = get_typed(obj, key, str, where=where)
    if not pattern.fullmatch(value):
        raise FormatError(f"field {key!r} must be {what}, got {value[:80]!r}", where=where)
    return value


def _ident(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise FormatError(
            f"{what} {shown!r} must be an identifier (letters, digits, _; at most {MAX_NAME_LEN})",
            where=where,
        )
    return value


def _fingerprint(obj: Mapping[str, Any], key: str, where: str) -> str:
    return _match(obj, key, _FINGERPRINT, "a key fingerprint (xxxx-xxxx-xxxx-xxxx-xxxx)", where)


def _fp_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise FormatError("must be a key fingerprint (xxxx-xxxx-xxxx-xxxx-xxxx)", where=where)
    return value


def _hex(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], where: str) -> str:
    digits = 64 if pattern is _HEX64 else 32
    return _match(obj, key, pattern, f"{digits} lowercase hex digits", where)


def _int(obj: Mapping[str, Any], key: str, where: str, *, low: int, high: int) -> int:
    value = get_typed(obj, key, int, where=where)
    if not low <= value <= high:
        raise FormatError(f"field {key!r} must be within {low}..{high}, got {value}", where=where)
    return value


def _list(obj: Mapping[str, Any], key: str, where: str, *, low: int, high: int) -> list[Any]:
    value = get_typed(obj, key, list, where=where)
    if not low <= len(value) <= high:
        raise FormatError(f"field {key!r} must hold {low}..{high} entries, got {len(value)}", where=where)
    return value


def _unique(values: Sequence[str], what: str, where: str) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise FormatError(f"{what} {v!r} appears twice", where=where)
        seen.add(v)


def _params(value: Any, where: str) -> dict[str, Any]:
    params = _obj(value, where)
    if json_depth(params, MAX_PARAMS_DEPTH + 1) > MAX_PARAMS_DEPTH:
        raise FormatError(f"nested deeper than {MAX_PARAMS_DEPTH} levels", where=where)
    size = len(canonical_json(params))
    if size > MAX_PARAMS_BYTES:
        raise FormatError(f"{size} bytes exceeds the {MAX_PARAMS_BYTES}-byte limit", where=where)
    return params


# ---- functions (section 4) -------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionDescriptor:
    kind: str  # "builtin" | "python"
    name: str
    version: str
    owner: str  # fingerprint of the function's owner, "" for a built-in
    source_sha256: str
    requirements: tuple[str, ...]
    description: str
    inputs: tuple[str, ...]  # ("*",): any inputs; else exactly these names
    outputs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FUNCTION_FORMAT,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "owner": self.owner,
            "source_sha256": self.source_sha256,
            "requirements": list(self.requirements),
            "description": self.description,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }

    @property
    def digest(self) -> str:
        return _sha256(canonical_json(self.to_json()))

    @property
    def any_inputs(self) -> bool:
        return self.inputs == ("*",)


def parse_function_descriptor(data: str | bytes | Mapping[str, Any]) -> FunctionDescriptor:
    w = "function descriptor"
    obj = _load(data, MAX_MANIFEST_BYTES, w)
    check_fields(
        obj,
        required=(
            "format",
            "kind",
            "name",
            "version",
            "owner",
            "source_sha256",
            "requirements",
            "description",
            "inputs",
            "outputs",
        ),
        where=w,
    )
    if obj["format"] != FUNCTION_FORMAT:
        raise FormatError(f"unknown descriptor format {str(obj['format'])[:80]!r}", where=w)
    kind = get_typed(obj, "kind", str, where=w)
    if kind not in FUNCTION_KINDS:
        raise FormatError(f"kind must be one of {', '.join(FUNCTION_KINDS)}, got {kind[:40]!r}", where=w)
    name = _match(obj, "name", _FUNCTION_NAME, "a function name (letters, digits, . _ -; at most 64)", w)
    w = f"function descriptor {name!r}"
    version = _match(obj, "version", _VERSION, "a version (letters, digits, . _ + -; at most 32)", w)
    owner = get_typed(obj, "owner", str, where=w)
    if kind == "builtin" and owner:
        raise FormatError('a built-in has no owner (owner must be "")', where=w)
    if owner:
        owner = _fingerprint(obj, "owner", w)
    requirements = _list(obj, "requirements", w, low=0, high=MAX_REQUIREMENTS)
    for req in requirements:
        if req not in PROVIDED_REQUIREMENTS:
            raise FormatError(
                f"requirement {str(req)[:40]!r} is not provided by the enclave "
                f"(available: {', '.join(PROVIDED_REQUIREMENTS)})",
                where=w,
            )
    _unique(requirements, "requirement", w)
    inputs = _list(obj, "inputs", w, low=0, high=MAX_INPUTS)
    if inputs != ["*"]:
        for n in inputs:
            _ident(n, "input name", f"{w}: inputs")
        _unique(inputs, "input name", w)
    outputs = _list(obj, "outputs", w, low=1, high=MAX_OUTPUTS)
    for n in outputs:
        _output_name(n, f"{w}: outputs")
    _unique(outputs, "output name", w)
    return FunctionDescriptor(
        kind=kind,
        name=name,
        version=version,
        owner=owner,
        source_sha256=_hex(obj, "source_sha256", _HEX64, w),
        requirements=tuple(requirements),
        description=_str(obj, "description", w, max_len=MAX_DESCRIPTION_LEN),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
    )


def _output_name(value: Any, where: str) -> str:
    name = _ident(value, "output name", where)
    if name.startswith("_"):
        raise FormatError(
            f"output name {name!r} is reserved (names starting with _ are the enclave's)", where=where
        )
    return name


def function_digest(descriptor: FunctionDescriptor | Mapping[str, Any]) -> str:
    """H(canonical_json(descriptor)); a mapping is strictly parsed first."""
    if not isinstance(descriptor, FunctionDescriptor):
        descriptor = parse_function_descriptor(descriptor)
    return descriptor.digest


def function_descriptor(
    *,
    name: str,
    source: str,
    owner: PublicIdentity | str,
    description: str,
    version: str = "1",
    requirements: Sequence[str] = (),
    inputs: Sequence[str] = ("*",),
    outputs: Sequence[str],
) -> FunctionDescriptor:
    """The descriptor of a party's Python function (``kind: python``), checked as the enclave will."""
    owner_fp = owner.fingerprint if isinstance(owner, PublicIdentity) else owner
    obj = FunctionDescriptor(
        kind="python",
        name=name,
        version=version,
        owner=owner_fp,
        source_sha256=_sha256(source.encode("utf-8")),
        requirements=tuple(sorted(requirements)),
        description=description,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
    ).to_json()
    return parse_function_descriptor(obj)


@dataclass(frozen=True)
class _Builtin:
    file: str
    requirements: tuple[str, ...]
    description: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


BUILTINS: dict[str, _Builtin] = {
    "gbdt-train": _Builtin(
        "gbdt_train.py",
        ("numpy", "pandas", "xgboost"),
        "Trains an XGBoost gradient-boosted tree model (classifier or regressor) on the union of all "
        "inputs: CSV files with the same header. Params: label (required), objective "
        "(binary:logistic), rounds, max_depth, eta, seed. Outputs: model (XGBoost JSON model) and "
        "report (JSON: rows per input, features, label balance). Deterministic for a given seed.",
        ("*",),
        ("model", "report"),
    ),
    "gbdt-predict": _Builtin(
        "gbdt_predict.py",
        ("numpy", "pandas", "xgboost"),
        "Scores a CSV (input data; a label column, if named in params.label, is dropped) with an "
        "XGBoost JSON model (input model). Output: predictions, a CSV with one score column.",
        ("model", "data"),
        ("predictions",),
    ),
}
BUILTIN_VERSION = "1"


def builtin_source(name: str) -> str:
    spec = BUILTINS.get(name)
    if spec is None:
        raise FormatError(
            f"unknown built-in function {name[:64]!r} (this build has: {', '.join(BUILTINS)})",
            where="built-in functions",
        )
    return (BUILTINS_DIR / spec.file).read_text(encoding="utf-8")


def builtin_descriptor(name: str) -> FunctionDescriptor:
    """The descriptor of a built-in of this build; its source is read from the enclave package."""
    spec = BUILTINS.get(name)
    source = builtin_source(name)
    assert spec is not None
    return FunctionDescriptor(
        kind="builtin",
        name=name,
        version=BUILTIN_VERSION,
        owner="",
        source_sha256=_sha256(source.encode("utf-8")),
        requirements=spec.requirements,
        description=spec.description,
        inputs=spec.inputs,
        outputs=spec.outputs,
    )


def check_function_source(descriptor: FunctionDescriptor, source: str) -> None:
    if len(source) > MAX_SOURCE_BYTES:
        raise FormatError(
            f"source longer than {MAX_SOURCE_BYTES} bytes", where=f"function {descriptor.name!r}"
        )
    got = _sha256(source.encode("utf-8", "surrogatepass"))
    if got != descriptor.source_sha256:
        raise IntegrityError(
            f"source has SHA-256 {got}, but the approved descriptor says {descriptor.source_sha256}",
            where=f"function {descriptor.name!r}",
        )


def _source_binding(descriptor: FunctionDescriptor, service_fp: str) -> dict[str, str]:
    return {"function": descriptor.digest, "owner": descriptor.owner, "service": service_fp}


def seal_function_source(source: str, *, descriptor: FunctionDescriptor, service: PublicIdentity) -> bytes:
    """Owner side: the source sealed so that only the service's enclaves can read it."""
    check_function_source(descriptor, source)
    if not descriptor.owner:
        raise FormatError("a confidential function needs an owner", where=f"function {descriptor.name!r}")
    return hpke_box.seal(
        source.encode("utf-8"),
        service.kem_key,
        FUNCTION_SOURCE_PURPOSE,
        **_source_binding(descriptor, service.fingerprint),
    )


def open_function_source(sealed: bytes, *, descriptor: FunctionDescriptor, service: Identity) -> str:
    """Enclave side: open a confidential function's source and check it against the descriptor."""
    w = f"sealed source of function {descriptor.name!r}"
    if len(sealed) > MAX_SOURCE_BYTES + 64:
        raise FormatError(f"longer than {MAX_SOURCE_BYTES} bytes", where=w)
    plain = hpke_box.open_sealed(
        sealed,
        service.kem_key,
        FUNCTION_SOURCE_PURPOSE,
        where=w,
        **_source_binding(descriptor, service.fingerprint),
    )
    try:
        source = plain.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("source is not UTF-8 text", where=w) from None
    check_function_source(descriptor, source)
    return source


# ---- datasets (section 3) --------------------------------------------------------------------------


def new_dataset_id() -> str:
    return os.urandom(16).hex()


@dataclass(frozen=True)
class DatasetKeyEnvelope:
    dataset_id: str
    owner: str
    service: str
    ciphertext_sha256: str
    wrapped: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DATASET_KEY_FORMAT,
            "dataset_id": self.dataset_id,
            "owner": self.owner,
            "service": self.service,
            "ciphertext_sha256": self.ciphertext_sha256,
            "wrapped": b64e(self.wrapped),
        }

    def binding(self) -> dict[str, str]:
        return {
            "dataset": self.dataset_id,
            "owner": self.owner,
            "service": self.service,
            "ciphertext_sha256": self.ciphertext_sha256,  # not "ciphertext": open_sealed's own argument
        }


def wrap_dataset_key(
    data_key: bytes,
    *,
    dataset_id: str,
    owner: PublicIdentity | str,
    service: PublicIdentity,
    ciphertext_sha256: str,
) -> dict[str, Any]:
    """Owner side: the dataset's data key wrapped to the service, bound to dataset, owner and blob."""
    if len(data_key) != 32:
        raise FormatError("a data key is 32 bytes", where="dataset key envelope")
    owner_fp = owner.fingerprint if isinstance(owner, PublicIdentity) else owner
    env = DatasetKeyEnvelope(dataset_id, owner_fp, service.fingerprint, ciphertext_sha256, b"")
    parse_dataset_key({**env.to_json(), "wrapped": b64e(bytes(48))})  # validate the fields first
    wrapped = hpke_box.seal(data_key, service.kem_key, DATASET_KEY_PURPOSE, **env.binding())
    return DatasetKeyEnvelope(dataset_id, owner_fp, service.fingerprint, ciphertext_sha256, wrapped).to_json()


def parse_dataset_key(
    data: str | bytes | Mapping[str, Any], *, where: str = "dataset key envelope"
) -> DatasetKeyEnvelope:
    obj = _load(data, MAX_ENVELOPE_BYTES, where)
    check_fields(
        obj,
        required=("format", "dataset_id", "owner", "service", "ciphertext_sha256", "wrapped"),
        where=where,
    )
    if obj["format"] != DATASET_KEY_FORMAT:
        raise FormatError(f"unknown envelope format {str(obj['format'])[:80]!r}", where=where)
    wrapped = b64d(obj["wrapped"], field="wrapped", where=where)
    if not hpke_box.ENC_LEN + hpke_box.TAG_LEN <= len(wrapped) <= 256:
        raise FormatError(f"wrapped key of {len(wrapped)} bytes has the wrong size", where=where)
    return DatasetKeyEnvelope(
        dataset_id=_hex(obj, "dataset_id", _HEX32, where),
        owner=_fingerprint(obj, "owner", where),
        service=_fingerprint(obj, "service", where),
        ciphertext_sha256=_hex(obj, "ciphertext_sha256", _HEX64, where),
        wrapped=wrapped,
    )


def check_dataset_key(
    envelope: DatasetKeyEnvelope, expect: TaskInput, service_fp: str, *, where: str
) -> None:
    """The envelope is for this service and says what the manifest says about the input."""
    if envelope.service != service_fp:
        raise IntegrityError(
            f"key envelope is wrapped to service {envelope.service}, not this service {service_fp}",
            where=where,
        )
    if envelope.dataset_id != expect.dataset_id:
        raise IntegrityError(
            f"key envelope is for dataset {envelope.dataset_id}, but the manifest names dataset "
            f"{expect.dataset_id}",
            where=where,
        )
    if envelope.owner != expect.owner:
        raise IntegrityError(
            f"key envelope is bound to owner {envelope.owner}, but the manifest says the owner is {expect.owner}",
            where=where,
        )
    if envelope.ciphertext_sha256 != expect.ciphertext_sha256:
        raise IntegrityError(
            f"key envelope is for ciphertext {envelope.ciphertext_sha256}, but the manifest names "
            f"{expect.ciphertext_sha256}",
            where=where,
        )


def open_dataset_key(
    envelope: DatasetKeyEnvelope | Mapping[str, Any],
    service: Identity,
    *,
    expect: TaskInput | None = None,
    where: str = "dataset key envelope",
) -> bytes:
    """Enclave side: unwrap a data key. With `expect`, the envelope must match that manifest input
    first; the HPKE info binds every field, so an edited envelope does not open."""
    env = envelope if isinstance(envelope, DatasetKeyEnvelope) else parse_dataset_key(envelope, where=where)
    if expect is not None:
        check_dataset_key(env, expect, service.fingerprint, where=where)
    key = hpke_box.open_sealed(
        env.wrapped, service.kem_key, DATASET_KEY_PURPOSE, where=where, **env.binding()
    )
    if len(key) != 32:
        raise FormatError(f"unwrapped data key has {len(key)} bytes, not 32", where=where)
    return key


# ---- manifests (section 5) -------------------------------------------------------------------------


def new_task_id() -> str:
    return os.urandom(16).hex()


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

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "recipients": list(self.recipients), "max_bytes": self.max_bytes}


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
        }

    @property
    def text(self) -> str:
        """The canonical text: what the creator uploads and the platform stores verbatim."""
        return canonical_json(self.to_json()).decode("utf-8")

    @property
    def digest(self) -> str:
        return _sha256(canonical_json(self.to_json()))

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
        """Whose approvals the enclave requires: each input's owner, and the function's owner."""
        fps: list[str] = []
        for fp in [i.owner for i in self.inputs] + ([self.function.owner] if self.function.owner else []):
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
        e = _obj(entry, pw)
        check_fields(e, required=("name", "identity"), where=pw)
        name = _ident(e["name"], "participant name", pw)
        line = _str(e, "identity", pw, max_len=MAX_IDENTITY_LINE_LEN)
        out.append(Participant(name, line, PublicIdentity.from_line(line, where=f"{pw} ({name})")))
    _unique([p.name for p in out], "participant name", where)
    _unique([p.fingerprint for p in out], "participant fingerprint", where)
    return tuple(out)


def parse_manifest(data: str | bytes | Mapping[str, Any], *, where: str = "manifest") -> Manifest:
    """Strictly parse a task manifest and check every rule of PROTOCOL.md section 5 that needs no
    context (the service check needs the enclave's own key: compare ``manifest.service``)."""
    w = where
    obj = _load(data, MAX_MANIFEST_BYTES, w)
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
        where=w,
    )
    if obj["format"] != TASK_FORMAT:
        raise FormatError(f"unknown manifest format {str(obj['format'])[:80]!r}", where=w)
    task_id = _hex(obj, "task_id", _HEX32, w)
    w = f"{where} of task {task_id}" if where == "manifest" else f"{where}: manifest"
    service = _fingerprint(obj, "service", w)
    creator = _fingerprint(obj, "creator", w)
    created_at = _int(obj, "created_at", w, low=0, high=1 << 40)

    fw = f"{w}: function"
    fn = _obj(obj["function"], fw)
    check_fields(fn, required=("descriptor", "digest", "confidential"), where=fw)
    descriptor = parse_function_descriptor(_obj(fn["descriptor"], f"{fw}.descriptor"))
    digest = _hex(fn, "digest", _HEX64, fw)
    if digest != descriptor.digest:
        raise IntegrityError(
            f"function digest {digest} does not match its descriptor (which hashes to {descriptor.digest})",
            where=fw,
        )
    confidential = get_typed(fn, "confidential", bool, where=fw)
    if confidential and (descriptor.kind != "python" or not descriptor.owner):
        raise FormatError("only a party's Python function with an owner can be confidential", where=fw)

    params = _params(obj["params"], f"{w}: params")

    inputs: list[TaskInput] = []
    for i, entry in enumerate(_list(obj, "inputs", w, low=0, high=MAX_INPUTS)):
        iw = f"{w}: inputs[{i}]"
        e = _obj(entry, iw)
        check_fields(e, required=("name", "dataset_id", "owner", "ciphertext_sha256"), where=iw)
        name = _ident(e["name"], "input name", iw)
        iw = f"{w}: input {name!r}"
        inputs.append(
            TaskInput(
                name,
                _hex(e, "dataset_id", _HEX32, iw),
                _fingerprint(e, "owner", iw),
                _hex(e, "ciphertext_sha256", _HEX64, iw),
            )
        )
    _unique([i.name for i in inputs], "input name", w)
    _unique([i.dataset_id for i in inputs], "dataset", w)

    outputs: list[TaskOutput] = []
    for i, entry in enumerate(_list(obj, "outputs", w, low=1, high=MAX_OUTPUTS)):
        ow = f"{w}: outputs[{i}]"
        e = _obj(entry, ow)
        check_fields(e, required=("name", "recipients", "max_bytes"), where=ow)
        name = _output_name(e["name"], ow)
        ow = f"{w}: output {name!r}"
        recipients = _list(e, "recipients", ow, low=1, high=MAX_RECIPIENTS)
        for r in recipients:
            _fp_value(r, f"{ow}: recipients")
        _unique(recipients, "recipient", ow)
        outputs.append(
            TaskOutput(name, tuple(recipients), _int(e, "max_bytes", ow, low=1, high=MAX_OUTPUT_BYTES))
        )
    _unique([o.name for o in outputs], "output name", w)

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
    if sorted(o.name for o in outputs) != sorted(descriptor.outputs):
        raise FormatError(
            f"outputs {sorted(o.name for o in outputs)} differ from the outputs function "
            f"{descriptor.name!r} writes {sorted(descriptor.outputs)}",
            where=w,
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
    )


def build_manifest(
    *,
    service: PublicIdentity | str,
    creator: PublicIdentity | str,
    function: FunctionDescriptor | Mapping[str, Any],
    inputs: Sequence[TaskInput | tuple[str, str, str, str]],
    outputs: Sequence[TaskOutput | tuple[str, Sequence[str], int]],
    participants: Mapping[str, PublicIdentity | str],
    params: Mapping[str, Any] | None = None,
    confidential: bool = False,
    task_id: str | None = None,
    created_at: int | None = None,
) -> Manifest:
    """Creator side: a manifest, checked by the same parser the enclave uses.

    `service`, `creator`: public identities or fingerprints. `inputs`: TaskInput or
    (name, dataset_id, owner fp, ciphertext_sha256). `outputs`: TaskOutput or (name, recipient fps,
    max_bytes). `participants`: name -> public identity (or its line); fingerprints come from these."""
    descriptor = function if isinstance(function, FunctionDescriptor) else parse_function_descriptor(function)
    people = {
        n: p if isinstance(p, PublicIdentity) else PublicIdentity.from_line(p, where=f"participant {n!r}")
        for n, p in participants.items()
    }
    obj = Manifest(
        task_id=task_id or new_task_id(),
        service=service.fingerprint if isinstance(service, PublicIdentity) else service,
        creator=creator.fingerprint if isinstance(creator, PublicIdentity) else creator,
        created_at=int(time.time()) if created_at is None else created_at,
        function=descriptor,
        function_digest=descriptor.digest,
        confidential=confidential,
        params=dict(params or {}),
        inputs=tuple(i if isinstance(i, TaskInput) else TaskInput(*i) for i in inputs),
        outputs=tuple(
            o if isinstance(o, TaskOutput) else TaskOutput(o[0], tuple(o[1]), o[2]) for o in outputs
        ),
        participants=tuple(Participant(n, p.to_line(), p) for n, p in people.items()),
    ).to_json()
    return parse_manifest(obj)


# ---- approvals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approval:
    task_id: str
    manifest_sha256: str
    party: str
    signature: bytes

    def signed_part(self) -> dict[str, Any]:
        return {
            "format": APPROVAL_FORMAT,
            "task_id": self.task_id,
            "manifest_sha256": self.manifest_sha256,
            "party": self.party,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.signed_part(), "signature": b64e(self.signature)}


def sign_approval(identity: Identity, manifest: Manifest) -> dict[str, Any]:
    """A party's consent to exactly this manifest (its digest and task id)."""
    unsigned = Approval(manifest.task_id, manifest.digest, identity.fingerprint, b"")
    return Approval(
        unsigned.task_id,
        unsigned.manifest_sha256,
        unsigned.party,
        identity.sign(canonical_json(unsigned.signed_part())),
    ).to_json()


def parse_approval(data: str | bytes | Mapping[str, Any], *, where: str = "approval") -> Approval:
    obj = _load(data, MAX_APPROVAL_BYTES, where)
    check_fields(obj, required=("format", "task_id", "manifest_sha256", "party", "signature"), where=where)
    if obj["format"] != APPROVAL_FORMAT:
        raise FormatError(f"unknown approval format {str(obj['format'])[:80]!r}", where=where)
    return Approval(
        task_id=_hex(obj, "task_id", _HEX32, where),
        manifest_sha256=_hex(obj, "manifest_sha256", _HEX64, where),
        party=_fingerprint(obj, "party", where),
        signature=b64d(obj["signature"], field="signature", where=where, length=64),
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
    error: Mapping[str, str] | None = None,
) -> bytes:
    """Enclave side: the receipt body of section 5, signed with the service key."""
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
        "status": "ok" if error is None else "error",
        "error": None
        if error is None
        else {"check": error["check"], "message": str(error["message"])[:MAX_ERROR_MESSAGE_LEN]},
    }
    return canonical_json({"body": body, "signature": b64e(service.sign(canonical_json(body)))})


_RECEIPT_FIELDS = (
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
    "status",
    "error",
)


def verify_task_receipt(
    data: str | bytes, service_public: PublicIdentity, *, where: str = "task receipt"
) -> dict[str, Any]:
    """Check the service's signature over a task receipt and its shape; returns the body."""
    w = where
    obj = _load(data, MAX_RECEIPT_BYTES, w)
    check_fields(obj, required=("body", "signature"), where=w)
    body = _obj(obj["body"], f"{w}: body")
    signature = b64d(obj["signature"], field="signature", where=w, length=64)
    service_public.verify(signature, canonical_json(body), what=w)
    check_fields(body, required=_RECEIPT_FIELDS, where=w)
    if body["format"] != RECEIPT_FORMAT:
        raise FormatError(f"unknown receipt format {str(body['format'])[:80]!r}", where=w)
    named = PublicIdentity.from_line(get_typed(body, "service", str, where=w), where=w)
    if (named.sign_pub, named.kem_pub) != (service_public.sign_pub, service_public.kem_pub):
        raise IntegrityError("receipt names another service key than the one that signed it", where=w)
    for key in ("inputs", "outputs"):
        for entry in get_typed(body, key, list, where=w):
            _obj(entry, f"{w}: {key}")
    status = get_typed(body, "status", str, where=w)
    error = body["error"]
    if status == "ok":
        if error is not None:
            raise FormatError("status ok with an error", where=w)
    elif status == "error":
        err = _obj(error, f"{w}: error")
        check_fields(err, required=("check", "message"), where=f"{w}: error")
        if err["check"] not in RECEIPT_CHECKS:
            raise FormatError(f"unknown error check {str(err['check'])[:40]!r}", where=w)
    else:
        raise FormatError(f"unknown status {status[:40]!r}", where=w)
    return body


# ---- for people ---------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Text from other parties, safe to print (no terminal control sequences)."""
    return "".join(c if c.isprintable() or c == "\n" else f"\\u{ord(c):04x}" for c in text)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


def describe_manifest(manifest: Manifest) -> str:
    """Exactly what an approval of this manifest consents to, for a person to read."""
    m = manifest
    fn = m.function
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.created_at))
    lines = [
        f"Task {m.task_id}",
        f"  manifest sha256: {m.digest}",
        f"  enclave service: {m.service}",
        f"  created by:      {_clean(m.name_of(m.creator))} at {when}",
        "",
        f"Function {fn.name!r} version {fn.version} ({'built into the enclave' if fn.kind == 'builtin' else 'Python'})",
        f"  digest:       {m.function_digest}",
        f"  source sha256: {fn.source_sha256}",
        f"  owner:        {_clean(m.name_of(fn.owner)) if fn.owner else '- (part of the measured enclave)'}",
        "  code:         "
        + (
            "CONFIDENTIAL: only the enclave reads it; you approve it by digest and description"
            if m.confidential
            else "readable by participants (check it against the source sha256)"
        ),
        f"  requires:     {', '.join(fn.requirements) or '-'}",
        "  description:  " + _clean(fn.description).replace("\n", "\n                "),
        "",
        "Parameters:",
    ]
    if m.params:
        lines += [
            f"  {_clean(k)} = {_clean(canonical_json(v).decode())}" for k, v in sorted(m.params.items())
        ]
    else:
        lines.append("  (none)")
    lines += ["", "Inputs (the enclave unlocks each only with its owner's approval):"]
    lines += [
        f"  {i.name}: dataset {i.dataset_id} of {_clean(m.name_of(i.owner))}, ciphertext sha256 {i.ciphertext_sha256}"
        for i in m.inputs
    ] or ["  (none)"]
    lines += ["", "Outputs (sealed to these recipients only):"]
    for o in m.outputs:
        lines.append(
            f"  {o.name} (at most {_size(o.max_bytes)}) -> {', '.join(_clean(m.name_of(r)) for r in o.recipients)}"
        )
    lines += [
        f"  if the function fails, its error text is sealed to: {', '.join(_clean(m.name_of(r)) for r in m.error_recipients())}",
        "",
        "The enclave runs it only with approvals of this exact manifest by: "
        + (", ".join(_clean(m.name_of(fp)) for fp in m.required_approvals()) or "nobody (no inputs)"),
        "",
        "Participants:",
    ]
    lines += [f"  {p.name}: {p.fingerprint}" for p in m.participants]
    return "\n".join(lines)
