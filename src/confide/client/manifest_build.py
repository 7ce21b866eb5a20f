"""Building a task manifest and signing approvals (PROTOCOL.md section 5): the creator's and each
party's side, run on a party's machine, outside the TCB.

What is built here is checked by the enclave with the objects and parsers of
``confide.enclave.manifest``: a manifest is built from its dataclasses and then parsed by the same
``parse_manifest`` the enclave uses, and an approval signs ``Approval.signed_part()``, the message
``verify_approval`` checks. Nothing about the wire format is defined in this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confide.enclave.encoding import canonical_json
from confide.enclave.errors import FormatError
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.manifest import (
    Approval,
    FunctionDescriptor,
    Manifest,
    Participant,
    TaskInput,
    TaskOutput,
    parse_function_descriptor,
    parse_manifest,
)
from confide.enclave.task_fields import DEFAULT_MAX_RUNS, MAX_RUNS


def new_task_id() -> str:
    return os.urandom(16).hex()


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
    error_max_bytes: int | None = None,
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
        error_max_bytes=error_max_bytes,
    ).to_json()
    return parse_manifest(obj)


def sign_approval(
    identity: Identity, manifest: Manifest, *, max_runs: int = DEFAULT_MAX_RUNS
) -> dict[str, Any]:
    """A party's consent to exactly this manifest (its digest and task id), for at most `max_runs`
    runs (the enclave counts them; see enclave/run_ledger.py for what a host that rolls back state
    can do)."""
    if not isinstance(max_runs, int) or isinstance(max_runs, bool) or not 1 <= max_runs <= MAX_RUNS:
        raise FormatError(f"max_runs must be within 1..{MAX_RUNS}, got {max_runs!r}", where="approval")
    unsigned = Approval(manifest.task_id, manifest.digest, identity.fingerprint, b"", max_runs)
    return Approval(
        unsigned.task_id,
        unsigned.manifest_sha256,
        unsigned.party,
        identity.sign(canonical_json(unsigned.signed_part())),
        max_runs,
    ).to_json()
