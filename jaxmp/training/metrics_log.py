"""The metrics log: one record per logging interval, written to every sink, kept for the summary.

The training loop reports each finished micro-step (``add``) and update (``advance``); every
``log_every`` updates it closes the logging window (``end_window``), adds the evaluation when
there is one, and writes the record (``write``). A record goes to ``metrics.jsonl`` through the run
directory, to TensorBoard event files in ``RUN_DIR/tensorboard/``, to Weights & Biases when a
project is given, and to the progress display: a tqdm bar on a terminal, one line per record
elsewhere. The newest record and evaluation stay in memory for the run's summary; a resumed run
starts from the records its directory holds and from its checkpoint's window losses.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import tqdm

from jaxmp.errors import UsageError, first_line
from jaxmp.training.config import TrainConfig
from jaxmp.training.run_dir import RunDir

__all__ = [
    "TAGS",
    "MetricsLog",
    "Window",
    "check_wandb",
    "open_metrics_log",
    "progress_line",
    "progress_style",
]

TAGS = {  # metrics.jsonl key -> TensorBoard and W&B tag
    "loss": "train/loss",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "loss_scale": "train/loss_scale",
    "skipped_steps": "train/skipped_steps",
    "grad_norm": "train/grad_norm",
    "grad_zero_fraction": "train/grad_zero_fraction",
    "learning_rate": "train/learning_rate",
    "tokens_per_s": "train/tokens_per_s",
}


class Window:
    """One logging interval: the losses and tokens of its micro-steps, and when it opened.

    Args:
      losses: losses already in the window (a resumed checkpoint's ``window_losses``).
    """

    def __init__(self, losses: Sequence[float] = ()):
        self.losses: list[float] = list(losses)
        self.tokens = 0
        self.opened = time.perf_counter()

    def record(self, update: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The ``metrics.jsonl`` record after ``update`` updates; ``metrics`` are the last micro-step's.

        ``loss`` is the mean of the window's finite losses (nan when every micro-step was skipped).
        """
        elapsed = max(time.perf_counter() - self.opened, 1e-9)
        finite = [loss for loss in self.losses if np.isfinite(loss)]
        return {
            "step": update,
            "loss": float(np.mean(finite)) if finite else float("nan"),
            "loss_scale": float(metrics["loss_scale"]),
            "skipped_steps": int(metrics["skipped_steps"]),
            "tokens_per_s": self.tokens / elapsed,
            "grad_norm": float(metrics["grad_norm"]),
            "learning_rate": float(metrics["learning_rate"]),
            "grad_zero_fraction": float(metrics["grad_zero_fraction"]),
        }


class Sink:
    """A destination for records besides ``metrics.jsonl``; subclasses override what they use."""

    def advance(self) -> None:
        """One more update finished."""

    def write(self, record: dict[str, Any]) -> None:
        """Takes one record."""

    def close(self) -> None:
        """Flushes and releases what the sink holds."""


class MetricsLog:
    """The records of one run: the open window, the sinks, the newest record and evaluation.

    Args:
      run_dir: where ``metrics.jsonl`` is appended to.
      sinks: the other destinations of every record.
      records: the records the run already logged (a resumed run's ``RunDir.records()``).
      window_losses: losses of the window the run was in (a resumed checkpoint's).
    """

    def __init__(
        self,
        run_dir: RunDir,
        sinks: Sequence[Sink] = (),
        *,
        records: Sequence[dict[str, Any]] = (),
        window_losses: Sequence[float] = (),
    ):
        self._run_dir = run_dir
        self._sinks = list(sinks)
        self.window = Window(window_losses)
        self.last_record: dict[str, Any] = dict(records[-1]) if records else {}
        # A resumed run that had evaluated reports that evaluation until it evaluates again.
        self.evaluation: dict[str, Any] = next(filter(None, map(_evaluation, reversed(records))), {})

    def add(self, loss: float, tokens: int) -> None:
        """Counts one finished micro-step's loss and tokens in the window."""
        self.window.losses.append(loss)
        self.window.tokens += tokens

    def advance(self) -> None:
        """Tells the sinks (the progress bar) that one more update finished."""
        for sink in self._sinks:
            sink.advance()

    def end_window(self, update: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Closes the window with the record after ``update`` updates; the next one opens at ``write``."""
        record = self.window.record(update, metrics)
        self.window = Window()
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Writes ``record`` to ``metrics.jsonl`` and every sink and keeps it for the summary.

        The open window restarts its clock here, so evaluation and writing are not training time.
        """
        self._run_dir.append_metrics(record)
        for sink in self._sinks:
            sink.write(record)
        self.last_record = record
        self.evaluation = _evaluation(record) or self.evaluation
        self.window.opened = time.perf_counter()

    def close(self) -> None:
        """Closes every sink (the progress bar, event files, the W&B run); closing twice does nothing."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()


def _evaluation(record: dict[str, Any]) -> dict[str, Any]:
    """The validation entries (``val_loss``, ``val_accuracy``) of a record."""
    return {key: value for key, value in record.items() if key.startswith("val_")}


def progress_style(show: bool, stream: TextIO | None = None) -> str | None:
    """``"bar"`` when ``stream`` (stderr) is a terminal, ``"lines"`` otherwise, None when ``show`` is False."""
    if not show:
        return None
    return "bar" if (sys.stderr if stream is None else stream).isatty() else "lines"


def format_duration(seconds: float) -> str:
    """``52s``, ``1m52s`` or ``2h05m``."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress_line(record: dict[str, Any], total_steps: int, eta_seconds: float | None) -> str:
    """One record as a progress line: ``step 40/400  loss 2.310  tok/s 5880  eta 1m52s``.

    Validation loss and accuracy follow the loss when the record has them, skipped steps when
    there were any; the ETA is left out while it is unknown.
    """
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.3f}"]
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.3f}")
    if "val_accuracy" in record:
        parts.append(f"val acc {record['val_accuracy']:.3f}")
    if record["skipped_steps"]:
        parts.append(f"skipped {record['skipped_steps']}")
    parts.append(f"tok/s {record['tokens_per_s']:.0f}")
    if eta_seconds is not None:
        parts.append(f"eta {format_duration(eta_seconds)}")
    return "  ".join(parts)


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


