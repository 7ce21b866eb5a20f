"""Parquet modular encryption in the enclave (enclave/parquet_keys.py): the file parquet-mr 1.12.0 wrote
(../shared/testvectors/parquet, double wrapping, external key material) decrypts to its documented
contents; wrong or missing master keys, altered key material, flipped bytes and truncations fail with
a ConfideError naming the file; pyarrow's own PME files (internal key material) round-trip; and the
reader runs in the real sandbox child, where Confide parses Parquet."""

from __future__ import annotations

import ast
import base64
import json
import random
import struct
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest

from confide.enclave import measurement
from confide.enclave import parquet_keys as pk
from confide.enclave.errors import ConfideError, FormatError, IntegrityError, KeyMismatchError
from confide.enclave.sandbox import SandboxLimits, Zygote, make_input_memfd

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "parquet"
JAVA_FILE = VECTORS / "external_key_material_java.parquet.encrypted"
JAVA_KEY_MATERIAL = VECTORS / "_KEY_MATERIAL_FOR_external_key_material_java.parquet.encrypted.json"
MASTER_KEYS = {"kf": b"0123456789012345", "kc1": b"1234567890123450", "kc2": b"1234567890123451"}
STRINGS = [f"{'abcdefghij'[i % 10]}{i}" for i in range(100)]

pytestmark = pytest.mark.skipif(not JAVA_FILE.exists(), reason="../shared/testvectors/parquet is missing")


def java() -> tuple[bytes, bytes]:
    return JAVA_FILE.read_bytes(), JAVA_KEY_MATERIAL.read_bytes()


def read_java(data: bytes, key_material: bytes, keys: dict[str, bytes] = MASTER_KEYS) -> pa.Table:
    return pk.read_parquet(data, name="java.parquet", master_keys=keys, key_material=key_material)


def assert_documented_contents(table: pa.Table) -> None:
    assert table.num_rows == 100
    assert table.column_names == ["integers", "strings"]
    integers = table.column("integers").to_pylist()
    assert integers == list(range(100))
    assert sum(integers) == 4950
    assert table.column("strings").to_pylist() == STRINGS


def write_pme(table: pa.Table, *, plaintext_footer: bool = False, double_wrapping: bool = True) -> bytes:
    """A PME file written by pyarrow, keys wrapped by the enclave's KMS, key material in the footer."""
    kms = pk.EnclaveKms(MASTER_KEYS, where="writer")
    config = pe.EncryptionConfiguration(
        footer_key="kf",
        column_keys={"kc1": ["integers"], "kc2": ["strings"]},
        encryption_algorithm="AES_GCM_V1",
        plaintext_footer=plaintext_footer,
        double_wrapping=double_wrapping,
        internal_key_material=True,
        cache_lifetime=timedelta(seconds=1),
    )
    props = pe.CryptoFactory(lambda _config: kms).file_encryption_properties(pe.KmsConnectionConfig(), config)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, encryption_properties=props)
    return bytes(sink.getvalue().to_pybytes())


def sample_table() -> pa.Table:
    return pa.table({"integers": pa.array(range(100), pa.int32()), "strings": STRINGS})


def unauthenticated(data: bytes, key_material: bytes | None) -> set[int]:
    """Bytes of a PME file (encrypted footer) that no AES-GCM tag covers: the page indexes between
    the last column chunk and the footer (parquet-mr writes them, Arrow's reader never reads them),
    and the plaintext FileCryptoMetaData before the encrypted footer (algorithm, AAD file id, footer
    key metadata: altering what matters there makes a key or an AAD wrong, so a tag fails)."""
    fs = None if key_material is None else pa.fs.PyFileSystem(pk._OneFile(pk.KEY_MATERIAL_PATH, key_material))
    kms = pk.EnclaveKms(MASTER_KEYS, where="test")
    props = pe.CryptoFactory(lambda _c: kms).file_decryption_properties(
        pe.KmsConnectionConfig(), parquet_file_path=pk.DATA_PATH if fs else None, filesystem=fs
    )
    rg = pq.ParquetFile(pa.BufferReader(data), decryption_properties=props).metadata.row_group(0)
    chunks_end = max(
        rg.column(i).file_offset + rg.column(i).total_compressed_size for i in range(rg.num_columns)
    )
    (footer_len,) = struct.unpack("<I", data[-8:-4])
    footer_start = len(data) - 8 - footer_len
    # the encrypted footer is a length-prefixed module that ends at the trailer
    encrypted_start = next(
        i
        for i in range(footer_start, len(data) - 8)
        if struct.unpack("<I", data[i : i + 4])[0] == len(data) - 12 - i
    )
    return set(range(chunks_end, footer_start)) | set(range(footer_start, encrypted_start))


