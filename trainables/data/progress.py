"""A one-line progress bar on stderr, for the slice cache's build."""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on stderr (redrawn on a terminal; every 10% otherwise)."""

    def __init__(self, total: int, enabled: bool, what: str = "slice cache") -> None:
        self.total, self.enabled, self.what = total, enabled, what
        self.tty, self.t0, self.step = sys.stderr.isatty(), time.time(), max(1, total // 10)

    def update(self, done: int, slices: int) -> None:
        if not self.enabled or not (self.tty or done % self.step == 0 or done == self.total):
            return
        filled = int(30 * done / max(self.total, 1))
        line = (f"[oodsweep] {self.what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} cases, "
                f"{slices} slices, {time.time() - self.t0:.0f}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)
