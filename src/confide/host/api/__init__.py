"""The platform's HTTP API (PROTOCOL.md §7), built with FastAPI; OpenAPI at ``/openapi.json``.

Every call but ``GET /v1/health``, ``GET /v1/platform``, ``/v1/service*`` and ``POST /v1/parties`` is
authenticated with `confide.client.api_auth` (nonces kept in the database, so a replay is refused
after a restart and by every server sharing the database; the signature names this platform's id,
so a request signed for another platform is refused), before anything else of the request is
looked at; an upload before a byte of its body is read (its length and digest are declared and
signed; quota, upload slots and time limits in `state.UploadLimits`). A party
sees its own objects and the tasks it takes part in; anything else answers 404, exactly like an
object that does not exist. Requests are validated strictly (JSON bodies parsed strictly, unknown
fields rejected, values the database cannot store refused) and every error is
``{"error": {"code", "message", "where"}}`` (tests/test_api_fuzz.py fuzzes every operation).

The platform is untrusted: the checks it makes on manifests, approvals and envelopes are a
courtesy that gives early, clear errors. The enclave makes them again.
"""

from confide.host.api.app import create_app
from confide.host.api.errors import ApiError
from confide.host.api.state import Platform

__all__ = ["ApiError", "Platform", "create_app"]
