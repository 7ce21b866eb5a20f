"""Sealed files: round trips at chunk boundaries and every tamper the format must catch."""

from __future__ import annotations

import contextlib
import io
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from confide.client.sealing import decrypt_file, encrypt_file, encrypt_stream
from confide.enclave.errors import ConfideError, FormatError, IntegrityError, KeyMismatchError
from confide.enclave.keys import Identity
from confide.enclave.sealed_file import MAC_LEN, TAG_LEN, SealedReader, SealedWriter

CS = 1024  # smallest chunk size: many chunks from little data


def seal(data: bytes, *recipients: Identity, chunk_size: int = CS, metadata: dict | None = None) -> bytes:
    out = io.BytesIO()
    encrypt_stream(
        io.BytesIO(data),
        out,
        recipients=[r.public for r in recipients],
        chunk_size=chunk_size,
        metadata=metadata,
    )
    return out.getvalue()


def unseal(blob: bytes, who: Identity) -> bytes:
    out = io.BytesIO()
    SealedReader(io.BytesIO(blob)).unlock(identity=who).decrypt_to(out)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 3 * CS, 3 * CS + 17])
def test_round_trip_at_chunk_boundaries(size: int, alice: Identity) -> None:
    data = os.urandom(size)
    blob = seal(data, alice, metadata={"dataset": "d1"})
    reader = SealedReader(io.BytesIO(blob)).unlock(identity=alice)
    assert reader.plaintext_size == size
    assert reader.n_chunks == max(1, -(-size // CS))
    assert reader.header.metadata == {"dataset": "d1"}
    assert unseal(blob, alice) == data


def test_streaming_writes_of_any_size_give_the_same_plaintext(alice: Identity) -> None:
    data = os.urandom(5 * CS + 3)
    out = io.BytesIO()
    with SealedWriter(out, recipients=[alice.public], chunk_size=CS) as w:
        for piece in (data[:1], data[1:2000], data[2000:2001], data[2001:]):
            w.write(piece)
    assert unseal(out.getvalue(), alice) == data


def test_random_access_to_chunk_i(alice: Identity) -> None:
    data = os.urandom(10 * CS + 5)
    reader = SealedReader(io.BytesIO(seal(data, alice))).unlock(identity=alice)
    for i in (7, 0, 10, 3):
        assert reader.read_chunk(i) == data[i * CS : (i + 1) * CS]
    with pytest.raises(IndexError):
        reader.read_chunk(11)


def test_several_recipients_each_open_it(alice: Identity, bob: Identity) -> None:
    blob = seal(b"shared", alice, bob)
    assert unseal(blob, alice) == unseal(blob, bob) == b"shared"


def test_wrong_recipient_is_told_who_the_file_is_for(alice: Identity, bob: Identity) -> None:
    blob = seal(b"for alice", alice)
    with pytest.raises(
        KeyMismatchError, match=f"not addressed to identity {bob.fingerprint}.*{alice.fingerprint}"
    ):
        unseal(blob, bob)


def test_wrong_data_key_fails_header_authentication(alice: Identity) -> None:
    blob = seal(b"x" * 3000, alice)
    with pytest.raises(IntegrityError, match="header authentication failed"):
        SealedReader(io.BytesIO(blob)).unlock(data_key=os.urandom(32))


def body_offset(blob: bytes) -> int:
    (hlen,) = struct.unpack(">I", blob[8:12])
    return 12 + hlen + MAC_LEN


def test_every_flipped_bit_position_is_caught(alice: Identity) -> None:
    blob = seal(os.urandom(3 * CS + 100), alice, metadata={"k": "v"})
    # every byte of a small file: header, MAC, each chunk, each tag
    for pos in range(0, len(blob), 7):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(ConfideError):
            unseal(bytes(bad), alice)


def test_truncation_at_a_chunk_boundary_is_reported_as_truncation(alice: Identity) -> None:
    blob = seal(os.urandom(3 * CS + 100), alice)
    cut = blob[: body_offset(blob) + 2 * (CS + TAG_LEN)]
    with pytest.raises(IntegrityError, match="truncated: chunk 1 is the last present but not the final"):
        unseal(cut, alice)


@pytest.mark.parametrize("cut", [1, 5, TAG_LEN, CS])
def test_truncation_inside_a_chunk(alice: Identity, cut: int) -> None:
    blob = seal(os.urandom(3 * CS + 100), alice)
    with pytest.raises(IntegrityError):
        unseal(blob[:-cut] if cut < 116 else blob[: len(blob) - 116 - cut], alice)


def test_truncated_header_and_empty_body(alice: Identity) -> None:
    blob = seal(b"abc", alice)
    for n in (0, 4, 8, 11, 20, body_offset(blob) - 1):
        with pytest.raises(FormatError):
            SealedReader(io.BytesIO(blob[:n]))
    with pytest.raises(IntegrityError, match="no final chunk"):
        SealedReader(io.BytesIO(blob[: body_offset(blob)]))


def test_reordered_chunks_fail(alice: Identity) -> None:
    blob = seal(os.urandom(4 * CS), alice)
    off, stride = body_offset(blob), CS + TAG_LEN
    chunks = [blob[off + i * stride : off + (i + 1) * stride] for i in range(4)]
    swapped = blob[:off] + chunks[1] + chunks[0] + chunks[2] + chunks[3]
    with pytest.raises(IntegrityError, match="chunk 0 of 4 failed authentication"):
        unseal(swapped, alice)


def test_data_appended_after_final_chunk(alice: Identity) -> None:
    blob = seal(os.urandom(2 * CS), alice)  # exactly two full chunks; the second is final
    off, stride = body_offset(blob), CS + TAG_LEN
    extra = blob + blob[off : off + stride]  # a copy of chunk 0 as chunk 2
    with pytest.raises(IntegrityError):
        unseal(extra, alice)
    # the honest final chunk is now followed by data: reported as such
    with pytest.raises(IntegrityError, match="data follows the final chunk|chunk 2"):
        unseal(blob + blob[-stride:], alice)


def test_chunk_spliced_from_another_file_with_the_same_key_fails(alice: Identity) -> None:
    key = os.urandom(32)
    a, b = io.BytesIO(), io.BytesIO()
    for dst in (a, b):
        with SealedWriter(dst, data_key=key, chunk_size=CS) as w:
            w.write(os.urandom(3 * CS))
    blob_a, blob_b = a.getvalue(), b.getvalue()
    off, stride = body_offset(blob_a), CS + TAG_LEN
    spliced = blob_a[: off + stride] + blob_b[off + stride : off + 2 * stride] + blob_a[off + 2 * stride :]
    reader = SealedReader(io.BytesIO(spliced)).unlock(data_key=key)
    with pytest.raises(IntegrityError, match="chunk 1 of 3 failed authentication"):
        reader.decrypt_to(io.BytesIO())


def test_header_of_another_file_fails(alice: Identity) -> None:
    a, b = seal(b"a" * 5000, alice), seal(b"b" * 5000, alice)
    mixed = a[: body_offset(a)] + b[body_offset(b) :]
    with pytest.raises(IntegrityError):
        unseal(mixed, alice)


def test_unknown_header_fields_and_versions_rejected(alice: Identity) -> None:
    import json

    blob = seal(b"abc", alice)
    (hlen,) = struct.unpack(">I", blob[8:12])
    header = json.loads(blob[12 : 12 + hlen])
    for change, msg in [
        ({"extra": 1}, "unknown field"),
        ({"version": 2}, "unsupported format version 2"),
        ({"chunk_size": 7}, "chunk_size 7 outside"),
        ({"alg": "AES-128-CBC"}, "unsupported algorithm"),
    ]:
        body = json.dumps({**header, **change}).encode()
        forged = blob[:8] + struct.pack(">I", len(body)) + body + blob[12 + hlen :]
        with pytest.raises(FormatError, match=msg):
            SealedReader(io.BytesIO(forged))
    with pytest.raises(FormatError, match="bad magic"):
        SealedReader(io.BytesIO(b"NOTSEAL!" + blob[8:]))
    huge = blob[:8] + struct.pack(">I", 1 << 30) + blob[12:]
    with pytest.raises(FormatError, match="exceeds"):
        SealedReader(io.BytesIO(huge))


def test_file_helpers_write_nothing_on_failure(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    src = tmp_path / "plain.csv"
    src.write_bytes(b"a,b\n1,2\n" * 1000)
    sealed = tmp_path / "plain.sealed"
    encrypt_file(src, sealed, recipients=[alice.public], chunk_size=CS)
    out = tmp_path / "out.csv"
    decrypt_file(sealed, out, identity=alice)
    assert out.read_bytes() == src.read_bytes()
    # tamper the last chunk: earlier chunks decrypt, but no partial plaintext may be left behind
    data = bytearray(sealed.read_bytes())
    data[-1] ^= 1
    sealed.write_bytes(bytes(data))
    bad_out = tmp_path / "bad.csv"
    with pytest.raises(IntegrityError):
        decrypt_file(sealed, bad_out, identity=alice)
    assert not bad_out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(KeyMismatchError):
        decrypt_file(sealed, bad_out, identity=bob)
    assert sealed.read_bytes() == bytes(data)  # input left intact


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_never_escape_as_other_errors(alice: Identity, blob: bytes) -> None:
    with contextlib.suppress(ConfideError):
        SealedReader(io.BytesIO(blob)).unlock(identity=alice).decrypt_to(io.BytesIO())


_VALID: dict[str, bytes] = {}


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutations_of_a_valid_file_always_fail_cleanly(data: st.DataObject) -> None:
    if "blob" not in _VALID:
        ident = Identity.generate()
        _VALID["key"] = ident.private_bytes()
        _VALID["blob"] = seal(os.urandom(2 * CS + 10), ident, metadata={"m": 1})
    ident = Identity.from_private_bytes(_VALID["key"], where="t")
    blob = bytearray(_VALID["blob"])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255).filter(lambda b, p=pos: b != blob[p]))
    cut = data.draw(st.integers(0, len(blob)))
    mutated = bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob)
    # two mutations of one byte can put the original back (found by CI: 0 then 45 at one position)
    assume(mutated != _VALID["blob"])
    with pytest.raises(ConfideError):
        unseal(mutated, ident)


