"""Signed HTTP requests between a party and the platform (PROTOCOL.md §7), used by both sides.

A party signs every call with its Ed25519 key over

    "confide-api-v2\\n" + audience + "\\n" + METHOD + "\\n" + path_and_query + "\\n" + time + "\\n"
    + nonce + "\\n" + len(body) + "\\n" + H(body)

and sends the signature in five headers. ``audience`` is the platform id the server announces
(``GET /v1/platform``): a request signed for one platform is refused by every other one, even where
the same party key is registered. ``path_and_query`` is the request target exactly as it goes on
the wire (percent-encoded path, then ``?`` and the query when there is one). A streamed upload
declares its body's length and SHA-256 in two more headers (signed, as the last two lines), so the
server authenticates it before it reads a byte of the body and checks the body against the
declaration as it streams. The server rejects another audience, a time more than ``MAX_SKEW_S``
away, a nonce it has seen (it keeps nonces ``NONCE_TTL_S``), an unknown party and a bad signature,
each with its own reason.

Registration is signed by the registering identity itself over
``"confide-register-v1\\n" + name + "\\n" + identity``, proving the caller holds the key it registers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import time as _time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from confide.enclave.errors import ConfideError, FormatError
from confide.enclave.keys import FINGERPRINT_RE, Identity, PublicIdentity

SCHEME = "confide-api-v2"
REGISTER_SCHEME = "confide-register-v1"
MAX_SKEW_S = 300
NONCE_TTL_S = 600
NONCE_HEX_LEN = 32
SIGNATURE_LEN = 64
MAX_NAME_LEN = 128

HEADER_PARTY = "X-Confide-Party"
HEADER_TIME = "X-Confide-Time"
HEADER_NONCE = "X-Confide-Nonce"
HEADER_SIGNATURE = "X-Confide-Signature"
HEADER_AUDIENCE = "X-Confide-Audience"
HEADERS = (HEADER_PARTY, HEADER_AUDIENCE, HEADER_TIME, HEADER_NONCE, HEADER_SIGNATURE)
# a streamed upload's declared body (both covered by the signature)
HEADER_CONTENT_LENGTH = "X-Confide-Content-Length"
HEADER_CONTENT_SHA256 = "X-Confide-Content-SHA256"
PLATFORM_ID_HEX_LEN = 32
MAX_BODY_LENGTH = (1 << 63) - 1

_FINGERPRINT = FINGERPRINT_RE
_NONCE = re.compile(r"[0-9a-f]{32}")
_PLATFORM_ID = re.compile(r"[0-9a-f]{32}")
_LENGTH = re.compile(r"0|[1-9][0-9]{0,18}")  # canonical decimal, at most 19 digits
_TIME = re.compile(r"0|[1-9][0-9]{0,11}")  # canonical: no sign, no leading zeros
_SHA256 = re.compile(r"[0-9a-f]{64}")
_METHOD = re.compile(r"[A-Z]{1,16}")
_NAME = re.compile(r"[^\x00-\x1f\x7f]+")

LookupParty = Callable[[str], PublicIdentity | None]
# (party fingerprint, nonce, signed time) -> True when the nonce was seen before; otherwise records it.
SeenNonceCheck = Callable[[str, str, int], bool]


class AuthError(ConfideError):
    """A request's signature headers are missing, malformed, stale, replayed or do not verify."""


@dataclass(frozen=True)
class SignedHeaders:
    party: str
    audience: str
    time: int
    nonce: str
    signature: bytes


@dataclass(frozen=True)
class DeclaredBody:
    """What a streamed upload's signed headers say its body is."""

    length: int
    sha256: str


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def check_platform_id(value: str, *, where: str = "platform id") -> str:
    if not isinstance(value, str) or not _PLATFORM_ID.fullmatch(value):
        raise FormatError(f"a platform id is {PLATFORM_ID_HEX_LEN} lowercase hex digits", where=where)
    return value


