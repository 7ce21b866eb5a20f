"""The enclave configuration. It is part of the measurement: change any field, get a new identity."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfideError, FormatError

SANDBOX_MODES = ("strict", "weak")


@dataclass(frozen=True)
class EnclaveConfig:
    memory_budget_mib: int = 1024  # like SGX's EPC: decrypted inputs + the function's data allowance
    sandbox: str = "strict"  # "weak" lets untrusted code run with a layer missing (development only)
    debug: bool = False  # a debug enclave: production policies reject its evidence
    product_id: int = 1
    security_version: int = 1
    cpu_seconds: int = 60  # per function run
    wall_seconds: float = 300.0  # per function run
    max_output_mib: int = 1024  # per declared output
    max_frame_bytes: int = 1 << 20  # largest enclave-call message accepted from the host

    def __post_init__(self) -> None:
        if self.sandbox not in SANDBOX_MODES:
            raise FormatError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}, got {self.sandbox!r}")
        for name in ("memory_budget_mib", "cpu_seconds", "max_output_mib", "max_frame_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FormatError(f"{name} must be a positive integer, got {value!r}")
        for name in ("product_id", "security_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 16:
                raise FormatError(f"{name} must be an integer in 0..65535, got {value!r}")
        if not isinstance(self.debug, bool):
            raise FormatError(f"debug must be true or false, got {self.debug!r}")
        if not isinstance(self.wall_seconds, int | float) or self.wall_seconds <= 0:
            raise FormatError(f"wall_seconds must be a positive number, got {self.wall_seconds!r}")

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget_mib << 20

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str) -> EnclaveConfig:
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise FormatError(f"unknown enclave setting(s) {', '.join(unknown)}", where=where)
        try:
            return cls(**data)
        except FormatError as exc:
            raise FormatError(exc.message, where=where) from None
        except TypeError as exc:
            raise FormatError(str(exc), where=where) from None

    @classmethod
    def load(cls, path: Path | None) -> EnclaveConfig:
        if path is None:
            return cls()
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfideError(f"cannot read enclave config ({exc.strerror})", where=str(path)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"not valid TOML ({exc})", where=str(path)) from None
        section = data.get("enclave", data)
        if not isinstance(section, dict):
            raise FormatError("[enclave] must be a table", where=str(path))
        return cls.from_dict(section, where=str(path))
