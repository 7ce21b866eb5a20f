"""What data owners and recipients do around a dataflow job: seal inputs, open sealed results
(``open_result``, shared with the enclave, which opens a platform job's results the same way:
confide.enclave.flow.results)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from confide.enclave.flow.results import open_manifest as open_manifest
from confide.enclave.flow.results import open_result as open_result
from confide.enclave.keys import PublicIdentity
from confide.enclave.sealed_file import DEFAULT_CHUNK_SIZE, SealedWriter, write_atomically


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
