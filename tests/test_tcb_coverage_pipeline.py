"""confide.enclave.pipeline input side: a missing input is named, the hashing reader covers exactly
the bytes read in order (a re-read or a seek back does not hash twice), fixed padding needs a cap."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from confide.enclave.errors import EnclaveError
from confide.enclave.keys import Identity
from confide.enclave.pipeline import OutputFile, _HashingReader, input_sha256


def test_a_missing_input_is_named(tmp_path: Path) -> None:
    with pytest.raises(EnclaveError, match="cannot open input"):
        input_sha256(str(tmp_path / "absent"), where="input 'a'")
    f = tmp_path / "x"
    f.write_bytes(b"abc" * 1000)
    assert input_sha256(str(f), where="input 'a'") == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_the_hashing_reader_hashes_each_byte_once_in_order(tmp_path: Path) -> None:
    f = tmp_path / "x"
    data = os.urandom(5000)
    f.write_bytes(data)
    with open(f, "rb", buffering=0) as fh:
        r = _HashingReader(fh)
        assert r.readable() and r.seekable()
        buf = bytearray(1000)
        r.readinto(buf)
        assert r.tell() == 1000
        r.seek(0, io.SEEK_END)  # SealedReader asks for the size
        r.seek(500)  # a re-read of bytes already hashed
        r.readinto(buf)
        assert r.hashed == 1500
        while r.readinto(buf):
            pass
        assert r.hashed == 5000 and r.hexdigest() == hashlib.sha256(data).hexdigest()


def test_fixed_padding_needs_a_cap(tmp_path: Path) -> None:
    who = Identity.generate("r")
    with pytest.raises(ValueError, match="fixed padding needs max_bytes"):
        OutputFile(tmp_path / "o", [who.public], {}, pad="fixed")
