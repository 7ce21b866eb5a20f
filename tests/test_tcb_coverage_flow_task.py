"""confide.enclave.flow.task and .emitter: the parts that read hostile bytes without a sandbox run:
the sandbox's output frames (a malicious user function controls them) and a CSV input's header row."""

from __future__ import annotations

import io
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.enclave.flow import driver
from confide.enclave.flow.emitter import _parse_keyed, _parse_output, sink_file_names, stray_part_files
from confide.enclave.flow.errors import FlowFormatError, FlowTaskError
from confide.enclave.flow.task import _csv_names, manifest_name
from confide.enclave.keys import Identity
from confide.enclave.sealed_file import SealedReader, SealedWriter


def _frame(obj: object) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack(">I", len(data)) + data


def test_frames_are_concatenated_in_order() -> None:
    out = _frame(["a", "b"]) + _frame([]) + _frame([1, {"x": 2}])
    assert _parse_output(out, keyed=None, where="s") == ["a", "b", 1, {"x": 2}]
    assert _parse_output(b"", keyed=None, where="s") == []


def _keyed(keys: list[bytes], recs: list[bytes], n: int | None = None) -> bytes:
    kb, rb = b"\n".join(keys), b"\n".join(recs)
    body = driver.KEYED.pack(len(keys) if n is None else n, len(kb)) + kb + rb
    return struct.pack(">I", len(body)) + body


def test_keyed_frames_carry_keys_and_record_bytes() -> None:
    out = io.BytesIO()
    driver.write_keyed_frame(out, ['"k1"', '"k2"'], [["k1", 1], ["k2", {"$l": [2]}]])
    driver.write_keyed_frame(out, [], [])
    driver.write_keyed_frame(out, ["3"], [[3, "a\nb\u2028"]])
    keys, recs = _parse_keyed(out.getvalue(), where="s")
    assert keys == [b'"k1"', b'"k2"', b"3"]
    assert [json.loads(r) for r in recs] == [["k1", 1], ["k2", {"$l": [2]}], [3, "a\nb\u2028"]]
    assert _parse_keyed(b"", where="s") == ([], [])


def test_range_frames_carry_bucket_record_pairs() -> None:
    assert _parse_output(_frame([[0, 1], [3, [2]]]), keyed="range", where="s") == [[0, 1], [3, [2]]]


@pytest.mark.parametrize(
    ("out", "keyed", "message"),
    [
        (b"\0\0", False, "ends inside a frame header"),
        (_frame(["a"]) + b"\0", False, "ends inside a frame header"),
        (struct.pack(">I", 10) + b"[1]", False, "frame of bad length"),
        (struct.pack(">I", driver.MAX_FRAME + 1), False, "frame of bad length"),
        (struct.pack(">I", 3) + b"[1,", False, "not valid JSON"),
        (struct.pack(">I", 2) + b"\xff\xfe", False, "not valid JSON"),
        (_frame("[" * 100000), False, "frame is not a list"),  # a JSON string
        (_frame({"a": 1}), False, "frame is not a list"),
        (_frame(7), False, "frame is not a list"),
        (_frame([[1, 1, 2]]), True, "keyed output is malformed"),
        (_frame([["k", 1]]), True, "keyed output is malformed"),
        (_frame([1]), True, "keyed output is malformed"),
    ],
)
def test_hostile_sandbox_output_is_refused(out: bytes, keyed: bool, message: str) -> None:
    with pytest.raises(FlowTaskError) as info:
        _parse_output(out, keyed="range" if keyed else None, where="stage 1 partition 0")
    assert message in str(info.value) and "stage 1 partition 0" in str(info.value)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (struct.pack(">I", 4) + b"\0\0\0\1", "too short"),
        (_keyed([b"1"], [b"[1]"])[:-1], "frame of bad length"),
        (struct.pack(">I", 8) + driver.KEYED.pack(1, 9), "bad lengths"),  # keys past the frame
        (_keyed([], [], n=0) + b"", None),  # an empty frame is fine
        (struct.pack(">I", 9) + driver.KEYED.pack(0, 0) + b"x", "bad lengths"),  # n=0, bytes after
        (struct.pack(">I", 8) + driver.KEYED.pack(2, 0), "bad lengths"),  # records said, none there
        (_keyed([b"1", b"2"], [b"[1]"]), "does not hold the 2 keys"),
        (_keyed([b"1"], [b"[1]", b"[2]"], n=1), "does not hold the 1 keys"),  # a record split in two
        (_keyed([b"1", b"2"], [b"[1]\n[3]", b"[2]"]), "does not hold the 2 keys"),  # a raw newline
        (_keyed([b"1", b"2"], [b"", b"[2]"]), "does not hold the 2 keys"),  # an empty record
    ],
)
def test_hostile_keyed_output_is_refused(out: bytes, message: str | None) -> None:
    if message is None:
        assert _parse_keyed(out, where="s") == ([], [])
        return
    with pytest.raises(FlowTaskError) as info:
        _parse_keyed(out, where="stage 1 partition 0")
    assert message in str(info.value) and "stage 1 partition 0" in str(info.value)


