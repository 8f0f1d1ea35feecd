"""Progress output that reads well on a terminal and in a log file.

On a terminal it is a tqdm bar. Anywhere else (stderr redirected to a file or a pipe) a bar's
carriage-return redraws become one endless line, so it prints a plain line instead, at most one
every ``interval_s`` seconds, and one when it closes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

INTERVAL_S = 15.0


class Progress:
    """``with Progress(total, "requests", "req") as bar: ... bar.update(n)``; ``enabled=False``: silent."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", file: TextIO | None = None,
                 interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic, enabled: bool = True):
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.total, self.desc, self.unit = total, desc, unit
        self.interval_s, self.clock = interval_s, clock
        self.n = 0
        self._bar = None
        if enabled and _is_tty(self.file):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file)
        self._start = self._last = clock()
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self._line(f"after {now - self._start:.0f} s")

    def close(self, failed: bool = False) -> None:
        if self._closed or not self.enabled:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(f"{'stopped after' if failed else 'done in'} {self.clock() - self._start:.1f} s")

    def _line(self, when: str) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        self.file.write(f"{self.desc}: {done} {self.unit}{share}, {when}\n")
        self.file.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def quiet_library_bars(file: TextIO | None = None) -> None:
    """Turn off the bars of transformers and huggingface_hub (weight loading, shard writing) when
    ``file`` (default: stderr) is not a terminal."""
    if not _is_tty(file if file is not None else sys.stderr):
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging

        logging.disable_progress_bar()
        disable_progress_bars()


def _is_tty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
