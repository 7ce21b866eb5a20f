"""The client's HTTP connection (confide.client.http) against a real socket server: a kept-alive
connection the server closed while idle is noticed and the request sent once more on a new one,
signed afresh; a server that refuses an upload before reading it is heard; no answer at all is an
`Unreachable` error naming the call."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from confide.client.http import Connection, HttpError
from confide.client.transport import ApiError, Transport, Unreachable
from confide.enclave.keys import Identity


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[dict[str, Any]]] = []
    close_after_reply = False

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        if type(self).close_after_reply:  # the server's idle timeout, without saying so
            self.close_connection = True

    def do_GET(self) -> None:
        if self.path == "/v1/platform":
            self._reply(200, {"platform_id": "ab" * 16})
            return
        type(self).seen.append({"path": self.path, "nonce": self.headers.get("x-confide-nonce")})
        self._reply(200, {"n": len(type(self).seen)})

    def do_PUT(self) -> None:  # refuses before reading the body
        self._reply(413, {"error": {"code": "too_large", "message": "quota exceeded", "where": "upload"}})
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_connection_closed_while_idle_is_retried_once_and_signed_afresh(server: str) -> None:
    _Handler.close_after_reply = True
    try:
        api = Transport(server, Identity.generate("p"))
        assert [api.call("GET", "/v1/things")["n"] for _ in range(3)] == [1, 2, 3]
        nonces = [s["nonce"] for s in _Handler.seen]
        assert len(set(nonces)) == 3  # each request once, each with its own nonce
    finally:
        _Handler.close_after_reply = False


def test_kept_alive_calls_share_one_connection(server: str) -> None:
    conn = Connection(server, timeout=5)
    first = conn.request("GET", "/a", headers=dict)
    sock = conn._conn.sock if conn._conn is not None else None
    second = conn.request("GET", "/b", headers=dict)
    assert first.json() == {"n": 1} and second.json() == {"n": 2}
    assert sock is not None and conn._conn is not None and conn._conn.sock is sock


def test_an_upload_refused_before_it_is_read_reports_the_refusal(server: str, tmp_path: Path) -> None:
    blob = tmp_path / "big.bin"
    blob.write_bytes(b"\0" * (8 << 20))
    api = Transport(server, Identity.generate("p"))
    with pytest.raises(ApiError, match="quota exceeded") as err:
        api.put_blob(blob)
    assert err.value.status == 413


def test_no_answer_is_unreachable_naming_the_call() -> None:
    api = Transport("http://127.0.0.1:9", Identity.generate("p"))  # discard port: nothing listens
    with pytest.raises(Unreachable, match="cannot reach the platform") as err:
        api.call("GET", "/v1/platform", signed=False)
    assert err.value.where == "GET http://127.0.0.1:9/v1/platform"
    with pytest.raises(HttpError):
        Connection("http://127.0.0.1:9", timeout=2).request("GET", "/", headers=dict)
    with pytest.raises(ValueError, match="not an http"):
        Connection("ftp://x", timeout=1)