def assert_flips_fail_or_change_nothing(data: bytes, key_material: bytes | None, name: str) -> None:
    """Every single flipped byte either fails with a ConfideError naming the file, or (only where no
    tag covers it) leaves what is read exactly as it was."""

    def read(blob: bytes) -> pa.Table:
        return pk.read_parquet(blob, name=name, master_keys=MASTER_KEYS, key_material=key_material)

    original = read(data)
    uncovered = unauthenticated(data, key_material)
    unnoticed = []
    for i in range(len(data)):
        altered = bytearray(data)
        altered[i] ^= 1 << (i % 8)
        try:
            table = read(bytes(altered))
        except ConfideError as exc:
            assert f"parquet file {name!r}" in str(exc)
            continue
        assert table.equals(original), f"byte {i} altered the contents without an error"
        unnoticed.append(i)
    assert [i for i in unnoticed if i not in uncovered] == []
    assert len(unnoticed) < len(data) // 5


# -- the file parquet-mr wrote ------------------------------------------------------------------


def test_parquet_mr_file_decrypts_to_its_documented_contents() -> None:
    data, key_material = java()
    assert data[:4] == data[-4:] == b"PARE"  # encrypted footer
    assert_documented_contents(read_java(data, key_material))


def test_parquet_mr_keks_open_in_the_inmemory_kms_format() -> None:
    _, key_material = java()
    for doc in json.loads(key_material).values():
        entry = json.loads(doc)
        mk = entry["masterKeyID"]
        kek = pk.unwrap_key(entry["wrappedKEK"], mk, MASTER_KEYS[mk], where="t")
        assert len(kek) == 16
        other = next(k for k in MASTER_KEYS if k != mk)  # the id is the associated data
        with pytest.raises(IntegrityError, match=other):
            pk.unwrap_key(entry["wrappedKEK"], other, MASTER_KEYS[mk], where="t")
    wrapped = pk.wrap_key(b"k" * 16, "kf", MASTER_KEYS["kf"])
    assert pk.unwrap_key(wrapped, "kf", MASTER_KEYS["kf"], where="t") == b"k" * 16
    assert len(base64.b64decode(wrapped)) == 12 + 16 + 16


@pytest.mark.parametrize("key_id", ["kf", "kc1", "kc2"])
def test_a_wrong_master_key_fails_naming_it_and_the_file(key_id: str) -> None:
    data, key_material = java()
    keys = {**MASTER_KEYS, key_id: b"5" * 16}
    with pytest.raises(IntegrityError, match=rf"parquet file 'java.parquet'.*master key '{key_id}'"):
        read_java(data, key_material, keys)


def test_missing_master_key_or_key_material_fails_clearly() -> None:
    data, key_material = java()
    keys = {k: v for k, v in MASTER_KEYS.items() if k != "kc1"}
    with pytest.raises(KeyMismatchError, match=r"'kc1', which was not released"):
        read_java(data, key_material, keys)
    with pytest.raises(KeyMismatchError, match="no master keys were released"):
        pk.read_parquet(data, name="java.parquet")
    with pytest.raises(KeyMismatchError, match="external file"):
        pk.read_parquet(data, name="java.parquet", master_keys=MASTER_KEYS)
    with pytest.raises(FormatError, match="master key 'kf' must be 16, 24 or 32 bytes"):
        read_java(data, key_material, {**MASTER_KEYS, "kf": b"short"})


def test_bad_or_altered_key_material_fails_clearly() -> None:
    data, key_material = java()
    for bad in (b"", b"{", b"[]", b'{"footerKey": 1}', b'{"footerKey": "[1]"}', b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(FormatError, match="key material is not a JSON object"):
            read_java(data, bad)
    doc = json.loads(key_material)
    footer = json.loads(doc["footerKey"])
    for field, value in (
        (
            "wrappedKEK",
            footer["wrappedKEK"][:10]
            + ("A" if footer["wrappedKEK"][10] != "A" else "B")
            + footer["wrappedKEK"][11:],
        ),
        (
            "wrappedDEK",
            footer["wrappedDEK"][:10]
            + ("A" if footer["wrappedDEK"][10] != "A" else "B")
            + footer["wrappedDEK"][11:],
        ),
        ("wrappedKEK", "not base64!"),
        ("masterKeyID", "kc1"),
        ("keyMaterialType", "PKMT9"),
    ):
        altered = json.dumps({**doc, "footerKey": json.dumps({**footer, field: value})}).encode()
        with pytest.raises(ConfideError, match="parquet file 'java.parquet'"):
            read_java(data, altered)


def test_every_flipped_byte_fails_or_leaves_the_contents_unchanged() -> None:
    """Each module Arrow reads (footer, page headers, pages) is AES-GCM authenticated: flipping any
    of their bytes fails. Of the parquet-mr file's 2922 bytes, only the page indexes Arrow does not
    read and framing of the plaintext crypto metadata may flip unnoticed, and then nothing read changes."""
    data, key_material = java()
    assert len(unauthenticated(data, key_material)) > 0
    assert_flips_fail_or_change_nothing(data, key_material, "java.parquet")


# -- files pyarrow writes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plaintext_footer", "double_wrapping"), [(False, True), (True, True), (False, False)]
)
def test_pyarrow_pme_round_trips_with_internal_key_material(
    plaintext_footer: bool, double_wrapping: bool
) -> None:
    data = write_pme(sample_table(), plaintext_footer=plaintext_footer, double_wrapping=double_wrapping)
    assert data[:4] == (b"PAR1" if plaintext_footer else b"PARE")
    table = pk.read_parquet(data, name="mine.parquet", master_keys=MASTER_KEYS)
    assert_documented_contents(table)
    assert (
        pk.read_parquet(data, name="mine.parquet", master_keys=MASTER_KEYS, columns=["integers"]).num_columns
        == 1
    )
    with pytest.raises(IntegrityError, match="master key 'kc2'"):
        pk.read_parquet(data, name="mine.parquet", master_keys={**MASTER_KEYS, "kc2": b"6" * 16})


