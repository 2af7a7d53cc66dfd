"""Files the data pipeline derives and keeps (packed tokens, trained tokenizers), written atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from jaxmp.errors import DataError
from jaxmp.files import atomic_write

__all__ = ["write_cache_file"]


def write_cache_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes ``path`` with ``write(file)`` atomically; raises ``DataError`` naming it when that fails."""
    try:
        atomic_write(path, write)
    except OSError as error:
        raise DataError(f"cannot write {path}: {error.strerror or error}") from None
