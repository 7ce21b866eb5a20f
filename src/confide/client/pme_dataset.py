"""A Parquet file with standard modular encryption (PME) as a Confide dataset, on the owner's machine.

The owner has the file (written by parquet-mr, pyarrow, Spark...), its key material (inside the file,
or in the ``_KEY_MATERIAL_FOR_<name>.json`` file parquet-mr writes beside it) and the master keys its
KMS holds. ``pack`` puts the three in one plaintext (the layout ``confide.enclave.parquet_keys.
parse_bundle`` reads), which is then sealed like any dataset: the master keys leave this machine
only under the dataset key, which is wrapped to the attested service, and open only in the sandbox
child of a task run the owner approved. Before that, ``check`` opens the file here with those keys,
so a wrong key or a missing key material file is found before anything is uploaded.

The master keys file is JSON: master key id -> the key in base64 (16, 24 or 32 bytes), e.g.
``{"kf": "MDEyMzQ1Njc4OTAxMjM0NQ==", "kc1": "..."}``. Keys are never taken on the command line,
where they would stay in the shell's history.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from confide.enclave.errors import ConfideError

# confide.enclave.parquet_keys (and so pyarrow) is imported where used: checking whether a file is
# Parquet must not cost a CSV upload pyarrow's import

KEY_MATERIAL_PREFIX = "_KEY_MATERIAL_FOR_"


def is_parquet(path: Path) -> bool:
    """Whether the file starts like Parquet: PAR1 (plain or plaintext footer) or PARE (encrypted footer)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in (b"PAR1", b"PARE")
    except OSError:
        return False


def load_master_keys(path: Path) -> dict[str, bytes]:
    where = str(path)
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfideError(f"cannot read master keys ({exc.strerror})", where=where) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfideError(f"master keys file is not JSON ({exc})", where=where) from None
    if not isinstance(obj, dict) or not obj:
        raise ConfideError("master keys file must be a JSON object: master key id -> base64 key", where=where)
    from confide.enclave.parquet_keys import check_master_keys

    keys: dict[str, bytes] = {}
    for key_id, value in obj.items():
        try:
            keys[key_id] = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
        except (binascii.Error, ValueError):
            raise ConfideError(f"master key {key_id!r} is not base64", where=where) from None
    return check_master_keys(keys, where=where)


def key_material_beside(path: Path) -> Path | None:
    """parquet-mr's external key material file for `path`, when there is one beside it."""
    candidate = path.with_name(KEY_MATERIAL_PREFIX + path.name + ".json")
    return candidate if candidate.is_file() else None


def pack(data: bytes, master_keys: dict[str, bytes], key_material: bytes | None) -> bytes:
    from confide.enclave.parquet_keys import BUNDLE_MAGIC

    header = json.dumps(
        {
            "master_keys": {k: base64.b64encode(v).decode("ascii") for k, v in sorted(master_keys.items())},
            "key_material": None if key_material is None else base64.b64encode(key_material).decode("ascii"),
        },
        sort_keys=True,
    ).encode("utf-8")
    return BUNDLE_MAGIC + len(header).to_bytes(4, "big") + header + data


def check(bundle: bytes, *, name: str) -> tuple[tuple[str, ...], int]:
    """Open the packed dataset here as the enclave will; its (columns, rows), the metadata the owner
    reveals with it. ConfideError naming the key or the file when it does not open."""
    from confide.enclave.parquet_keys import read_dataset

    table = read_dataset(bundle, name=name)
    return tuple(table.schema.names), table.num_rows


def parquet_shape(path: Path) -> tuple[tuple[str, ...], int]:
    """(columns, rows) of a plain Parquet file, from its footer; ConfideError when it is not one."""
    import pyarrow.parquet as pq

    with open(path, "rb") as fh:
        encrypted_footer = fh.read(4) == b"PARE"
    if encrypted_footer:
        raise ConfideError(
            "is Parquet with modular encryption (encrypted footer): give its master keys with --pme-keys",
            where=str(path),
        )
    try:
        meta = pq.ParquetFile(path)
        return tuple(meta.schema_arrow.names), meta.metadata.num_rows
    except Exception as exc:  # Arrow's OSError / ArrowInvalid on a file that is not Parquet
        raise ConfideError(f"not a readable Parquet file ({str(exc)[:200]})", where=str(path)) from None
