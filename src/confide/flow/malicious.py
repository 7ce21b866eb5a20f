"""A deliberately malicious engine, for tests: it records every byte it handles and tampers with one
stage's batches, tasks or reports as told. Every attack must make the job fail, naming the stage
and partition."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from confide.enclave.flow.batch import Header, parse_header

from .engine import Endpoint, LocalEngine

ATTACKS = (
    "none",
    "drop",  # drop one data batch
    "drop_end",  # drop a stream's end batch
    "drop_stream",  # drop every batch of one source task to this partition
    "duplicate",  # deliver a batch twice
    "reorder",  # swap two data batches of one stream
    "replay",  # deliver a batch of an earlier stage
    "splice",  # a batch's ciphertext under another header (bucket edited)
    "swap_partitions",  # give partition 0 the batches of partition 1 and the reverse
    "foreign",  # a batch of another job (recorded from `foreign_batches`)
    "rerun_task",  # run task 1 twice and task 0 never
    "drop_report",
    "duplicate_report",
    "swap_input",  # give the source task another sealed file
)


class MaliciousEngine(LocalEngine):
    def __init__(
        self,
        workers: Sequence[Endpoint],
        attack: str = "none",
        *,
        stage: int = 1,
        foreign_batches: Sequence[bytes] = (),
        other_input: str | None = None,
    ) -> None:
        super().__init__(workers)
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        self.attack = attack
        self.stage = stage
        self.foreign = list(foreign_batches)
        self.other_input = other_input
        self.seen: list[bytes] = []  # everything the engine handled
        self.history: list[bytes] = []  # batches of earlier stages
        self.done = False

    def _record(self, blob: bytes) -> None:
        self.seen.append(blob)

    def run(self, sealed_description: bytes, inputs: dict[str, str], out_dir: str) -> dict[str, Any]:
        self._record(sealed_description)
        return super().run(sealed_description, inputs, out_dir)

    def _outputs(
        self, stage: int, partition: int, outputs: list[tuple[int, bytes]]
    ) -> list[tuple[int, bytes]]:
        for _, blob in outputs:
            self._record(blob)
            self.history.append(blob)
        return outputs

    def _tasks(self, stage: int, partitions: int) -> list[int]:
        tasks = list(range(partitions))
        if self.attack == "rerun_task" and stage == self.stage and partitions >= 2:
            tasks[0] = 1
            self.done = True
        return tasks

    def _source(self, stage: int, partition: int, path: str) -> str:
        if self.attack == "swap_input" and stage == self.stage and self.other_input:
            self.done = True
            return self.other_input
        return path

    def _reports(self, reports: list[bytes]) -> list[bytes]:
        for r in reports:
            self._record(r)
        if self.attack == "drop_report":
            self.done = True
            return reports[1:]
        if self.attack == "duplicate_report":
            self.done = True
            return [*reports, reports[0]]
        return reports

    def _deliver(self, stage: int, partition: int, batches: list[bytes]) -> list[bytes]:
        if stage != self.stage or self.done:
            return batches
        heads = [parse_header(b, where="engine")[0] for b in batches]
        data = [i for i, h in enumerate(heads) if h.kind == "data"]
        a = self.attack
        if a == "drop" and data:
            self.done = True
            return [b for i, b in enumerate(batches) if i != data[0]]
        if a == "drop_end":
            ends = [i for i, h in enumerate(heads) if h.kind == "end"]
            self.done = True
            return [b for i, b in enumerate(batches) if i != ends[0]]
        if a == "drop_stream":
            self.done = True
            victim = heads[0].part
            return [b for b, h in zip(batches, heads, strict=True) if h.part != victim]
        if a == "duplicate" and batches:
            self.done = True
            return [batches[0], *batches]
        if a == "reorder":
            for i, j in itertools.pairwise(data):
                if heads[i].part == heads[j].part and heads[i].stage == heads[j].stage:
                    out = list(batches)
                    out[i], out[j] = out[j], out[i]
                    self.done = True
                    return out
            return batches
        if a == "replay":
            earlier = [b for b in self.history if parse_header(b, where="engine")[0].stage < stage - 1]
            if earlier:
                self.done = True
                return [*batches, earlier[0]]
            return batches
        if a == "splice" and data:
            h = heads[data[0]]
            _, off = parse_header(batches[data[0]], where="engine")
            forged = Header(h.job, h.kind, h.stage, h.part, h.bucket, h.seq + 1, h.last).encode()
            out = list(batches)
            out[data[0]] = forged + batches[data[0]][off:]
            self.done = True
            return out
        if a == "swap_partitions" and partition in (0, 1):
            other = 1 - partition
            self.done = True
            return [b for b in self.history if self._for(b, stage, other)]
        if a == "foreign" and self.foreign:
            self.done = True
            return [*batches, self.foreign[0]]
        return batches

    @staticmethod
    def _for(blob: bytes, stage: int, bucket: int) -> bool:
        h = parse_header(blob, where="engine")[0]
        return h.bucket == bucket and h.stage == stage - 1
