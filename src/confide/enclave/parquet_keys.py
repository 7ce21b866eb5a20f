"""Standard Parquet modular encryption (PME) in the enclave: the KMS client and the reader.

A PME file's columns and footer are encrypted with data keys (DEKs). With double wrapping (parquet-mr's
and pyarrow's default) each DEK is wrapped with a key-encryption key (KEK), and each KEK is wrapped by
the KMS with a master key named by id (``kf`` for the footer, ``kc1``... for columns); the wrapped keys
are the file's *key material*, kept in the footer (internal) or in a JSON file beside it (external:
``_KEY_MATERIAL_FOR_<file name>.json``, as parquet-mr writes it). Here the KMS is the enclave:
:class:`EnclaveKms` is a pyarrow ``KmsClient`` that holds the master keys the enclave opened from a
request sealed to it (they never come from, or go to, the host) and unwraps KEKs in the format of
parquet-mr's ``InMemoryKMS``: ``base64(nonce 12 ‖ AES-GCM ciphertext ‖ tag 16)`` with the master key
id as associated data (AES-GCM from pyca/cryptography; pyarrow does the rest of PME itself).
:func:`read_parquet` opens a plain or PME file into a pyarrow Table.

Where Parquet is parsed: in the sandbox child, never in the enclave process. The file and its key
material are hostile input (a party's upload, or the host's copy of it), and parsing them means
running Arrow's C++ Thrift, JSON and page decoders, a large native attack surface, on them; the
sandbox child is where Confide already runs such parsers (ONNX models are parsed there for
enclave/infer and builtins/onnx_infer.py), behind its rlimits, namespaces, Landlock and seccomp, so
a decoder bug there cannot reach the enclave's keys or state. The enclave process never imports
this module (tests/test_parquet_pme.py checks that): it hands the child the file, its key material
and the master keys released for this run, as input descriptors like any input. What the child
learns is what the function it runs would learn anyway (the plaintext), plus those master keys; so
release to a run only the master keys of that run's files. The zygote pins Arrow's allocator
(sandbox/environment.py) so that importing pyarrow keeps it single-threaded.

Every failure is a ConfideError naming the file: an unknown master key id, a wrong master key or
altered key material (``KeyMismatchError``/``IntegrityError``), a truncated or altered file or bad key
material JSON (``FormatError``); Arrow's own messages are kept, shortened, as the cause.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from confide.enclave.errors import ConfideError, FormatError, IntegrityError, KeyMismatchError

NONCE_BYTES = 12
TAG_BYTES = 16
PARQUET_MAGICS = (b"PAR1", b"PARE")  # plain or plaintext footer; encrypted footer
MASTER_KEY_BYTES = (16, 24, 32)  # AES-128/192/256
MAX_WRAPPED_CHARS = 1024  # a wrapped KEK is ~60 base64 characters
MAX_KEY_MATERIAL_BYTES = 1 << 20
MAX_ERROR_CHARS = 300
DATA_PATH = "/confide/input.parquet"  # the name pyarrow sees; the key material's name derives from it
KEY_MATERIAL_PATH = "/confide/_KEY_MATERIAL_FOR_input.parquet.json"


def check_master_keys(master_keys: Mapping[str, bytes], *, where: str) -> dict[str, bytes]:
    """A copy of `master_keys` (id -> AES key) after checking every id and key."""
    out: dict[str, bytes] = {}
    for key_id, key in master_keys.items():
        if not isinstance(key_id, str) or not key_id or len(key_id) > 256:
            raise FormatError(f"master key id {key_id!r} must be a non-empty string", where=where)
        if not isinstance(key, bytes) or len(key) not in MASTER_KEY_BYTES:
            raise FormatError(
                f"master key {key_id!r} must be 16, 24 or 32 bytes (AES), got "
                f"{len(key) if isinstance(key, bytes) else type(key).__name__}",
                where=where,
            )
        out[key_id] = key
    return out


def wrap_key(key: bytes, master_key_id: str, master_key: bytes) -> str:
    """`key` wrapped like parquet-mr's InMemoryKMS: base64(nonce ‖ AES-GCM(key, aad=master key id))."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(master_key).encrypt(nonce, key, master_key_id.encode("utf-8"))
    return base64.b64encode(nonce + sealed).decode("ascii")


def unwrap_key(wrapped: str | bytes, master_key_id: str, master_key: bytes, *, where: str) -> bytes:
    """The key inside `wrapped` (InMemoryKMS format); IntegrityError if it does not open."""
    if len(wrapped) > MAX_WRAPPED_CHARS:
        raise FormatError(f"a key wrapped with master key {master_key_id!r} is too long", where=where)
    try:
        raw = base64.b64decode(wrapped, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(
            f"a key wrapped with master key {master_key_id!r} is not base64", where=where
        ) from None
    if len(raw) < NONCE_BYTES + TAG_BYTES + 16:
        raise FormatError(
            f"a key wrapped with master key {master_key_id!r} is {len(raw)} bytes, too short", where=where
        )
    try:
        return AESGCM(master_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], master_key_id.encode("utf-8"))
    except InvalidTag:
        raise IntegrityError(
            f"the key wrapped with master key {master_key_id!r} does not open with the master key "
            "released for it (wrong master key, or altered key material)",
            where=where,
        ) from None


