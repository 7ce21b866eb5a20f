"""Small strict parsers of the TCB against hostile values: the sandbox's status classification (a
function may forge status lines), batch headers, base64/hex fields and the enclave config file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from confide.enclave.config import EnclaveConfig
from confide.enclave.encoding import b64d, hexd
from confide.enclave.errors import ConfideError, FormatError
from confide.enclave.flow.batch import MAX_BATCH, Header, JobKeys, parse_header
from confide.enclave.flow.errors import FlowFormatError
from confide.enclave.sandbox.exitcodes import EXIT_EXCEPTION, EXIT_OK, EXIT_SETUP_FAILED
from confide.enclave.sandbox.outcome import Observed, classify, parse_status


def _status(code: int) -> int:
    return code << 8  # a wait status for exit(code)


def test_parse_status_takes_the_last_json_record_with_an_outcome() -> None:
    data = b'{"outcome": "ok"}\nnot json\n{"no": "outcome"}\n[1]\n'
    assert parse_status(data) == {"outcome": "ok"}
    assert parse_status(b"garbage\n\xff\xfe") is None


def _classify(**kw: object) -> object:
    return classify(Observed(**kw), cpu_seconds=5, max_output_bytes=100)  # type: ignore[arg-type]


def test_a_zygote_error_is_a_crash_whatever_the_function_wrote() -> None:
    r = _classify(zygote_error="fork failed: EAGAIN", status_bytes=b'{"outcome": "ok"}\n')
    assert r.category == "crashed" and "the zygote could not run the function: fork failed" in r.detail  # type: ignore[attr-defined]


def test_setup_failure_is_a_crash_and_the_function_did_not_run() -> None:
    status = json.dumps({"outcome": "setup-failed", "layer": "seccomp", "detail": "seccomp: EINVAL"}).encode()
    r = _classify(wait_status=_status(EXIT_SETUP_FAILED), status_bytes=status + b"\n")
    assert r.category == "crashed" and "sandbox setup failed, the function was not run" in r.detail  # type: ignore[attr-defined]


def test_a_forged_ok_status_does_not_turn_an_exception_exit_into_ok() -> None:
    r = _classify(wait_status=_status(EXIT_EXCEPTION), status_bytes=b'{"outcome": "ok"}\n')
    assert r.category != "ok"  # type: ignore[attr-defined]
    ok = _classify(wait_status=_status(EXIT_OK), status_bytes=b'{"outcome": "ok"}\n')
    assert ok.category == "ok"  # type: ignore[attr-defined]


def test_batch_headers_refuse_non_bytes_and_oversized_batches() -> None:
    with pytest.raises(FlowFormatError, match="a batch must be bytes, got str"):
        parse_header("batch", where="b")  # type: ignore[arg-type]
    with pytest.raises(FlowFormatError, match=f"exceeds the {MAX_BATCH}-byte limit"):
        parse_header(b"\0" * (MAX_BATCH + 1), where="b")


def test_job_keys_check_their_sizes_and_seal_only_their_job() -> None:
    with pytest.raises(ValueError, match="job id must be 16 bytes and job key 32 bytes"):
        JobKeys(b"short", os.urandom(32))
    keys = JobKeys(b"\1" * 16, os.urandom(32))
    with pytest.raises(ValueError, match="header of another job"):
        keys.seal(Header("02" * 16, "data", 0, 0, 0, 0, False), b"x")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: b64d("AAAA", field="k", where="w", length=32), "field 'k' must decode to 32 bytes, got 3"),
        (lambda: b64d("!!!", field="k", where="w"), "field 'k' is not valid base64"),
        (lambda: hexd(7, field="h", where="w"), "field 'h' must be hex text"),
        (lambda: hexd("zz", field="h", where="w"), "field 'h' is not valid hex"),
        (lambda: hexd("abcd", field="h", where="w", length=32), "field 'h' must be 32 bytes of hex, got 2"),
    ],
)
def test_encoded_fields_are_checked(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FormatError) as info:
        call()
    assert message in str(info.value) and "w" in str(info.value)


def test_enclave_config_files(tmp_path: Path) -> None:
    assert EnclaveConfig.load(None) == EnclaveConfig()
    with pytest.raises(ConfideError, match="cannot read enclave config"):
        EnclaveConfig.load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("enclave = 3\n")
    with pytest.raises(FormatError, match="\\[enclave\\] must be a table"):
        EnclaveConfig.load(bad)
    typed = tmp_path / "typed.toml"
    typed.write_text("[enclave]\ndebug = true\n")
    assert EnclaveConfig.load(typed).debug is True
