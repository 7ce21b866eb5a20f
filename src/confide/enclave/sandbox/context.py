"""The one argument a sandboxed function receives: ``run(ctx)``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, BinaryIO


class Context:
    """``params``: the task's parameters (JSON values). ``inputs[name]``: read-only binary file over a
    decrypted input. ``outputs[name]``: binary write handle of a declared output (streamed out)."""

    __slots__ = ("inputs", "outputs", "params")

    def __init__(
        self, params: dict[str, Any], inputs: dict[str, BinaryIO], outputs: dict[str, BinaryIO]
    ) -> None:
        self.params: dict[str, Any] = params
        self.inputs: Mapping[str, BinaryIO] = MappingProxyType(inputs)
        self.outputs: Mapping[str, BinaryIO] = MappingProxyType(outputs)

    def __repr__(self) -> str:
        return f"Context(params={sorted(self.params)}, inputs={sorted(self.inputs)}, outputs={sorted(self.outputs)})"