class EnclaveKms(pe.KmsClient):  # type: ignore[misc]
    """pyarrow's KMS, answered from master keys the enclave holds; the first failure is kept in
    `failure` (pyarrow turns an exception raised here into its own error text)."""

    def __init__(self, master_keys: Mapping[str, bytes], *, where: str) -> None:
        super().__init__()
        self._keys = check_master_keys(master_keys, where=where)
        self._where = where
        self.failure: ConfideError | None = None

    def _master(self, master_key_id: str) -> bytes:
        key = self._keys.get(master_key_id)
        if key is None:
            raise KeyMismatchError(
                f"needs master key {master_key_id!r}, which was not released for it "
                f"(released: {sorted(self._keys)})",
                where=self._where,
            )
        return key

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        try:
            return wrap_key(key_bytes, master_key_identifier, self._master(master_key_identifier))
        except ConfideError as exc:
            self.failure = self.failure or exc
            raise

    def unwrap_key(self, wrapped_key: str | bytes, master_key_identifier: str) -> bytes:
        try:
            master = self._master(master_key_identifier)
            return unwrap_key(wrapped_key, master_key_identifier, master, where=self._where)
        except ConfideError as exc:
            self.failure = self.failure or exc
            raise


class _OneFile(pafs.FileSystemHandler):  # type: ignore[misc]
    """A read-only filesystem of one file: where pyarrow looks for external key material."""

    def __init__(self, path: str, data: bytes) -> None:
        self._path, self._data = path, data

    def get_type_name(self) -> str:
        return "confide-key-material"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: Sequence[str]) -> list[pafs.FileInfo]:
        return [
            pafs.FileInfo(p, pafs.FileType.File, size=len(self._data))
            if p == self._path
            else pafs.FileInfo(p, pafs.FileType.NotFound)
            for p in paths
        ]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return []

    def open_input_stream(self, path: str) -> pa.NativeFile:
        if path != self._path:
            raise FileNotFoundError(path)
        return pa.BufferReader(self._data)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.open_input_stream(path)

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError("the key material filesystem is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def _check_key_material(raw: bytes, *, where: str) -> None:
    """External key material is a JSON object of strings (each itself a JSON object)."""
    if len(raw) > MAX_KEY_MATERIAL_BYTES:
        raise FormatError(f"key material is {len(raw)} bytes (at most {MAX_KEY_MATERIAL_BYTES})", where=where)
    try:
        doc = json.loads(raw.decode("utf-8"))
        ok = isinstance(doc, dict) and all(
            isinstance(v, str) and isinstance(json.loads(v), dict) for v in doc.values()
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        ok = False
    if not ok:
        raise FormatError("key material is not a JSON object of key-material strings (PKMT1)", where=where)


def _magic(data: bytes, *, where: str) -> bytes:
    head, tail = data[:4], data[-4:]
    if len(data) < 12 or head not in PARQUET_MAGICS or tail != head:
        raise FormatError(
            f"not a Parquet file ({len(data)} bytes; it must begin and end with PAR1 or PARE: truncated?)",
            where=where,
        )
    return head


def read_parquet(
    data: bytes,
    *,
    name: str,
    master_keys: Mapping[str, bytes] | None = None,
    key_material: bytes | None = None,
    columns: Sequence[str] | None = None,
    row_groups: tuple[int, int] | None = None,
) -> pa.Table:
    """The table in `data` (the file named `name` in errors): plain Parquet, or PME with an encrypted
    or plaintext footer when `master_keys` are given, its key material internal or in `key_material`
    (the bytes of the JSON file parquet-mr writes beside it). `row_groups` (part, parts): only the
    row groups [part * G // parts, (part + 1) * G // parts) of the file's G, a dataflow partition."""
    where = f"parquet file {name!r}"
    magic = _magic(data, where=where)
    if magic == b"PARE" and master_keys is None:
        raise KeyMismatchError("is encrypted (PME) and no master keys were released for it", where=where)
    kms: EnclaveKms | None = None
    props = None
    if master_keys is not None:
        kms = EnclaveKms(master_keys, where=where)
        handler = None
        if key_material is not None:
            _check_key_material(key_material, where=where)
            handler = pafs.PyFileSystem(_OneFile(KEY_MATERIAL_PATH, key_material))
        # A fresh factory per file: its KEK cache never carries a key from one file to another.
        factory = pe.CryptoFactory(lambda _config: kms)
        try:
            props = factory.file_decryption_properties(
                pe.KmsConnectionConfig(),
                pe.DecryptionConfiguration(cache_lifetime=timedelta(seconds=1)),
                parquet_file_path=DATA_PATH if handler is not None else None,
                filesystem=handler,
            )
        except Exception as exc:
            raise _failure(kms, exc, where) from None
    try:
        reader = pq.ParquetFile(pa.BufferReader(data), decryption_properties=props)
        cols = list(columns) if columns is not None else None
        if row_groups is None:
            return reader.read(columns=cols, use_threads=False)
        part, parts = row_groups
        n = reader.num_row_groups
        wanted = list(range(part * n // parts, (part + 1) * n // parts))
        return reader.read_row_groups(wanted, columns=cols, use_threads=False)
    except Exception as exc:  # Arrow raises OSError, ArrowInvalid, ArrowException, KeyError...
        raise _failure(kms, exc, where) from None


def _failure(kms: EnclaveKms | None, exc: BaseException, where: str) -> ConfideError:
    if kms is not None and kms.failure is not None:
        return kms.failure
    if "external key material" in str(exc):  # Arrow: "The Parquet file path must be specified when..."
        return KeyMismatchError(
            "keeps its key material in an external file (_KEY_MATERIAL_FOR_<name>.json), which was not given",
            where=where,
        )
    text = " ".join(str(exc).split())[:MAX_ERROR_CHARS]
    return FormatError(f"cannot be read as Parquet: {type(exc).__name__}: {text}", where=where)


# ----------------------------------------------------------------------------------------------
# a PME dataset: the file, its key material and its master keys, sealed together by their owner

BUNDLE_MAGIC = b"CNFPME1\n"
MAX_BUNDLE_HEADER = MAX_KEY_MATERIAL_BYTES + (64 << 10)
BUNDLE_FIELDS = frozenset({"master_keys", "key_material"})


def is_bundle(raw: bytes) -> bool:
    return raw[: len(BUNDLE_MAGIC)] == BUNDLE_MAGIC


def is_parquet(raw: bytes) -> bool:
    """Whether an input is for read_dataset: a PME dataset, or bytes that start like Parquet (a
    truncated or otherwise broken file among them: read_dataset says what is wrong with it)."""
    return is_bundle(raw) or raw[:4] in PARQUET_MAGICS


def parse_bundle(raw: bytes, *, name: str) -> tuple[bytes, dict[str, bytes], bytes | None]:
    """(file, master keys, key material or None) of a PME dataset's plaintext.

    Layout: ``CNFPME1\\n`` ‖ header length (4 bytes, big-endian) ‖ header (JSON: ``master_keys``: id ->
    base64 key; ``key_material``: base64 of the external key material file, or null) ‖ the Parquet
    file. The owner's client packs it (confide.client.pme_dataset) and seals it like any dataset,
    so the master keys travel under the dataset key wrapped to the attested service, and open only
    here, in the sandbox child of a run the owner approved."""
    where = f"parquet dataset {name!r}"
    head = len(BUNDLE_MAGIC) + 4
    if not is_bundle(raw) or len(raw) < head:
        raise FormatError("is not a Confide PME dataset (magic CNFPME1)", where=where)
    size = int.from_bytes(raw[len(BUNDLE_MAGIC) : head], "big")
    if size > MAX_BUNDLE_HEADER or head + size > len(raw):
        raise FormatError(f"header of {size} bytes does not fit the dataset", where=where)
    try:
        header = json.loads(raw[head : head + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError("header is not JSON", where=where) from None
    if not isinstance(header, dict) or set(header) != BUNDLE_FIELDS:
        raise FormatError(f"header must hold exactly {sorted(BUNDLE_FIELDS)}", where=where)
    keys, material = header["master_keys"], header["key_material"]
    if not isinstance(keys, dict) or not keys:
        raise FormatError("master_keys must be a non-empty object (id -> base64 key)", where=where)
    try:
        master = {k: base64.b64decode(v, validate=True) for k, v in keys.items() if isinstance(v, str)}
        material_raw = None if material is None else base64.b64decode(material, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise FormatError("a master key or the key material is not base64", where=where) from None
    if len(master) != len(keys):
        raise FormatError("every master key must be a base64 string", where=where)
    return raw[head + size :], check_master_keys(master, where=where), material_raw


def read_dataset(
    raw: bytes,
    *,
    name: str,
    columns: Sequence[str] | None = None,
    row_groups: tuple[int, int] | None = None,
) -> pa.Table:
    """A Parquet input of a built-in or a dataflow source: a PME dataset (see parse_bundle) or a
    plain Parquet file (see read_parquet for `columns` and `row_groups`)."""
    if not is_bundle(raw):
        return read_parquet(raw, name=name, columns=columns, row_groups=row_groups)
    data, master, material = parse_bundle(raw, name=name)
    return read_parquet(
        data, name=name, master_keys=master, key_material=material, columns=columns, row_groups=row_groups
    )
