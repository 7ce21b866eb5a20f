"""What data owners and recipients do around a dataflow job: seal inputs, open sealed results.

``open_result`` accepts an output only as the enclave's sealed manifest describes it: every part
named there, each with the SHA-256 the enclave recorded while writing it, none left out, all of this
job. The manifest is written only after the job passed the completeness verification.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from confide.enclave.encoding import parse_json_object
from confide.enclave.errors import IntegrityError
from confide.enclave.flow.driver import dec
from confide.enclave.flow.task import manifest_name
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.sealed_file import DEFAULT_CHUNK_SIZE, SealedReader, SealedWriter, write_atomically


def seal_text(
    path: str | Path,
    data: str | bytes | Iterable[str],
    recipients: Sequence[PublicIdentity],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Path:
    """Seal text (a str, bytes, or lines without line ends) as an input for a dataflow job."""
    if isinstance(data, str):
        raw = data.encode("utf-8")
    elif isinstance(data, bytes):
        raw = data
    else:
        raw = "".join(line + "\n" for line in data).encode("utf-8")

    def fill(fh: Any) -> None:
        with SealedWriter(fh, recipients=recipients, chunk_size=chunk_size) as w:
            w.write(raw)

    write_atomically(Path(path), fill)
    return Path(path)


def _read(path: Path, identity: Identity) -> tuple[SealedReader, bytes]:
    with open(path, "rb") as fh:
        blob = fh.read()
    reader = SealedReader(io.BytesIO(blob), where=str(path)).unlock(identity=identity)
    return reader, blob


def open_manifest(out_dir: str | Path, name: str, identity: Identity) -> dict[str, Any]:
    path = Path(out_dir) / manifest_name(name)
    reader, _ = _read(path, identity)
    return parse_json_object(b"".join(bytes(c) for c in reader.iter_chunks()), where=str(path))


def open_result(out_dir: str | Path, name: str, identity: Identity) -> list[Any]:
    """The records of output `name`, in partition order, after checking them against the manifest."""
    manifest = open_manifest(out_dir, name, identity)
    out = manifest["outputs"][name]
    files = sorted(out["files"], key=lambda f: f["part"])
    if [f["part"] for f in files] != list(range(out["partitions"])):
        raise IntegrityError("the manifest does not list every part", where=name)
    records: list[Any] = []
    for f in files:
        path = Path(out_dir) / f["file"]
        reader, blob = _read(path, identity)
        if hashlib.sha256(blob).hexdigest() != f["sha256"]:
            raise IntegrityError("part file is not the one the enclave wrote (SHA-256)", where=str(path))
        meta = reader.header.metadata.get("confide_flow", {})
        if meta != {"job": manifest["job"], "output": name, "part": f["part"]}:
            raise IntegrityError("part file of another job or output", where=str(path))
        text = b"".join(bytes(c) for c in reader.iter_chunks()).decode("utf-8")
        lines = text.split("\n")[:-1] if text else []
        if out["format"] == "text":
            records.extend(lines)
        else:
            records.extend(dec(json.loads(line)) for line in lines)
        if len(lines) != f["records"]:
            raise IntegrityError("part file has another record count than the manifest", where=str(path))
    return records
