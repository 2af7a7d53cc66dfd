"""SIGINT and SIGTERM during a run: caught from its start, acted on between accumulation windows."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

__all__ = ["Signals", "Interrupted"]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before training started; the run directory is as it was."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum} before training started; nothing was written")
        self.signum = signum


class Signals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between micro-steps."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
