"""Helpers shared by the benchmark scripts: percentiles and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any


def percentiles(samples: list[float], *, scale: float = 1.0, digits: int = 2) -> dict[str, float]:
    """p50/p90/p99 of `samples` (each multiplied by `scale`) and their count."""
    qs = statistics.quantiles(samples, n=100) if len(samples) > 1 else samples * 99
    return {
        "p50": round(statistics.median(samples) * scale, digits),
        "p90": round(qs[89] * scale, digits),
        "p99": round(qs[98] * scale, digits),
        "n": len(samples),
    }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