def new_platform_id() -> str:
    return os.urandom(PLATFORM_ID_HEX_LEN // 2).hex()


def signing_payload(
    audience: str,
    method: str,
    path_and_query: str,
    time: int,
    nonce: str,
    body_length: int,
    body_sha256: str,
) -> bytes:
    """The exact bytes a request signature covers."""
    check_platform_id(audience, where="signed request")
    if not _METHOD.fullmatch(method):
        raise FormatError(f"HTTP method {method[:16]!r} must be upper-case letters", where="signed request")
    if not path_and_query.startswith("/") or any(c in path_and_query for c in "\r\n\0"):
        raise FormatError("path must start with '/' and hold no line breaks", where="signed request")
    if not isinstance(body_length, int) or not 0 <= body_length <= MAX_BODY_LENGTH:
        raise FormatError("body length must be a non-negative 64-bit integer", where="signed request")
    if not _SHA256.fullmatch(body_sha256):
        raise FormatError("body digest must be 64 lowercase hex digits", where="signed request")
    return (
        f"{SCHEME}\n{audience}\n{method}\n{path_and_query}\n{time}\n{nonce}\n{body_length}\n{body_sha256}"
    ).encode()


def sign_request(
    identity: Identity,
    method: str,
    path_and_query: str,
    body: bytes,
    *,
    audience: str,
    now: float | None = None,
    body_sha256: str | None = None,
    body_length: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers that authenticate one request to the platform ``audience`` (its platform id).

    Give ``body_sha256`` and ``body_length`` instead of the body to sign a streamed upload without
    holding it in memory (``body`` is then ignored): the headers then declare them too
    (``X-Confide-Content-Length``, ``X-Confide-Content-SHA256``)."""
    stamp = int(_time.time() if now is None else now)
    nonce = nonce if nonce is not None else os.urandom(NONCE_HEX_LEN // 2).hex()
    if not _NONCE.fullmatch(nonce):
        raise FormatError("nonce must be 32 lowercase hex digits", where="signed request")
    declared = body_sha256 is not None
    if declared != (body_length is not None):
        raise FormatError("a declared body needs both its length and its SHA-256", where="signed request")
    digest = body_sha256 if body_sha256 is not None else body_digest(body)
    length = body_length if body_length is not None else len(body)
    payload = signing_payload(audience, method.upper(), path_and_query, stamp, nonce, length, digest)
    headers = {
        HEADER_PARTY: identity.fingerprint,
        HEADER_AUDIENCE: audience,
        HEADER_TIME: str(stamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: base64.b64encode(identity.sign(payload)).decode("ascii"),
    }
    if declared:
        headers[HEADER_CONTENT_LENGTH] = str(length)
        headers[HEADER_CONTENT_SHA256] = digest
    return headers


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:  # a plain dict with other capitalisation
        for key, val in headers.items():
            if key.lower() == name.lower():
                value = val
                break
    if value is None:
        raise AuthError("missing header", where=name)
    return value


def parse_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """Parse the four authentication headers strictly (hostile input: exact shapes only)."""
    party = _header(headers, HEADER_PARTY)
    if not _FINGERPRINT.fullmatch(party):
        raise AuthError("not a party fingerprint (5 groups of 4 lowercase hex digits)", where=HEADER_PARTY)
    audience = _header(headers, HEADER_AUDIENCE)
    if not _PLATFORM_ID.fullmatch(audience):
        raise AuthError(
            f"not a platform id ({PLATFORM_ID_HEX_LEN} lowercase hex digits; see GET /v1/platform)",
            where=HEADER_AUDIENCE,
        )
    stamp = _header(headers, HEADER_TIME)
    if not _TIME.fullmatch(stamp):
        raise AuthError("not a UNIX time in whole seconds", where=HEADER_TIME)
    nonce = _header(headers, HEADER_NONCE)
    if not _NONCE.fullmatch(nonce):
        raise AuthError("nonce must be 32 lowercase hex digits", where=HEADER_NONCE)
    sig_text = _header(headers, HEADER_SIGNATURE)
    try:
        signature = base64.b64decode(sig_text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise AuthError("signature is not valid base64", where=HEADER_SIGNATURE) from None
    if len(signature) != SIGNATURE_LEN:
        raise AuthError(
            f"signature must be {SIGNATURE_LEN} bytes, got {len(signature)}", where=HEADER_SIGNATURE
        )
    if base64.b64encode(signature).decode("ascii") != sig_text:  # one encoding per signature
        raise AuthError("signature is not canonical base64", where=HEADER_SIGNATURE)
    return SignedHeaders(party, audience, int(stamp), nonce, signature)


def parse_declared_body(headers: Mapping[str, str]) -> DeclaredBody:
    """The length and SHA-256 a streamed upload declares (and signs), parsed strictly."""
    length = _header(headers, HEADER_CONTENT_LENGTH)
    if not _LENGTH.fullmatch(length) or int(length) > MAX_BODY_LENGTH:
        raise AuthError("not a byte count (decimal, no sign or leading zeros)", where=HEADER_CONTENT_LENGTH)
    digest = _header(headers, HEADER_CONTENT_SHA256)
    if not _SHA256.fullmatch(digest):
        raise AuthError("not a SHA-256 (64 lowercase hex digits)", where=HEADER_CONTENT_SHA256)
    return DeclaredBody(int(length), digest)


def check_audience(signed: SignedHeaders, audience: str) -> None:
    if signed.audience != audience:
        raise AuthError(
            f"request is signed for platform {signed.audience}, this is platform {audience} "
            "(audience mismatch: a request signed for one platform is refused by every other)",
            where=HEADER_AUDIENCE,
        )


def check_time(signed: SignedHeaders, *, now: float | None = None) -> None:
    current = _time.time() if now is None else now
    skew = signed.time - current
    if abs(skew) > MAX_SKEW_S:
        direction = "ahead of" if skew > 0 else "behind"
        raise AuthError(
            f"request time is {abs(skew):.0f} s {direction} the server clock (limit {MAX_SKEW_S} s)",
            where=HEADER_TIME,
        )


def lookup(signed: SignedHeaders, lookup_party: LookupParty) -> PublicIdentity:
    party = lookup_party(signed.party)
    if party is None:
        raise AuthError(f"unknown party {signed.party} (register first)", where=HEADER_PARTY)
    if party.fingerprint != signed.party:  # the store's copy must be the party it is filed under
        raise AuthError(f"stored keys of party {signed.party} do not match it", where=HEADER_PARTY)
    return party


def check_signature(
    signed: SignedHeaders,
    party: PublicIdentity,
    method: str,
    path_and_query: str,
    body_length: int,
    body_sha256: str,
) -> None:
    payload = signing_payload(
        signed.audience, method, path_and_query, signed.time, signed.nonce, body_length, body_sha256
    )
    try:
        party.verify(signed.signature, payload, what="request")
    except ConfideError:
        raise AuthError(
            f"signature by {signed.party} does not verify over {method} {path_and_query} and its body",
            where=HEADER_SIGNATURE,
        ) from None


def check_nonce(signed: SignedHeaders, seen_nonce_check: SeenNonceCheck) -> None:
    if seen_nonce_check(signed.party, signed.nonce, signed.time):
        raise AuthError(f"nonce {signed.nonce} was used before (replay rejected)", where=HEADER_NONCE)


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path_and_query: str,
    body: bytes,
    lookup_party: LookupParty,
    seen_nonce_check: SeenNonceCheck,
    *,
    audience: str,
    now: float | None = None,
    declared: DeclaredBody | None = None,
) -> PublicIdentity:
    """Authenticate a request to the platform ``audience``; returns the party's public identity or
    raises `AuthError`.

    Order: shape, audience, freshness, party, signature, and only then the nonce, so a forged
    request cannot spend a legitimate party's nonce. Give ``declared`` (what the upload's headers
    declare, `parse_declared_body`) to authenticate a streamed upload before reading its body; the
    caller then checks the body against it (``body`` is ignored).
    """
    signed = parse_headers(headers)
    check_audience(signed, audience)
    check_time(signed, now=now)
    party = lookup(signed, lookup_party)
    if declared is not None:
        length, digest = declared.length, declared.sha256
    else:
        length, digest = len(body), body_digest(body)
    check_signature(signed, party, method, path_and_query, length, digest)
    check_nonce(signed, seen_nonce_check)
    return party


# ---- registration -------------------------------------------------------------------------------------


def registration_message(name: str, identity_line: str) -> bytes:
    return f"{REGISTER_SCHEME}\n{name}\n{identity_line}".encode()


def check_party_name(name: str) -> None:
    if not 1 <= len(name) <= MAX_NAME_LEN or not _NAME.fullmatch(name) or name != name.strip():
        raise FormatError(
            f"party name must be 1..{MAX_NAME_LEN} printable characters without surrounding spaces",
            where="name",
        )


def sign_registration(identity: Identity, name: str) -> str:
    """The base64 signature a party sends with ``POST /v1/parties``."""
    check_party_name(name)
    return base64.b64encode(identity.sign(registration_message(name, identity.public.to_line()))).decode()


def verify_registration(name: str, identity_line: str, signature: str) -> PublicIdentity:
    """Parse the identity line and check that its own key signed this registration."""
    check_party_name(name)
    public = PublicIdentity.from_line(identity_line, where="identity")
    try:
        raw = base64.b64decode(signature.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise FormatError("signature is not valid base64", where="signature") from None
    if len(raw) != SIGNATURE_LEN:
        raise FormatError(f"signature must be {SIGNATURE_LEN} bytes, got {len(raw)}", where="signature")
    public.verify(raw, registration_message(name, identity_line), what="registration signature")
    return public
