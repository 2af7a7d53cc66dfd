"""The run directory: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``.

Every file is written atomically (temporary name, then rename); ``metrics.jsonl`` is
appended a line at a time and trimmed atomically when a run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from jaxmp.config import TrainConfig
from jaxmp.errors import UsageError
from jaxmp.files import write_text_atomically

__all__ = ["RunDir"]


class RunDir:
    """One run's directory. Construction only checks; nothing is written until ``start``."""

    OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "cache")

    def __init__(self, path: str | os.PathLike, *, resume: bool, overwrite: bool):
        self.path = Path(path)
        self.resume = resume
        self.overwrite = overwrite
        if resume and overwrite:
            raise UsageError("--resume and --overwrite contradict each other; give one")
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file; give a directory")
        is_run = self.config_path.is_file()
        if resume and not is_run:
            raise UsageError(
                f"--resume: {self.path} holds no run (no config.json); drop --resume to start one"
            )
        if is_run and not (resume or overwrite):
            raise UsageError(
                f"run directory {self.path} already exists; pass --resume to continue it or --overwrite"
            )

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
    def cache_dir(self) -> Path:
        return self.path / "cache"

    def saved_identity(self) -> dict[str, Any] | None:
        """The model/tokenizer/task identity recorded by the run being resumed."""
        if not self.resume:
            return None
        return json.loads(self.config_path.read_text()).get("identity")

    def start(self, config: TrainConfig, identity: dict[str, Any]) -> None:
        """Clears an overwritten run's outputs and records the config (after every check passed)."""
        if self.overwrite:
            for name in self.OUTPUTS:
                target = self.path / name
                if target.is_dir() and name != "cache":
                    shutil.rmtree(target)
                elif target.is_file():
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        record = json.loads(config.to_json()) | {"identity": identity}
        write_text_atomically(self.config_path, json.dumps(record, indent=2, sort_keys=True) + "\n")

    def trim_metrics(self, last_step: int) -> None:
        """Keeps only records with ``step <= last_step`` (those the resumed checkpoint had seen)."""
        if not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if json.loads(line)["step"] <= last_step
        ]
        write_text_atomically(self.metrics_path, "".join(line + "\n" for line in kept))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as metrics:
            metrics.write(json.dumps(record) + "\n")

    def last_metrics(self) -> dict[str, Any]:
        """The newest ``metrics.jsonl`` record ({} when there is none)."""
        if not self.metrics_path.exists():
            return {}
        lines = self.metrics_path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomically(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")
