"""confide.enclave.channel: call frames a hostile host sends the enclave (oversized pieces, too many
entries, bad paths, frames cut inside an oversized payload) are refused naming the call and field."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from confide.enclave.channel import (
    HEADER,
    MAX_EVIDENCE_LEN,
    MAX_MANIFEST_LEN,
    MAX_TASK_ENTRIES,
    ChannelClosed,
    FrameTooLarge,
    parse_call,
    read_frame,
    write_frame,
)
from confide.enclave.errors import FormatError


def call(name: str, **args: Any) -> bytes:
    return json.dumps({"id": 1, "call": name, "args": args}).encode()


TASK = {"manifest": "{}", "approvals": [], "dataset_keys": {}, "inputs": {}, "outputs": {}}
RUN = {"request": "r", "inputs": {}, "outputs": {}}
FINISH = {"task_id": "t", "reports": "/r", "out_dir": "/o"}


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (call("run", **RUN, source="x" * (1 << 22)), "function source longer than"),
        (
            call("run", **{**RUN, "inputs": {f"i{n}": "/p" for n in range(65)}}),
            "run': inputs: more than 64 entries",
        ),
        (call("run", **{**RUN, "inputs": {"a": 3}}), "path of 'a' must be a string"),
        (
            call("run", **{**RUN, "outputs": {"o": ""}}),
            "outputs.o: path must be 1..4096 characters without NUL",
        ),
        (call("run", **{**RUN, "outputs": {"o": "/a\0b"}}), "path must be 1..4096 characters without NUL"),
        (call("run", **{**RUN, "outputs": {"../o": "/x"}}), "must be an identifier"),
        (call("run", **RUN, error_report="x" * 5000), "error_report: path must be"),
        (call("provision_grant", offer="o" * (MAX_EVIDENCE_LEN + 1), evidence="e"), "offer longer than"),
        (call("task", **{**TASK, "manifest": "m" * (MAX_MANIFEST_LEN + 1)}), "manifest longer than"),
        (
            call("task", **{**TASK, "approvals": ["a"] * (MAX_TASK_ENTRIES + 1)}),
            f"more than {MAX_TASK_ENTRIES} approvals",
        ),
        (
            call("task", **{**TASK, "dataset_keys": {str(i): "k" for i in range(MAX_TASK_ENTRIES + 1)}}),
            "dataset_keys",
        ),
        (call("task", **{**TASK, "outputs": {"o": "\0"}}), "task': outputs.o"),
        (call("task", **TASK, flow_agents={"a": "b"}), "flow_agents"),
        (call("flow_finish", **FINISH, engine_error="e" * 5000), "engine_error longer than 4096"),
        (call("flow_finish", **{**FINISH, "task_id": "t" * 65}), "task_id longer than 64"),
        (call("flow_finish", **{**FINISH, "reports": "/r\0"}), "flow_finish': reports: path must be"),
        (call("flow_finish", **{**FINISH, "out_dir": ""}), "flow_finish': out_dir: path must be"),
        (call("flow_finish", task_id="t", reports="/r"), "out_dir"),
    ],
)
def test_hostile_calls_are_refused(frame: bytes, message: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_call(frame)
    assert message in str(info.value) and "enclave call" in str(info.value)


def test_an_oversized_frame_is_skipped_and_the_stream_stays_in_step() -> None:
    a, b = socket.socketpair()
    try:
        write_frame(a, b"x" * 5000)
        write_frame(a, b"next")
        with pytest.raises(FrameTooLarge, match="frame of 5000 bytes exceeds the 100-byte limit"):
            read_frame(b, 100)
        assert read_frame(b, 100) == b"next"
        a.sendall(HEADER.pack(5000) + b"x" * 10)
        a.close()
        with pytest.raises(ChannelClosed, match="channel closed inside an oversized frame"):
            read_frame(b, 100)
    finally:
        b.close()
