"""The signed-request scheme of PROTOCOL.md §7 (confide.client.api_auth), used by client and platform."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client import api_auth
from confide.client.api_auth import AuthError, DeclaredBody, verify_request
from confide.enclave.errors import ConfideError, FormatError, IntegrityError
from confide.enclave.keys import Identity, PublicIdentity

NOW = 1_750_000_000
ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
HERE = "a1" * 16  # the platform id of the server in these tests
THERE = "b2" * 16  # another platform's


class Nonces:
    """An in-memory nonce store like the platform's database table."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, party: str, nonce: str, _time: int) -> bool:
        if (party, nonce) in self.seen:
            return True
        self.seen.add((party, nonce))
        return False


def lookup(fp: str) -> PublicIdentity | None:
    return {ALICE.fingerprint: ALICE.public, BOB.fingerprint: BOB.public}.get(fp)


def verify(
    headers, method="POST", path="/v1/tasks", body=b"{}", *, nonces=None, now=NOW, audience=HERE, **kw
):
    return verify_request(
        headers, method, path, body, lookup, nonces or Nonces(), now=now, audience=audience, **kw
    )


def sign_request(identity, method, path, body, *, audience=HERE, **kw):
    return api_auth.sign_request(identity, method, path, body, audience=audience, **kw)


def test_round_trip_and_headers() -> None:
    headers = sign_request(ALICE, "POST", "/v1/tasks", b"{}", now=NOW)
    assert set(headers) == set(api_auth.HEADERS)
    assert headers["X-Confide-Party"] == ALICE.fingerprint
    assert headers["X-Confide-Time"] == str(NOW)
    assert len(headers["X-Confide-Nonce"]) == 32
    assert verify(headers) == ALICE.public
    # the server sees lower-case header names (HTTP/2, ASGI): matched case-insensitively
    assert verify({k.lower(): v for k, v in headers.items()}) == ALICE.public


def test_signature_covers_the_declared_length_and_digest_of_a_streamed_body() -> None:
    body = b"x" * 100_000
    digest = hashlib.sha256(body).hexdigest()
    headers = sign_request(ALICE, "PUT", "/v1/blobs", b"", body_sha256=digest, body_length=len(body), now=NOW)
    assert headers[api_auth.HEADER_CONTENT_LENGTH] == "100000"
    assert headers[api_auth.HEADER_CONTENT_SHA256] == digest
    declared = api_auth.parse_declared_body(headers)
    assert declared == DeclaredBody(len(body), digest)
    # verified before the body is read: from the declaration alone
    assert verify(headers, "PUT", "/v1/blobs", b"", declared=declared) == ALICE.public
    assert verify(headers, "PUT", "/v1/blobs", body) == ALICE.public  # the same body, in memory
    with pytest.raises(AuthError, match="does not verify"):
        verify(headers, "PUT", "/v1/blobs", body + b"!")
    # a declaration other than the signed one (a longer body, another digest) does not verify
    for other in (DeclaredBody(len(body) + 1, digest), DeclaredBody(len(body), "0" * 64)):
        with pytest.raises(AuthError, match="does not verify"):
            verify(headers, "PUT", "/v1/blobs", b"", declared=other)
    with pytest.raises(FormatError, match="both its length and its SHA-256"):
        sign_request(ALICE, "PUT", "/v1/blobs", b"", body_sha256=digest, now=NOW)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        (api_auth.HEADER_CONTENT_LENGTH, "-1", "byte count"),
        (api_auth.HEADER_CONTENT_LENGTH, "010", "byte count"),
        (api_auth.HEADER_CONTENT_LENGTH, "9" * 20, "byte count"),
        (api_auth.HEADER_CONTENT_LENGTH, str(1 << 63), "byte count"),
        (api_auth.HEADER_CONTENT_SHA256, "A" * 64, "SHA-256"),
        (api_auth.HEADER_CONTENT_SHA256, "0" * 63, "SHA-256"),
    ],
)
def test_malformed_declarations_are_refused(name: str, value: str, reason: str) -> None:
    headers = sign_request(ALICE, "PUT", "/v1/blobs", b"", body_sha256="0" * 64, body_length=10, now=NOW)
    with pytest.raises(AuthError, match=reason) as err:
        api_auth.parse_declared_body({**headers, name: value})
    assert err.value.where == name
    missing = {k: v for k, v in headers.items() if k != name}
    with pytest.raises(AuthError, match="missing header"):
        api_auth.parse_declared_body(missing)