def test_deeply_nested_output_is_refused_not_a_crash() -> None:
    depth = 200000
    data = b"[" * depth + b"]" * depth
    with pytest.raises(FlowTaskError, match="not valid JSON|not a list"):
        _parse_output(struct.pack(">I", len(data)) + data, keyed=None, where="s")


def _sealed(data: bytes, who: Identity, chunk: int = 1024) -> SealedReader:
    buf = io.BytesIO()
    with SealedWriter(buf, recipients=[who.public], chunk_size=chunk) as w:
        w.write(data)
    return SealedReader(io.BytesIO(buf.getvalue()), where="t").unlock(identity=who)


@pytest.fixture(scope="module")
def who() -> Identity:
    return Identity.generate("flow-task-test")


def test_csv_header_spanning_chunks(who: Identity) -> None:
    long = "n" * 2500  # the header row runs over three 1 KiB chunks
    reader = _sealed(f"{long},age,city\r\nann,3,x\n".encode(), who)
    assert reader.n_chunks == 3
    assert _csv_names(reader, "input 'a'") == [long, "age", "city"]


def test_csv_header_of_a_file_without_newline(who: Identity) -> None:
    assert _csv_names(_sealed(b'"a,b",c', who), "input 'a'") == ["a,b", "c"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"a,b,a\n1,2,3\n", "names a column twice"),
        (b"\n1,2\n", "empty or names a column twice"),
        (b"", "empty or names a column twice"),
        (b"\xff\xfe,b\n", "cannot be read"),
        (b"a,\xc3(\n", "cannot be read"),  # invalid UTF-8 after a valid column
    ],
)
def test_hostile_csv_headers_are_refused(who: Identity, data: bytes, message: str) -> None:
    with pytest.raises(FlowFormatError) as info:
        _csv_names(_sealed(data, who), "input 'a'")
    assert message in str(info.value) and "input 'a'" in str(info.value)


