"""A PySpark-RDD-like API over sealed data. Building a Dataset only records lineage; ``Flow.run``
compiles the lineage of its actions into a job description (a JSON plan of stages, the function
module's source and the SHA-256 of each function), seals it to the engine's enclave, and runs it.

User functions are named functions of ONE module (``Flow(functions=source or path)``): they run in
the enclave's sandbox from the source in the sealed job description, never pickled, so a lambda or
a closure is refused (define it in the module). Records are None, bool, int, float, str, bytes,
tuples, lists and dicts of those.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide.client.policy import Policy
from confide.enclave.encoding import b64e
from confide.enclave.flow.driver import enc
from confide.enclave.flow.plan import FORMAT, MAX_SAMPLE
from confide.enclave.keys import Identity, PublicIdentity
from confide.enclave.sealed_file import SealedReader, SealedWriter

if TYPE_CHECKING:
    from confide.attest import TrustAnchors

Fn = Callable[..., Any] | str
SAMPLES_PER_BUCKET = 60  # a range sort samples ~60 keys per output partition in all (PySpark's 3 x 20)


class FlowError(ValueError):
    """A job that cannot be built (unknown function, lambda, bad argument)."""


@dataclass(frozen=True)
class TaskInput:
    """Where a job file's `job(flow, inputs)` gets a platform task's input instead of a local file:
    `flow.text(TaskInput("corpus"))` is `flow.task_input("corpus", format="text")`, so one job file
    runs locally (`confide flow run`) and as a platform task (`confide flow task`)."""

    name: str


@dataclass(eq=False)
class _Node:
    kind: str
    parents: tuple[_Node, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    source: str | None
    parents: list[int]
    partitions: int
    chain: list[dict[str, Any]] = field(default_factory=list)
    combine: str = "concat"
    how: str = "inner"


def _module_functions(source: str) -> dict[str, str]:
    try:
        tree = ast.parse(source, filename="<flow functions>")
    except SyntaxError as exc:
        raise FlowError(f"the function module does not parse: {exc}") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            segment = ast.get_source_segment(source, node) or ""
            out[node.name] = hashlib.sha256(segment.encode("utf-8")).hexdigest()
    return out


@dataclass(frozen=True)
class ShufflePadding:
    """Padded exchanges for a whole job (``Flow(padded_shuffle=...)``): every task sends every
    bucket of every exchange the same number of same-size sealed batches, so the engine's view of
    bucket sizes does not show key frequencies. `records` is your bound on the records one task sends
    one bucket (after the map-side combine of reduce/aggregate/group/distinct), `record_bytes` on one
    record's JSON encoding; a task over either fails the job, naming its stage and partition.
    `batch_records` is the record slots per batch. The engine still sees each task's timing."""

    records: int
    record_bytes: int = 256
    batch_records: int = 256

    def __post_init__(self) -> None:
        for name in ("records", "record_bytes", "batch_records"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlowError(f"ShufflePadding.{name} must be a positive integer")

    def spec(self) -> dict[str, int]:
        return {
            "records": self.records,
            "record_bytes": self.record_bytes,
            "batch_records": self.batch_records,
        }


class Flow:
    """One job's builder: its function module and its sealed inputs."""

    def __init__(
        self,
        functions: str | Path = "",
        *,
        identity: Identity | None = None,
        padded_shuffle: ShufflePadding | None = None,
    ) -> None:
        """`identity`: your key, for sources sealed to you (see `text`): used for each source
        addressed to it; sources sealed to the engine's workers are read by them as they are.
        `padded_shuffle`: pad every exchange of the job (see ShufflePadding)."""
        self.identity = identity
        if isinstance(functions, Path) or (functions and "\n" not in functions and functions.endswith(".py")):
            functions = Path(functions).read_text(encoding="utf-8")
        self.module_source: str = str(functions)
        self.functions = _module_functions(self.module_source)
        self._inputs: dict[str, dict[str, Any]] = {}
        self.padded_shuffle = padded_shuffle

    # ---- sources -----------------------------------------------------------------------------
    def _source(
        self,
        path: str | Path | TaskInput,
        fmt: str,
        partitions: int | None,
        csv_header: bool,
        identity: Identity | None,
    ) -> Dataset:
        if isinstance(path, TaskInput):
            return self.task_input(path.name, format=fmt, header=csv_header, partitions=partitions or 1)
        path = Path(path)
        with open(path, "rb", buffering=0) as fh:
            reader = SealedReader(fh, where=str(path))
            digest, n_chunks = reader.header.digest.hex(), reader.n_chunks
            # a file sealed to its owner: the owner's data key travels in the job description, which is
            # sealed only to the attested coordinator (Flow.run)
            data_key = None
            if identity is not None:
                data_key = reader.unlock(identity=identity).data_key
            elif self.identity is not None and self.identity.fingerprint in reader.header.wrapped_keys:
                data_key = reader.unlock(identity=self.identity).data_key
        if partitions is None:
            partitions = n_chunks
        if partitions < 1:
            raise FlowError("partitions must be at least 1")
        name = f"in{len(self._inputs)}"
        self._inputs[name] = {
            "path": str(path),
            "spec": {
                "header_sha256": digest,
                "format": fmt,
                "csv_header": csv_header,
                "partitions": partitions,
                **({"data_key": b64e(data_key)} if data_key is not None else {}),
            },
        }
        return Dataset(self, _Node("source", args={"input": name, "partitions": partitions}))

    def task_input(
        self, name: str, *, format: str = "text", header: bool = True, partitions: int = 1
    ) -> Dataset:
        """Input `name` of a platform task (see confide.flow.platform): a dataset the task names,
        read as text lines, CSV (`header`: the first row names the fields), JSON lines or Parquet
        (plain, or a PME dataset: `confide dataset upload --pme-keys`)."""
        if format not in ("text", "csv", "jsonl", "parquet"):
            raise FlowError("format must be 'text', 'csv', 'jsonl' or 'parquet'")
        if partitions < 1:
            raise FlowError("partitions must be at least 1")
        if name in self._inputs:
            raise FlowError(f"input {name!r} is already a source of this job")
        spec = {"format": format, "csv_header": bool(header) and format == "csv", "partitions": partitions}
        self._inputs[name] = {"path": None, "spec": spec}
        return Dataset(self, _Node("source", args={"input": name, "partitions": partitions}))

    # Each source reads a sealed file (CNFSEAL1) sealed to the engine's worker, or sealed to you: then
    # pass your `identity` and the file's data key goes to the attested coordinator in the job.

    def text(
        self, path: str | Path | TaskInput, *, partitions: int | None = None, identity: Identity | None = None
    ) -> Dataset:
        """Lines of a sealed UTF-8 text file (without their line ends); by default one partition per chunk."""
        return self._source(path, "text", partitions, False, identity)

    def csv(
        self,
        path: str | Path | TaskInput,
        *,
        header: bool = True,
        partitions: int | None = None,
        identity: Identity | None = None,
    ) -> Dataset:
        """Rows of a sealed CSV file: dicts by the header row's names, or tuples of strings without one.
        A field may not hold a line break (rows are split on chunk boundaries at newlines)."""
        return self._source(path, "csv", partitions, header, identity)

    def json_lines(
        self, path: str | Path | TaskInput, *, partitions: int | None = None, identity: Identity | None = None
    ) -> Dataset:
        """One JSON value per line of a sealed file (arrays become tuples); blank lines are skipped."""
        return self._source(path, "jsonl", partitions, False, identity)

    def parquet(
        self, path: str | Path | TaskInput, *, partitions: int | None = None, identity: Identity | None = None
    ) -> Dataset:
        """Rows of a sealed Parquet file, as dicts by column name: plain Parquet, or Parquet with
        modular encryption packed with its master keys (confide.client.pme_dataset.pack, as
        `confide dataset upload --pme-keys` does), decrypted only in the enclave's sandbox. Partition
        p of P reads the row groups [p * G // P, (p + 1) * G // P) of the file's G (default P: one
        per sealed chunk; with fewer row groups than partitions some are empty). Values: Parquet's
        integers, floats, strings, booleans, bytes and lists as Python's; decimals as their exact
        text; dates, times and timestamps in ISO 8601. Each partition's task decrypts the whole
        file (Parquet's footer, at its end, says where the row groups are), so P partitions read it
        P times."""
        return self._source(path, "parquet", partitions, False, identity)

    def fn_name(self, fn: Fn) -> str:
        name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
        if name == "<lambda>" or not name:
            raise FlowError("a lambda cannot run in the enclave: define a named function in the job's module")
        if name not in self.functions:
            raise FlowError(f"function {name!r} is not defined at the top level of the job's module")
        return name

    # ---- compiling -----------------------------------------------------------------------------
    def describe(
        self, actions: Sequence[Dataset], recipients: Sequence[PublicIdentity], *, job_id: str | None = None
    ) -> dict[str, Any]:
        """The job description for these actions (each a Dataset returned by save or count)."""
        if not actions or not recipients:
            raise FlowError("a job needs at least one action and one recipient")
        stages: list[dict[str, Any]] = []

        def finish(p: _Pending, output: dict[str, Any]) -> int:
            stages.append(
                {
                    "source": p.source,
                    "parents": p.parents,
                    "combine": p.combine,
                    "how": p.how,
                    "chain": p.chain,
                    "output": output,
                }
            )
            return len(stages) - 1

        def build(node: _Node) -> _Pending:
            a = node.args
            if node.kind == "source":
                return _Pending(a["input"], [], a["partitions"])
            if node.kind == "narrow":
                p = build(node.parents[0])
                p.chain.append(dict(a["op"]))
                return p
            if node.kind == "shuffle":
                built = [build(n) for n in node.parents]
                exchange = a["exchange"]
                if exchange == "forward":
                    total = sum(b.partitions for b in built)
                    outs, off = [], 0
                    for b in built:
                        outs.append({"kind": "forward", "offset": off, "buckets": total})
                        off += b.partitions
                    buckets = total
                elif exchange == "single":
                    outs, buckets = [{"kind": "single"}] * len(built), 1
                elif exchange == "range":  # the map stage samples, a routing stage, the sorting stage
                    (b,) = built
                    n = a["buckets"] or b.partitions
                    pad = self.padded_shuffle
                    padding = {"pad": pad.spec()} if pad else {}
                    b.chain.extend(dict(op) for op in a["tail"])
                    per_task = min(MAX_SAMPLE, -(-SAMPLES_PER_BUCKET * n // b.partitions))
                    sample = {"kind": "sample", "buckets": b.partitions, "sample": per_task, **padding}
                    route = _Pending(None, [finish(b, sample)], b.partitions)
                    ranges = {"kind": "range", "buckets": n, "ascending": a["ascending"], **padding}
                    return _Pending(None, [finish(route, ranges)], n, [dict(op) for op in a["head"]])
                else:
                    buckets = a.get("buckets") or max(b.partitions for b in built)
                    outs = [{"kind": "hash", "keyed": exchange, "buckets": buckets}] * len(built)
                ids = []
                for b, out in zip(built, outs, strict=True):
                    b.chain.extend(dict(op) for op in a["tail"])
                    pad = self.padded_shuffle
                    ids.append(finish(b, {**out, "pad": pad.spec()} if pad else out))
                return _Pending(None, ids, buckets, [dict(op) for op in a["head"]], a["combine"], a["how"])
            raise FlowError(f"{node.kind} is not a dataset")

        for action in actions:
            if action._node.kind != "sink":
                raise FlowError("run() takes actions: the Datasets returned by save() or count()")
            a = action._node.args
            finish(build(action._node.parents[0]), {"kind": "sink", "format": a["format"], "name": a["name"]})
        names = [action._node.args["name"] for action in actions]
        if len(set(names)) != len(names):
            raise FlowError("two actions have the same output name")
        return {
            "format": FORMAT,
            "job_id": job_id or os.urandom(16).hex(),
            "module": {
                "source": self.module_source,
                "sha256": hashlib.sha256(self.module_source.encode("utf-8")).hexdigest(),
            },
            "functions": dict(self.functions),
            "inputs": {name: v["spec"] for name, v in self._inputs.items()},
            "stages": stages,
            "recipients": [r.to_line() for r in recipients],
        }

    def input_paths(self) -> dict[str, str]:
        return {name: v["path"] for name, v in self._inputs.items()}

    def run(
        self,
        *actions: Dataset,
        engine: Any,
        recipients: Sequence[PublicIdentity],
        out_dir: str | Path,
        policy: Policy | None = None,
        anchors: TrustAnchors | None = None,
    ) -> dict[str, Any]:
        """Run the actions on `engine`; their results are sealed files in `out_dir` that only the
        recipients can open (confide.flow.open_result). Returns the engine's public summary.

        The job description (functions, and every key the job needs) is sealed only to an engine
        coordinator whose evidence, fetched with a fresh nonce, passes `policy` under `anchors`
        (default: CONFIDE_POLICY or $CONFIDE_HOME/policy.toml, and the vendor roots plus
        CONFIDE_SIM_ROOT, as the `confide` commands use)."""
        description = self.describe(actions, recipients)
        coordinator = attest_engine(engine, policy, anchors)
        sealed = seal_description(description, coordinator)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return engine.run(sealed, self.input_paths(), str(out_dir))


def attest_engine(
    engine: Any, policy: Policy | None = None, anchors: TrustAnchors | None = None
) -> PublicIdentity:
    """The engine coordinator's key, once its evidence (fresh nonce) passes the policy; else the
    PolicyError or EvidenceError that says why."""
    from confide.client.home import Home
    from confide.client.local import check_attestation

    if policy is None or anchors is None:
        env_policy, env_anchors = Home.from_env().trust_from_env()
        policy, anchors = policy or env_policy, anchors or env_anchors
    nonce = os.urandom(32)
    evidence = engine.evidence(nonce)
    return check_attestation(evidence, nonce, policy, anchors, keys_line=engine.enclave_public).enclave


def seal_description(description: dict[str, Any], enclave: PublicIdentity) -> bytes:
    from confide.enclave.encoding import canonical_json

    buf = io.BytesIO()
    with SealedWriter(buf, recipients=[enclave], metadata={"confide_flow": "job description"}) as w:
        w.write(canonical_json(description))
    return buf.getvalue()


class Dataset:
    """A distributed collection of records, defined by its lineage (nothing runs until Flow.run)."""

    def __init__(self, flow: Flow, node: _Node) -> None:
        self._flow = flow
        self._node = node

    def _narrow(self, op: str, fn: Fn) -> Dataset:
        return Dataset(
            self._flow, _Node("narrow", (self._node,), {"op": {"op": op, "fn": self._flow.fn_name(fn)}})
        )

    def _shuffle(
        self,
        others: Sequence[Dataset],
        exchange: str,
        tail: list[dict[str, Any]],
        head: list[dict[str, Any]],
        *,
        buckets: int | None = None,
        combine: str = "concat",
        how: str = "inner",
        ascending: bool = True,
    ) -> Dataset:
        for o in others:
            if o._flow is not self._flow:
                raise FlowError("datasets of two different Flows cannot be combined")
        if buckets is not None and buckets < 1:
            raise FlowError("num_partitions must be at least 1")
        args = {
            "exchange": exchange,
            "tail": tail,
            "head": head,
            "buckets": buckets,
            "combine": combine,
            "how": how,
            "ascending": ascending,
        }
        parents = (self._node, *(o._node for o in others))
        return Dataset(self._flow, _Node("shuffle", parents, args))

    # ---- narrow operators ---------------------------------------------------------------------
    def map(self, fn: Fn) -> Dataset:
        return self._narrow("map", fn)

    def flat_map(self, fn: Fn) -> Dataset:
        return self._narrow("flat_map", fn)

    def filter(self, fn: Fn) -> Dataset:
        return self._narrow("filter", fn)

    def map_partitions(self, fn: Fn) -> Dataset:
        """fn(iterator of records) -> iterable of records, once per partition."""
        return self._narrow("map_partitions", fn)

    def key_by(self, fn: Fn) -> Dataset:
        """(fn(x), x) for each record x."""
        return self._narrow("key_by", fn)

    # ---- wide operators ------------------------------------------------------------------------
    def reduce_by_key(self, fn: Fn, num_partitions: int | None = None) -> Dataset:
        """(k, v) pairs to one (k, fn(...fn(v1, v2)..., vn)) per key; combined on the map side first."""
        op = {"op": "reduce_local", "fn": self._flow.fn_name(fn)}
        return self._shuffle([], "pair", [op], [op], buckets=num_partitions)

    def aggregate_by_key(
        self, zero: Any, seq_fn: Fn, comb_fn: Fn, num_partitions: int | None = None
    ) -> Dataset:
        """(k, v) pairs to one (k, acc) per key, as PySpark's aggregateByKey: on the map side
        acc = seq_fn(acc, v) from a fresh copy of `zero` per key and partition, then the partitions'
        accumulators are merged with comb_fn(acc1, acc2). `zero` is a record value (it travels in the
        job description)."""
        try:
            encoded = enc(zero)
        except TypeError as exc:
            raise FlowError(f"the zero value cannot be a record: {exc}") from None
        seq = {"op": "aggregate_local", "fn": self._flow.fn_name(seq_fn), "zero": encoded}
        comb = {"op": "reduce_local", "fn": self._flow.fn_name(comb_fn)}
        return self._shuffle([], "pair", [seq], [comb], buckets=num_partitions)

    def fold_by_key(self, zero: Any, fn: Fn, num_partitions: int | None = None) -> Dataset:
        """aggregate_by_key(zero, fn, fn), as PySpark's foldByKey."""
        return self.aggregate_by_key(zero, fn, fn, num_partitions)

    def group_by_key(self, num_partitions: int | None = None) -> Dataset:
        """(k, v) pairs to (k, [values]) (the order of the values is not defined)."""
        return self._shuffle(
            [], "pair", [{"op": "group_local"}], [{"op": "group_concat"}], buckets=num_partitions
        )

    def distinct(self, num_partitions: int | None = None) -> Dataset:
        op = {"op": "distinct_local"}
        return self._shuffle([], "self", [op], [op], buckets=num_partitions)

    def join(self, other: Dataset, how: str = "inner", num_partitions: int | None = None) -> Dataset:
        """(k, v) and (k, w) to (k, (v, w)); how="left" keeps (k, (v, None)) for keys absent on the right."""
        if how not in ("inner", "left"):
            raise FlowError("join how must be 'inner' or 'left'")
        return self._shuffle([other], "pair", [], [], buckets=num_partitions, combine="join", how=how)

    def sort_by(self, fn: Fn, ascending: bool = True, num_partitions: int | None = None) -> Dataset:
        """Records ordered by fn(record) (stable), as PySpark's sortBy: range-partitioned into
        `num_partitions` (default: this dataset's partition count) partitions in global order, every
        key of partition i before every key of partition i + 1. The N - 1 boundaries come from a
        sample of the keys (about 60 per output partition, weighted by each map task's record count),
        drawn and used only inside the enclave; a key that fills several ranges fills one partition
        (the others stay empty). One partition: no sampling, everything into one sorted partition."""
        key = {"op": "key_by", "fn": self._flow.fn_name(fn)}
        sort = [{"op": "sort_local", "ascending": bool(ascending)}]
        if num_partitions is not None and num_partitions < 1:
            raise FlowError("num_partitions must be at least 1")
        n = num_partitions or self._partitions()
        if n == 1:
            return self._shuffle([], "single", [key], sort)
        return self._shuffle([], "range", [key], sort, buckets=n, ascending=bool(ascending))

    def _partitions(self) -> int:
        """This dataset's partition count, as the job description will have it."""
        node = self._node
        while node.kind == "narrow":
            node = node.parents[0]
        if node.kind == "source":
            return int(node.args["partitions"])
        a = node.args
        if a["exchange"] == "forward":
            return sum(Dataset(self._flow, p)._partitions() for p in node.parents)
        if a["exchange"] == "single":
            return 1
        return int(a["buckets"] or max(Dataset(self._flow, p)._partitions() for p in node.parents))

    def union(self, other: Dataset) -> Dataset:
        """The partitions of this dataset, then those of `other`."""
        return self._shuffle([other], "forward", [], [])

    # ---- actions -------------------------------------------------------------------------------
    def count(self, name: str = "count") -> Dataset:
        """An action: the number of records, as a one-record sealed result named `name`."""
        counted = self._shuffle([], "single", [{"op": "count_local"}], [{"op": "sum_local"}])
        return counted.save(name)

    def save(self, name: str, *, format: str = "records") -> Dataset:
        """An action: one sealed part file per partition (and a sealed manifest) for the recipients.
        format "records" keeps the values (confide.flow.open_result gives them back); "text" writes
        each record (a str, or str() of it) as a line."""
        if format not in ("records", "text"):
            raise FlowError("format must be 'records' or 'text'")
        return Dataset(self._flow, _Node("sink", (self._node,), {"name": name, "format": format}))