def test_a_request_signed_for_another_platform_is_refused_naming_the_audience() -> None:
    """The adversary replays a request Alice signed for platform THERE (where her key is registered
    too) to platform HERE: refused before anything else, naming both platforms; and rewriting the
    audience header to HERE breaks the signature. No nonce is spent either way."""
    nonces = Nonces()
    headers = sign_request(ALICE, "GET", "/v1/tasks", b"", audience=THERE, now=NOW)
    assert headers[api_auth.HEADER_AUDIENCE] == THERE
    assert verify(headers, "GET", "/v1/tasks", b"", audience=THERE) == ALICE.public  # fine there
    with pytest.raises(AuthError, match="audience mismatch") as err:
        verify(headers, "GET", "/v1/tasks", b"", nonces=nonces)
    assert THERE in err.value.message and HERE in err.value.message
    assert err.value.where == api_auth.HEADER_AUDIENCE
    with pytest.raises(AuthError, match="does not verify"):
        verify({**headers, api_auth.HEADER_AUDIENCE: HERE}, "GET", "/v1/tasks", b"", nonces=nonces)
    assert not nonces.seen


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/tasks", b"{}"),  # another method
        ("POST", "/v1/tasks?x=1", b"{}"),  # another target (query included)
        ("POST", "/v1/datasets", b"{}"),
        ("POST", "/v1/tasks", b'{"a":1}'),  # another body
    ],
)
def test_any_change_breaks_the_signature(method: str, path: str, body: bytes) -> None:
    headers = sign_request(ALICE, "POST", "/v1/tasks", b"{}", now=NOW)
    with pytest.raises(AuthError, match="does not verify") as err:
        verify(headers, method, path, body)
    assert err.value.where == api_auth.HEADER_SIGNATURE


def test_changed_headers_break_the_signature() -> None:
    headers = sign_request(ALICE, "POST", "/v1/tasks", b"{}", now=NOW)
    for name, value in (("X-Confide-Time", str(NOW + 1)), ("X-Confide-Nonce", "0" * 32)):
        with pytest.raises(AuthError, match="does not verify"):
            verify({**headers, name: value})
    # Bob cannot claim Alice's signature as his
    with pytest.raises(AuthError, match="does not verify"):
        verify({**headers, "X-Confide-Party": BOB.fingerprint})


@pytest.mark.parametrize("skew", [301, -301, 10_000])
def test_stale_or_future_time_is_refused(skew: int) -> None:
    headers = sign_request(ALICE, "GET", "/v1/tasks", b"", now=NOW)
    with pytest.raises(AuthError, match="limit 300 s") as err:
        verify(headers, "GET", "/v1/tasks", b"", now=NOW + skew)
    assert err.value.where == api_auth.HEADER_TIME
    assert verify(headers, "GET", "/v1/tasks", b"", now=NOW + 299) == ALICE.public


def test_replayed_nonce_is_refused_and_a_forgery_spends_no_nonce() -> None:
    nonces = Nonces()
    headers = sign_request(ALICE, "GET", "/v1/tasks", b"", now=NOW)
    forged = {**headers, "X-Confide-Signature": base64.b64encode(bytes(64)).decode()}
    with pytest.raises(AuthError, match="does not verify"):
        verify(forged, "GET", "/v1/tasks", b"", nonces=nonces)
    assert not nonces.seen  # checked only after the signature
    verify(headers, "GET", "/v1/tasks", b"", nonces=nonces)
    with pytest.raises(AuthError, match="used before") as err:
        verify(headers, "GET", "/v1/tasks", b"", nonces=nonces)
    assert err.value.where == api_auth.HEADER_NONCE


