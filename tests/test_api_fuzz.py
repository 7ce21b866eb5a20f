"""Property-based fuzzing of the platform's HTTP API (PROTOCOL.md §7) with schemathesis.

The app runs in process (`create_app`) on a temporary SQLite database with no enclave workers.
Before fuzzing, Alice and Bob register and create real objects through the API (blobs, a dataset
whose key is wrapped to a stand-in service key, a clear and a confidential function, two tasks,
an approval, a queued run) and one worker evidence row is stored. A `flatmap_case` hook then aims
a share of the generated cases at more than the parsers: at ids of objects that exist (path
parameters), or at a *valid* body for the operation (Bob's next dataset, function, task or
approval, a new party's registration) with one value replaced by arbitrary JSON or one item
removed, so the handlers' own checks and the database see hostile values too.

Every operation of ``/openapi.json`` is fuzzed twice:

* unsigned: every answer is < 500 with the error shape; protected routes answer 401
  ``unauthenticated`` (with ``WWW-Authenticate``) whatever the parameters and body;
* signed by Bob: a `requests` auth hook signs the prepared request, i.e. the very method, target
  and body bytes that go on the wire, so every call authenticates (never 401); nothing answers
  >= 500 (but the documented 503 of evidence without workers), every non-2xx has the error shape
  and no answer mentions a traceback.

Generation is deterministic (schemathesis ``deterministic`` = Hypothesis ``derandomize``, no
example database) and small: ``MAX_EXAMPLES`` fuzzed cases per operation and run, plus the
schema's examples and schemathesis' coverage cases (boundaries, wrong types, other methods).
A systematic sweep then puts each of a list of hostile values at every position of every valid
body, on SQLite and on PostgreSQL; the last tests pin what the fuzzing found. Run with ``-s`` to
see how many requests each operation got and what they answered.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import FastAPI
from hypothesis import strategies as st
from schemathesis import Case, HookContext, Response
from schemathesis.python import asgi

from confide.client import api_auth
from confide.client.dataset_keys import new_dataset_id, wrap_dataset_key
from confide.client.function_seal import seal_function_source
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.sealing import encrypt_stream
from confide.enclave import manifest as mf
from confide.enclave.keys import Identity
from confide.host.api import Platform, create_app
from confide.host.blobstore import BlobStore
from confide.host.db import Database, Evidence, now, sqlite_url
from confide.host.scheduler import Scheduler

MAX_EXAMPLES = 30
LONG_POLL_S = 0.1  # the longest long poll the fuzzer makes

# Routes anyone may call; every other operation needs a signed request.
PUBLIC = {
    ("GET", "/v1/health"),
    ("GET", "/v1/platform"),
    ("GET", "/v1/service"),
    ("POST", "/v1/service/evidence"),
    ("GET", "/v1/service/evidence/{sha256}"),
    ("POST", "/v1/parties"),
    ("GET", "/status"),  # the operator's status page and its figures (tests/test_status_page.py)
    ("GET", "/metrics"),
    ("GET", "/docs"),  # the offline API docs page (tests/test_api_docs.py)
}

SOURCE = """
def run(ctx):
    ctx.outputs["out"].write(ctx.inputs["data"].read().upper())