class _Zeros(io.RawIOBase):
    """A readable stream of `n` zero bytes that holds nothing in memory."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        k = min(len(buf), self.left)
        buf[:k] = bytes(k)
        self.left -= k
        return k


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)


def _peaks(path: Path, who: Identity, mib: int) -> tuple[int, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        with open(path, "wb") as dst:
            encrypt_stream(_Zeros(mib << 20), dst, recipients=[who.public])  # type: ignore[arg-type]
        _, enc_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = _Sink()
        with open(path, "rb", buffering=0) as src:
            SealedReader(src).unlock(identity=who).decrypt_to(sink)  # type: ignore[arg-type]
        _, dec_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.count == mib << 20
    return enc_peak, dec_peak


def test_encrypting_and_decrypting_use_memory_independent_of_file_size(
    tmp_path: Path, alice: Identity
) -> None:
    small = _peaks(tmp_path / "small.sealed", alice, 4)
    big = _peaks(tmp_path / "big.sealed", alice, 128)
    # a few 1 MiB chunk buffers (and the test stream's own 1 MiB block) for 4 MiB and 128 MiB alike
    assert big[0] < 6 << 20 and big[1] < 3 << 20, big
    assert abs(big[0] - small[0]) < 64 << 10 and abs(big[1] - small[1]) < 64 << 10, (small, big)
