"""A terminal progress bar that stays hidden for quick tasks."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """`update(done)` redraws `label [#####.....] done/total` on one line of a terminal,
    but only once the task has run longer than `delay` seconds, so fast loads print nothing."""

    def __init__(self, label: str, total: int, *, delay: float = 0.5, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.total = max(total, 1)
        self.delay = delay
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.monotonic()
        self.shown = False

    def update(self, done: int) -> None:
        """Records progress; draws once the delay has passed (terminals only)."""
        if not self.stream.isatty() or time.monotonic() - self.start < self.delay:
            return
        filled = self.width * min(done, self.total) // self.total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total}")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """Ends the bar's line if it was drawn."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
