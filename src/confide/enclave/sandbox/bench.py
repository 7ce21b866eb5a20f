"""Start-up latency of a sandboxed child, for the benchmark suite (no assertions here)."""

from __future__ import annotations

import time

from confide.enclave.errors import SandboxError
from confide.enclave.sandbox.api import SandboxLimits
from confide.enclave.sandbox.zygote import Zygote

_FIRST_INSTRUCTION = """
def run(ctx):
    import time
    ctx.outputs["t"].write(repr(time.monotonic()).encode())
"""


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def bench_child_start(zygote: Zygote, n: int) -> list[float]:
    """n samples (seconds) of request-sent → first instruction of the function, with every layer
    the zygote applies. CLOCK_MONOTONIC is system-wide, so the child's reading is comparable."""
    samples: list[float] = []
    limits = SandboxLimits(wall_seconds=30.0)
    for _ in range(n):
        sink = _Buffer()
        started = time.monotonic()
        result = zygote.run(_FIRST_INSTRUCTION, params={}, inputs={}, outputs={"t": sink}, limits=limits)
        if not result.ok:
            raise SandboxError(
                f"benchmark function failed: {result.category}: {result.detail}", where="bench_child_start"
            )
        samples.append(float(sink.data.decode()) - started)
    return samples
