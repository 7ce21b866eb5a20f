"""Helpers shared by the benchmark scripts: percentiles and a description of the machine."""

from __future__ import annotations

import inspect
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
    exit before they could be read. Between full scans of /proc (every `rescan_s`, to find new
    children) only the tree's known processes are read: scanning all of /proc every 20 ms took a
    tenth of a core from the run being measured."""

    def __init__(self, root: int, every_s: float = 0.05, rescan_s: float = 0.25) -> None:
        self.root, self.every_s, self.rescan_s, self.peak_bytes = root, every_s, rescan_s, 0
        self._stop = False
        self._tree: set[int] = {root}
        self._page = os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def _stat(pid: int) -> list[str] | None:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()
        except OSError:
            return None

    def _rescan(self) -> None:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (fields := self._stat(int(entry))) is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
        tree, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo.extend(children.get(pid, ()))
        self._tree = tree

    def _tree_rss(self) -> int:
        total = 0
        for pid in self._tree:
            fields = self._stat(pid)
            if fields is not None:
                total += int(fields[21]) * self._page  # field 24: rss in pages
        return total

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop:
            if time.monotonic() - last_scan >= self.rescan_s:
                self._rescan()
                last_scan = time.monotonic()
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


# ONNX Runtime as the infer built-in runs it (one intra-op and one inter-op thread, sequential, no
# spinning, the CPU provider): `ort_session` in this process, and ORT_SESSION_SRC, the same function's
# source, which a sandboxed function's source includes to build its session the same way (its zygote
# pre-imports confide.enclave.infer.split, as the enclave's does).
def ort_session(model: bytes) -> Any:
    import onnxruntime as ort

    from confide.enclave.infer.split import session_options

    ort.set_default_logger_severity(3)
    return ort.InferenceSession(model, session_options(ort), providers=["CPUExecutionProvider"])


# the future import first: it must start the sandboxed function's module
ORT_SESSION_SRC = "from __future__ import annotations\n\n" + inspect.getsource(ort_session)


class Sink:
    """An output sink that keeps what it is given."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data