"""

# (test, operation label) -> status -> requests sent
STATS: dict[tuple[str, str], Counter[int]] = {}


class ConfideSignature(requests.auth.AuthBase):
    """Signs the prepared request, after `requests` encoded the URL and body: what the signature
    covers is exactly what goes on the wire. For the audience of `world` (default: WORLD); a blob
    upload declares its body (length and SHA-256), as the SDK does."""

    def __init__(self, identity: Identity, world: World | None = None) -> None:
        self.identity = identity
        self.world = world
        self.signed: list[tuple[str, str, bytes]] = []

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body if r.body is not None else b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        assert isinstance(body, bytes), type(body)  # no streamed bodies here
        method, target = str(r.method), r.path_url
        audience = (self.world or WORLD).platform.platform_id
        declared: dict[str, Any] = {}
        if method == "PUT" and target.split("?", 1)[0] == "/v1/blobs":
            declared = {"body_sha256": hashlib.sha256(body).hexdigest(), "body_length": len(body)}
        r.headers.update(
            api_auth.sign_request(self.identity, method, target, body, audience=audience, **declared)
        )
        self.signed.append((method, target, body))
        return r


class World:
    """An app under test with no enclave workers, on SQLite in a temporary directory or on the
    given PostgreSQL database, and the parties and objects `populate` creates in it."""

    def __init__(self, db_url: str | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="confide-api-fuzz-")
        root = Path(self.tmp.name)
        self.db = Database(db_url or sqlite_url(root / "confide.db"))  # connects on first use
        blobs = BlobStore(root / "blobs", max_bytes=1 << 20)
        self.platform = Platform(
            db=self.db, blobs=blobs, scheduler=Scheduler(self.db, blobs, lease_seconds=60), pool=None
        )
        self.app: FastAPI = create_app(self.platform)
        self.alice = Identity.generate("alice")
        self.bob = Identity.generate("bob")
        # a stand-in service key: without workers the platform has none to check envelopes against
        self.service = Identity.generate("service")
        self.known: dict[str, list[str]] = {}  # path parameter -> ids of objects that exist
        # operation label -> path parameter -> the ids it is aimed at instead (a rejection is final:
        # aimed at its own task, it leaves the others approvable and runnable for the fuzzer)
        self.known_for: dict[str, dict[str, list[str]]] = {}
        # operation label -> path parameters, and a valid body made with a fresh 32-hex-digit id
        self.templates: dict[str, tuple[dict[str, str], Callable[[str], dict[str, Any]]]] = {}

    def close(self) -> None:
        self.db.dispose()
        self.tmp.cleanup()

    # -- setting it up: real calls, through the same transport and signing as the fuzzing ----------

    def call(
        self, method: str, path: str, who: Identity | None, body: Any = None, **path_parameters: str
    ) -> Any:
        operation = schema[path][method]
        if body is None:
            case = operation.Case(path_parameters=path_parameters)
        else:
            media_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
            case = operation.Case(path_parameters=path_parameters, body=body, media_type=media_type)
        response = case.call(auth=ConfideSignature(who, self) if who is not None else None, app=self.app)
        assert 200 <= response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def dataset(self, owner: Identity, data: bytes) -> dict[str, Any]:
        """What an owner's client does: seal, upload, wrap the key to the service; returns the
        body of ``POST /v1/datasets`` (not sent)."""
        key = AESGCM.generate_key(256)
        dataset_id = new_dataset_id()
        sealed = io.BytesIO()
        encrypt_stream(
            io.BytesIO(data),
            sealed,
            recipients=[owner.public],
            data_key=key,
            metadata={"dataset_id": dataset_id},
        )
        sha = self.call("PUT", "/v1/blobs", owner, sealed.getvalue())["sha256"]
        envelope = wrap_dataset_key(
            key, dataset_id=dataset_id, owner=owner.public, service=self.service.public, ciphertext_sha256=sha
        )
        return {
            "dataset_id": dataset_id,
            "name": "rows",
            "schema": {"columns": [{"name": "text", "type": "string"}]},
            "rows": data.count(b"\n"),
            "ciphertext_sha256": sha,
            "key_envelope": envelope,
        }

    def manifest(self, fn: mf.FunctionDescriptor, dataset: dict[str, Any]) -> mf.Manifest:
        """Bob's task on Alice's dataset."""
        alice, bob = self.alice, self.bob
        return build_manifest(
            service=self.service.public,
            creator=bob.public,
            function=fn,
            inputs=[
                mf.TaskInput("data", dataset["dataset_id"], alice.fingerprint, dataset["ciphertext_sha256"])
            ],
            outputs=[mf.TaskOutput("out", (bob.fingerprint,), 1 << 20)],
            participants={"alice": alice.public, "bob": bob.public},
            params={"suffix": "!", "limits": {"rows": 10}},
        )

    def populate(self) -> World:
        self.db.migrate()
        alice, bob = self.alice, self.bob
        self.call("POST", "/v1/parties", None, _registration(alice, "alice"))
        self.call("POST", "/v1/parties", None, _registration(bob, "bob"))

        dataset = self.dataset(alice, b"alice's rows\n")
        self.call("POST", "/v1/datasets", alice, dataset)
        clear = _function(bob, "upper", SOURCE)
        self.call("POST", "/v1/functions", bob, {"descriptor": clear.to_json(), "source": SOURCE})
        secret = _function(alice, "secret", SOURCE + "#")
        sealed = seal_function_source(SOURCE + "#", descriptor=secret, service=self.service.public)
        self.call(
            "POST",
            "/v1/functions",
            alice,
            {"descriptor": secret.to_json(), "sealed_source": base64.b64encode(sealed).decode()},
        )
        # Bob's tasks on Alice's data: the first approved by Alice and queued, the second only
        # created, the third there to be rejected
        tasks = [self.manifest(clear, dataset) for _ in range(3)]
        for manifest in tasks:
            self.call("POST", "/v1/tasks", bob, {"manifest": manifest.to_json()})
        first = tasks[0].task_id
        approval = {"approval": sign_approval(alice, tasks[0])}
        self.call("POST", "/v1/tasks/{task_id}/approvals", alice, approval, task_id=first)
        self.call("POST", "/v1/tasks/{task_id}/run", bob, {}, task_id=first)

        evidence = os.urandom(64)
        evidence_sha = hashlib.sha256(evidence).hexdigest()
        with self.db.transaction() as s:  # what a worker stores at boot (no worker runs here)
            s.add(
                Evidence(
                    sha256=evidence_sha,
                    worker_id="w0",
                    evidence=base64.b64encode(evidence).decode(),
                    created_at=now(),
                )
            )

        # valid bodies the fuzzer mutates, all Bob's (the signed run is Bob's), made with a fresh
        # id each time so that a mutated value gets past "already in use" (the platform reads a
        # key envelope's fields, not its HPKE, and checks no manifest signature: the enclave does)
        bobs_dataset = self.dataset(bob, b"bob's rows\nmore\n")
        envelope = bobs_dataset["key_envelope"]
        next_task = self.manifest(clear, dataset).to_json()
        lower = SOURCE.replace("upper", "lower")
        register_carol = _registration(Identity.generate("carol"), "carol")
        approve_second = {"approval": sign_approval(bob, tasks[1])}
        second = {"task_id": tasks[1].task_id}
        third = {"task_id": tasks[2].task_id}
        self.templates.update(
            {
                "POST /v1/parties": ({}, lambda _: register_carol),
                "POST /v1/service/evidence": ({}, lambda fresh: {"nonce": fresh}),
                "POST /v1/datasets": (
                    {},
                    lambda fresh: {
                        **bobs_dataset,
                        "dataset_id": fresh,
                        "key_envelope": {**envelope, "dataset_id": fresh},
                    },
                ),
                "POST /v1/functions": (
                    {},
                    lambda fresh: {
                        "descriptor": _function(bob, f"f{fresh[:8]}", lower).to_json(),
                        "source": lower,
                    },
                ),
                "POST /v1/tasks": ({}, lambda fresh: {"manifest": {**next_task, "task_id": fresh}}),
                "POST /v1/tasks/{task_id}/approvals": (second, lambda _: approve_second),
                "POST /v1/tasks/{task_id}/run": (second, lambda _: {}),
                "POST /v1/tasks/{task_id}/reject": (third, lambda _: {"reason": "not what I agreed to"}),
            }
        )
        self.known_for["POST /v1/tasks/{task_id}/reject"] = {"task_id": [tasks[2].task_id]}
        self.known.update(
            {
                "fingerprint": [alice.fingerprint, bob.fingerprint],
                "sha256": [dataset["ciphertext_sha256"], bobs_dataset["ciphertext_sha256"], evidence_sha],
                "dataset_id": [dataset["dataset_id"]],
                "digest": [clear.digest, secret.digest, mf.builtin_descriptor("gbdt-train").digest],
                "task_id": [t.task_id for t in tasks],
            }
        )
        return self


def _registration(who: Identity, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "identity": who.public.to_line(),
        "signature": api_auth.sign_registration(who, name),
    }


def _function(owner: Identity, name: str, source: str) -> mf.FunctionDescriptor:
    return mf.function_descriptor(
        name=name,
        source=source,
        owner=owner.public,
        description="upper-cases",
        inputs=["data"],
        outputs=["out"],
    )


# The app the schemathesis tests fuzz. It is built at import, because schemathesis reads the
# OpenAPI document while pytest collects; the `world` fixture migrates and fills its database.
WORLD = World()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    WORLD.populate()
    yield WORLD
    print()
    for (test, label), statuses in sorted(STATS.items()):
        print(f"{test} {label}: {sum(statuses.values())} requests, {dict(sorted(statuses.items()))}")
    WORLD.close()


# ---- the schema and the hooks that aim the fuzzer ------------------------------------------------------------

schema = schemathesis.openapi.from_asgi("/openapi.json", WORLD.app)
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")
schema.config.update(suppress_health_check=[schemathesis.config.HealthCheck.all])

DELETE = object()
FRESH_IDS = st.binary(min_size=16, max_size=16).map(bytes.hex)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=1 << 62, max_value=1 << 80)  # past what the database's integers hold
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16)
    | st.sampled_from(["", "\x00", "0" * 32, "f" * 64, "aaaa-bbbb-cccc-dddd-eeee"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


DEEP = st.integers(min_value=2, max_value=400).map(_nested)  # deeper than any sane schema or params


def _positions(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every position inside a JSON value (dictionary keys and list indices, nested)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield (*prefix, key)
        yield from _positions(item, (*prefix, key))


def _replace(value: Any, position: tuple[Any, ...], new: Any) -> Any:
    """A copy of `value` with the item at `position` replaced by `new` (removed if `DELETE`)."""
    if not position:
        return new
    out: Any = dict(value) if isinstance(value, dict) else list(value)
    head, rest = position[0], position[1:]
    if not rest and new is DELETE:
        del out[head]
    else:
        out[head] = _replace(value[head], rest, new)
    return out


def _mutations(template: dict[str, Any]) -> st.SearchStrategy[Any]:
    """The template itself, or with one value replaced by arbitrary JSON, or one item removed."""
    positions = list(_positions(template))
    if not positions:
        return st.just(template)
    replaced = st.builds(lambda p, v: _replace(template, p, v), st.sampled_from(positions), JSON | DEEP)
    removed = st.sampled_from(positions).map(lambda p: _replace(template, p, DELETE))
    return st.just(template) | replaced | removed


def _aimed(case: Case, path_parameters: dict[str, Any], body: Any = DELETE) -> Case:
    out = case.derive()
    out.path_parameters.update(path_parameters)
    if body is not DELETE:
        out.body = body
    return out


@schema.hook
def flatmap_case(context: HookContext, case: Case) -> st.SearchStrategy[Case]:
    """As generated, or aimed at what exists: ids of existing objects in the path, or a valid body
    (and its path) with one value replaced or removed."""
    options = [st.just(case)]
    ids = {**WORLD.known, **WORLD.known_for.get(case.operation.label, {})}
    names = [n for n in case.path_parameters or {} if n in ids]
    if names:
        known = st.fixed_dictionaries({n: st.sampled_from(ids[n]) for n in names})
        options.append(known.map(lambda p: _aimed(case, p)))
    if case.operation.label in WORLD.templates:
        path_parameters, make = WORLD.templates[case.operation.label]
        bodies = FRESH_IDS.map(make).flatmap(_mutations)
        options.append(bodies.map(lambda b: _aimed(case, path_parameters, b)))
    return st.one_of(options)


def _short_long_poll(case: Case) -> None:
    """A valid long poll on a task that never leaves its state waits it out: keep it short."""
    wait = (case.query or {}).get("wait")
    try:
        seconds = float(wait)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    if LONG_POLL_S < seconds <= 30:
        case.query["wait"] = str(LONG_POLL_S)


# ---- the properties ---------------------------------------------------------------------------------------


def error_of(response: Response) -> dict[str, Any]:
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == {"code", "message", "where"}, body
    assert isinstance(err["code"], str) and err["code"], body
    assert isinstance(err["message"], str) and err["message"], body
    assert err["where"] is None or isinstance(err["where"], str), body
    return err


def _check(test: str, case: Case, response: Response) -> None:
    """What holds for every answer, signed or not."""
    stats = STATS.setdefault((test, case.operation.label), Counter())
    stats[response.status_code] += 1
    assert b"Traceback" not in response.content
    if response.status_code == 503:  # documented: evidence needs an enclave worker, and none runs
        assert case.operation.label == "POST /v1/service/evidence", response.text
        assert error_of(response)["code"] == "unavailable"
    else:
        assert response.status_code < 500, (response.status_code, response.text)
    if not 200 <= response.status_code < 300:
        error_of(response)
    if case.method.upper() != case.operation.method.upper():  # the coverage phase tries other methods
        assert response.status_code == 405, (case.method, response.status_code, response.text)


@schema.parametrize()
def test_unsigned_requests(case: Case, world: World) -> None:
    _short_long_poll(case)
    response = case.call()
    _check("unsigned", case, response)
    route = (case.operation.method.upper(), case.operation.path)
    if route not in PUBLIC and case.method.upper() == route[0]:
        # a protected route refuses before it looks at the parameters or the body
        err = error_of(response)
        assert response.status_code == 401, (response.status_code, response.text)
        assert err == {"code": "unauthenticated", "message": "missing header", "where": "X-Confide-Party"}
        assert response.headers.get("www-authenticate") == ["Confide-Signature"], response.headers


@schema.parametrize()
def test_signed_requests(case: Case, world: World) -> None:
    bob = ConfideSignature(world.bob)
    _short_long_poll(case)
    response = case.call(auth=bob)
    assert bob.signed, "the request was not signed"
    _check("signed", case, response)
    assert response.status_code != 401, (bob.signed[-1][:2], response.text)


# ---- a systematic sweep: one hostile value at every position of every valid body ------------------------

HUGE = "<1e400>"  # a stand-in replaced by the number in the JSON text sent


def _json_text(body: Any) -> bytes:
    return json.dumps(body).replace(json.dumps(HUGE), "1e400").encode()


HOSTILE: list[Any] = [
    DELETE,  # the item removed
    None,
    True,
    -1,
    1 << 63,  # one past the database's BIGINT
    0.5,
    "",
    "a\x00b",  # PostgreSQL text refuses NUL
    "\ud800",  # a lone surrogate: valid JSON text, not encodable as UTF-8
    "\u00e9" * 5000,
    [],
    {},
    _nested(300),  # deeper than the JSON encoder takes when the value is echoed back
    HUGE,  # 1e400, which Python's JSON parser reads as infinity
]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hostile_value_at_every_position_of_a_valid_body(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """Bob's valid bodies (`World.templates`) with, in turn, each value replaced by each of
    HOSTILE: every answer is a 2xx or a 4xx with the error shape. The random mutations reach
    such values only sometimes; this reaches every one, also on PostgreSQL (stricter than SQLite
    about what its columns take)."""
    if backend == "sqlite":
        target: World = request.getfixturevalue("world")
    else:
        target = World(request.getfixturevalue("postgres_url")).populate()
    failures: list[str] = []
    try:
        for label, (path_parameters, make) in sorted(target.templates.items()):
            method, path = label.split(" ", 1)
            operation = schema[path][method]
            for position in _positions(make(os.urandom(16).hex())):
                for value in HOSTILE:
                    body = _json_text(_replace(make(os.urandom(16).hex()), position, value))
                    case = operation.Case(path_parameters=path_parameters)
                    try:
                        response = case.call(
                            data=body,
                            headers={"Content-Type": "application/json"},
                            auth=ConfideSignature(target.bob, target),
                            app=target.app,
                        )
                        _check(f"sweep-{backend}", case, response)
                        assert response.status_code != 401, response.text
                    # the app's own exception surfaces here too: the ASGI client re-raises it
                    except Exception as exc:
                        shown = "removed" if value is DELETE else repr(value)[:40]
                        failures.append(f"{label} {'.'.join(map(str, position))} = {shown}: {exc!r:.300}")
    finally:
        if target is not WORLD:
            target.close()
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])


# ---- what the fuzzing found (each was a 500, a traceback in the log, or an unclear answer) ----------------


def _send(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    who: Identity | None = None,
    content_type: str | None = "application/json",
) -> requests.Response:
    """One raw request to the fuzzed app (signed by `who` over exactly these bytes)."""
    headers = {"Content-Type": content_type} if content_type else {}
    with asgi.get_client(WORLD.app) as client:  # type: ignore[arg-type]
        return client.request(
            method, target, data=body, headers=headers, auth=ConfideSignature(who) if who else None
        )


def _error(r: requests.Response, status: int, code: str, where: str | None) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["where"] == where, body
    return str(body["error"]["message"])


def test_protected_routes_answer_401_before_parsing_the_body(world: World) -> None:
    # was 422 "body.12: JSON decode error": FastAPI parsed the body before the auth dependency ran
    for target in ("/v1/tasks", "/v1/datasets", f"/v1/tasks/{'0' * 32}/approvals"):
        r = _send("POST", target, b'{"manifest":')
        assert _error(r, 401, "unauthenticated", "X-Confide-Party") == "missing header"
        assert r.headers["WWW-Authenticate"] == "Confide-Signature"


def test_a_body_that_is_not_json_is_400_invalid_json_at_body(world: World) -> None:
    for body, reason in (
        (b'{"manifest":', "Expecting value"),  # was 422 invalid-request at "body.12"
        (b'{"manifest": "\xff"}', "can't decode byte 0xff"),  # was 400 "There was an error parsing the body"
        (b'{"manifest":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "recursion"),  # the same
    ):
        for who, target in ((world.bob, "/v1/tasks"), (None, "/v1/parties")):  # protected and public
            message = _error(_send("POST", target, body, who=who), 400, "invalid-json", "body")
            assert message.startswith("not valid JSON") and reason in message, message


def test_integers_beyond_the_database_are_422(world: World) -> None:
    # was 500 (OverflowError: Python int too large to convert to SQLite INTEGER)
    r = _send("GET", f"/v1/audit?after={1 << 63}", who=world.bob)
    assert "less than or equal to 9223372036854775807" in _error(r, 422, "invalid-request", "query.after")
    assert _send("GET", f"/v1/audit?after={(1 << 63) - 1}", who=world.bob).json() == {"events": []}
    # was 500 (the same on SQLite; "bigint out of range" on PostgreSQL)
    body = world.dataset(world.bob, b"rows\n")
    r = _send("POST", "/v1/datasets", _json_text({**body, "rows": 1 << 63}), who=world.bob)
    _error(r, 422, "invalid-request", "body.rows")
    r = _send("POST", "/v1/datasets", _json_text({**body, "rows": (1 << 63) - 1}), who=world.bob)
    assert r.status_code == 201 and r.json()["rows"] == (1 << 63) - 1, r.text


def test_a_dataset_schema_must_be_storable_and_echoable(world: World) -> None:
    body = world.dataset(world.bob, b"rows\n")
    for schema_, reason in (
        # was 201 and then 500 on every listing of the owner's datasets (or 500 at once, deeper)
        (_nested(16), "nested deeper than 16 levels"),  # 17 levels: {"a": ... {} ...}
        # was 500 (UnicodeEncodeError: surrogates not allowed)
        ({"\ud800": 1}, "not valid Unicode"),
        # was 400 "not valid JSON (non-standard JSON constant Infinity)" at "dataset <id>"
        ({"rows": HUGE}, "number out of range"),
    ):
        r = _send("POST", "/v1/datasets", _json_text({**body, "schema": schema_}), who=world.bob)
        assert reason in _error(r, 422, "invalid-request", "body.schema")
    r = _send("POST", "/v1/datasets", _json_text({**body, "schema": _nested(15)}), who=world.bob)
    assert r.status_code == 201, r.text
    assert _send("GET", "/v1/datasets", who=world.bob).status_code == 200


def test_text_the_database_refuses_is_422(world: World) -> None:
    # NUL: a 500 on PostgreSQL ("text fields cannot contain NUL (0x00) bytes"), stored on SQLite;
    # other control characters were stored and shown to every party that lists the dataset
    body = world.dataset(world.bob, b"rows\n")
    for name in ("a\x00b", "line\nbreak", "\x1b[31mred"):
        r = _send("POST", "/v1/datasets", _json_text({**body, "name": name}), who=world.bob)
        assert "no control characters" in _error(r, 422, "invalid-request", "body.name")
    source = SOURCE + "# \x00\n"
    fn = _function(world.bob, "nul", source)
    r = _send(
        "POST", "/v1/functions", _json_text({"descriptor": fn.to_json(), "source": source}), who=world.bob
    )
    assert "no NUL" in _error(r, 422, "invalid-request", "body.source")


def test_a_stray_trailing_slash_is_a_404_with_the_error_body(world: World) -> None:
    # was a 307 redirect without a body, which a signed request cannot follow
    with asgi.get_client(WORLD.app) as client:  # type: ignore[arg-type]
        r = client.get("/v1/tasks/", allow_redirects=False, auth=ConfideSignature(world.bob))
    _error(r, 404, "not-found", "GET /v1/tasks/")


def test_a_long_poll_waits_a_finite_time(world: World) -> None:
    # "nan" was refused as "less than or equal to 30"
    task = world.known["task_id"][1]
    r = _send("GET", f"/v1/tasks/{task}?wait=nan&state=created", who=world.bob)
    assert "finite number" in _error(r, 422, "invalid-request", "query.wait")