class _Lines(Sink):
    """Headless progress: one line per record, through ``emit``, with an ETA from this process's pace."""

    def __init__(self, emit: Callable[[str], None], total_steps: int, start_update: int):
        self._emit = emit
        self._total_steps = total_steps
        self._start_update = start_update
        self._started = time.perf_counter()

    def write(self, record: dict[str, Any]) -> None:
        done = record["step"] - self._start_update
        elapsed = time.perf_counter() - self._started
        eta = (self._total_steps - record["step"]) * elapsed / done if done > 0 else None
        self._emit(progress_line(record, self._total_steps, eta))


class _Bar(Sink):
    """A tqdm bar over the updates (on a terminal), showing the newest record."""

    def __init__(self, total_steps: int, start_update: int):
        self._bar = tqdm.tqdm(total=total_steps, initial=start_update, unit="step", leave=False)

    def advance(self) -> None:
        self._bar.update(1)

    def write(self, record: dict[str, Any]) -> None:
        self._bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            scale=f"{record['loss_scale']:g}",
            skipped=record["skipped_steps"],
        )

    def close(self) -> None:
        self._bar.close()


def _import_tensorboardx() -> None:
    """Imports tensorboardX without PyTorch.

    tensorboardX imports ``torch`` whenever it is installed, only to accept torch tensors, which a
    JAX run never passes; that import costs ~4 s and ~180 MB. Unless torch is already imported,
    ``import torch`` is made to fail for the duration of the import (tensorboardX expects that).
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


class _TensorBoard(Sink):
    """A TensorBoard event file: one event per record, holding its scalars tagged as ``TAGS`` says.

    Each process start writes a new event file. ``purge_step`` (a resumed run's first update after
    its checkpoint) hides the points an earlier process logged from that step on: the resumed run
    logs them again. Each event is written and flushed as it comes (no background thread), so a
    killed run keeps every point logged before its newest checkpoint, as ``metrics.jsonl`` does.
    """

    def __init__(self, logdir: Path, purge_step: int | None):
        _import_tensorboardx()
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event

        self._event_type = Event
        logdir.mkdir(parents=True, exist_ok=True)
        # The suffix makes the name unique and ordered by start time within one second, as TensorBoard
        # reads a directory's files in name order.
        self._writer = EventsWriter(str(logdir / "events"), f".{time.time_ns()}")
        if purge_step is not None:
            start = Event(wall_time=time.time(), step=purge_step)
            start.session_log.status = start.session_log.START
            self._writer.write_event(start)
        self._writer.flush()

    def write(self, record: dict[str, Any]) -> None:
        event = self._event_type(wall_time=time.time(), step=record["step"])
        for key, tag in TAGS.items():
            if key in record:
                event.summary.value.add(tag=tag, simple_value=record[key])
        self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_wandb() -> None:
    """Refuses ``wandb`` when the ``wandb`` package is not installed (before any work)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UsageError("`wandb` needs the wandb package: pip install wandb") from None


