"""`confide ui`: a party's web console, served on 127.0.0.1 next to the party's key.

The console is a client like the CLI: every page is built from `confide.Client` calls made in this
process, approvals are signed here with the party's key, which never leaves the process, and results
are checked against their receipts and decrypted here. A local web page that can sign is a target,
so `security` admits only the browser that opened the launch URL (a per-launch token, then an
HttpOnly SameSite=Strict session cookie), only under its own Host name (DNS rebinding), and takes a
state change only with the session's CSRF token and from its own origin. Nothing is loaded from
another origin: the stylesheet ships in the package, and the one script (upload progress on the
datasets page, which works as a plain form without it) too.
"""

from __future__ import annotations

from confide.console.app import Console, create_app
from confide.console.security import Guard

__all__ = ["Console", "Guard", "create_app"]
