"""Built-in password-check v1: is one party's password in another party's breach corpus?

Inputs: ``password`` (one UTF-8 password: the whole input, less trailing NUL bytes (padding:
confide.client.custody.upload_password pads it to 8 KiB so that its size tells the host nothing)
and then at most one line ending; at most 4096 bytes, not empty, no line break or NUL inside) and ``exposed`` (the breach corpus: lines of
``SHA1HEX:COUNT`` as in Have I Been Pwned's Pwned Passwords download (SHA-1, ordered by hash or by
count), or bare ``SHA1HEX`` lines, each counting once; hex in either case, LF or CRLF line endings,
empty lines skipped). No params.

The password is hashed as HIBP does: SHA-1 of its UTF-8 bytes, as given (no normalisation). The
corpus is read line by line (memory independent of its size), every line to the end whatever the
password, with the same work per line, so the run's duration depends on the corpus's size, not on
whether the password is in it; a malformed line is refused naming its number (never its text).
Errors never quote the password either.

Output ``result``: JSON {"count": n, "exposed": bool}, n the sum of the counts of the lines holding
the password's hash, padded with spaces to a fixed 96 bytes so that its size says nothing. The
enclave allows it to be sealed only to the owner of input ``password`` (function_desc.py:
owner_only_outputs); the corpus owner learns only that a check ran (and its error text, if a run fails).
Runs in the sandbox; only the standard library.
"""

import hashlib
import json
import re
from typing import Any, NoReturn

NAME = "password-check"
MAX_PASSWORD = 4096
MAX_INPUT = 8192  # with its padding
MAX_LINE = 128  # a corpus line: 40 hex digits, ':', a count, CRLF
LINE_RE = re.compile(rb"([0-9A-Fa-f]{40})(?::([1-9][0-9]{0,18}))?")
RESULT_BYTES = 96


def _fail(message: str) -> NoReturn:
    raise ValueError(f"{NAME}: {message}")


def password_hash(fh: Any) -> bytes:
    """The upper-case hex SHA-1 of the password input, checked without quoting it."""
    raw = fh.read(MAX_INPUT + 1)
    if len(raw) > MAX_INPUT:
        _fail(f"input 'password' is longer than {MAX_INPUT} bytes")
    raw = raw.rstrip(b"\0")
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if len(raw) > MAX_PASSWORD:
        _fail(f"input 'password' is longer than {MAX_PASSWORD} bytes")
    if not raw:
        _fail("input 'password' is empty")
    if b"\n" in raw or b"\r" in raw or b"\0" in raw:
        _fail("input 'password' holds more than one line or a NUL byte (one password per check)")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail("input 'password' is not UTF-8 text")
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest().upper().encode()


def count_in_corpus(fh: Any, digest: bytes) -> int:
    """The summed count of the corpus lines holding `digest`, every line read and checked."""
    total, number = 0, 0
    while True:
        raw = fh.readline(MAX_LINE + 1)
        if not raw:
            return total
        number += 1
        body = raw[:-1] if raw.endswith(b"\n") else raw
        body = body[:-1] if body.endswith(b"\r") else body
        if number == 1 and body.startswith(b"\xef\xbb\xbf"):
            body = body[3:]
        if not body:
            continue
        match = LINE_RE.fullmatch(body) if len(raw) <= MAX_LINE else None
        if match is None:
            _fail(
                f"input 'exposed', line {number}: not a corpus line (SHA1HEX:COUNT: 40 hex digits, a "
                "colon and a count from 1, or a bare SHA1HEX)"
            )
        count = int(match.group(2) or b"1")
        total += count * (match.group(1).upper() == digest)


def run(ctx: Any) -> None:
    if sorted(ctx.inputs) != ["exposed", "password"]:
        _fail(f"needs inputs 'password' and 'exposed', got {sorted(ctx.inputs)}")
    if ctx.params:
        _fail(f"takes no parameters, got {', '.join(sorted(ctx.params))}")
    if sorted(ctx.outputs) != ["result"]:
        _fail(f"writes output 'result' only, got {sorted(ctx.outputs)}")
    digest = password_hash(ctx.inputs["password"])
    count = count_in_corpus(ctx.inputs["exposed"], digest)
    body = json.dumps({"count": count, "exposed": count > 0}, sort_keys=True)
    if len(body) >= RESULT_BYTES:
        _fail("the count does not fit the fixed-size result")
    ctx.outputs["result"].write(body.ljust(RESULT_BYTES - 1).encode() + b"\n")
