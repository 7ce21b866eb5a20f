"""confide.enclave.flow.plan: a hostile coordinator's malformed job descriptions are refused, each
naming what is wrong and where; well-formed ones resolve their partitions and routing."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from confide.enclave.errors import FormatError
from confide.enclave.flow.errors import FlowFormatError
from confide.enclave.flow.plan import FORMAT, MAX_CHAIN, MAX_STAGES, parse_plan

SOURCE = "def up(x):\n    return x.upper()\n"
DIGEST = "ab" * 32


def _job() -> dict[str, Any]:
    """a, b: sources -> hash join -> sink (text)."""
    return {
        "format": FORMAT,
        "job_id": "0" * 32,
        "module": {"source": SOURCE, "sha256": hashlib.sha256(SOURCE.encode()).hexdigest()},
        "functions": {"up": DIGEST},
        "inputs": {
            "a": {"header_sha256": "1" * 64, "format": "csv", "csv_header": True, "partitions": 2},
            "b": {"header_sha256": "2" * 64, "format": "jsonl", "csv_header": False, "partitions": 3},
        },
        "stages": [
            {
                "source": "a",
                "parents": [],
                "combine": "concat",
                "how": "inner",
                "chain": [{"op": "map", "fn": "up"}, {"op": "key_by", "fn": "up"}],
                "output": {"kind": "hash", "keyed": "pair", "buckets": 4},
            },
            {
                "source": "b",
                "parents": [],
                "combine": "concat",
                "how": "inner",
                "chain": [{"op": "sort_local", "ascending": False}, {"op": "distinct_local"}],
                "output": {"kind": "hash", "keyed": "self", "buckets": 4},
            },
            {
                "source": None,
                "parents": [0, 1],
                "combine": "join",
                "how": "left",
                "chain": [{"op": "count_local"}],
                "output": {"kind": "sink", "format": "text", "name": "joined"},
            },
        ],
        "recipients": ["age1recipient"],
    }


def _union_job() -> dict[str, Any]:
    """two sources forwarded side by side into one stage (union), then a single-bucket sink."""
    job = _job()
    job["stages"] = [
        {
            "source": "a",
            "parents": [],
            "combine": "concat",
            "how": "inner",
            "chain": [],
            "output": {"kind": "forward", "offset": 0, "buckets": 5},
        },
        {
            "source": "b",
            "parents": [],
            "combine": "concat",
            "how": "inner",
            "chain": [],
            "output": {"kind": "forward", "offset": 2, "buckets": 5},
        },
        {
            "source": None,
            "parents": [0, 1],
            "combine": "concat",
            "how": "inner",
            "chain": [{"op": "filter", "fn": "up"}],
            "output": {"kind": "single"},
        },
        {
            "source": None,
            "parents": [2],
            "combine": "concat",
            "how": "inner",
            "chain": [{"op": "group_concat"}],
            "output": {"kind": "sink", "format": "records", "name": "all"},
        },
    ]
    return job


def test_a_join_job_resolves_partitions_and_routing() -> None:
    plan = parse_plan(_job())
    assert [st.partitions for st in plan.stages] == [2, 3, 4]
    assert plan.consumer(0) == (2, 0) and plan.consumer(1) == (2, 1) and plan.consumer(2) is None
    assert plan.expected_sources(0, 3) == [0, 1]
    assert plan.expected_buckets(0, 1) == [0, 1, 2, 3]
    assert plan.expected_buckets(2, 0) == []  # a sink closes no stream
    assert plan.stages[1].chain == ({"op": "sort_local", "ascending": False}, {"op": "distinct_local"})
    assert plan.stages[2].output.sink_format == "text" and plan.stages[2].output.sink_name == "joined"
    assert plan.inputs["a"].csv_header is True and plan.recipients == ("age1recipient",)


def test_a_union_job_forwards_each_task_to_its_own_bucket() -> None:
    plan = parse_plan(_union_job())
    assert [st.partitions for st in plan.stages] == [2, 3, 5, 1]
    assert plan.expected_buckets(1, 0) == [2]  # task 0 of the second source -> bucket 0 + offset 2
    assert plan.expected_sources(1, 4) == [2]
    assert plan.expected_sources(1, 1) == []  # bucket 1 belongs to the first source
    assert plan.expected_sources(0, 1) == [1]
    assert plan.expected_buckets(2, 3) == [0]


Mutation = Callable[[dict[str, Any]], None]


def _set(path: tuple[Any, ...], value: Any) -> Mutation:
    def apply(job: dict[str, Any]) -> None:
        obj = job
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return apply


def _delete(path: tuple[Any, ...]) -> Mutation:
    def apply(job: dict[str, Any]) -> None:
        obj = job
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return apply


HOSTILE: dict[str, tuple[Mutation, str]] = {
    "wrong format": (_set(("format",), "confide-flow-job-v0"), "unsupported job format"),
    "missing field": (_delete(("recipients",)), "recipients"),
    "extra field": (_set(("extra",), 1), "extra"),
    "job id not hex": (_set(("job_id",), "Z" * 32), "job_id must be 32 lowercase hex"),
    "module swapped": (_set(("module", "source"), "import os\n"), "does not match its SHA-256"),
    "bad function name": (_set(("functions",), {"1up": DIGEST}), "function name must be a name"),
    "function digest": (_set(("functions",), {"up": "xyz"}), "needs a SHA-256 in hex"),
    "bad input name": (_set(("inputs", "a b"), {}), "input name must be a name"),
    "input not object": (_set(("inputs", "a"), ["x"]), "an input must be an object"),
    "input digest": (_set(("inputs", "a", "header_sha256"), "A" * 64), "header_sha256 must be 64"),
    "input format": (_set(("inputs", "a", "format"), "orc"), "format must be one of"),
    "partitions zero": (_set(("inputs", "a", "partitions"), 0), "'partitions' must be within"),
    "partitions huge": (_set(("inputs", "a", "partitions"), 1 << 17), "'partitions' must be within"),
    "no stages": (_set(("stages",), []), f"a job needs 1..{MAX_STAGES} stages"),
    "stage not object": (_set(("stages", 0), "stage"), "a stage must be an object"),
    "forward parent": (_set(("stages", 0, "parents"), [2]), "a parent must be the id of an earlier"),
    "bool parent": (_set(("stages", 2, "parents"), [True, 1]), "a parent must be the id of an earlier"),
    "parent fed twice": (_set(("stages", 2, "parents"), [0, 0]), "stage 0 already feeds stage 2"),
    "source with parents": (_set(("stages", 1, "parents"), [0]), "a source stage reads one listed"),
    "unlisted source": (_set(("stages", 0, "source"), "c"), "a source stage reads one listed"),
    "orphan stage": (_set(("stages", 0, "source"), None), "a stage needs a source or parents"),
    "combine": (_set(("stages", 2, "combine"), "zip"), "combine must be concat or join"),
    "how": (_set(("stages", 2, "how"), "outer"), "combine must be concat or join"),
    "join of one": (_set(("stages", 2, "parents"), [0]), "a join stage has exactly two parents"),
    "long chain": (
        _set(("stages", 0, "chain"), [{"op": "distinct_local"}] * (MAX_CHAIN + 1)),
        f"more than {MAX_CHAIN} operators",
    ),
    "op not object": (_set(("stages", 0, "chain", 0), "map"), "an operator must be an object"),
    "unknown op": (_set(("stages", 0, "chain", 0), {"op": "exec"}), "unknown operator 'exec'"),
    "unlisted fn": (
        _set(("stages", 0, "chain", 0), {"op": "map", "fn": "down"}),
        "function 'down' is not listed",
    ),
    "fn op extra field": (
        _set(("stages", 0, "chain", 0), {"op": "map", "fn": "up", "code": "x"}),
        "code",
    ),
    "sort without order": (_set(("stages", 0, "chain", 0), {"op": "sort_local"}), "ascending"),
    "sort order not bool": (
        _set(("stages", 0, "chain", 0), {"op": "sort_local", "ascending": 1}),
        "ascending",
    ),
    "plain op extra field": (_set(("stages", 0, "chain", 0), {"op": "sum_local", "fn": "up"}), "fn"),
    "output not object": (_set(("stages", 0, "output"), "hash"), "output must be an object"),
    "unknown output": (_set(("stages", 0, "output"), {"kind": "http"}), "unknown output kind 'http'"),
    "keyed": (_set(("stages", 0, "output", "keyed"), "value"), "'keyed' must be 'pair' or 'self'"),
    "buckets zero": (_set(("stages", 0, "output", "buckets"), 0), "'buckets' must be within"),
    "sink format": (_set(("stages", 2, "output", "format"), "csv"), "sink format must be"),
    "sink name": (_set(("stages", 2, "output", "name"), "../x"), "sink name must be a name"),
    "unread output": (
        _set(("stages", 2, "parents"), [0]),
        "a join stage has exactly two parents",
    ),
    "mismatched buckets": (
        _set(("stages", 1, "output", "buckets"), 3),
        "send to different bucket counts [3, 4]",
    ),
    "no recipients": (_set(("recipients",), []), "recipients must be a non-empty list"),
    "recipient not text": (_set(("recipients",), [7]), "recipients must be a non-empty list"),
    "recipient huge": (_set(("recipients",), ["x" * 4096]), "recipients must be a non-empty list"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_job_descriptions_are_refused_naming_the_fault(name: str) -> None:
    mutate, message = HOSTILE[name]
    job = copy.deepcopy(_job())
    mutate(job)
    with pytest.raises(FormatError) as info:  # FlowFormatError, or the shared field checks' FormatError
        parse_plan(job, where="job j1")
    assert message in str(info.value)
    assert "job" in str(info.value)


def test_an_output_read_by_no_stage_is_refused() -> None:
    job = _job()
    job["stages"][2]["combine"] = "concat"
    job["stages"][2]["parents"] = [0]
    with pytest.raises(FlowFormatError, match="the output of stage 1 is read by no stage"):
        parse_plan(job)


def test_a_sink_cannot_feed_a_stage() -> None:
    job = _job()
    job["stages"][1]["output"] = {"kind": "sink", "format": "records", "name": "early"}
    with pytest.raises(FlowFormatError, match="stage 1 is a sink and cannot feed another stage"):
        parse_plan(job)


def test_two_sinks_with_one_name_are_refused() -> None:
    job = _union_job()
    job["stages"][2]["output"] = {"kind": "sink", "format": "records", "name": "all"}
    job["stages"][3] = {
        "source": "a",
        "parents": [],
        "combine": "concat",
        "how": "inner",
        "chain": [],
        "output": {"kind": "sink", "format": "records", "name": "all"},
    }
    job["stages"][2]["parents"] = [0, 1]
    with pytest.raises(FlowFormatError, match="each with its own name"):
        parse_plan(job)


@pytest.mark.parametrize(
    "offsets",
    [
        (0, 1),  # overlap: the first source's two tasks and the second's first share bucket 1
        (1, 3),  # a gap at bucket 0
        (0, 3),  # a gap at bucket 2
    ],
)
def test_forwarded_parents_that_do_not_tile_are_refused(offsets: tuple[int, int]) -> None:
    job = _union_job()
    job["stages"][0]["output"]["offset"] = offsets[0]
    job["stages"][1]["output"]["offset"] = offsets[1]
    job["stages"][0]["output"]["buckets"] = job["stages"][1]["output"]["buckets"] = (
        6 if offsets[1] == 3 else 5
    )
    with pytest.raises(FlowFormatError, match="do not tile its"):
        parse_plan(job)


def test_forwarded_parents_short_of_the_bucket_count_are_refused() -> None:
    job = _union_job()
    job["stages"][0]["output"]["buckets"] = job["stages"][1]["output"]["buckets"] = 6  # 2 + 3 != 6
    with pytest.raises(FlowFormatError, match="do not tile its 6 partitions"):
        parse_plan(job)


def test_forward_mixed_with_hash_is_refused() -> None:
    job = _union_job()
    job["stages"][1]["output"] = {"kind": "hash", "keyed": "self", "buckets": 5}
    with pytest.raises(FlowFormatError, match="do not tile"):
        parse_plan(job)
