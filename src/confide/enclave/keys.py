"""Party identities: an Ed25519 signing key and an X25519 encryption key (for HPKE).

Private keys live in one file with owner-only permissions (written on a party's machine by
``confide.client.identity_file.save_identity``, read by ``Identity.load``). The public half is one
text line, ``confide-pub1:<base64url of 32-byte Ed25519 key || 32-byte X25519 key> [label]``, that
parties can paste into a message. Its fingerprint is 128 bits of SHA-256 over both keys, written as
8 groups of 4 hex digits; pins (the fingerprints parties compare out of band, the owners named in
manifests and dataset key envelopes) use all 128 bits (``check_pin``). ``short_fingerprint`` (the
first 80 bits) is for display only: it identifies nothing a host could not grind a second key for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .encoding import b64d, b64e, canonical_json, check_fields, get_typed, parse_json_object
from .errors import ConfideError, FormatError, IntegrityError

PUBLIC_PREFIX = "confide-pub1:"
IDENTITY_FORMAT = "confide-identity-v1"
FINGERPRINT_BITS = 128
FINGERPRINT_HEX = FINGERPRINT_BITS // 4
SHORT_FINGERPRINT_HEX = 20  # shown to people; never compared for pinning
FINGERPRINT_RE = re.compile(r"[0-9a-f]{4}(?:-[0-9a-f]{4}){7}")  # FINGERPRINT_HEX digits in groups of 4


def _raw(pub: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _grouped(digits: str) -> str:
    return "-".join(digits[i : i + 4] for i in range(0, len(digits), 4))


def fingerprint_of(sign_pub: bytes, kem_pub: bytes) -> str:
    """128 bits of SHA-256 over both public keys, as 8 dash-separated groups of 4 hex digits."""
    digest = hashlib.sha256(b"confide-fingerprint-v1\0" + sign_pub + kem_pub).hexdigest()
    return _grouped(digest[:FINGERPRINT_HEX])


def short_fingerprint(fingerprint: str) -> str:
    """The first 80 bits of a fingerprint, for people to glance at (not for pinning)."""
    return _grouped(fingerprint.replace("-", "")[:SHORT_FINGERPRINT_HEX])


def check_pin(pin: str, *, where: str = "fingerprint pin") -> str:
    """A fingerprint given to pin a party's keys: the full 128-bit form (dashes optional, any case),
    returned canonical. A shorter prefix is refused: the host could search for another key pair
    sharing it (about 2^80 work for the 80-bit short form)."""
    if not isinstance(pin, str):
        raise FormatError("fingerprint pin must be text", where=where)
    digits = pin.strip().replace("-", "").replace(":", "").lower()
    if not digits or any(c not in "0123456789abcdef" for c in digits):
        raise FormatError(f"fingerprint pin {pin[:80]!r} is not hex digits", where=where)
    if len(digits) < FINGERPRINT_HEX:
        raise FormatError(
            f"fingerprint pin {pin[:80]!r} has {len(digits) * 4} bits; pinning needs the full "
            f"{FINGERPRINT_BITS}-bit fingerprint ({FINGERPRINT_HEX} hex digits)",
            where=where,
        )
    if len(digits) > FINGERPRINT_HEX:
        raise FormatError(
            f"fingerprint pin {pin[:80]!r} has {len(digits)} hex digits, not {FINGERPRINT_HEX}", where=where
        )
    return _grouped(digits)


@dataclass(frozen=True)
class PublicIdentity:
    """The shareable half of an identity."""

    sign_pub: bytes
    kem_pub: bytes
    label: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.sign_pub, self.kem_pub)

    def matches_pin(self, pin: str, *, where: str = "fingerprint pin") -> bool:
        """These keys have the full 128-bit fingerprint `pin` (a shorter pin is refused)."""
        return check_pin(pin, where=where) == self.fingerprint

    @property
    def verify_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.sign_pub)

    @property
    def kem_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.kem_pub)

    def to_line(self) -> str:
        body = base64.urlsafe_b64encode(self.sign_pub + self.kem_pub).decode("ascii").rstrip("=")
        return f"{PUBLIC_PREFIX}{body}" + (f" {self.label}" if self.label else "")

    @classmethod
    def from_line(cls, line: str, *, where: str = "public identity") -> PublicIdentity:
        if not isinstance(line, str):
            raise FormatError("public identity must be text", where=where)
        text = line.strip()
        token, _, label = text.partition(" ")
        if not token.startswith(PUBLIC_PREFIX):
            raise FormatError(f"public identity must start with {PUBLIC_PREFIX!r}", where=where)
        body = token[len(PUBLIC_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise FormatError("public identity is not valid base64url", where=where) from None
        if len(raw) != 64:
            raise FormatError(f"public identity must hold 64 bytes of keys, got {len(raw)}", where=where)
        return cls(raw[:32], raw[32:], label.strip())

    def verify(self, signature: bytes, message: bytes, *, what: str) -> None:
        try:
            self.verify_key.verify(signature, message)
        except InvalidSignature:
            raise IntegrityError(f"signature by {self.fingerprint} does not verify", where=what) from None


@dataclass(frozen=True)
class Identity:
    """A party's private keys."""

    sign_key: Ed25519PrivateKey
    kem_key: X25519PrivateKey
    label: str = ""

    @classmethod
    def generate(cls, label: str = "") -> Identity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate(), label)

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(_raw(self.sign_key.public_key()), _raw(self.kem_key.public_key()), self.label)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def sign(self, message: bytes) -> bytes:
        return self.sign_key.sign(message)

    # ---- serialisation -------------------------------------------------------------------------
    def private_bytes(self) -> bytes:
        return canonical_json(
            {
                "format": IDENTITY_FORMAT,
                "label": self.label,
                "sign": b64e(self.sign_key.private_bytes_raw()),
                "kem": b64e(self.kem_key.private_bytes_raw()),
            }
        )

    @classmethod
    def from_private_bytes(cls, data: bytes, *, where: str) -> Identity:
        obj = parse_json_object(data, where=where)
        check_fields(obj, required=("format", "label", "sign", "kem"), where=where)
        if obj["format"] != IDENTITY_FORMAT:
            raise FormatError(f"not a Confide identity file (format {obj['format']!r})", where=where)
        label = get_typed(obj, "label", str, where=where)
        sign = b64d(obj["sign"], field="sign", where=where, length=32)
        kem = b64d(obj["kem"], field="kem", where=where, length=32)
        return cls(
            Ed25519PrivateKey.from_private_bytes(sign), X25519PrivateKey.from_private_bytes(kem), label
        )

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            st = os.stat(path)
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfideError(f"cannot read identity ({exc.strerror})", where=str(path)) from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfideError(
                f"identity file is accessible by other users (mode {stat.S_IMODE(st.st_mode):o});"
                " run: chmod 600",
                where=str(path),
            )
        return cls.from_private_bytes(data, where=str(path))


def load_public(text_or_path: str) -> PublicIdentity:
    """Accept a public line directly, or a file holding one (``.pub``)."""
    if text_or_path.startswith(PUBLIC_PREFIX):
        return PublicIdentity.from_line(text_or_path)
    path = Path(text_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfideError(f"cannot read public identity ({exc})", where=str(path)) from None
    return PublicIdentity.from_line(text, where=str(path))
