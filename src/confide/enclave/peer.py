"""Mutual attestation between enclaves of one build: a peer's evidence, verified by this enclave's own
backend, must come from the same backend, the same measurement (the same build and configuration),
and may be a debug enclave only when this one is too. Used where a secret passes between enclaves:
the service key to a new platform worker (service.py), a dataflow job's key to a node's worker
(flow/task.py)."""

from __future__ import annotations

from .backend import TeeBackend
from .errors import EvidenceError


def check_peer(backend: TeeBackend, evidence: bytes, what: str) -> bytes:
    """The peer's report data, once its evidence verifies and it runs this same build; else
    EvidenceError naming `what`."""
    try:
        peer, report_data = backend.verify_peer(evidence)
    except EvidenceError as exc:
        raise EvidenceError(f"{what}: {exc.message}", where=exc.where) from None
    me = backend.identity
    if peer.backend != me.backend:
        raise EvidenceError(f"peer runs on backend {peer.backend!r}, not {me.backend!r}", where=what)
    if peer.debug and not me.debug:
        raise EvidenceError("peer is a debug enclave and this one is not: refused", where=what)
    if peer.measurement != me.measurement:
        raise EvidenceError(
            f"peer measurement {peer.measurement} differs from this enclave's {me.measurement} "
            "(another build or configuration): refused",
            where=what,
        )
    return report_data
