"""httpx, imported without its command-line client.

httpx imports its own CLI (rich, pygments) at import time unless that import fails; Confide never
uses it, and it costs 40-70 ms of every `confide` command's start. A None entry in `sys.modules`
makes that import fail, and httpx falls back to a stub `httpx.main`. Import httpx from here.
"""

from __future__ import annotations

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import httpx  # noqa: E402

__all__ = ["httpx"]
