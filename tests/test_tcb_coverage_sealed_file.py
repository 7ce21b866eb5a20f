"""confide.enclave.sealed_file under a hostile host: headers with too many, malformed or duplicated
recipients, files cut inside a chunk tag or shrunk while read, misuse of the reader and writer."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

from confide.client.sealing import encrypt_file, open_reader
from confide.enclave.errors import ConfideError, FormatError, IntegrityError, KeyMismatchError
from confide.enclave.keys import Identity
from confide.enclave.sealed_file import (
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_HEADER_LEN,
    MAX_RECIPIENTS,
    MIN_CHUNK_SIZE,
    TAG_LEN,
    SealedReader,
    SealedWriter,
)

WHO = Identity.generate("sealed-file-test")
DATA = bytes(range(256)) * 20  # 5 chunks of 1 KiB


def sealed(data: bytes = DATA, **kw: object) -> bytes:
    buf = io.BytesIO()
    with SealedWriter(buf, recipients=[WHO.public], chunk_size=MIN_CHUNK_SIZE, **kw) as w:  # type: ignore[arg-type]
        w.write(data)
    return buf.getvalue()


def with_header(blob: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    (length,) = struct.unpack(">I", blob[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    obj = json.loads(blob[start : start + length])
    change(obj)
    body = json.dumps(obj).encode()
    return MAGIC + struct.pack(">I", len(body)) + body + blob[start + length :]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda o: o.update(recipients=o["recipients"] * (MAX_RECIPIENTS + 1)),
            f"more than {MAX_RECIPIENTS} recipients",
        ),
        (lambda o: o["recipients"].append("fp"), "recipients[1]: recipient entry must be an object"),
        (lambda o: o["recipients"].append(dict(o["recipients"][0])), "recipients[1]: recipient"),
    ],
)
def test_hostile_recipient_lists_are_refused(change, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FormatError) as info:
        SealedReader(io.BytesIO(with_header(sealed(), change)), where="in.cnfseal")
    assert message in str(info.value) and "in.cnfseal: header" in str(info.value)


def test_a_recipient_listed_twice_is_named() -> None:
    with pytest.raises(FormatError, match="listed twice"):
        SealedReader(
            io.BytesIO(with_header(sealed(), lambda o: o["recipients"].append(dict(o["recipients"][0]))))
        )


@pytest.mark.parametrize("cut", [1, TAG_LEN - 1])
def test_a_file_cut_inside_the_last_chunk_tag_is_refused(cut: int) -> None:
    blob = sealed()
    # the last chunk holds DATA's last 1 KiB + tag; leave `cut` bytes of a new stride after 5 whole chunks
    header_end = len(blob) - (len(DATA) + 5 * TAG_LEN)
    stride = MIN_CHUNK_SIZE + TAG_LEN
    cut_blob = blob[: header_end + 4 * stride + cut]
    with pytest.raises(IntegrityError, match="truncated inside a chunk tag"):
        SealedReader(io.BytesIO(cut_blob))


def test_a_file_that_shrinks_while_read_is_refused() -> None:
    src = io.BytesIO(sealed())
    reader = SealedReader(src).unlock(identity=WHO)
    assert reader.read_chunk(0) == DATA[:MIN_CHUNK_SIZE]
    src.truncate(len(src.getvalue()) - 100)
    with pytest.raises(IntegrityError, match="chunk 4 is short \\(file changed while reading\\?\\)"):
        reader.read_chunk(4)


def test_reader_misuse() -> None:
    reader = SealedReader(io.BytesIO(sealed()))
    with pytest.raises(ValueError, match="unlock\\(\\) the reader first"):
        reader.read_chunk(0)
    with pytest.raises(ValueError, match="unlock needs an identity or a data key"):
        reader.unlock()
    with pytest.raises(KeyMismatchError, match="data key must be 32 bytes"):
        reader.unlock(data_key=b"short")
    reader.unlock(identity=WHO)
    with pytest.raises(IndexError, match="chunk 5 out of range 0..4"):
        reader.read_chunk(5)


def test_writer_misuse_and_limits() -> None:
    with pytest.raises(ValueError, match=f"chunk_size must be within {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"):
        SealedWriter(io.BytesIO(), recipients=[WHO.public], chunk_size=MIN_CHUNK_SIZE - 1)
    with pytest.raises(ValueError, match="needs at least one recipient or an explicit data key"):
        SealedWriter(io.BytesIO())
    with pytest.raises(FormatError, match="header too large"):
        SealedWriter(io.BytesIO(), recipients=[WHO.public], metadata={"x": "y" * MAX_HEADER_LEN})
    w = SealedWriter(io.BytesIO(), recipients=[WHO.public], chunk_size=MIN_CHUNK_SIZE)
    w.write(b"abc")
    with pytest.raises(ValueError, match="write_chunks_from needs an empty writer"):
        w.write_chunks_from(io.BytesIO(b"x"))
    w.close()
    with pytest.raises(ValueError, match="write to a closed SealedWriter"):
        w.write(b"more")


def test_streamed_writes_and_progress() -> None:
    buf = io.BytesIO()
    seen: list[int] = []
    w = SealedWriter(buf, recipients=[WHO.public], chunk_size=MIN_CHUNK_SIZE)
    w.write_chunks_from(io.BytesIO(DATA), progress=seen.append)
    assert sum(seen) == len(DATA) and len(seen) == 5
    reader = SealedReader(io.BytesIO(buf.getvalue())).unlock(identity=WHO)
    out, got = io.BytesIO(), list[int]()
    assert reader.decrypt_to(out, progress=got.append) == len(DATA)
    assert out.getvalue() == DATA and sum(got) == len(DATA)


def test_unreadable_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfideError, match="cannot read input"):
        encrypt_file(tmp_path / "absent", tmp_path / "out", recipients=[WHO.public])
    with pytest.raises(ConfideError, match="cannot read sealed file"):
        open_reader(tmp_path / "absent")
    bad = tmp_path / "bad"
    bad.write_bytes(b"not sealed at all")
    with pytest.raises(FormatError, match="bad magic"):
        open_reader(bad)
