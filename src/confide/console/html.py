"""The console's HTML: one layout, tables, forms. Every value that comes from the platform or
another party goes through `esc`; markup is built only from this module's pieces."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

NAV = (
    ("/", "Inbox"),
    ("/tasks/new", "New task"),
    ("/datasets", "Datasets"),
    ("/functions", "Functions"),
    ("/audit", "Audit log"),
    ("/service", "Service"),
)


def esc(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def when(t: Any) -> str:
    """A Unix time as UTC, or '-'."""
    if isinstance(t, bool) or not isinstance(t, int | float):
        return "-"
    try:
        return datetime.fromtimestamp(float(t), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "-"


@dataclass(frozen=True)
class Frame:
    """What every page shows around its content: who this console is, and the service's kind."""

    party: str
    fingerprint: str
    simulated: bool | None  # None: not attested (yet)
    csrf: str


def page(
    frame: Frame,
    title: str,
    body: str,
    *,
    current: str = "",
    refresh_s: int | None = None,
    refresh_url: str | None = None,
    scripts: Sequence[str] = (),
) -> str:
    """The layout around `body`. `scripts` name files of console/static (the only scripts a page
    loads: from this origin, deferred, none inline)."""
    nav = "".join(
        f'<li><a href="{href}"{" aria-current=page" if href == current else ""}>{esc(label)}</a></li>'
        for href, label in NAV
    )
    banner = ""
    if frame.simulated:
        banner = (
            '<div class="banner simulated" role="alert"><strong>SIMULATED</strong> enclave backend: '
            "no protection against the host. For development only.</div>"
        )
    refresh = ""
    if refresh_s is not None:
        target = f"; url={esc(refresh_url)}" if refresh_url else ""
        refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}{target}">'
    refresh += "".join(f'<script src="/static/{esc(name)}" defer></script>' for name in scripts)

    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'{refresh}<title>{esc(title)} - Confide console</title><link rel="stylesheet" href="/static/console.css">'
        f'</head><body>{banner}<header><a class="brand" href="/">Confide</a>'
        f'<span class="who">signed in as <strong>{esc(frame.party)}</strong> '
        f"<code>{esc(frame.fingerprint)}</code></span>"
        f'<nav aria-label="Main"><ul>{nav}</ul></nav></header>'
        f"<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, caption: str, empty: str) -> str:
    """`rows` hold markup (escape values with `esc`)."""
    rows = list(rows)
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f"<table><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def notice(text: str, *, kind: str = "ok") -> str:
    role = "alert" if kind == "error" else "status"
    return f'<div class="notice {esc(kind)}" role="{role}">{esc(text)}</div>'


def form(
    frame: Frame,
    action: str,
    inner: str,
    *,
    label: str,
    multipart: bool = False,
    button_class: str = "",
    attrs: Mapping[str, str] | None = None,
) -> str:
    enctype = ' enctype="multipart/form-data"' if multipart else ""
    cls = f' class="{esc(button_class)}"' if button_class else ""
    extra = "".join(f' {esc(k)}="{esc(v)}"' for k, v in (attrs or {}).items())
    return (
        f'<form method="post" action="{esc(action)}"{enctype}{extra}>'
        f'<input type="hidden" name="csrf" value="{esc(frame.csrf)}">{inner}'
        f"<button type=submit{cls}>{esc(label)}</button></form>"
    )


def field(
    name: str, label: str, *, kind: str = "text", value: str = "", hint: str = "", required: bool = False
) -> str:
    ident = f"f-{name}"
    hint_id = f"{ident}-hint"
    described = f' aria-describedby="{hint_id}"' if hint else ""
    req = " required" if required else ""
    hint_html = f'<small id="{hint_id}">{esc(hint)}</small>' if hint else ""
    if kind == "textarea":
        control = (
            f'<textarea id="{ident}" name="{esc(name)}" rows="6"{described}{req}>{esc(value)}</textarea>'
        )
    elif kind == "checkbox":
        return (
            f'<p class="check"><input type="checkbox" id="{ident}" name="{esc(name)}" value="1"{described}>'
            f'<label for="{ident}">{esc(label)}</label>{hint_html}</p>'
        )
    else:
        control = (
            f'<input type="{esc(kind)}" id="{ident}" name="{esc(name)}" value="{esc(value)}"{described}{req}>'
        )
    return f'<p><label for="{ident}">{esc(label)}</label>{control}{hint_html}</p>'


def select(name: str, label: str, options: Sequence[tuple[str, str]], *, hint: str = "") -> str:
    ident = f"f-{name}"
    opts = "".join(f'<option value="{esc(v)}">{esc(t)}</option>' for v, t in options)
    hint_html = f"<small>{esc(hint)}</small>" if hint else ""
    return f'<p><label for="{ident}">{esc(label)}</label><select id="{ident}" name="{esc(name)}">{opts}</select>{hint_html}</p>'


def pre(text: str, *, label: str) -> str:
    return f'<pre tabindex="0" aria-label="{esc(label)}">{esc(text)}</pre>'


def state_badge(state: Any) -> str:
    s = str(state or "?")
    return f'<span class="state state-{esc(s)}">{esc(s)}</span>'
