"""The command lines: ``python -m jaxmp.<verb>`` runs ``jaxmp.cli.<verb>.main``.

This package is the only place that knows about flags; the library below it (``jaxmp.training``,
``jaxmp.inference``, ``jaxmp.data`` and the numerics modules) never imports it. What every command
does with bad input is defined here once: one line on stderr, exit status 2.

Each verb's ``main(argv)`` is ``run_cli(PROG, body, argv)``: ``body`` parses its flags with a
:class:`UsageParser`, checks every input, then works. :func:`run_cli` is the one place that turns
the errors of bad input (``UsageError``, ``DataError``, a path that cannot be read or written, a
full disk, text that is not UTF-8, JSON that does not parse, a damaged safetensors file) into
``{prog}: error: {one line}``; any other exception is a bug and keeps its traceback. Library
messages name an argument in backticks (```seq_len` must be >= 1``); every such argument is a flag
of the same name, and the message shows it as one (``--seq-len must be >= 1``). This module
imports nothing heavy, so ``--help`` and flag errors stay fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxmp.errors import DataError, UsageError

__all__ = ["UsageParser", "run_cli", "bad_input_message", "check_output_file", "as_flags", "print_to_stderr"]

_ARGUMENT_NAME = re.compile(r"(?<!`)`([a-z][a-z0-9_]*)`(?!`)")  # how a library message names an argument

# An OSError with one of these numbers and a file name is about a path the user gave.
_PATH_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EROFS,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.ENOTEMPTY,
    }
)
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class UsageParser(argparse.ArgumentParser):
    """An argument parser whose errors raise ``UsageError``: :func:`run_cli` prints them in one line
    and returns 2, as for every other bad input (argparse itself would print the usage too).

    Abbreviated flags are refused: argparse would take ``--policy`` for compare's ``--policies``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UsageError(message)


def run_cli(prog: str, body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """Returns ``body(argv)``, or 2 after printing ``{prog}: error: {message}`` for bad input.

    Args:
      prog: the command, e.g. ``"python -m jaxmp.generate"``.
      body: parses ``argv``, checks every input before any work, works; returns the exit status.
      argv: the arguments (None: ``sys.argv[1:]``).
    """
    try:
        return body(argv)
    except Exception as error:
        message = bad_input_message(error)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def bad_input_message(error: BaseException) -> str | None:
    """The one-line message for an error caused by bad input; None for any other error (a bug)."""
    if isinstance(error, (UsageError, DataError)):
        return as_flags(_one_line(str(error)))
    if isinstance(error, OSError):
        return _os_error_message(error)
    if isinstance(error, UnicodeDecodeError):
        return f"input is not UTF-8 text (bad byte at offset {error.start}); give UTF-8 text"
    if isinstance(error, json.JSONDecodeError):
        return (
            f"invalid JSON ({error.msg} at line {error.lineno} column {error.colno}); give a valid JSON file"
        )
    if _is_safetensors_error(error):
        return f"unreadable safetensors file ({_one_line(str(error))}); give a complete model.safetensors"
    return None


def as_flags(message: str) -> str:
    """``message`` with each argument name in backticks shown as its flag: ```top_k``` -> ``--top-k``."""
    return _ARGUMENT_NAME.sub(lambda match: "--" + match.group(1).replace("_", "-"), message)


def print_to_stderr(message: str) -> None:
    """Prints a library's message for a command-line user: on stderr, arguments shown as flags."""
    print(as_flags(message), file=sys.stderr)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Raises ``UsageError`` unless a file can be written at ``path`` (checked before any work).

    Probes the nearest existing directory on the way by creating and removing a temporary file in
    it, which also catches what permission bits do not show (a read-only file system, root's
    writes to ``/proc``).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise UsageError(f"{flag} {path}: {directory} is not a directory; give a writable file name")
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".jaxmp-probe-")
    except OSError as error:
        raise UsageError(
            f"{flag} {path} is not writable (cannot create a file in {directory}: {error.strerror or error}); "
            "give a writable file name"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (a library message may span several)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _os_error_message(error: OSError) -> str | None:
    """A full disk, or a path that cannot be read or written; None for other OS errors."""
    where = f" writing {error.filename}" if error.filename else ""
    if error.errno in _DISK_FULL_ERRNOS:
        return f"disk full: no space left{where} ({error.strerror}); free some space and retry"
    if error.errno in _PATH_ERRNOS and error.filename:
        target = f" -> {error.filename2}" if error.filename2 else ""
        return f"{error.filename}{target}: {error.strerror}"
    return None


def _is_safetensors_error(error: BaseException) -> bool:
    # safetensors is imported only when weights are read; it cannot have raised if it is not loaded.
    safetensors = sys.modules.get("safetensors")
    return safetensors is not None and isinstance(error, safetensors.SafetensorError)
