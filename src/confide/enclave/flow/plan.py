"""The job description of a dataflow job, parsed strictly inside the enclave.

A job is a list of stages in topological order (a stage's parents have smaller ids). A stage reads
either one source (a partition of a sealed input file: a range of its chunks) or the outputs of its
parent stages bucketed to it; it combines them (concatenation, or a join of two parents), applies a
chain of operators in the sandbox, and sends its records to one output: ``hash`` (bucket = keyed
PRF of the record's key mod ``buckets``), ``single`` (bucket 0), ``forward`` (task p to bucket
p + offset, for union), ``sample`` / ``range`` (a range-partitioned sort, below) or ``sink`` (a
sealed part file per partition for the job's recipients). Each stage but a sink feeds exactly one
input of one later stage.

A range-partitioned sort is three stages: the parent's stage ends with ``key_by`` and a ``sample``
output (task p sends its (key, record) pairs to bucket p of the next stage, and to EVERY bucket one
sample batch: its record count and up to ``sample`` of its keys); the next stage (no operators, a
``range`` output of N buckets) has every task compute the same N-1 boundaries from all the samples
and route each of its pairs to its range; the stage after it sorts its bucket.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..encoding import b64d, canonical_json, check_fields, get_typed
from . import driver
from .errors import FlowFormatError

FORMAT = "confide-flow-job-v1"
MAX_STAGES = 256
MAX_PARTITIONS = 1 << 16
MAX_CHAIN = 64
MAX_ZERO_BYTES = 64 << 10  # the encoded zero value of aggregate_local
MAX_PAD_BATCH = 16 << 20  # a padded batch's payload
MAX_PAD_TASK = 1 << 30  # what one task's padded output streams may add up to
MAX_SAMPLE = 1 << 16  # the keys one task of a range sort samples
FN_OPS = frozenset({"map", "flat_map", "filter", "map_partitions", "key_by", "reduce_local"})
PLAIN_OPS = frozenset(
    {"group_local", "group_concat", "distinct_local", "sort_local", "count_local", "sum_local"}
)
SOURCE_FORMATS = ("text", "csv", "jsonl", "parquet")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_JOB = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SourceSpec:
    name: str
    header_sha256: str
    format: str
    csv_header: bool
    partitions: int
    data_key: bytes | None = None  # given by the owner in the sealed description: the file is sealed to it


@dataclass(frozen=True)
class Pad:
    """A padded exchange: each task sends every bucket exactly `batches` data batches of
    `payload_bytes` each, whatever its data; the job fails if a task has more than `records` records
    for one bucket or a record over `record_bytes` encoded."""

    records: int  # the bound on records per (task, bucket)
    record_bytes: int  # the bound on one record's encoded size
    batch_records: int  # record slots per batch

    @property
    def batches(self) -> int:
        return -(-self.records // self.batch_records)

    @property
    def payload_bytes(self) -> int:
        # a record count, then "[" r1 "," r2 ... "]" of at most batch_records records, then spaces
        return 4 + 1 + self.batch_records * (self.record_bytes + 1)


@dataclass(frozen=True)
class Output:
    kind: str  # hash | single | forward | sink
    buckets: int = 1
    keyed: str | None = None  # hash: "pair" or "self"
    offset: int = 0  # forward
    sink_format: str = "records"  # sink: records | text
    sink_name: str = ""
    pad: Pad | None = None  # hash, single, forward, sample, range: a padded exchange
    sample: int = 0  # sample: the keys each task samples (its sample batch to every bucket)
    ascending: bool = True  # range: bucket 0 holds the smallest keys (else the largest)


@dataclass(frozen=True)
class Stage:
    id: int
    source: str | None
    parents: tuple[int, ...]
    combine: str  # concat | join
    how: str  # inner | left (join)
    chain: tuple[dict[str, Any], ...]
    output: Output
    partitions: int = 0  # resolved


@dataclass(frozen=True)
class JobPlan:
    job_id: str
    module_source: str
    functions: dict[str, str]
    inputs: dict[str, SourceSpec]
    stages: tuple[Stage, ...]
    recipients: tuple[str, ...]  # public identity lines
    raw: dict[str, Any]

    @property
    def padded(self) -> bool:
        """Whether any exchange is padded (then every task report has a fixed size too)."""
        return any(st.output.pad is not None for st in self.stages)

    def consumer(self, stage: int) -> tuple[int, int] | None:
        """(child stage, input index) that reads `stage`'s output, None for a sink."""
        for st in self.stages:
            if stage in st.parents:
                return st.id, st.parents.index(stage)
        return None

    def expected_sources(self, parent: int, bucket: int) -> list[int]:
        """The tasks of `parent` whose stream to `bucket` a child task must receive."""
        st = self.stages[parent]
        if st.output.kind == "forward":
            p = bucket - st.output.offset
            return [p] if 0 <= p < st.partitions else []
        return list(range(st.partitions))

    def expected_buckets(self, stage: int, part: int) -> list[int]:
        """The buckets task `part` of `stage` must close a stream to (empty for a sink)."""
        out = self.stages[stage].output
        if out.kind == "sink":
            return []
        if out.kind == "forward":
            return [part + out.offset]
        return list(range(out.buckets))


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    value = get_typed(obj, key, int, where=where)
    if not lo <= value <= hi:
        raise FlowFormatError(f"field {key!r} must be within {lo}..{hi}, got {value}", where=where)
    return int(value)


