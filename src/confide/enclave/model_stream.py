"""The ``split`` inference mode's weight stream, in the enclave process (issue 9, MazeNet splitting).

A model larger than the memory budget is never decrypted whole. For an ``infer`` task in mode
``split`` the enclave opens the sealed model (sealed in the external-weights layout,
``model_layout.py``) as a ``PinnedModel``:

1. one streaming pass reads the whole ciphertext in order, hashes it against the manifest's pin
   (``ciphertext_sha256``, approved by every owner) and records the SHA-256 of each chunk's
   ciphertext (32 bytes per chunk: 8 KiB for a 256 MiB model in 1 MiB chunks);
2. the data key unlocks the header (its MAC), the layout is read from the authenticated metadata,
   and the reader is pinned to those chunk digests (``SealedReader.pin_chunks``);
3. only the graph's chunks are decrypted, into a small memfd reserved against the budget.

The sandbox child then asks for each segment's weights through the weight stream, a pipe pair
like the accelerator's (``WeightServer``: a thread of the enclave process answering bounded reads,
decrypting only the chunks a read covers). Every request is hostile: it must lie inside the
weights region (never the graph's bytes, never past the end), be non-empty and at most
``MAX_READ`` bytes; anything else is refused with a message and the stream closed.

Why later random-access reads cannot be swapped by the host: every chunk is AES-256-GCM under a
key derived from the file's own data key and random file id, with the chunk's index (and final
flag) in the nonce and the header's digest as associated data, so a chunk from another file, from
another position or from a truncated file fails its tag; and each chunk read must also have the
ciphertext digest recorded in the pass whose whole-file digest matched the approved one, which
holds even against the data key's holder (who could seal a second, different file with the same
key, file id and header).

Memory: the enclave process holds two chunk buffers and one reply buffer of ``MAX_READ`` bytes
(``buffer_bytes``, reserved by the caller); weights pass through it one read at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from collections.abc import Iterator

from .errors import ConfideError, EnclaveError, FormatError, IntegrityError
from .model_layout import MAX_READ, OK, REFUSED, REPLY, REQUEST, Layout, parse_layout
from .sealed_file import TAG_LEN, SealedReader

_BLOCK = 1 << 20
JOIN_TIMEOUT_S = 10.0


def _read_into(fh: io.FileIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class PinnedModel:
    """A sealed external-layout model opened for split mode (see the module docstring)."""

    def __init__(self, path: str, *, data_key: bytes, ciphertext_sha256: str, where: str) -> None:
        self.where = where
        try:
            self._fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise EnclaveError(f"cannot open input ({exc.strerror})", where=where) from None
        try:
            reader = SealedReader(self._fh, where=where)
            digests = self._hash_pass(reader, ciphertext_sha256)
            reader.unlock(data_key=data_key)  # the header's MAC: its metadata is the owner's
            layout = parse_layout(reader.header.metadata, where=f"{where}: header metadata")
            if layout is None:
                raise FormatError(
                    "mode split needs a model sealed in the external-weights layout (upload it with "
                    "`confide model upload --layout external` or upload_model(..., layout='external')); "
                    "this one has its weights inline",
                    where=where,
                )
            if reader.plaintext_size != layout.weights_bytes + layout.graph_bytes:
                raise FormatError(
                    f"layout says {layout.weights_bytes} + {layout.graph_bytes} bytes, the file holds "
                    f"{reader.plaintext_size}",
                    where=where,
                )
            reader.pin_chunks(digests)
        except BaseException:
            self._fh.close()
            raise
        self.reader = reader
        self.layout: Layout = layout
        stride = reader.header.chunk_size + TAG_LEN
        self._buf, self._cbuf = bytearray(stride), bytearray(stride)
        self._reply = bytearray(min(MAX_READ, layout.weights_bytes))
        self.buffer_bytes = 2 * stride + len(self._reply)

    def _hash_pass(self, reader: SealedReader, approved: str) -> list[bytes]:
        """SHA-256 of the whole file (must be the approved one) and of each chunk's ciphertext, from
        one sequential read; the header read here must be the header the reader parsed."""
        fh, header = self._fh, reader.header
        fh.seek(0)
        head = bytearray(header.body_offset)
        if _read_into(fh, memoryview(head)) != len(head) or head[: len(header.raw)] != header.raw:
            raise IntegrityError("the file's header changed while it was read", where=self.where)
        whole = hashlib.sha256(head)
        stride = header.chunk_size + TAG_LEN
        last = reader.plaintext_size - (reader.n_chunks - 1) * header.chunk_size + TAG_LEN
        buf = bytearray(stride)
        digests = []
        for i in range(reader.n_chunks):
            view = memoryview(buf)[: stride if i < reader.n_chunks - 1 else last]
            if _read_into(fh, view) != len(view):
                raise IntegrityError(
                    f"the file ends inside chunk {i} (it changed while read)", where=self.where
                )
            whole.update(view)
            digests.append(hashlib.sha256(view).digest())
        if fh.read(1):
            raise IntegrityError("the file grew while it was read", where=self.where)
        if whole.hexdigest() != approved:
            raise IntegrityError(
                f"ciphertext has SHA-256 {whole.hexdigest()}, not the approved {approved} (the file "
                "changed after it was checked)",
                where=self.where,
            )
        return digests

    def _plaintext(self, offset: int, length: int) -> Iterator[memoryview]:
        """Plaintext bytes [offset, offset + length), decrypting only the chunks they lie in; each
        view is valid until the next is asked for."""
        cs = self.reader.header.chunk_size
        end = offset + length
        for index in range(offset // cs, (end - 1) // cs + 1):
            plain = self.reader.read_chunk_into(index, self._buf, self._cbuf)
            lo, hi = max(offset, index * cs) - index * cs, min(end, (index + 1) * cs) - index * cs
            yield plain[lo:hi]

    def graph_chunks(self) -> Iterator[memoryview]:
        return self._plaintext(self.layout.graph_offset, self.layout.graph_bytes)

    def refusal(self, offset: int, length: int) -> str | None:
        """Why a weight read is refused, or None: inside the weights region, 1..MAX_READ bytes."""
        weights = self.layout.weights_bytes
        if not 0 < length <= MAX_READ:
            return f"a read of {length} bytes (1..{MAX_READ} allowed)"
        if offset >= weights or length > weights - offset:
            return f"bytes {offset}..{offset + length} lie outside the weights region 0..{weights}"
        return None

    def weights(self, offset: int, length: int) -> memoryview:
        """The plaintext of a checked weight read, assembled in the reply buffer."""
        out = memoryview(self._reply)
        at = 0
        for piece in self._plaintext(offset, length):
            out[at : at + len(piece)] = piece
            at += len(piece)
        return out[:length]

    def close(self) -> None:
        self._fh.close()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = os.read(fd, n - len(out))
        if not got:
            break
        out += got
    return out


class WeightServer:
    """One run's weight stream: two fresh pipes; the child gets `child_fds` (read replies, write
    requests; the caller passes them to the run and closes them after it), a thread here serves."""

    def __init__(self, model: PinnedModel) -> None:
        self.model = model
        req_r, req_w = os.pipe2(os.O_CLOEXEC)  # the child writes requests
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)  # the enclave writes replies
        self.child_fds = (rep_r, req_w)
        self._req, self._rep = req_r, rep_w
        self.requests = 0
        self.bytes_served = 0
        self.refused: str | None = None  # why the stream was closed on the child, if it was
        self._thread = threading.Thread(target=self._serve, name="confide-weight-stream", daemon=True)
        self._thread.start()

    def _refuse(self, why: str) -> None:
        self.refused = why
        message = why.encode("utf-8", "replace")[:4096]
        with contextlib.suppress(OSError):  # the child may be gone already
            _write_all(self._rep, REPLY.pack(REFUSED, len(message)) + message)

    def _serve(self) -> None:
        try:
            while True:
                head = _read_exact(self._req, REQUEST.size)
                if not head:
                    return  # the child closed its end: the run is over
                if len(head) != REQUEST.size:
                    self._refuse(f"a request of {len(head)} bytes, not {REQUEST.size}")
                    return
                offset, length = REQUEST.unpack(head)
                why = self.model.refusal(offset, length)
                if why is not None:
                    self._refuse(f"weight read refused: {why}")
                    return
                try:
                    data = self.model.weights(offset, length)
                except ConfideError as exc:  # a chunk failed its tag or its pin: nothing of it is sent
                    self._refuse(str(exc))
                    return
                _write_all(self._rep, REPLY.pack(OK, length))
                _write_all(self._rep, data)
                self.requests += 1
                self.bytes_served += length
        except OSError:
            return  # the child went away (broken pipe)
        finally:
            os.close(self._req)
            os.close(self._rep)

    def stop(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """After the run, once the child's ends are closed (so a blocked read sees end of file and a
        blocked write a broken pipe): wait for the thread."""
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - a descriptor of the child's ends leaked
            raise EnclaveError("the weight stream's thread did not stop", where="weight stream")
