"""Progress bars for long operations (on stderr, only when it is a terminal or when asked)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

THRESHOLD_BYTES = 8 << 20


@contextmanager
def byte_progress(
    description: str, total: int, *, force: bool = False
) -> Iterator[Callable[[int], None] | None]:
    """Yields an `advance(n)` callback, or None when no bar is wanted (small file, not a terminal)."""
    if not force and (total < THRESHOLD_BYTES or not sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console  # imported only when a bar is shown (start-up time)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
