"""confide.enclave.request and keys: sealed run requests whose body a client (or whoever sealed it to
the enclave's key) made malformed, receipts of another format, and hostile identity texts and files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from confide.client.identity_file import save_identity
from confide.client.receipts import verify_receipt
from confide.enclave import hpke_box
from confide.enclave.encoding import b64e, canonical_json
from confide.enclave.errors import ConfideError, FormatError
from confide.enclave.keys import Identity, PublicIdentity, check_pin, load_public
from confide.enclave.request import REQUEST_FORMAT, REQUEST_PURPOSE, open_request

ENCLAVE, CLIENT = Identity.generate("enclave"), Identity.generate("client")
H32 = "ab" * 32


def body(**kw: Any) -> dict[str, Any]:
    return {
        "format": REQUEST_FORMAT,
        "request_id": "cd" * 16,
        "attestation_nonce": H32,
        "function_sha256": H32,
        "params": {},
        "inputs": {"a": {"data_key": b64e(b"k" * 32), "header_sha256": H32}},
        "outputs": {"o": {"recipients": [CLIENT.public.to_line()], "max_bytes": 10}},
        "error_recipients": [CLIENT.public.to_line()],
        "client": CLIENT.public.to_line(),
        **kw,
    }


def seal(obj: dict[str, Any]) -> bytes:
    return hpke_box.seal(
        canonical_json(obj), ENCLAVE.public.kem_key, REQUEST_PURPOSE, enclave=ENCLAVE.fingerprint
    )


def test_a_good_request_opens() -> None:
    req = open_request(seal(body(source="def run(ctx): pass\n")), ENCLAVE)
    assert (
        req.outputs["o"].max_bytes == 10 and req.source is not None and req.inputs["a"].header_sha256 == H32
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "confide-run-request-v0"}, "unknown request format"),
        ({"inputs": {"a": "key"}}, "input 'a': must be an object"),
        ({"outputs": {"o": ["x"]}}, "output 'o': must be an object"),
        (
            {"outputs": {"o": {"recipients": [CLIENT.public.to_line()], "max_bytes": 0}}},
            "max_bytes must be positive",
        ),
        ({"outputs": {"o": {"recipients": [], "max_bytes": 1}}}, "recipients must be a list of 1..64"),
        ({"error_recipients": [CLIENT.public.to_line()] * 65}, "recipients must be a list of 1..64"),
    ],
)
def test_malformed_requests_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError) as info:
        open_request(seal(body(**change)), ENCLAVE)
    assert message in str(info.value) and "run request" in str(info.value)


def test_a_receipt_of_another_format_is_refused() -> None:
    b = {"format": "other"}
    data = canonical_json({"body": b, "signature": b64e(ENCLAVE.sign(canonical_json(b)))})
    with pytest.raises(FormatError, match="unknown receipt format 'other'"):
        verify_receipt(data, ENCLAVE.public, where="receipt")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (7, "fingerprint pin must be text"),
        ("", "fingerprint"),
    ],
)
def test_bad_pins(value: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        check_pin(value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (None, "public identity must be text"),
        ("ssh-ed25519 AAAA", "must start with"),
    ],
)
def test_bad_public_lines(line: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        PublicIdentity.from_line(line)


def test_identity_files(tmp_path: Path) -> None:
    p = tmp_path / "id.json"
    save_identity(ENCLAVE, p)
    with pytest.raises(ConfideError, match="refusing to overwrite an existing identity"):
        save_identity(ENCLAVE, p)
    assert Identity.load(p).fingerprint == ENCLAVE.fingerprint
    os.chmod(p, 0o644)
    with pytest.raises(ConfideError, match="accessible by other users \\(mode 644\\)"):
        Identity.load(p)
    with pytest.raises(ConfideError, match="cannot read identity"):
        Identity.load(tmp_path / "absent")
    other = json.loads(ENCLAVE.private_bytes())
    other["format"] = "ssh"
    with pytest.raises(FormatError, match="not a Confide identity file \\(format 'ssh'\\)"):
        Identity.from_private_bytes(json.dumps(other).encode(), where="id")


def test_load_public_from_a_line_or_a_file(tmp_path: Path) -> None:
    line = CLIENT.public.to_line()
    assert load_public(line).fingerprint == CLIENT.public.fingerprint
    f = tmp_path / "c.pub"
    f.write_text(line + "\n")
    assert load_public(str(f)).fingerprint == CLIENT.public.fingerprint
    with pytest.raises(ConfideError):
        load_public(str(tmp_path / "absent.pub"))
