"""A deliberately malicious engine, for tests: it records every byte it handles and tampers with one
stage's batches, tasks or reports as told. Every attack must make the job fail, naming the stage
and partition."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

from confide.enclave.flow.batch import Header, parse_header

from .engine import Endpoint, LocalEngine
from .spark_engine import SparkEngine

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


SPARK_ATTACKS = ("none", "drop", "duplicate", "replay", "drop_report")


def tamper_partition(
    attack: str, extra: Sequence[bytes], target: int, index: int, rows: Any
) -> Any:  # runs in Spark's Python workers, on the shuffle's output
    """Partition `target` of the attacked stage loses its first data batch, gets its first batch
    twice, or gets batches of an earlier stage (`extra`) replayed into it."""
    rows = list(rows)
    if index == target:
        if attack == "drop":
            data = [i for i, (_, b) in enumerate(rows) if parse_header(b, where="spark")[0].kind == "data"]
            rows = [r for i, r in enumerate(rows) if not data or i != data[0]]
        elif attack == "duplicate" and rows:
            rows = [rows[0], *rows]
        elif attack == "replay":
            rows = [*rows, *((0, b) for b in extra)]
    return iter(rows)


def _partitions_with_data(index: int, rows: Any) -> Any:  # runs in Spark's Python workers
    if any(parse_header(b, where="spark")[0].kind == "data" for _, b in rows):
        yield index


class MaliciousSparkEngine(SparkEngine):
    """A Spark engine whose shuffle drops, duplicates or replays a batch of stage `stage`, all inside
    Spark (the tampering is a transformation Spark's Python workers run); it also records every row
    Spark handled and every closure Spark pickled."""

    def __init__(self, *args: Any, attack: str = "none", stage: int = 1, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if attack not in SPARK_ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        self.attack = attack
        self.stage = stage
        self.seen: list[bytes] = []  # every batch and report Spark moved
        self.pickled: list[bytes] = []  # every closure Spark shipped to its workers
        self.history: dict[int, list[bytes]] = {}
        self.done = False
        self.target = 0  # the partition attacked: 0, or the first holding a data batch if 0 holds none

    def _closure(self, stage: int, fn: Any) -> Any:
        from pyspark import cloudpickle

        self.pickled.append(cloudpickle.dumps(fn))
        return fn

    def _stage_output(self, stage: int, rdd: Any) -> None:
        rows = rdd.collect()
        self.seen.extend(b for _, b in rows)
        self.history[stage] = [b for k, b in rows if k >= 0]

    def _shuffled(self, stage: int, rdd: Any) -> Any:
        if stage != self.stage or self.attack in ("none", "drop_report"):
            return rdd
        extra: list[bytes] = []
        if self.attack == "replay":
            earlier = [b for s, blobs in self.history.items() if s < stage - 1 for b in blobs]
            extra = earlier[:1]
        # bucket assignment is a PRF under the job's fresh key, so which partitions hold data
        # batches differs run to run: attack one that does (the host reads the public headers)
        with_data = sorted(set(rdd.mapPartitionsWithIndex(_partitions_with_data).collect()))
        if self.attack == "drop" and not with_data:
            return rdd  # nothing to drop: `done` stays False and the test says so
        self.target = 0 if not with_data or 0 in with_data else with_data[0]
        self.done = True
        fn = functools.partial(tamper_partition, self.attack, extra, self.target)
        return rdd.mapPartitionsWithIndex(fn, preservesPartitioning=True)

    def _reports(self, reports: list[bytes]) -> list[bytes]:
        if self.attack == "drop_report":
            self.done = True
            return reports[1:]
        return reports


def fail_first_attempt(fn: Any, record: str, stage: int, index: int, rows: Any) -> Any:
    """Run the stage's task (the enclave does its work), then fail the task's first attempt as an
    executor that died before handing back its rows would (noting it in the folder `record`): Spark
    runs the task again."""
    import os

    from pyspark import TaskContext

    out = list(fn(index, rows))
    ctx = TaskContext.get()
    if ctx is not None and ctx.attemptNumber() == 0:
        open(os.path.join(record, f"stage{stage}-part{index}"), "w").close()
        raise RuntimeError("injected failure: the executor died after the task ran")
    return iter(out)


class FlakySparkEngine(SparkEngine):
    """Not an attack: a Spark engine whose every task of `stages` fails once after it ran, the way
    lost executors make Spark run a task again; each failure is noted as a file in `record`. The job
    must still be accepted (the enclave keeps no record of task runs; only the rows of the attempt
    Spark kept reach the next stage and the verification), given a master that retries
    (``local[N,F]``, F >= 2)."""

    def __init__(self, *args: Any, stages: Sequence[int] = (), record: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stages, self.record = set(stages), record

    def _closure(self, stage: int, fn: Any) -> Any:
        if stage not in self.stages:
            return fn
        return functools.partial(fail_first_attempt, fn, self.record, stage)


def run_twice_keep_first(fn: Any, index: int, rows: Any) -> Any:
    """Run a task twice on the same rows, as Spark's speculative execution does with a slow task:
    the first attempt's rows are the ones Spark keeps, the second finishes later and is dropped (its
    enclave work, a sink's part file included, is done all the same)."""
    rows = list(rows)
    first = list(fn(index, iter(rows)))
    for _ in fn(index, iter(rows)):
        pass
    return iter(first)


class SpeculativeSparkEngine(SparkEngine):
    """Not an attack: a Spark engine whose every task of `stages` runs twice, the later attempt's
    rows dropped (speculative execution's race, made certain). The job must be accepted, with the
    kept attempt's results."""

    def __init__(self, *args: Any, stages: Sequence[int] = (), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stages = set(stages)

    def _closure(self, stage: int, fn: Any) -> Any:
        return functools.partial(run_twice_keep_first, fn) if stage in self.stages else fn