def test_output_file_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert sink_file_names("counts", 7, "0a1b2c3d") == "counts-part-00007-0a1b2c3d.cnfseal"
    assert manifest_name("counts") == "counts.manifest.cnfseal"
    names = [
        "c-part-00000-0a1b2c3d.cnfseal",  # kept: the manifest names it
        "c-part-00000-ffffffff.cnfseal",  # another attempt's: stray
        "c-part-00001-12345678.cnfseal",  # stray
        "c-part-00000.cnfseal",  # not this layout
        "c-part-00000-0A1B2C3D.cnfseal",  # not this layout (upper case)
        "cc-part-00000-0a1b2c3d.cnfseal",  # another output
        "c.manifest.cnfseal",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    got = stray_part_files(tmp_path, "c", {names[0]})
    assert [p.name for p in got] == [names[1], names[2]]


# -- the enclave worker's job start and task entry, facing a hostile engine ----------------------
def _sealed_to(who: Identity, data: bytes) -> bytes:
    buf = io.BytesIO()
    with SealedWriter(buf, recipients=[who.public], chunk_size=1024) as w:
        w.write(data)
    return buf.getvalue()


def _job_setup(tmp_path, who: Identity):  # type: ignore[no-untyped-def]
    import copy

    from test_tcb_coverage_flow_plan import _job

    files = {}
    job = copy.deepcopy(_job())
    for name, data in (("a", b"id,v\n1,2\n"), ("b", b'{"x": 1}\n')):
        path = tmp_path / f"{name}.cnfseal"
        path.write_bytes(_sealed_to(who, data))
        job["inputs"][name]["header_sha256"] = SealedReader(io.BytesIO(path.read_bytes())).header.digest.hex()
        job["inputs"][name]["partitions"] = 1
        files[name] = str(path)
    return job, files


def _enclave(who: Identity):  # type: ignore[no-untyped-def]
    from confide.enclave.flow.task import FlowEnclave

    return FlowEnclave(who, None)  # type: ignore[arg-type]  # no task here reaches the sandbox


def test_start_job_refuses_an_oversized_description(who: Identity) -> None:
    from confide.enclave.flow.task import MAX_DESCRIPTION

    with pytest.raises(FlowFormatError, match="job description too large"):
        _enclave(who).start_job(b"\0" * (MAX_DESCRIPTION + 1), {})


def test_start_job_refuses_replays_missing_and_swapped_inputs(who: Identity, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from confide.enclave.flow.errors import FlowIntegrityError

    job, files = _job_setup(tmp_path, who)
    desc = _sealed_to(who, json.dumps(job).encode())
    enclave = _enclave(who)
    with pytest.raises(FlowFormatError, match="the engine gave no path for this input"):
        enclave.start_job(desc, {"a": files["a"]})
    with pytest.raises(FlowIntegrityError, match="not the file the job description names"):
        enclave.start_job(desc, {"a": files["b"], "b": files["b"]})
    ticket, graph = enclave.start_job(desc, files)
    assert [s["partitions"] for s in graph["stages"]] == [1, 1, 4] and graph["stages"][2]["sink"]
    with pytest.raises(FlowIntegrityError, match="already started \\(a replayed job description\\)"):
        enclave.start_job(desc, files)
    with pytest.raises(FlowIntegrityError, match="the job has no stage 3"):
        enclave.run_task(ticket, 3, 0, [])
    with pytest.raises(FlowIntegrityError, match="stage 2 has 4 partitions"):
        enclave.run_task(ticket, 2, 4, [])
    with pytest.raises(FlowFormatError, match="the engine gave no input path for a source task"):
        enclave.run_task(ticket, 0, 0, [])
    with pytest.raises(FlowIntegrityError, match="is not the file the job opened"):
        enclave.run_task(ticket, 0, 0, [], source_path=files["b"])
    other = _enclave(who)  # a worker that never opened (or was granted) this job
    with pytest.raises(FlowIntegrityError, match="is open in this enclave worker"):
        other.run_task(ticket, 0, 0, [])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 5), st.integers(0, 40))
def test_fuzz_keyed_output_parses_or_fails_closed(tail: bytes, n: int, klen: int) -> None:
    """Whatever a hostile sandbox writes, the keyed parser returns as many keys as records, none
    empty or holding a newline, or refuses with FlowTaskError: never another exception."""
    body = driver.KEYED.pack(n, klen) + tail
    for out in (struct.pack(">I", len(body)) + body, tail):
        try:
            keys, recs = _parse_keyed(out, where="fuzz")
        except FlowTaskError:
            continue
        assert len(keys) == len(recs)
        assert all(r and b"\n" not in r for r in recs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_json_output_parses_or_fails_closed(data: bytes) -> None:
    for out in (struct.pack(">I", len(data)) + data, data):
        for keyed in (None, "range"):
            try:
                items = _parse_output(out, keyed=keyed, where="fuzz")
            except FlowTaskError:
                continue
            assert isinstance(items, list)
