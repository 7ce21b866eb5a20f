"""A keyed stage's task over the memory budget: its records routed by key into sealed spill files.

A task whose incoming batches exceed half the budget and whose stage reads keyed exchanges opens its
batches one by one and routes each record by a keyed PRF (BLAKE2b) of its canonical key (a fresh key per task)
into sub-partitions of about a quarter of the budget (`_Spill`), written as sealed files under a
fresh key held only in the enclave (`_SpillFiles`, shared with the external sort: each file's header
binds job, stage, partition, slot and parent, checked when it is read back); then the stage's
functions run once per sub-partition (`run_spilled`). Every record of a key is in one sub-partition,
so per-key operators give the partition's result, and so do per-record operators after them and a
shuffle's map-side combiner at the end; anything else (map_partitions) is refused before anything
spills (`_needs_whole_partition`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..sandbox import make_input_memfd
from ..sealed_file import DEFAULT_CHUNK_SIZE, SealedReader, SealedWriter
from . import driver
from .batch import KEY_LEN, Header, prf_buckets
from .emitter import CACHE_KEYS, _Emitter
from .errors import FlowIntegrityError, FlowTaskError
from .plan import Stage

if TYPE_CHECKING:
    from .task import FlowEnclave, _Job

_PER_RECORD_OPS = frozenset({"map", "flat_map", "filter", "key_by"})
# a shuffle's map-side combiners: run per piece, the reduce side combines the pieces' results
_COMBINER_OPS = frozenset({"reduce_local", "aggregate_local", "group_local", "distinct_local", "count_local"})
# per-key operators: a sub-partition holding every record of its keys gives those keys' results
_PER_KEY_OPS = frozenset({"reduce_local", "aggregate_local", "group_local", "group_concat", "distinct_local"})


def over_budget(incoming: int, budget: int, why: str, where: str) -> FlowTaskError:
    """The refusal of a task over the budget that cannot run in parts: `why` says what it runs."""
    return FlowTaskError(
        f"the partition holds {incoming} bytes, over half the worker's memory budget of {budget} "
        f"bytes, and {why}: give it more partitions or the worker more memory",
        where=where,
    )


def _needs_whole_partition(st: Stage, keyed: list[str]) -> str | None:
    """The first operator of a keyed stage whose result per sub-partition (a spilled task runs the
    stage once per sub-partition, its records routed by the exchange's key) could differ from its
    result over the whole partition; None if there is none. Allowed: per-key operators first, while
    the records are still partitioned by the routed key (distinct on any key, the others only on a
    pair's key: a record's own key, "self", does not group by its first element); then per-record
    operators; then, last, a shuffle's map-side combiner (the next stage combines the results)."""
    chain = st.chain
    i = 0
    while i < len(chain) and chain[i]["op"] in _PER_KEY_OPS:
        if chain[i]["op"] != "distinct_local" and any(k != "pair" for k in keyed):
            return str(chain[i]["op"])
        i += 1
    return _not_per_piece(chain[i:], st)


def _not_per_piece(chain: Sequence[dict[str, Any]], st: Stage) -> str | None:
    """The first operator of `chain` (the rest of stage `st`'s) that cannot run once per piece of a
    partition (a spilled stage's sub-partition, a spilled sort's merged piece) and give the
    partition's result; None if there is none. Allowed: per-record operators, then, last, a
    shuffle's map-side combiner (the next stage combines the pieces' results)."""
    i = 0
    while i < len(chain) and chain[i]["op"] in _PER_RECORD_OPS:
        i += 1
    if i == len(chain) - 1 and chain[i]["op"] in _COMBINER_OPS and st.output.kind != "sink":
        return None
    return str(chain[i]["op"]) if i < len(chain) else None


def run_unkeyed_streamed(
    enclave: FlowEnclave,
    job: _Job,
    st: Stage,
    partition: int,
    batches: Sequence[bytes],
    report: dict[str, Any],
    out_dir: str | None,
    incoming: int,
    where: str,
) -> list[tuple[int, bytes]]:
    """A stage reading only unkeyed exchanges (a union's consumer: forward, single) over the budget:
    no record needs another, so its batches are opened in order and run about a quarter of the
    budget at a time, each piece in one sandboxed run, the output sealed as it comes; nothing
    spills. Its operators must give the partition's result piece by piece (per-record operators,
    then a shuffle's map-side combiner); anything else (map_partitions) is refused before a batch
    is opened, naming the budget."""
    from .external_sort import Pieces

    budget = enclave.memory_budget
    assert budget is not None
    op = _not_per_piece(st.chain, st)
    if op is not None:
        raise over_budget(
            incoming,
            budget,
            f"this stage runs {op}, which needs the whole partition at once (a streamed stage runs "
            "once per piece)",
            where,
        )
    emitter = _Emitter(enclave, job, st, partition, out_dir, where)
    try:
        pieces = Pieces(enclave, job, st, emitter, where, budget // 4, st.chain)
        _, consumed, n_in = enclave._check_batches(
            job,
            st,
            partition,
            batches,
            where,
            sink=lambda _parent, _header, payload, _count: pieces.add(payload),
        )
        pieces.finish()
        report["consumed"] = consumed
        report["records_in"] = n_in
        outputs = emitter.finish(report)
    finally:
        emitter.abort()
    enclave.last_task = {"held_bytes": pieces.held, "subpartitions": pieces.runs, "spilled_bytes": 0}
    return outputs


def run_spilled(
    enclave: FlowEnclave,
    job: _Job,
    st: Stage,
    partition: int,
    batches: Sequence[bytes],
    report: dict[str, Any],
    out_dir: str | None,
    incoming: int,
    where: str,
) -> list[tuple[int, bytes]]:
    """Split the partition by key into sub-partitions that each fit half the budget, spilled as
    sealed files (a fresh key held only here; each file's header binds job, stage, partition,
    sub-partition and parent), then run the stage's functions once per sub-partition. Every
    record of a key lands in one sub-partition, so per-key operators (reduce, aggregate, group,
    distinct, join) give the same result, and so do per-record operators after them and a
    shuffle's map-side combiner at the end; anything else (map_partitions) would see a
    sub-partition instead of the partition and is refused before anything spills, naming the
    budget. A stage reading only unkeyed exchanges (a union's consumer) needs no spill: it runs in
    pieces (run_unkeyed_streamed). (A sort's stages: external_sort.run_sort_spilled,
    run_routing_streamed.)"""
    budget = enclave.memory_budget
    assert budget is not None
    plan = job.plan
    keyed = [
        plan.stages[k].output.keyed if plan.stages[k].output.kind == "hash" else None for k in st.parents
    ]
    if st.parents and all(k is None for k in keyed):
        return run_unkeyed_streamed(enclave, job, st, partition, batches, report, out_dir, incoming, where)
    if not st.parents or None in keyed:
        raise over_budget(
            incoming,
            budget,
            "this stage reads keyed and unkeyed exchanges at once, which cannot spill",
            where,
        )
    op = _needs_whole_partition(st, [str(k) for k in keyed])
    if op is not None:  # refused before anything spills: per sub-partition it would see a part
        raise over_budget(
            incoming,
            budget,
            f"this keyed stage runs {op}, which needs the whole partition at once (a spilled stage "
            "runs once per sub-partition)",
            where,
        )
    n_sub = min(4096, -(-incoming // max(1, budget // 4)))  # ~a quarter of the budget each
    spill = _Spill(enclave, job, st, partition, n_sub, len(st.parents), budget, where)
    try:
        route = spill.router([str(k) for k in keyed])
        _, consumed, n_in = enclave._check_batches(job, st, partition, batches, where, sink=route)
        report["consumed"] = consumed
        report["records_in"] = n_in
        spill.seal_all()
        emitter = _Emitter(enclave, job, st, partition, out_dir, where)
        try:
            held = 0
            for sub in range(n_sub):
                parts = spill.read(sub)
                held = max(held, sum(len(x) for x in parts))
                fds = {
                    f"in{i}": make_input_memfd(data, name=f"confide-flow-in{i}")
                    for i, data in enumerate(parts)
                }
                specs = [{"name": f"in{i}", "kind": "frames"} for i in range(len(parts))]
                try:
                    out = enclave._run_driver(job, st, specs, fds, where)
                finally:
                    for fd in fds.values():
                        with contextlib.suppress(OSError):
                            os.close(fd)
                held = max(held, len(out))
                emitter.add(out)
                del out, parts
            outputs = emitter.finish(report)
        finally:
            emitter.abort()
        enclave.last_task = {"held_bytes": held, "subpartitions": n_sub, "spilled_bytes": spill.written}
        return outputs
    finally:
        spill.remove()


class _SpillFiles:
    """The sealed temporary files of one task (a keyed stage's sub-partitions, a sort's runs) under a
    fresh key held only in the enclave. Each file is a slot (kind, index, parent) whose header binds
    job, stage, partition, kind and index, and parent, checked when it is read back: a file of
    another task (another key), slot or job is refused. remove() deletes them all."""

    def __init__(
        self,
        enclave: FlowEnclave,
        job: _Job,
        st: Stage,
        partition: int,
        where: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        import tempfile

        self.enclave, self.job, self.st, self.partition, self.where = enclave, job, st, partition, where
        self.key = os.urandom(KEY_LEN)
        self.chunk_size = chunk_size
        base = enclave.spill_dir
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="confide-spill-", dir=base))
        self.writers: dict[tuple[str, int, int], tuple[BinaryIO, SealedWriter]] = {}
        self.readers: dict[tuple[str, int, int], io.BufferedIOBase] = {}
        self.written = 0  # plaintext bytes written, all files together
        self.sizes: list[int] = []  # each sealed file's size on disk (what the host sees)

    def meta(self, slot: tuple[str, int, int]) -> dict[str, Any]:
        kind, index, parent = slot
        return {
            "confide_flow_spill": {
                "job": self.job.plan.job_id,
                "stage": self.st.id,
                "part": self.partition,
                kind: index,
                "parent": parent,
            }
        }

    def path(self, slot: tuple[str, int, int]) -> Path:
        kind, index, parent = slot
        return self.dir / f"{kind}-{index:05d}-{parent}.spill"

    def has(self, slot: tuple[str, int, int]) -> bool:
        return slot in self.writers

    def write(self, slot: tuple[str, int, int], data: bytes | bytearray) -> None:
        w = self.writers.get(slot)
        if w is None:
            fh = open(self.path(slot), "xb")  # noqa: SIM115 (closed in seal/remove)
            w = self.writers[slot] = (
                fh,
                SealedWriter(fh, data_key=self.key, metadata=self.meta(slot), chunk_size=self.chunk_size),
            )
        w[1].write(data)
        self.written += len(data)

    def seal(self, slot: tuple[str, int, int]) -> None:
        fh, writer = self.writers[slot]
        if not fh.closed:
            writer.close()
            self.sizes.append(fh.tell())
            fh.close()

    def seal_all(self) -> None:
        for slot in self.writers:
            self.seal(slot)

    def open(self, slot: tuple[str, int, int]) -> SealedReader:
        """A reader of the file written for `slot`, its header checked to be exactly that slot's."""
        path = self.path(slot)
        w = f"{self.where}: spill file {path.name}"
        try:
            fh = self.enclave._open_spill(path)
        except OSError as exc:
            raise FlowIntegrityError(f"spill file gone ({exc.strerror})", where=w) from None
        self.readers[slot] = fh
        reader = SealedReader(fh, where=w).unlock(data_key=self.key)
        if reader.header.metadata != self.meta(slot):
            raise FlowIntegrityError("spill file of another task, sub-partition or run (swapped)", where=w)
        return reader

    def discard(self, slot: tuple[str, int, int]) -> None:
        """Delete a file once it is read."""
        fh = self.readers.pop(slot, None)
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        with contextlib.suppress(OSError):
            self.path(slot).unlink()

    def remove(self) -> None:
        for fh in [w[0] for w in self.writers.values()] + list(self.readers.values()):
            with contextlib.suppress(OSError):
                fh.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class _Spill:
    """A keyed stage's spilled partition: n_sub sub-partitions x parents, routed by a fresh PRF key."""

    FLUSH_BYTES = 1 << 18

    def __init__(
        self,
        enclave: FlowEnclave,
        job: _Job,
        st: Stage,
        partition: int,
        n_sub: int,
        n_parents: int,
        budget: int,
        where: str,
    ) -> None:
        self.where = where
        self.n_sub, self.n_parents = n_sub, n_parents
        self.route_key = os.urandom(32)
        self.files = _SpillFiles(enclave, job, st, partition, where)
        # buffered records per (sub, parent), flushed as frames: together at most ~a quarter budget
        self.flush = max(1 << 12, min(self.FLUSH_BYTES, budget // (4 * n_sub * n_parents)))
        self.buffers: dict[tuple[int, int], list[bytes]] = {}
        self.cache: dict[bytes, int] = {}  # key encoding -> sub-partition (bounded like the emitter's)
        self.sizes: dict[tuple[int, int], int] = {}

    @property
    def written(self) -> int:
        return self.files.written

    def router(self, keyed: list[str]) -> Callable[[int, Header, bytes, int], None]:
        def route(parent: int, header: Header, payload: bytes, count: int) -> None:
            try:
                records = json.loads(payload)
            except (ValueError, RecursionError):
                raise FlowIntegrityError("a batch's records are not valid JSON", where=self.where) from None
            if not isinstance(records, list) or len(records) != count:  # a record holding two values
                raise FlowTaskError(
                    f"a batch holds {len(records) if isinstance(records, list) else 'no list of'} records "
                    f"where the enclave counted {count} (a record of the previous task's output is not "
                    "one JSON value)",
                    where=self.where,
                )
            cache, whole = self.cache, keyed[parent] == "self"
            if len(cache) > CACHE_KEYS:
                cache.clear()
            for rec in records:
                key = rec if whole else (rec[0] if isinstance(rec, list) and rec else None)
                k = driver.canonical_encoded(key).encode()
                sub = cache.get(k)
                if sub is None:
                    (sub,) = prf_buckets(self.route_key, [k], self.n_sub)
                    cache[k] = sub
                self._add(sub, parent, driver.record_json(rec).encode())

        return route

    def _add(self, sub: int, parent: int, rec: bytes) -> None:
        slot = (sub, parent)
        self.buffers.setdefault(slot, []).append(rec)
        self.sizes[slot] = self.sizes.get(slot, 0) + len(rec) + 1
        if self.sizes[slot] >= self.flush:
            self._flush(slot)

    def _flush(self, slot: tuple[int, int]) -> None:
        recs = self.buffers.pop(slot, [])
        self.sizes.pop(slot, None)
        if not recs:
            return
        frame = b"[" + b",".join(recs) + b"]"
        self.files.write(("sub", *slot), driver.FRAME.pack(len(frame)) + frame)

    def seal_all(self) -> None:
        for slot in list(self.buffers):
            self._flush(slot)
        self.files.seal_all()

    def read(self, sub: int) -> list[bytes]:
        """Sub-partition `sub`, one framed input per parent, each file checked to be the one written
        for exactly this (job, stage, partition, sub-partition, parent), deleted once read."""
        parts = []
        for parent in range(self.n_parents):
            slot = ("sub", sub, parent)
            if not self.files.has(slot):
                parts.append(b"")
                continue
            reader = self.files.open(slot)
            parts.append(b"".join(bytes(c) for c in reader.iter_chunks()))
            self.files.discard(slot)
        return parts

    def remove(self) -> None:
        self.files.remove()
