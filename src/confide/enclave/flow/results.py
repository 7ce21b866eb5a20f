"""Opening a dataflow job's sealed results: by a recipient on its machine (confide.flow re-exports
these), and by the platform's enclave for a flow task, whose outputs it seals again per task output.

``open_result`` accepts an output only as the enclave's sealed manifest describes it: every part
named there, each with the SHA-256 the enclave recorded while writing it, none left out, all of this
job. The manifest is written only after the job passed the completeness verification.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from ..encoding import parse_json_object
from ..errors import IntegrityError
from ..keys import Identity
from ..sealed_file import SealedReader
from .driver import dec
from .task import manifest_name


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
