"""Atomic file writes: a reader sees the old file or the new one, never a part-written one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "write_text_atomically"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path`` (its directory made if missing), flushes
    it to disk and renames it over ``path``. Raises ``OSError``; the temporary file never outlives it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))
