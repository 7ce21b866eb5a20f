"""A party's cache of the service's verified evidence, so that every `confide` command does not ask
the platform's enclave for fresh evidence (each request takes an enclave worker's time, and waits
for an idle one while tasks run).

What is cached, under `$CONFIDE_HOME/attestations/`, one file per (platform URL, policy digest): the
evidence itself, the nonce it was fetched with, the service key line sent beside it, and when it was
checked. The cache is a hint, never trusted on its own: on every use the evidence is verified again
here, with the party's current trust anchors and policy, at the current time (signature, certificate
and collateral validity windows, the nonce binding, the key binding, the policy's `max_age_seconds`
on the evidence's own time). On top of that an entry is used only while it is younger than the
policy's `max_age_seconds` (0 disables the cache: every command attests afresh). The caller also
compares the key with the one the platform names now (`GET /v1/service`) and attests again on any
difference.

Nothing in the multi-party flow spends the attestation nonce (task requests are bound to the service
key by the manifest and the key envelopes, not to a nonce), so reusing verified evidence for the
policy's freshness window gives the same guarantee as fetching it again within that window. The local
`confide run` flow, where each request spends the nonce of the attestation it follows, does not use
this cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.attest import TrustAnchors
from confide.client.local import Attestation, check_attestation
from confide.client.policy import Policy
from confide.enclave.encoding import b64d, b64e
from confide.enclave.errors import ConfideError

CLOCK_SKEW_S = 60


def policy_digest(policy: Policy) -> str:
    return hashlib.sha256(policy.to_toml().encode()).hexdigest()


@dataclass(frozen=True)
class CachedAttestation:
    attestation: Attestation
    attested_at: int

    @property
    def age_s(self) -> int:
        return max(0, int(time.time()) - self.attested_at)


class AttestationCache:
    def __init__(self, root: Path, url: str, policy: Policy) -> None:
        self.url = url.rstrip("/")
        self.policy = policy
        self.policy_sha256 = policy_digest(policy)
        key = hashlib.sha256(f"{self.url}\n{self.policy_sha256}".encode()).hexdigest()[:32]
        self.path = root / "attestations" / f"{key}.json"

    @property
    def enabled(self) -> bool:
        return self.policy.max_age_seconds > 0

    def load(self, anchors: TrustAnchors) -> CachedAttestation | None:
        """The cached attestation if it still verifies under the policy now; else None (and the stale
        entry is removed)."""
        if not self.enabled:
            return None
        try:
            entry = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        try:
            return self._check(entry, anchors)
        except (ConfideError, KeyError, TypeError, ValueError):
            self.forget()
            return None

    def _check(self, entry: Any, anchors: TrustAnchors) -> CachedAttestation | None:
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        if entry.get("url") != self.url or entry.get("policy_sha256") != self.policy_sha256:
            raise ValueError("for another platform or policy")
        attested_at = int(entry["attested_at"])
        now = int(time.time())
        if attested_at > now + CLOCK_SKEW_S or now - attested_at > self.policy.max_age_seconds:
            raise ValueError("outside the policy's freshness window")
        line = entry.get("service")
        nonce = bytes.fromhex(str(entry["nonce"]))
        evidence = b64d(entry["evidence"], field="evidence", where=str(self.path))
        att = check_attestation(
            evidence, nonce, self.policy, anchors, keys_line=line if isinstance(line, str) else None
        )
        return CachedAttestation(att, attested_at)

    def store(self, evidence: bytes, nonce: bytes, service_line: str | None, attested_at: int) -> None:
        """Remember verified evidence; a cache that cannot be written is only a missed shortcut."""
        if not self.enabled:
            return
        entry = {
            "url": self.url,
            "policy_sha256": self.policy_sha256,
            "attested_at": attested_at,
            "nonce": nonce.hex(),
            "service": service_line,
            "evidence": b64e(evidence),
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entry, fh)
            os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

    def forget(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