def test_unknown_party_and_missing_headers() -> None:
    stranger = Identity.generate("stranger")
    headers = sign_request(stranger, "GET", "/v1/tasks", b"", now=NOW)
    with pytest.raises(AuthError, match="unknown party"):
        verify(headers, "GET", "/v1/tasks", b"")
    for name in api_auth.HEADERS:
        partial = {k: v for k, v in headers.items() if k != name}
        with pytest.raises(AuthError, match="missing header") as err:
            verify(partial, "GET", "/v1/tasks", b"")
        assert err.value.where == name


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("X-Confide-Party", "ALICE", "fingerprint"),
        ("X-Confide-Party", "abcd-abcd-abcd-abcd-abcdx", "fingerprint"),
        ("X-Confide-Audience", "A1" * 16, "platform id"),
        ("X-Confide-Audience", "a1" * 15, "platform id"),
        ("X-Confide-Time", "-5", "UNIX time"),
        ("X-Confide-Time", "1e9", "UNIX time"),
        ("X-Confide-Time", " 1750000000", "UNIX time"),
        ("X-Confide-Time", "01750000000", "UNIX time"),  # one spelling per time
        ("X-Confide-Nonce", "A" * 32, "32 lowercase hex"),
        ("X-Confide-Nonce", "0" * 31, "32 lowercase hex"),
        ("X-Confide-Signature", "not base64!", "base64"),
        ("X-Confide-Signature", base64.b64encode(bytes(63)).decode(), "64 bytes"),
        ("X-Confide-Signature", base64.b64encode(bytes(64)).decode()[:-3] + "B==", "canonical"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(name: str, value: str, reason: str) -> None:
    headers = {**sign_request(ALICE, "GET", "/v1/tasks", b"", now=NOW), name: value}
    with pytest.raises(AuthError, match=reason) as err:
        api_auth.parse_headers(headers)
    assert err.value.where == name


def test_signing_payload_rejects_ambiguous_input() -> None:
    digest = "0" * 64
    with pytest.raises(FormatError):
        api_auth.signing_payload(HERE, "GET", "/v1/a\nGET", 1, "0" * 32, 0, digest)
    with pytest.raises(FormatError):
        api_auth.signing_payload(HERE, "get", "/v1/a", 1, "0" * 32, 0, digest)
    with pytest.raises(FormatError):
        api_auth.signing_payload(HERE, "GET", "v1/a", 1, "0" * 32, 0, digest)
    with pytest.raises(FormatError):
        api_auth.signing_payload(HERE, "GET", "/v1/a", 1, "0" * 32, 0, "xyz")
    with pytest.raises(FormatError):
        api_auth.signing_payload(HERE, "GET", "/v1/a", 1, "0" * 32, -1, digest)
    with pytest.raises(FormatError):
        api_auth.signing_payload("platform\nGET", "GET", "/v1/a", 1, "0" * 32, 0, digest)
    assert api_auth.signing_payload(HERE, "GET", "/v1/a", 7, "ab" * 16, 12, digest) == (
        f"confide-api-v2\n{HERE}\nGET\n/v1/a\n7\n{'ab' * 16}\n12\n{digest}".encode()
    )


def test_registration_signature() -> None:
    line = ALICE.public.to_line()
    sig = api_auth.sign_registration(ALICE, "Alice's lab")
    assert api_auth.verify_registration("Alice's lab", line, sig) == ALICE.public
    with pytest.raises(IntegrityError):
        api_auth.verify_registration("Mallory", line, sig)  # the name is signed
    with pytest.raises(IntegrityError):  # Bob cannot register Alice's keys
        api_auth.verify_registration("Alice's lab", line, api_auth.sign_registration(BOB, "Alice's lab"))
    with pytest.raises(FormatError, match="base64"):
        api_auth.verify_registration("Alice's lab", line, "%%%")
    for bad in ("", " padded ", "line\nbreak", "x" * 129):
        with pytest.raises(FormatError, match="party name"):
            api_auth.verify_registration(bad, line, sig)


# ---- properties ------------------------------------------------------------------------------------

header_text = st.text(st.characters(codec="latin-1"), max_size=100)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*api_auth.HEADERS, *(h.lower() for h in api_auth.HEADERS), "Other"]),
        header_text,
        max_size=6,
    )
)
def test_header_parsing_never_fails_other_than_auth_error(headers: dict[str, str]) -> None:
    try:
        signed = api_auth.parse_headers(headers)
    except AuthError as exc:
        assert exc.where in api_auth.HEADERS
        return
    assert len(signed.signature) == 64 and len(signed.nonce) == 32


@settings(max_examples=100, deadline=None)
@given(
    mutated=st.sampled_from(api_auth.HEADERS),
    value=header_text,
)
def test_any_mutated_header_is_refused(mutated: str, value: str) -> None:
    headers = sign_request(ALICE, "GET", "/v1/audit", b"", now=NOW)
    if headers[mutated] == value:
        return
    with pytest.raises(AuthError):
        verify({**headers, mutated: value}, "GET", "/v1/audit", b"")


@settings(max_examples=100, deadline=None)
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE"]),
    path=st.from_regex(r"/[A-Za-z0-9/%._~?&=-]{0,80}", fullmatch=True),
    body=st.binary(max_size=512),
)
def test_sign_then_verify_round_trips(method: str, path: str, body: bytes) -> None:
    headers = sign_request(BOB, method, path, body, now=NOW)
    assert verify(headers, method, path, body) == BOB.public


def test_auth_error_is_a_confide_error() -> None:
    assert issubclass(AuthError, ConfideError)