def _name(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise FlowFormatError(f"{what} must be a name of letters, digits, _ and - (max 64)", where=where)
    return value


def _fn(obj: dict[str, Any], functions: dict[str, str], where: str) -> str:
    fn = _name(obj["fn"], "field 'fn'", where)
    if fn not in functions:
        raise FlowFormatError(f"function {fn!r} is not listed in the job's functions", where=where)
    return fn


def _record(value: Any, where: str) -> Any:
    """A record value in the driver's tagged encoding (aggregate_local's zero), checked before any
    sandbox sees it: it decodes, re-encodes to itself, is hashable where it is a dict key, small."""
    try:
        size = len(canonical_json(value))
        same = driver.enc(driver.dec(value)) == value
    except (TypeError, ValueError, RecursionError, AttributeError, binascii.Error):
        same, size = False, 0
    if not same:
        raise FlowFormatError("field 'zero' is not a record in the dataflow encoding", where=where)
    if size > MAX_ZERO_BYTES:
        raise FlowFormatError(f"field 'zero' is over {MAX_ZERO_BYTES} bytes encoded", where=where)
    return value


def _op(obj: Any, functions: dict[str, str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FlowFormatError("an operator must be an object", where=where)
    kind = obj.get("op")
    if kind in FN_OPS:
        check_fields(obj, required=("op", "fn"), where=where)
        return {"op": kind, "fn": _fn(obj, functions, where)}
    if kind == "aggregate_local":
        check_fields(obj, required=("op", "fn", "zero"), where=where)
        return {"op": kind, "fn": _fn(obj, functions, where), "zero": _record(obj["zero"], where)}
    if kind == "sort_local":
        check_fields(obj, required=("op", "ascending"), where=where)
        return {"op": kind, "ascending": get_typed(obj, "ascending", bool, where=where)}
    if kind in PLAIN_OPS:
        check_fields(obj, required=("op",), where=where)
        return {"op": kind}
    raise FlowFormatError(f"unknown operator {kind!r}", where=where)


def _pad(obj: dict[str, Any], streams: int, where: str) -> Pad | None:
    """An exchange's optional padding; `streams` is how many buckets each task sends to."""
    if "pad" not in obj:
        return None
    pw = f"{where}: pad"
    spec = get_typed(obj, "pad", dict, where=where)
    check_fields(spec, required=("records", "record_bytes", "batch_records"), where=pw)
    pad = Pad(
        _int(spec, "records", 1, 1 << 24, pw),
        _int(spec, "record_bytes", 1, 1 << 20, pw),
        _int(spec, "batch_records", 1, 1 << 16, pw),
    )
    if pad.payload_bytes > MAX_PAD_BATCH:
        raise FlowFormatError(
            f"a padded batch of {pad.payload_bytes} bytes is over {MAX_PAD_BATCH}: fewer batch_records",
            where=pw,
        )
    if streams * pad.batches * pad.payload_bytes > MAX_PAD_TASK:
        raise FlowFormatError(
            f"padded, each task would send {streams} x {pad.batches} batches of {pad.payload_bytes} "
            f"bytes, over {MAX_PAD_TASK}",
            where=pw,
        )
    return pad


def _output(obj: Any, where: str) -> Output:
    if not isinstance(obj, dict):
        raise FlowFormatError("output must be an object", where=where)
    kind = obj.get("kind")
    if kind == "hash":
        check_fields(obj, required=("kind", "keyed", "buckets"), optional=("pad",), where=where)
        keyed = obj["keyed"]
        if keyed not in ("pair", "self"):
            raise FlowFormatError("field 'keyed' must be 'pair' or 'self'", where=where)
        buckets = _int(obj, "buckets", 1, MAX_PARTITIONS, where)
        return Output("hash", buckets, keyed=keyed, pad=_pad(obj, buckets, where))
    if kind == "single":
        check_fields(obj, required=("kind",), optional=("pad",), where=where)
        return Output("single", 1, pad=_pad(obj, 1, where))
    if kind == "forward":
        check_fields(obj, required=("kind", "offset", "buckets"), optional=("pad",), where=where)
        return Output(
            "forward",
            _int(obj, "buckets", 1, MAX_PARTITIONS, where),
            offset=_int(obj, "offset", 0, MAX_PARTITIONS, where),
            pad=_pad(obj, 1, where),
        )
    if kind == "sample":
        check_fields(obj, required=("kind", "buckets", "sample"), optional=("pad",), where=where)
        return Output(
            "sample",
            _int(obj, "buckets", 1, MAX_PARTITIONS, where),
            sample=_int(obj, "sample", 1, MAX_SAMPLE, where),
            pad=_pad(obj, 1, where),
        )
    if kind == "range":
        check_fields(obj, required=("kind", "buckets", "ascending"), optional=("pad",), where=where)
        buckets = _int(obj, "buckets", 1, MAX_PARTITIONS, where)
        return Output(
            "range",
            buckets,
            ascending=get_typed(obj, "ascending", bool, where=where),
            pad=_pad(obj, buckets, where),
        )
    if kind == "sink":
        check_fields(obj, required=("kind", "format", "name"), where=where)
        fmt = obj["format"]
        if fmt not in ("records", "text"):
            raise FlowFormatError("sink format must be 'records' or 'text'", where=where)
        return Output("sink", 0, sink_format=fmt, sink_name=_name(obj["name"], "sink name", where))
    raise FlowFormatError(f"unknown output kind {kind!r}", where=where)


def parse_plan(obj: dict[str, Any], *, where: str = "job description") -> JobPlan:
    check_fields(
        obj,
        required=("format", "job_id", "module", "functions", "inputs", "stages", "recipients"),
        where=where,
    )
    if obj["format"] != FORMAT:
        raise FlowFormatError(
            f"unsupported job format {obj['format']!r} (this build reads {FORMAT})", where=where
        )
    job_id = get_typed(obj, "job_id", str, where=where)
    if not _JOB.match(job_id):
        raise FlowFormatError("job_id must be 32 lowercase hex digits", where=where)
    module = get_typed(obj, "module", dict, where=where)
    mw = f"{where}: module"
    check_fields(module, required=("source", "sha256"), where=mw)
    source = get_typed(module, "source", str, where=mw)
    if hashlib.sha256(source.encode("utf-8")).hexdigest() != module["sha256"]:
        raise FlowFormatError("the function module does not match its SHA-256", where=mw)
    functions_obj = get_typed(obj, "functions", dict, where=where)
    functions: dict[str, str] = {}
    for name, digest in functions_obj.items():
        _name(name, "function name", f"{where}: functions")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise FlowFormatError(f"function {name!r} needs a SHA-256 in hex", where=f"{where}: functions")
        functions[name] = digest
    inputs: dict[str, SourceSpec] = {}
    for name, spec in get_typed(obj, "inputs", dict, where=where).items():
        iw = f"{where}: input {name!r}"
        _name(name, "input name", iw)
        if not isinstance(spec, dict):
            raise FlowFormatError("an input must be an object", where=iw)
        check_fields(
            spec,
            required=("header_sha256", "format", "csv_header", "partitions"),
            optional=("data_key",),
            where=iw,
        )
        digest = get_typed(spec, "header_sha256", str, where=iw)
        if not _HEX64.match(digest):
            raise FlowFormatError("header_sha256 must be 64 lowercase hex digits", where=iw)
        if spec["format"] not in SOURCE_FORMATS:
            raise FlowFormatError(f"format must be one of {', '.join(SOURCE_FORMATS)}", where=iw)
        inputs[name] = SourceSpec(
            name,
            digest,
            spec["format"],
            get_typed(spec, "csv_header", bool, where=iw),
            _int(spec, "partitions", 1, MAX_PARTITIONS, iw),
            b64d(spec["data_key"], field="data_key", where=iw) if "data_key" in spec else None,
        )
    stages_obj = get_typed(obj, "stages", list, where=where)
    if not 1 <= len(stages_obj) <= MAX_STAGES:
        raise FlowFormatError(f"a job needs 1..{MAX_STAGES} stages", where=where)
    stages: list[Stage] = []
    consumed: dict[int, int] = {}
    for i, s in enumerate(stages_obj):
        sw = f"{where}: stage {i}"
        if not isinstance(s, dict):
            raise FlowFormatError("a stage must be an object", where=sw)
        check_fields(s, required=("source", "parents", "combine", "how", "chain", "output"), where=sw)
        src = s["source"]
        parents_obj = get_typed(s, "parents", list, where=sw)
        parents: list[int] = []
        for k in parents_obj:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < i:
                raise FlowFormatError("a parent must be the id of an earlier stage", where=sw)
            if k in consumed:
                raise FlowFormatError(f"stage {k} already feeds stage {consumed[k]}", where=sw)
            consumed[k] = i
            parents.append(k)
        if src is not None:
            if src not in inputs or parents:
                raise FlowFormatError("a source stage reads one listed input and has no parents", where=sw)
        elif not parents:
            raise FlowFormatError("a stage needs a source or parents", where=sw)
        combine = s["combine"]
        how = s["how"]
        if combine not in ("concat", "join") or how not in ("inner", "left"):
            raise FlowFormatError("combine must be concat or join, how inner or left", where=sw)
        if combine == "join" and len(parents) != 2:
            raise FlowFormatError("a join stage has exactly two parents", where=sw)
        chain_obj = get_typed(s, "chain", list, where=sw)
        if len(chain_obj) > MAX_CHAIN:
            raise FlowFormatError(f"more than {MAX_CHAIN} operators in one stage", where=sw)
        chain = tuple(_op(op, functions, f"{sw}: chain[{j}]") for j, op in enumerate(chain_obj))
        stages.append(
            Stage(i, src, tuple(parents), combine, how, chain, _output(s["output"], f"{sw}: output"))
        )
    for st in stages:
        if st.output.kind != "sink" and st.id not in consumed:
            raise FlowFormatError(f"the output of stage {st.id} is read by no stage", where=where)
        if st.output.kind == "sink" and st.id in consumed:
            raise FlowFormatError(f"stage {st.id} is a sink and cannot feed another stage", where=where)
    names = [st.output.sink_name for st in stages if st.output.kind == "sink"]
    if len(set(names)) != len(names) or not names:
        raise FlowFormatError("a job needs at least one sink, each with its own name", where=where)
    recipients = get_typed(obj, "recipients", list, where=where)
    if not recipients or not all(isinstance(r, str) and len(r) < 4096 for r in recipients):
        raise FlowFormatError("recipients must be a non-empty list of public identities", where=where)
    return _resolve(JobPlan(job_id, source, functions, inputs, tuple(stages), tuple(recipients), obj))


def _resolve(plan: JobPlan) -> JobPlan:
    """Give every stage its partition count; check that bucket counts agree with the consumers."""
    resolved: list[Stage] = []
    for st in plan.stages:
        if st.source is not None:
            n = plan.inputs[st.source].partitions
        else:
            counts = {resolved[k].output.buckets for k in st.parents}
            if len(counts) != 1:
                raise FlowFormatError(
                    f"the parents of stage {st.id} send to different bucket counts {sorted(counts)}",
                    where="job description",
                )
            (n,) = counts
            kinds = {resolved[k].output.kind for k in st.parents}
            if "forward" in kinds:
                spans = sorted((resolved[k].output.offset, resolved[k].partitions) for k in st.parents)
                pos = 0
                for offset, size in spans:
                    if offset != pos or kinds != {"forward"}:
                        raise FlowFormatError(
                            f"the forwarded parents of stage {st.id} do not tile its {n} partitions",
                            where="job description",
                        )
                    pos += size
                if pos != n:
                    raise FlowFormatError(
                        f"the forwarded parents of stage {st.id} do not tile its {n} partitions",
                        where="job description",
                    )
            if "sample" in kinds:
                parent = resolved[st.parents[0]]
                if (
                    len(st.parents) != 1
                    or parent.output.buckets != parent.partitions
                    or st.output.kind != "range"
                    or st.chain
                    or st.combine != "concat"
                ):
                    raise FlowFormatError(
                        f"stage {st.id} reads a sort's samples: it must be the sort's routing stage (one "
                        "parent sending to as many buckets as it has tasks, no operators, a range output)",
                        where="job description",
                    )
        if st.output.kind == "range" and (
            len(st.parents) != 1 or resolved[st.parents[0]].output.kind != "sample"
        ):
            raise FlowFormatError(
                f"stage {st.id} has a range output but does not read a sort's samples",
                where="job description",
            )
        if st.output.kind == "sample" and (not st.chain or st.chain[-1]["op"] != "key_by"):
            raise FlowFormatError(
                f"stage {st.id} samples a sort's keys but does not end with key_by", where="job description"
            )
        resolved.append(
            Stage(st.id, st.source, st.parents, st.combine, st.how, st.chain, st.output, partitions=n)
        )
    return JobPlan(
        plan.job_id,
        plan.module_source,
        plan.functions,
        plan.inputs,
        tuple(resolved),
        plan.recipients,
        plan.raw,
    )
