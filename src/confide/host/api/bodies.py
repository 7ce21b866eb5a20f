"""Request bodies, validated strictly: unknown fields, wrong types and values the database cannot
store are refused with 422 naming the field."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from confide.client import api_auth
from confide.enclave import manifest as mf
from confide.enclave.encoding import canonical_json, json_depth
from confide.host.api.common import HEX32, HEX64, MAX_INT64, MAX_SCHEMA_DEPTH

# ---- request bodies (strict: unknown fields and wrong types are refused) ----------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RegisterBody(Strict):
    name: str = Field(min_length=1, max_length=api_auth.MAX_NAME_LEN)
    identity: str = Field(max_length=512)
    signature: str = Field(max_length=128)


class EvidenceBody(Strict):
    nonce: str = Field(pattern=r"^([0-9a-f]{2}){0,64}$", description="hex, at most 64 bytes; may be empty")


class DatasetBody(Strict):
    dataset_id: str = Field(pattern=HEX32)
    name: str = Field(min_length=1, max_length=256)
    schema_: dict[str, Any] = Field(alias="schema")
    rows: int | None = Field(default=None, ge=0, le=MAX_INT64)
    ciphertext_sha256: str = Field(pattern=HEX64)
    key_envelope: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        # shown to other parties; and PostgreSQL text refuses NUL (a database error, not a 4xx)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("must hold no control characters")
        return value

    @field_validator("schema_")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        # stored as canonical JSON and echoed in every listing: what the encoder refuses there
        # (deep nesting, lone surrogates, 1e400 parsed as infinity) would break them all
        if json_depth(value, MAX_SCHEMA_DEPTH + 1) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
        try:
            canonical_json(value)
            json.dumps(value, allow_nan=False)
        except (UnicodeEncodeError, ValueError):
            raise ValueError("holds text that is not valid Unicode or a number out of range") from None
        return value


class FunctionBody(Strict):
    descriptor: dict[str, Any]
    source: str | None = Field(default=None, max_length=mf.MAX_SOURCE_BYTES)
    sealed_source: str | None = Field(default=None, max_length=2 * mf.MAX_SOURCE_BYTES)

    @field_validator("source")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # compile() refuses it anyway, and PostgreSQL text refuses it with a database error
        if value is not None and "\x00" in value:
            raise ValueError("Python source holds no NUL character")
        return value


class TaskBody(Strict):
    manifest: dict[str, Any] | str = Field(description="the manifest object (or its canonical JSON text)")
    approval: dict[str, Any] | None = Field(
        default=None, description="the creator's approval of this manifest (saves a second call)"
    )


class ApprovalBody(Strict):
    approval: dict[str, Any]


class RunBody(Strict):
    pass


class RejectBody(Strict):
    reason: str | None = Field(
        default=None, min_length=1, max_length=512, description="shown to participants"
    )

    @field_validator("reason")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        # shown to other parties and in the audit log; PostgreSQL text refuses NUL
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("must hold no control characters")
        return value
