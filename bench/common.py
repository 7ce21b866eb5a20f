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


class PeakRss:
    """The largest resident set of a process tree (the process `root` and all its descendants,
    summed), sampled every `every_s` seconds from /proc while the block runs: the peak memory of an
    enclave process with its zygote and sandbox children. A sample can miss a peak shorter than
    `every_s`; Linux's per-process high-water marks (VmHWM) are not summed because the children
    exit before they could be read."""

    def __init__(self, root: int, every_s: float = 0.02) -> None:
        self.root, self.every_s, self.peak_bytes = root, every_s, 0
        self._stop = False

    def _tree_rss(self) -> int:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        page = os.sysconf("SC_PAGE_SIZE")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry)
            children.setdefault(int(fields[1]), []).append(pid)  # field 4: ppid
            rss[pid] = int(fields[21]) * page  # field 24: rss in pages
        total, todo = 0, [self.root]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo.extend(children.get(pid, ()))
        return total

    def _run(self) -> None:
        while not self._stop:
            self.peak_bytes = max(self.peak_bytes, self._tree_rss())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRss:
        import threading

        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop = True
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak_bytes / (1 << 20), 1)