def test_every_flipped_byte_of_a_pyarrow_pme_file_fails_or_changes_nothing() -> None:
    assert_flips_fail_or_change_nothing(write_pme(sample_table()), None, "mine.parquet")


def test_plain_parquet_reads_without_keys() -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(sample_table(), sink)
    data = bytes(sink.getvalue().to_pybytes())
    assert_documented_contents(pk.read_parquet(data, name="plain.parquet"))
    with pytest.raises(FormatError, match="not a Parquet file"):
        pk.read_parquet(b"id,x\n1,2\n", name="plain.parquet")


def test_fuzz_truncations_and_bit_flips_fail_closed() -> None:
    """Bounded (about 4 s): truncations and random multi-bit flips of both files; every read raises a
    ConfideError naming the file, or (flips only where no tag covers) returns the original."""
    rng = random.Random(20261201)
    java_data, key_material = java()
    mine = write_pme(sample_table())
    cases = [
        (
            java_data,
            key_material,
            read_java(java_data, key_material),
            unauthenticated(java_data, key_material),
        ),
        (
            mine,
            None,
            pk.read_parquet(mine, name="java.parquet", master_keys=MASTER_KEYS),
            unauthenticated(mine, None),
        ),
    ]
    deadline = time.monotonic() + 4.0
    runs = 0
    while time.monotonic() < deadline:
        data, km, original, uncovered = cases[runs % 2]
        altered = bytearray(data)
        flipped: list[int] = []
        if rng.random() < 0.3:
            altered = altered[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(data))
                altered[i] ^= 1 << rng.randrange(8)
                flipped.append(i)
        if bytes(altered) == data:
            continue
        runs += 1
        try:
            table = pk.read_parquet(
                bytes(altered), name="java.parquet", master_keys=MASTER_KEYS, key_material=km
            )
        except ConfideError as exc:
            assert "parquet file 'java.parquet'" in str(exc)
            continue
        assert flipped and all(i in uncovered for i in flipped), flipped
        assert table.equals(original)
    assert runs > 200


# -- where it runs ------------------------------------------------------------------------------

CHILD_SOURCE = """
def run(ctx):
    import json
    from confide.enclave.parquet_keys import read_parquet
    keys = {k: bytes.fromhex(v) for k, v in json.loads(ctx.inputs["keys"].read()).items()}
    table = read_parquet(
        ctx.inputs["data"].read(), name="data", master_keys=keys, key_material=ctx.inputs["key_material"].read()
    )
    ctx.outputs["result"].write(json.dumps(table.to_pydict()).encode())
"""


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_the_reader_runs_in_the_strict_sandbox_child() -> None:
    zygote = Zygote.start(strict=True, preimport=("confide.enclave.parquet_keys",))
    try:
        data, key_material = java()
        for keys, ok in ((MASTER_KEYS, True), ({**MASTER_KEYS, "kc2": b"7" * 16}, False)):
            sink = Sink()
            inputs = {
                "data": make_input_memfd(data),
                "key_material": make_input_memfd(key_material),
                "keys": make_input_memfd(json.dumps({k: v.hex() for k, v in keys.items()}).encode()),
            }
            result = zygote.run(
                CHILD_SOURCE, params={}, inputs=inputs, outputs={"result": sink}, limits=SandboxLimits()
            )
            assert result.ok is ok, result.detail[-2000:]
            if ok:
                assert json.loads(sink.data) == {"integers": list(range(100)), "strings": STRINGS}
            else:
                assert result.category == "exception"
                assert "IntegrityError: parquet file 'data'" in result.detail and "'kc2'" in result.detail
    finally:
        zygote.close()


# functions of enclave-process modules that run only in the sandbox child (the module's source is
# sent to the zygote as a run's source, like a built-in's)
CHILD_ONLY_FUNCTIONS = {("flow", "driver.py"): "_parquet_rows"}


def test_no_enclave_process_module_imports_the_parquet_reader() -> None:
    offenders = []
    for path in measurement.tcb_files():
        if path.suffix != ".py" or path.name == "parquet_keys.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        child_fn = CHILD_ONLY_FUNCTIONS.get((path.parent.name, path.name))
        child_nodes = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name == child_fn
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if id(node) in child_nodes:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            else:
                continue
            if path.parent.name == "builtins":  # read as text and run in the sandbox child
                continue
            if any(n.endswith("parquet_keys") or n.split(".")[0] == "pyarrow" for n in names):
                offenders.append(path.relative_to(measurement.TCB_ROOT).as_posix())
    assert offenders == []