class _Wandb(Sink):
    """A Weights & Biases run in ``project``, named after the run directory, logging ``TAGS`` per step.

    A resumed run starts a new W&B run with the same name.
    """

    def __init__(self, project: str, name: str, config: dict[str, Any]):
        import wandb

        try:
            self._run = wandb.init(project=project, name=name, config=config)
        except Exception as error:  # not logged in, no network: any failure to start is the user's to fix
            reason = first_line(error, limit=1000)
            raise UsageError(f"`wandb` {project}: could not start a Weights & Biases run: {reason}") from None

    def write(self, record: dict[str, Any]) -> None:
        self._run.log({tag: record[key] for key, tag in TAGS.items() if key in record}, step=record["step"])

    def close(self) -> None:
        self._run.finish()


def open_metrics_log(
    config: TrainConfig,
    run_dir: RunDir,
    *,
    start_update: int,
    window_losses: Sequence[float] = (),
    progress: str | None = None,
    emit: Callable[[str], None] | None = None,
    primary: bool = True,
) -> MetricsLog:
    """The metrics log of a run that starts (or resumes) after ``start_update`` updates.

    Args:
      config: the run's settings (``steps``, ``resume``, ``no_tensorboard``, ``wandb``).
      run_dir: the run directory; a resumed run's records are read from it once, here.
      start_update: updates done before this process started (0 for a new run).
      window_losses: losses of the logging window the resumed checkpoint was in.
      progress: ``"bar"``, ``"lines"`` (one line per record, through ``emit``) or None (no progress).
      emit: where progress lines go (default: stderr).
      primary: False in processes other than 0 of a multi-host run, which write no sink.
    """
    if not primary:
        return MetricsLog(run_dir, window_losses=window_losses)
    sinks: list[Sink] = []
    try:
        if progress == "bar":
            sinks.append(_Bar(config.steps, start_update))
        elif progress == "lines":
            sinks.append(_Lines(emit or _print_to_stderr, config.steps, start_update))
        if not config.no_tensorboard:
            purge_step = start_update + 1 if config.resume else None
            sinks.append(_TensorBoard(run_dir.tensorboard_dir, purge_step))
        if config.wandb:
            sinks.append(_Wandb(config.wandb, run_dir.path.name, dataclasses.asdict(config)))
    except BaseException:
        MetricsLog(run_dir, sinks).close()
        raise
    records = run_dir.records() if config.resume else []
    return MetricsLog(run_dir, sinks, records=records, window_losses=window_losses)
