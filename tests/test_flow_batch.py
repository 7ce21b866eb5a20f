"""Sealed batch format, record codec, bucket PRF and job plan parsing, played as a hostile engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from confide.enclave.errors import FormatError
from confide.enclave.flow import FlowIntegrityError, Header, JobKeys, parse_header
from confide.enclave.flow.driver import dec, enc, key_json
from confide.enclave.flow.plan import parse_plan
from confide.enclave.keys import Identity
from confide.enclave.sandbox import Zygote
from confide.flow import Flow, LocalEngine, open_result, seal_text
from flow_support import FUNCTIONS, enclave_identity, make_enclave, recipient, zygote

__all__ = ["enclave_identity", "recipient", "zygote"]  # fixtures

JOB = os.urandom(16)


def keys() -> JobKeys:
    return JobKeys(JOB, os.urandom(32))


def test_batch_round_trip_and_every_header_field_is_bound() -> None:
    k = keys()
    h = Header(JOB.hex(), "data", 2, 3, 4, 5, False)
    blob = k.seal(h, b"payload")
    assert k.open(blob, where="t") == (h, b"payload")
    _, off = parse_header(blob, where="t")
    for forged in (
        Header(JOB.hex(), "end", 2, 3, 4, 5, False),
        Header(JOB.hex(), "data", 1, 3, 4, 5, False),
        Header(JOB.hex(), "data", 2, 0, 4, 5, False),
        Header(JOB.hex(), "data", 2, 3, 0, 5, False),
        Header(JOB.hex(), "data", 2, 3, 4, 6, False),
        Header(JOB.hex(), "data", 2, 3, 4, 5, True),
    ):
        with pytest.raises(FlowIntegrityError, match="failed authentication"):
            k.open(forged.encode() + blob[off:], where="t")
    with pytest.raises(FlowIntegrityError, match="batch of another job"):
        JobKeys(os.urandom(16), os.urandom(32)).open(blob, where="t")
    with pytest.raises(FlowIntegrityError, match="failed authentication"):
        keys().open(blob, where="t")  # same job id, another job key
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(FlowIntegrityError, match="failed authentication"):
        k.open(bytes(flipped), where="t")


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"CNFFLOW0\x00\x02{}",
        b"CNFFLOW1\xff\xff{}",
        b"CNFFLOW1\x00\x02[]" + bytes(28),
        b"CNFFLOW1\x00\x05{bad}" + bytes(28),
    ],
)
def test_malformed_headers_are_refused(header: bytes) -> None:
    with pytest.raises(FormatError):
        parse_header(header, where="t")


@pytest.mark.parametrize(
    "change",
    [
        {"stage": -1},
        {"stage": True},
        {"seq": 1 << 40},
        {"kind": "other"},
        {"job": "AB" * 16},
        {"extra": 1},
        {"last": 0},
    ],
)
def test_header_fields_are_checked(change: dict) -> None:
    body = {"job": JOB.hex(), "kind": "data", "stage": 0, "part": 0, "bucket": 0, "seq": 0, "last": False}
    body.update(change)
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(FormatError):
        parse_header(b"CNFFLOW1" + len(raw).to_bytes(2, "big") + raw + bytes(28), where="t")


def test_non_canonical_header_is_refused() -> None:
    body = {"job": JOB.hex(), "kind": "data", "stage": 0, "part": 0, "bucket": 0, "seq": 0, "last": False}
    spaced = json.dumps(body, sort_keys=True).encode()  # same fields, other bytes: another AAD
    with pytest.raises(FormatError, match="canonical"):
        parse_header(b"CNFFLOW1" + len(spaced).to_bytes(2, "big") + spaced + bytes(28), where="t")


def test_codec_round_trip_keeps_types() -> None:
    values = [
        None,
        True,
        3,
        -2.5,
        "ü日本😀",
        b"\x00\xff",
        (1, "a"),
        [1, (2, 3)],
        {"a": [1]},
        {1: "x", "$l": 2},
        (),
    ]
    for v in values:
        assert dec(json.loads(json.dumps(enc(v)))) == v
        assert type(dec(enc(v))) is type(v)
    with pytest.raises(TypeError, match="set"):
        enc({1, 2})
    assert key_json(1) == key_json(1.0) == key_json(True)


def test_bucket_prf_is_keyed() -> None:
    words = [f"w{i}" for i in range(200)]
    a, b = keys(), keys()
    assign_a = [a.bucket_of(key_json(w), 8) for w in words]
    assert assign_a == [a.bucket_of(key_json(w), 8) for w in words]  # deterministic within a job
    assert assign_a != [b.bucket_of(key_json(w), 8) for w in words]  # another job key: another assignment
    assert len(set(assign_a)) == 8


def _plan(**over: object) -> dict:
    flow = Flow(FUNCTIONS)
    flow._inputs["in0"] = {
        "path": "x",
        "spec": {"header_sha256": "0" * 64, "format": "text", "csv_header": False, "partitions": 2},
    }
    from confide.flow.api import Dataset, _Node

    ds = Dataset(flow, _Node("source", args={"input": "in0", "partitions": 2}))
    desc = flow.describe([ds.map("upper").save("o")], [Identity.generate().public])
    desc.update(over)
    return desc


def test_plan_parsing_is_strict() -> None:
    parse_plan(_plan())
    bad = [
        _plan(format="v0"),
        _plan(module={"source": "x = 1", "sha256": "0" * 64}),
        _plan(functions={"upper": "zz"}),
        _plan(stages=[]),
        _plan(extra=1),
    ]
    p = _plan()
    p["stages"][0]["chain"] = [{"op": "map", "fn": "not_listed"}]
    bad.append(p)
    p = _plan()
    p["stages"][0]["chain"] = [{"op": "exec", "fn": "upper"}]
    bad.append(p)
    p = _plan()
    p["stages"][0]["output"] = {"kind": "hash", "keyed": "pair", "buckets": 2}  # read by no stage
    bad.append(p)
    for desc in bad:
        with pytest.raises(FormatError):
            parse_plan(desc)


def test_two_workers_share_the_job_key_by_grant(
    tmp_path: Path, zygote: Zygote, enclave_identity: Identity, recipient: Identity
) -> None:
    other = Zygote.start(preimport=())
    try:
        a = make_enclave(zygote, enclave_identity)
        b = make_enclave(other, Identity.generate("worker-2"))
        path = seal_text(
            tmp_path / "in.sealed",
            [f"w{i % 9} x" for i in range(300)],
            [enclave_identity.public],
            chunk_size=1024,
        )
        flow = Flow(FUNCTIONS)
        action = flow.text(path).flat_map("words").map("one").reduce_by_key("add", 3).save("wc")
        flow.run(action, engine=LocalEngine([a, b]), recipients=[recipient.public], out_dir=tmp_path / "out")
        got = dict(open_result(tmp_path / "out", "wc", recipient))
        assert got == {**{f"w{i}": len(range(i, 300, 9)) for i in range(9)}, "x": 300}
        # a worker without the grant cannot run the job's tasks
        c = make_enclave(other, Identity.generate("worker-3"))
        ticket, _ = a.start_job(
            __import__("confide.flow", fromlist=["x"]).seal_description(
                flow.describe([action], [recipient.public]), enclave_identity.public
            ),
            flow.input_paths(),
        )
        with pytest.raises(FlowIntegrityError, match="no job .* is open in this enclave worker"):
            c.run_task(ticket, 0, 0, [], source_path=str(path))
    finally:
        other.close()
