"""A one-line progress bar for a terminal: bytes done of total, rate, ETA.
Nothing at all when stderr is not a terminal (logs and pipes stay clean)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from common.names import format_size

WIDTH = 30
EVERY = 0.2         # seconds between redraws


class ProgressBar:
    def __init__(self, what: str, stream: TextIO | None = None, force: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.what = what
        self.start = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < EVERY and done < total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        frac = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * WIDTH)
        self.stream.write(f"\r{self.what} [{bar:<{WIDTH}}] {format_size(done)}/{format_size(total)} "
                          f"{format_size(int(rate))}/s ETA {_clock(eta)}  ")
        self.stream.flush()
        self.drawn = True

    def done(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
