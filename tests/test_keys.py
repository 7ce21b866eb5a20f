from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from confide.client.identity_file import save_identity
from confide.enclave import hpke_box
from confide.enclave.errors import ConfideError, FormatError, IntegrityError
from confide.enclave.keys import (
    FINGERPRINT_BITS,
    Identity,
    PublicIdentity,
    check_pin,
    load_public,
    short_fingerprint,
)


def test_identity_file_is_owner_only_and_round_trips(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.key"
    save_identity(alice, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.fingerprint == alice.fingerprint
    assert loaded.public == alice.public


def test_identity_refuses_overwrite_and_group_readable(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.key"
    save_identity(alice, path)
    with pytest.raises(ConfideError, match="refusing to overwrite"):
        save_identity(Identity.generate(), path)
    os.chmod(path, 0o640)
    with pytest.raises(ConfideError, match="accessible by other users"):
        Identity.load(path)


def test_public_line_round_trip_and_fingerprint(alice: Identity) -> None:
    line = alice.public.to_line()
    assert line.startswith("confide-pub1:") and "\n" not in line and line.endswith(" alice")
    back = PublicIdentity.from_line(line)
    assert back == alice.public
    assert back.fingerprint == alice.fingerprint
    assert len(alice.fingerprint) == 39  # 8 groups of 4 hex digits: 128 bits
    assert len(alice.fingerprint.replace("-", "")) * 4 == FINGERPRINT_BITS == 128
    assert Identity.generate().fingerprint != alice.fingerprint
    assert short_fingerprint(alice.fingerprint) == alice.fingerprint[:24]  # shown, never pinned


def test_a_pin_shorter_than_128_bits_is_refused(alice: Identity) -> None:
    """Issue 12 item 7b: the 80-bit short form (and any prefix) does not pin a key."""
    fp = alice.fingerprint
    assert check_pin(fp) == fp
    assert check_pin(fp.replace("-", "").upper()) == fp  # dashes optional, any case
    assert alice.public.matches_pin(fp)
    assert not Identity.generate().public.matches_pin(fp)
    for short in (short_fingerprint(fp), fp[:-5], fp.replace("-", "")[:31]):
        with pytest.raises(FormatError, match="pinning needs the full 128-bit fingerprint"):
            check_pin(short)
        with pytest.raises(FormatError, match="128-bit"):
            alice.public.matches_pin(short)
    for bad in (fp + "0", "zz" * 16, ""):
        with pytest.raises(FormatError):
            check_pin(bad)


@pytest.mark.parametrize(
    "line", ["", "confide-pub2:AAAA", "confide-pub1:!!!", "confide-pub1:" + "A" * 10, "ssh-ed25519 AAAA"]
)
def test_bad_public_lines_are_rejected(line: str) -> None:
    with pytest.raises(FormatError):
        PublicIdentity.from_line(line)


def test_load_public_from_file(tmp_path: Path, alice: Identity) -> None:
    (tmp_path / "a.pub").write_text(alice.public.to_line() + "\n")
    assert load_public(str(tmp_path / "a.pub")) == alice.public
    with pytest.raises(ConfideError, match="cannot read"):
        load_public(str(tmp_path / "missing.pub"))


def test_signature_verification(alice: Identity, bob: Identity) -> None:
    sig = alice.sign(b"msg")
    alice.public.verify(sig, b"msg", what="test")
    with pytest.raises(IntegrityError, match=alice.fingerprint):
        alice.public.verify(sig, b"msh", what="test")
    with pytest.raises(IntegrityError):
        bob.public.verify(sig, b"msg", what="test")


def test_hpke_context_binding(alice: Identity, bob: Identity) -> None:
    ct = hpke_box.seal(b"key material", alice.public.kem_key, "dataset-key", dataset="d1", task="t1")
    assert (
        hpke_box.open_sealed(ct, alice.kem_key, "dataset-key", where="t", dataset="d1", task="t1")
        == b"key material"
    )
    for purpose, binding in [
        ("other-purpose", {"dataset": "d1", "task": "t1"}),
        ("dataset-key", {"dataset": "d2", "task": "t1"}),
        ("dataset-key", {"dataset": "d1", "task": "t2"}),
        ("dataset-key", {"dataset": "d1"}),
    ]:
        with pytest.raises(IntegrityError, match="does not open"):
            hpke_box.open_sealed(ct, alice.kem_key, purpose, where="t", **binding)
    with pytest.raises(IntegrityError):  # wrong recipient
        hpke_box.open_sealed(ct, bob.kem_key, "dataset-key", where="t", dataset="d1", task="t1")
    for i in (0, 31, 32, len(ct) - 1):  # flipped bit in enc, ciphertext, tag
        bad = bytearray(ct)
        bad[i] ^= 1
        with pytest.raises(IntegrityError):
            hpke_box.open_sealed(bytes(bad), alice.kem_key, "dataset-key", where="t", dataset="d1", task="t1")
    with pytest.raises(FormatError, match="too short"):
        hpke_box.open_sealed(ct[:20], alice.kem_key, "dataset-key", where="t", dataset="d1", task="t1")
