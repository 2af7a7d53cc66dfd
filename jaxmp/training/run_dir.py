"""The run directory: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``,
``tensorboard/``, ``cache/``.

A run directory has one owner at a time: ``lock`` takes an exclusive ``flock`` on its
``.lock`` file, which the operating system releases when the process ends however it
ends, so a crashed run never leaves a stale lock behind. Only a jaxmp run (a
``config.json`` that jaxmp wrote) is ever resumed or overwritten; any other non-empty
directory is refused. Every file is written atomically (temporary name, then rename);
``metrics.jsonl`` is appended a line at a time and trimmed atomically when a run resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from jaxmp.errors import UsageError
from jaxmp.files import write_text_atomically
from jaxmp.training.config import TrainConfig, config_values

__all__ = ["RunDir", "FollowerRunDir"]

_LOCK = ".lock"


class RunDir:
    """One run's directory. Construction only checks; nothing is written before ``lock``.

    Args:
      path: the directory (``--out``).
      resume: continue the run there (it must be a jaxmp run).
      overwrite: replace the jaxmp run there (never anything else).
    """

    OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard", "cache")

    def __init__(self, path: str | os.PathLike, *, resume: bool, overwrite: bool):
        self._bind(path, resume=resume, overwrite=overwrite)
        if resume and overwrite:
            raise UsageError("`resume` and `overwrite` contradict each other; give one")
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"`out` {self.path} is a file; give a directory")
        is_run = self.saved_config is not None
        if not is_run and self._foreign_entries():
            raise UsageError(
                f"`out` {self.path} is not empty and holds no jaxmp run (no config.json written by jaxmp); "
                f"choose a new or empty directory"
            )
        if resume and not is_run:
            raise UsageError(
                f"`resume`: {self.path} holds no run (no config.json); drop `resume` to start one"
            )
        if is_run and not (resume or overwrite):
            raise UsageError(
                f"run directory {self.path} already exists; pass `resume` to continue it or `overwrite`"
            )
        if resume:
            self.records()  # a damaged metrics.jsonl is refused before any work

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        """An existing run's directory, to read: nothing is written or locked.

        Raises:
          UsageError: ``path`` holds no jaxmp run (no ``config.json`` that jaxmp wrote).
        """
        run_dir = cls.__new__(cls)
        run_dir._bind(path, resume=False, overwrite=False)
        run_dir._saved()
        return run_dir

    def _bind(self, path: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        self._lock_file: Any = None
        self._entries_before_lock: set[str] | None = None
        self.saved_config = self._read_saved_config()

    def read_config(self) -> TrainConfig:
        """The run's settings, as its ``config.json`` recorded them.

        Raises:
          UsageError: no run here, or a ``config.json`` this jaxmp cannot read back.
        """
        return TrainConfig(**config_values(self._saved(), str(self.config_path)))

    def identity(self) -> dict[str, Any]:
        """What the run trained: its ``model``, ``tokenizer`` and ``task`` names (see ``jaxmp.training.tasks``)."""
        return self._saved()["identity"]

    def _saved(self) -> dict[str, Any]:
        """The run's ``config.json`` record; ``UsageError`` when jaxmp wrote none here."""
        if self.saved_config is None:
            raise UsageError(f"{self.path} holds no jaxmp run (no config.json written by jaxmp)")
        return self.saved_config

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    def _read_saved_config(self) -> dict[str, Any] | None:
        """The record in ``config.json`` if jaxmp wrote it (it has an ``identity``), else None."""
        if not self.config_path.is_file():
            return None
        try:
            record = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            if self.resume:
                raise UsageError(f"{self.config_path} is damaged ({error}); it cannot be resumed") from None
            return None
        if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
            return None
        return record

    def _foreign_entries(self) -> list[str]:
        """Entries that jaxmp did not put there (a killed start may leave its lock and cache)."""
        if not self.path.is_dir():
            return []
        return sorted(name for name in os.listdir(self.path) if name not in (_LOCK, "cache"))

    def saved_identity(self) -> dict[str, Any] | None:
        """The model/tokenizer/task identity recorded by the run being resumed."""
        return self.saved_config["identity"] if self.resume and self.saved_config else None

    def lock(self) -> None:
        """Makes the directory if needed and takes its exclusive lock.

        Raises:
          UsageError: another process holds the lock (its pid is named).
        """
        self._entries_before_lock = set(os.listdir(self.path)) if self.path.is_dir() else None
        self.path.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.path / _LOCK, "a+")  # noqa: SIM115 (held open until release)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise UsageError(
                f"run directory {self.path} is in use by another process (pid {holder}); "
                f"wait for it to finish or choose another `out`"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file

    def release(self) -> None:
        """Releases the lock (the lock file stays; it is harmless and reused)."""
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    def abandon(self) -> None:
        """Undoes ``lock`` and what was written since, for a run that failed before ``start``.

        A directory that ``lock`` made is removed whole; in one that existed, only the entries
        made since (a fresh ``cache/``, the lock file) are removed.
        """
        before = self._entries_before_lock
        self.release()
        if before is None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in set(os.listdir(self.path)) - before:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()

    def start(self, config: TrainConfig, identity: dict[str, Any]) -> None:
        """Clears an overwritten run's outputs and records a new run's config (after every check passed).

        A resumed run keeps the ``config.json`` it was started with.
        """
        if self.overwrite:
            for name in self.OUTPUTS:
                target = self.path / name
                if target.is_dir() and name != "cache":
                    shutil.rmtree(target)
                elif target.is_file():
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        if self.resume:
            return
        record = json.loads(config.to_json()) | {"identity": identity}
        write_text_atomically(self.config_path, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def finished(self) -> bool:
        """True when ``summary.json`` records a run that ended without interruption."""
        try:
            summary = json.loads((self.path / "summary.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(summary, dict) and summary.get("interrupted") is False

    def records(self) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` records. A torn last line (the process died while appending it) is
        left out: it was written after the newest checkpoint, so a resume logs that step again.

        Raises:
          UsageError: a line other than the last is not a JSON record.
        """
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise UsageError(
                    f"{self.metrics_path}:{number} is not a JSON record; the file is damaged"
                ) from None
        return records

    def trim_metrics(self, last_step: int) -> None:
        """Keeps only records with ``step <= last_step`` (those the resumed checkpoint had seen)."""
        if not self.metrics_path.exists():
            return
        kept = [record for record in self.records() if record["step"] <= last_step]
        write_text_atomically(self.metrics_path, "".join(json.dumps(record) + "\n" for record in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as metrics:
            metrics.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomically(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")


class FollowerRunDir(RunDir):
    """The run directory as processes other than 0 see it: checked and read, never written or locked."""

    def lock(self) -> None:
        pass

    def release(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def start(self, config: TrainConfig, identity: dict[str, Any]) -> None:
        del config, identity

    def trim_metrics(self, last_step: int) -> None:
        del last_step

    def append_metrics(self, record: dict[str, Any]) -> None:
        del record

    def write_summary(self, summary: dict[str, Any]) -> None:
        del summary
