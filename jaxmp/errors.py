"""The errors jaxmp raises for bad input. Each message is one line naming the problem and what would be
valid; the command lines print it and exit with status 2."""

from __future__ import annotations

__all__ = ["UsageError", "DataError", "first_line"]


class UsageError(ValueError):
    """Bad input from the user: a flag, a run directory, a model or checkpoint that cannot be used."""


class DataError(ValueError):
    """Bad data input: a missing, empty or unreadable corpus, an unknown tokenizer, a split too short."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (its type's name when empty), at most ``limit`` characters:
    how a library's multi-line error is quoted inside one of ours."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
