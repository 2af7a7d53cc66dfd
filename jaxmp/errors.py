"""The errors jaxmp raises for bad input. Each message is one line naming the problem and what would be
valid; the command lines print it and exit with status 2."""

from __future__ import annotations

__all__ = ["UsageError", "DataError"]


class UsageError(ValueError):
    """Bad input from the user: a flag, a run directory, a model or checkpoint that cannot be used."""


class DataError(ValueError):
    """Bad data input: a missing, empty or unreadable corpus, an unknown tokenizer, a split too short."""
