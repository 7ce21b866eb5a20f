"""The one argument a sandboxed function receives: ``run(ctx)``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, BinaryIO


class Context:
    """``params``: the task's parameters (JSON values). ``inputs[name]``: read-only binary file over a
    decrypted input. ``outputs[name]``: binary write handle of a declared output (streamed out).
    ``accelerator``: None, or (reader, writer) of the byte stream to the host's accelerator process
    the enclave opened for this run (only the ``infer`` built-in's outsourced modes get one; every
    byte read from it is hostile)."""

    __slots__ = ("accelerator", "inputs", "outputs", "params")

    def __init__(
        self,
        params: dict[str, Any],
        inputs: dict[str, BinaryIO],
        outputs: dict[str, BinaryIO],
        accelerator: tuple[BinaryIO, BinaryIO] | None = None,
    ) -> None:
        self.params: dict[str, Any] = params
        self.inputs: Mapping[str, BinaryIO] = MappingProxyType(inputs)
        self.outputs: Mapping[str, BinaryIO] = MappingProxyType(outputs)
        self.accelerator = accelerator

    def __repr__(self) -> str:
        return f"Context(params={sorted(self.params)}, inputs={sorted(self.inputs)}, outputs={sorted(self.outputs)})"
