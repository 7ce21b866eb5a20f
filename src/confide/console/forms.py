"""Form bodies the console's pages post: ``application/x-www-form-urlencoded`` and, for uploads,
``multipart/form-data`` (parsed with the standard library's MIME parser, bounded in size)."""

from __future__ import annotations

from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from urllib.parse import parse_qsl

from confide.enclave.errors import ConfideError

MAX_BODY_BYTES = 64 << 20  # a dataset uploaded through the browser; the CLI streams larger ones
MAX_FIELDS = 200
WHERE = "form"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass(frozen=True)
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Upload] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)

    def required(self, name: str, label: str) -> str:
        value = self.fields.get(name, "").strip()
        if not value:
            raise ConfideError(f"{label} is required", where=label)
        return value


def parse_form(content_type: str, body: bytes) -> Form:
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "application/x-www-form-urlencoded" or (not kind and not body):
        return _urlencoded(body)
    if kind == "multipart/form-data":
        return _multipart(content_type, body)
    raise ConfideError(f"unexpected form encoding {kind or '(none)'!r}", where=WHERE)


def _add(fields: dict[str, str], name: str, value: str) -> None:
    if name in fields:
        raise ConfideError(f"field {name!r} given twice", where=WHERE)
    if len(fields) >= MAX_FIELDS:
        raise ConfideError(f"more than {MAX_FIELDS} fields", where=WHERE)
    fields[name] = value


def _urlencoded(body: bytes) -> Form:
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfideError(f"not a form body ({exc})", where=WHERE) from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        _add(fields, name, value)
    return Form(fields)


def _multipart(content_type: str, body: bytes) -> Form:
    if "\r" in content_type or "\n" in content_type:
        raise ConfideError("bad content type", where=WHERE)
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart() or message.defects:
        raise ConfideError("not a multipart form body", where=WHERE)
    fields: dict[str, str] = {}
    files: dict[str, Upload] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_content_disposition() != "form-data":
            raise ConfideError("a form part without a name", where=WHERE)
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            if name in files:
                raise ConfideError(f"file {name!r} given twice", where=WHERE)
            files[name] = Upload(filename, data)
            continue
        try:
            _add(fields, name, data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfideError(f"field {name!r} is not UTF-8", where=WHERE) from None
    return Form(fields, files)
