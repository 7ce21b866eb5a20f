"""confide.enclave.padding: buckets, the length trailer, and what a hostile host or party can hand the
recipient's unpadding (truncated, malformed or lying trailers, non-zero padding)."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.enclave.errors import FormatError, IntegrityError
from confide.enclave.padding import (
    MIN_POW2_BUCKET,
    TRAILER,
    check_pad,
    describe_pad,
    pad_bytes,
    padded_size,
    trailer,
    unpad_bytes,
    unpad_file,
)


@pytest.mark.parametrize("value", ["pow2", 16, 4096, 1 << 30])
def test_check_pad_accepts_pow2_and_bucket_sizes(value: object) -> None:
    assert check_pad(value, "manifest.outputs[0].pad") == value


@pytest.mark.parametrize("value", [True, False, 15, 0, -16, (1 << 30) + 1, 64.0, "64", "POW2", None, [64]])
def test_check_pad_refuses_everything_else_naming_where(value: object) -> None:
    with pytest.raises(FormatError) as info:
        check_pad(value, "manifest.outputs[0].pad")
    assert "pad must be" in str(info.value)
    assert "manifest.outputs[0].pad" in str(info.value)


def test_pow2_buckets() -> None:
    assert padded_size(0, "pow2") == MIN_POW2_BUCKET
    assert padded_size(MIN_POW2_BUCKET - TRAILER, "pow2") == MIN_POW2_BUCKET
    assert padded_size(MIN_POW2_BUCKET - TRAILER + 1, "pow2") == 2 * MIN_POW2_BUCKET
    assert padded_size(1000, "pow2") == 1024
    assert padded_size(1024 - TRAILER + 1, "pow2") == 2048


def test_multiple_buckets() -> None:
    assert padded_size(0, 100) == 100
    assert padded_size(84, 100) == 100
    assert padded_size(85, 100) == 200
    assert padded_size(184, 100) == 200


@pytest.mark.parametrize("n", [0, 1, 47, 48, 49, 1000])
def test_round_trip_and_the_host_sees_only_the_bucket(n: int, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    data = data[:n]
    total = padded_size(n, "pow2")
    padded = pad_bytes(data, total)
    assert len(padded) == total
    assert padded.endswith(trailer(n)) and trailer(n) == b"%016x" % n
    assert unpad_bytes(padded, where="t") == data
    f = tmp_path / "out"
    f.write_bytes(padded)
    assert unpad_file(f, where="t") == n
    assert f.read_bytes() == data


def test_two_sizes_in_one_bucket_are_indistinguishable_by_length() -> None:
    assert len(pad_bytes(b"x", padded_size(1, 4096))) == len(pad_bytes(b"x" * 4000, padded_size(4000, 4096)))


def test_pad_bytes_refuses_a_bucket_too_small() -> None:
    with pytest.raises(ValueError, match="bucket smaller"):
        pad_bytes(b"abc", 3 + TRAILER - 1)


def test_describe_pad() -> None:
    assert "exact size visible" in describe_pad(None)
    assert "power of two" in describe_pad("pow2")
    assert "multiple of 512" in describe_pad(512)


# -- hostile padded outputs, in memory and on disk ---------------------------------------------------
GOOD = pad_bytes(b"secret", 64)


def _bad(name: str) -> bytes:
    return {
        "truncated": GOOD[: TRAILER - 1],
        "empty": b"",
        "trailer-upper-hex": GOOD[:-TRAILER] + b"%016X" % 0xAB,
        "trailer-not-hex": GOOD[:-TRAILER] + b"000000000000000g",
        "trailer-short": GOOD[:-1],  # the trailer now ends one byte early: reads as non-hex/too long
        "length-too-long": GOOD[:-TRAILER] + trailer(64 - TRAILER + 1),
        "length-huge": GOOD[:-TRAILER] + b"ffffffffffffffff",
        "non-zero-padding": GOOD[:10] + b"\x01" + GOOD[11:],
        "padding-cut-to-data": b"secret" + trailer(7),
    }[name]


BAD = [
    "truncated",
    "empty",
    "trailer-upper-hex",
    "trailer-not-hex",
    "trailer-short",
    "length-too-long",
    "length-huge",
    "non-zero-padding",
    "padding-cut-to-data",
]


@pytest.mark.parametrize("name", BAD)
def test_unpad_bytes_refuses_hostile_padding(name: str) -> None:
    with pytest.raises(IntegrityError) as info:
        unpad_bytes(_bad(name), where="results/out")
    assert "padded output" in str(info.value) and "results/out" in str(info.value)


@pytest.mark.parametrize("name", BAD)
def test_unpad_file_refuses_hostile_padding_and_leaves_the_file(name: str, tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_bytes(_bad(name))
    with pytest.raises(IntegrityError) as info:
        unpad_file(f, where="results/out")
    assert "padded output" in str(info.value) and "results/out" in str(info.value)
    assert f.read_bytes() == _bad(name)  # not truncated to a length the trailer lied about


def test_unpad_file_checks_padding_zeros_beyond_one_block(tmp_path: Path) -> None:
    import confide.enclave.padding as padding

    n = 10
    total = 3 * padding._BLOCK + 100
    data = bytearray(pad_bytes(b"y" * n, total))
    f = tmp_path / "big"
    f.write_bytes(bytes(data))
    assert unpad_file(f, where="t") == n and f.read_bytes() == b"y" * n
    data[2 * padding._BLOCK + 5] = 7  # one stray byte deep in the padding, past the first block
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="non-zero padding"):
        unpad_file(f, where="t")
    assert f.stat().st_size == total
