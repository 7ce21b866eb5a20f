"""A party's cache of the service attestations it verified, so that every `confide` command does not
ask the platform's enclave for fresh evidence (each request takes an enclave worker's time, and waits
for an idle one while tasks run), nor re-verify certificate chains (parsing them is most of a client
command's start-up).

What is cached, under `$CONFIDE_HOME/attestations/`, one file per (platform URL, policy digest): the
claims this client verified, the nonce they were fetched with, the service key line the evidence
binds, when it was checked, and the digests of the policy and of the trust anchors it was checked
with, all signed with the party's own identity key. An entry is used only when

- its signature verifies under this party's key (another user, or anything that can write the file
  but does not hold the key, cannot plant a verdict),
- it names this platform URL, this policy (by digest) and the same trust anchors (by digest: a root
  added or removed since invalidates it),
- it is younger than the policy's `max_age_seconds` (0 disables the cache: every command attests
  afresh), and the time now is inside the window in which every certificate and piece of collateral
  the evidence used is valid,
- and the stored claims pass the policy again, now (the same `evaluate` as a fresh attestation,
  including the nonce and key bindings).

The caller also compares the key with the one the platform names now (`GET /v1/service`) and attests
again on any difference.

Nothing in the multi-party flow spends the attestation nonce (task requests are bound to the service
key by the manifest and the key envelopes, not to a nonce), so reusing a verdict for the policy's
freshness window gives the same guarantee as fetching evidence again within that window. The local
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

from confide.attest.claims import Claims
from confide.client.policy import Policy, evaluate
from confide.enclave.encoding import b64d, b64e, canonical_json
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity, PublicIdentity

CLOCK_SKEW_S = 60
ENTRY_FORMAT = "confide-attestation-cache-v2"
SIGNING_CONTEXT = b"confide attestation cache v2\0"


def policy_digest(policy: Policy) -> str:
    return hashlib.sha256(policy.to_toml().encode()).hexdigest()


@dataclass(frozen=True)
class CachedAttestation:
    enclave: PublicIdentity
    claims: Claims
    attested_at: int

    @property
    def age_s(self) -> int:
        return max(0, int(time.time()) - self.attested_at)


class AttestationCache:
    """`anchors_sha256`: a digest of the trust anchors the caller verifies evidence with (see
    `Client._anchors_digest`); entries checked with other anchors are not used."""

    def __init__(self, root: Path, url: str, policy: Policy, identity: Identity, anchors_sha256: str) -> None:
        self.url = url.rstrip("/")
        self.policy = policy
        self.identity = identity
        self.anchors_sha256 = anchors_sha256
        self.policy_sha256 = policy_digest(policy)
        key = hashlib.sha256(f"{self.url}\n{self.policy_sha256}".encode()).hexdigest()[:32]
        self.path = root / "attestations" / f"{key}.json"

    @property
    def enabled(self) -> bool:
        return self.policy.max_age_seconds > 0

    def load(self) -> CachedAttestation | None:
        """The cached verdict if it is ours and still passes the policy now; else None (and the
        entry is removed)."""
        if not self.enabled:
            return None
        try:
            entry = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        try:
            return self._check(entry)
        except (ConfideError, KeyError, TypeError, ValueError):
            self.forget()
            return None

    def _check(self, entry: Any) -> CachedAttestation:
        if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT:
            raise ValueError("not a cache entry of this format")
        signature = b64d(entry.pop("signature"), field="signature", where=str(self.path))
        self.identity.public.verify(signature, SIGNING_CONTEXT + canonical_json(entry), what=str(self.path))
        expect = {"url": self.url, "policy_sha256": self.policy_sha256, "anchors_sha256": self.anchors_sha256}
        if any(entry.get(k) != v for k, v in expect.items()):
            raise ValueError("for another platform, policy or set of trust anchors")
        attested_at = int(entry["attested_at"])
        now = int(time.time())
        if attested_at > now + CLOCK_SKEW_S or now - attested_at > self.policy.max_age_seconds:
            raise ValueError("outside the policy's freshness window")
        claims = Claims.from_json(entry["claims"])
        if (claims.valid_from is not None and now < claims.valid_from) or (
            claims.valid_until is not None and now > claims.valid_until
        ):
            raise ValueError("outside the evidence's certificate and collateral validity window")
        enclave = PublicIdentity.from_line(str(entry["service"]), where=str(self.path))
        evaluate(self.policy, claims, at=now, nonce=bytes.fromhex(str(entry["nonce"])), enclave_keys=enclave)
        return CachedAttestation(enclave, claims, attested_at)

    def store(self, enclave: PublicIdentity, claims: Claims, nonce: bytes, attested_at: int) -> None:
        """Remember a verdict just reached; a cache that cannot be written is only a missed shortcut."""
        if not self.enabled:
            return
        entry: dict[str, Any] = {
            "format": ENTRY_FORMAT,
            "url": self.url,
            "policy_sha256": self.policy_sha256,
            "anchors_sha256": self.anchors_sha256,
            "attested_at": attested_at,
            "nonce": nonce.hex(),
            "service": enclave.to_line(),
            "claims": claims.to_json(),
        }
        try:
            entry["signature"] = b64e(self.identity.sign(SIGNING_CONTEXT + canonical_json(entry)))
            text = json.dumps(entry)
        except (TypeError, ValueError, ConfideError):  # claims this format cannot hold: no shortcut
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

    def forget(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
