"""The training loop behind ``python -m jaxmp.train`` (and ``jaxmp.compare``).

``run(config)`` checks every input before writing anything, then trains, logging one
record per ``log_every`` updates (``metrics.jsonl``, TensorBoard, W&B, progress; see
``jaxmp.training.metrics_log``), evaluating, checkpointing, and writing ``summary.json``. Metrics are
fetched one micro-step late, so the host never waits on the step it has just dispatched.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxmp import distributed, lowp
from jaxmp.checkpoint import Checkpointer, CheckpointError, NonFiniteStateError
from jaxmp.errors import UsageError, first_line
from jaxmp.train_step import TrainState, leaf_paths
from jaxmp.training.config import TrainConfig, default_run_dir
from jaxmp.training.metrics_log import MetricsLog, check_wandb, open_metrics_log, progress_style
from jaxmp.training.run_dir import FollowerRunDir, RunDir
from jaxmp.training.signals import Interrupted, Signals
from jaxmp.training.state import feed_by_processes, make_mesh, make_state
from jaxmp.training.tasks import Task, build_task, export_tokenizer, resolve_epochs

__all__ = ["run", "RunResult", "TrainingStopped", "RESUMABLE_CHANGES"]


class TrainingStopped(RuntimeError):
    """Training gave up (too many non-finite steps, a non-finite state, a failed checkpoint write).

    The checkpoints already written are kept, and every one of them holds a finite state.
    """


# Settings a resumed run may change: where and how it runs, not what it computes or logs.
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "resume",
        "overwrite",
        "export_hf",
        "sample_tokens",
        "keep_checkpoints",
        "max_consecutive_skips",
        "save_every",
        "mesh",
        "coordinator",
        "num_processes",
        "process_id",
        "no_tensorboard",
        "wandb",
    }
)


@dataclasses.dataclass
class RunResult:
    """What ``run`` returns: the summary written to ``summary.json`` plus live objects."""

    summary: dict[str, Any]
    state: TrainState
    task: Task
    run_dir: RunDir
    interrupted_by: int | None = None  # the signal number that stopped the run early
    train_step: Callable | None = None  # the jitted step (its ``.lower(...).compile()`` is cached)

    @functools.cached_property
    def host_params(self) -> Any:
        """The trained params, whole, on the host. Multi-host: a collective; every process reads it."""
        return distributed.to_host(self.state.params)


def run(
    config: TrainConfig, *, show_progress: bool = True, log: Callable[[str], None] | None = None
) -> RunResult:
    """Trains as ``config`` says. Bad input raises ``UsageError``/``DataError`` before any file is written.

    The run directory is locked for the whole run; a run that fails before training starts leaves
    the directory as it found it. With ``coordinator`` set, every process of a multi-host run calls
    this with the same config; process 0 alone writes the run directory's files and logs.

    Args:
      config: the run's settings.
      show_progress: a progress bar when stderr is a terminal, else one line per record through
        ``log``; False shows none.
      log: where messages go (default: stderr).

    Raises:
      TrainingStopped: after ``max_consecutive_skips`` non-finite micro-steps in a row, a state with
        non-finite params, or a checkpoint that could not be written.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    try:
        distributed.initialize(config.coordinator, config.num_processes, config.process_id)
    except ValueError as error:
        raise UsageError(str(error)) from None
    primary = distributed.is_primary()
    if not primary:
        log, show_progress = (lambda message: None), False
    config.check()
    if config.wandb:
        check_wandb()
    config = resolve_epochs(config)
    mesh = make_mesh(config)
    if config.out is None and jax.process_count() > 1:
        raise UsageError("`out` is required in a multi-host run: every process writes to the same directory")
    if config.out is None:
        now = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        config = dataclasses.replace(config, out=str(default_run_dir(config, now)))
    run_dir = (RunDir if primary else FollowerRunDir)(
        config.out, resume=config.resume, overwrite=config.overwrite
    )
    _check_export_dir(config)
    if config.resume:
        _check_resumed_config(config, run_dir.saved_config)
    with Signals() as signals:  # from here on SIGINT/SIGTERM stop the run between steps, cleanly
        run_dir.lock()
        metrics_log = MetricsLog(run_dir)
        try:
            task, state, train_step, checkpointer, window_losses = _prepare(config, mesh, run_dir, log)
            metrics_log = open_metrics_log(
                config,
                run_dir,
                start_update=int(state.step) // config.accum_steps,
                window_losses=window_losses,
                progress=progress_style(show_progress),
                emit=log,
                primary=primary,
            )
            if signals.received is not None:
                raise Interrupted(signals.received)
        except BaseException:
            metrics_log.close()
            run_dir.abandon()
            raise
        try:
            result = _train(config, task, state, train_step, checkpointer, run_dir, metrics_log, signals, log)
        finally:
            metrics_log.close()
            run_dir.release()
    if config.export_hf and result.interrupted_by is None:
        _export(config, result, log)
    return result


def _export(config: TrainConfig, result: RunResult, log: Callable[[str], None]) -> None:
    """Writes the trained model and its tokenizer to ``config.export_hf`` as a Hugging Face directory."""
    from jaxmp import hf

    params = result.host_params  # multi-host: every process takes part
    if distributed.is_primary():
        tokenizer = export_tokenizer(config, result.task)
        hf.save_pretrained(result.task.model, params, config.export_hf, tokenizer=tokenizer)
        log(f"exported a Hugging Face model and its tokenizer to {config.export_hf}")


def _check_export_dir(config: TrainConfig) -> None:
    """Refuses an ``export_hf`` target that the export after training could not write."""
    if not config.export_hf:
        return
    export = Path(config.export_hf)
    if export.exists() and not export.is_dir():
        raise UsageError(f"`export_hf` {export} is a file; give a directory")
    if export.is_dir() and any(export.iterdir()) and not config.overwrite:
        raise UsageError(
            f"`export_hf` {export} exists and is not empty; choose a new directory or `overwrite`"
        )
    existing = next(parent for parent in (export, *export.absolute().parents) if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"`export_hf` {export}: {existing} is not writable; choose another directory")


def _check_resumed_config(config: TrainConfig, saved: dict[str, Any]) -> None:
    """Refuses a resume whose settings differ from the run's own ``config.json`` where that would
    change what the run computes or logs (anything outside ``RESUMABLE_CHANGES``)."""
    defaults = dataclasses.asdict(TrainConfig())
    changed = [
        f"{name}: {saved.get(name, defaults[name])} -> {value}"
        for name, value in dataclasses.asdict(config).items()
        if name not in RESUMABLE_CHANGES and saved.get(name, defaults[name]) != value
    ]
    if changed:
        raise UsageError(
            f"`resume` of {config.out} with a different {', '.join(changed)}; resume with the run's own "
            f"settings (see its config.json)"
        )


def _prepare(config: TrainConfig, mesh, run_dir: RunDir, log: Callable):
    """Builds the task and state, restores a resumed run's newest checkpoint, and starts the directory."""
    task = build_task(config, run_dir.cache_dir)
    saved = run_dir.saved_identity()
    if saved is not None and saved != task.identity:
        changed = ", ".join(
            f"{k}: {saved.get(k)} -> {v}" for k, v in task.identity.items() if saved.get(k) != v
        )
        raise UsageError(
            f"`resume` of {run_dir.path} with a different {changed}; resume with the run's own settings"
        )
    distributed.barrier("jaxmp.training.loop: inputs checked")  # before process 0 writes what others check
    task = feed_by_processes(task, mesh, config.batch_size)
    state, train_step = make_state(config, task, mesh, log)
    window_losses: list[float] = []
    if config.resume:
        checkpointer = Checkpointer(run_dir.checkpoint_dir, keep=config.keep_checkpoints)
        latest = checkpointer.latest_step()
        total_micro = config.steps * config.accum_steps
        if latest == total_micro and run_dir.finished():
            raise UsageError(f"`resume`: run {run_dir.path} already finished its {config.steps} steps")
        update = 0
        if latest is not None:
            state, metadata = _restore(checkpointer, state, latest)
            if latest % config.accum_steps:
                raise UsageError(
                    f"{checkpointer.describe(latest)} was saved inside an accumulation window of "
                    f"{config.accum_steps} micro-steps (by a jaxmp older than window-at-once training); "
                    f"resume it with that version, or from a checkpoint at a multiple of {config.accum_steps}"
                )
            window_losses, update = metadata["window_losses"], metadata["update"]
            log(f"resuming {run_dir.path} at update {update} (micro-step {int(state.step)})")
        run_dir.trim_metrics(update)  # records logged after the checkpoint are logged again
    run_dir.start(config, task.identity)
    if not config.resume:  # after `start`, which removes an overwritten run's checkpoints/ folder
        checkpointer = Checkpointer(run_dir.checkpoint_dir, keep=config.keep_checkpoints)
    return task, state, train_step, checkpointer, window_losses


def _restore(checkpointer: Checkpointer, state: TrainState, step: int) -> tuple[TrainState, dict[str, Any]]:
    """``checkpointer.restore``; a damaged checkpoint's error says which older one is left."""
    try:
        return checkpointer.restore(state, step)
    except CheckpointError as error:
        older = [s for s in checkpointer.all_steps() if s < step]
        hint = (
            f"; delete {checkpointer.step_dir(step)} to resume from micro-step {max(older)}" if older else ""
        )
        raise CheckpointError(f"{error}{hint}") from None


def _train(
    config, task, state, train_step, checkpointer, run_dir, metrics_log: MetricsLog, signals, log
) -> RunResult:
    accum = config.accum_steps
    total_micro = config.steps * accum
    start_micro = int(state.step)
    paths = leaf_paths(state.params)
    fp8_dots = [] if state.fp8 is None else state.fp8.dot_names()
    consecutive_skips, pending = 0, None
    started = time.perf_counter()
    # Wall time between consecutive finished micro-steps; the median leaves out compilation and evaluation.
    step_seconds: list[float] = []
    last_finished = started

    def save(micro: int, losses: list[float]) -> None:
        """Checkpoints ``state`` after ``micro`` micro-steps, with the logging window's losses so far."""
        if checkpointer.latest_step() == micro:  # e.g. a signal right after a periodic save
            return
        metadata = {"update": micro // accum, "micro_step": micro, "window_losses": losses}
        try:
            checkpointer.save(micro, state, metadata)
        except NonFiniteStateError as error:
            raise TrainingStopped(f"stopped: {error} (is `lr` too large?); {_kept(checkpointer)}") from None
        except (OSError, ValueError) as error:  # tensorstore reports a full disk as a ValueError
            raise TrainingStopped(
                f"stopped: could not write checkpoint {checkpointer.step_dir(micro)}: {_write_failure(error)}; "
                f"{_kept(checkpointer)}"
            ) from None

    def handle_window(first: int, metrics: dict[str, Any]) -> None:
        """Host-side work for the finished window of micro-steps ``first ..`` (one window late)."""
        nonlocal last_finished
        metrics = jax.device_get(metrics)  # every leaf [accum]: one value per micro-step
        now = time.perf_counter()
        seconds, last_finished = (now - last_finished) / accum, now
        for index in range(accum):
            step_seconds.append(seconds)
            handle(first + index, {name: values[index] for name, values in metrics.items()})

    def handle(micro: int, metrics: dict[str, Any]) -> None:
        """Host-side work for finished micro-step ``micro`` (0-based)."""
        nonlocal consecutive_skips
        metrics_log.add(float(metrics["loss"]), task.tokens_per_batch)
        consecutive_skips = 0 if metrics["grads_finite"] else consecutive_skips + 1
        if config.max_consecutive_skips and consecutive_skips >= config.max_consecutive_skips:
            where = paths[int(metrics["nonfinite_leaf"])]
            raise TrainingStopped(
                f"stopped: {consecutive_skips} non-finite steps in a row at loss scale "
                f"{float(metrics['loss_scale']):g}; first non-finite gradient: {where}; {_kept(checkpointer)}"
            )
        if not metrics["grads_finite"]:
            log(
                f"micro-step {micro}: non-finite gradient (first: {paths[int(metrics['nonfinite_leaf'])]}), skipped"
            )
        if (micro + 1) % accum:
            return
        update = (micro + 1) // accum
        metrics_log.advance()
        if update % config.log_every == 0 or update == config.steps:
            record = metrics_log.end_window(update, metrics)
            if fp8_dots:  # each delayed-scaling fp8 dot's scales of x, w and the gradient
                record["fp8_scale"] = dict(
                    zip(fp8_dots, np.asarray(metrics["fp8_scales"]).tolist(), strict=True)
                )
            if (config.eval_every and update % config.eval_every == 0) or update == config.steps:
                record.update(task.evaluate(state.params))
            metrics_log.write(record)

    # One call per accumulation window: the step scans over its micro-batches. Checkpoints and signals
    # take effect at window boundaries; metrics are read one window late, so dispatch stays asynchronous.
    for update in range(start_micro // accum, config.steps):
        first = update * accum
        state, metrics = train_step(state, task.window(first, accum))
        if pending is not None:
            handle_window(*pending)
        pending = (first, {k: v for k, v in metrics.items() if k != "aux"})
        if config.save_every and (update + 1) % config.save_every == 0:
            handle_window(*pending)
            pending = None
            save(first + accum, metrics_log.window.losses)
        if signals.received is not None:
            if pending is not None:
                handle_window(*pending)
            save(first + accum, metrics_log.window.losses)
            metrics_log.close()
            log(
                f"interrupted by signal {signals.received}: checkpoint saved at micro-step {first + accum}; "
                f"continue with `resume`"
            )
            timing = (started, start_micro, step_seconds)
            summary = _summary(config, task, state, metrics_log, *timing, interrupted=True)
            run_dir.write_summary(summary)
            return RunResult(
                summary, state, task, run_dir, interrupted_by=signals.received, train_step=train_step
            )
    if pending is not None:
        handle_window(*pending)
    metrics_log.close()
    if checkpointer.latest_step() != total_micro:
        save(total_micro, [])
    summary = _summary(
        config, task, state, metrics_log, started, start_micro, step_seconds, interrupted=False
    )
    run_dir.write_summary(summary)
    return RunResult(summary, state, task, run_dir, train_step=train_step)


def _kept(checkpointer: Checkpointer) -> str:
    """Which checkpoint a stopped run leaves to resume from."""
    latest = checkpointer.latest_step()
    if latest is None:
        return "no checkpoint was written"
    return f"the newest checkpoint, {checkpointer.step_dir(latest)}, is kept; continue from it with `resume`"


def _write_failure(error: Exception) -> str:
    """A write error's cause in a few words; a full disk is named as such."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
        return "the disk is full"
    return first_line(error)


def _summary(
    config, task, state, metrics_log: MetricsLog, started, start_micro, step_seconds, *, interrupted
) -> dict[str, Any]:
    wall = time.perf_counter() - started
    micro_steps = int(state.step) - start_micro
    return {
        "policy": str(config.precision_policy),
        "model": task.identity["model"],
        "task": task.identity["task"],
        "steps": int(state.step) // config.accum_steps,
        "micro_steps": int(state.step),
        "interrupted": interrupted,
        "final_train_loss": metrics_log.last_record.get("loss"),
        **{f"final_{k}": v for k, v in metrics_log.evaluation.items()},
        "wall_seconds": wall,
        "tokens_per_s": micro_steps * task.tokens_per_batch / max(wall, 1e-9),
        "step_time_s": float(np.median(step_seconds)) if step_seconds else None,  # per micro-step
        "skipped_steps": int(state.skipped_steps),
        "final_loss_scale": float(state.loss_scale.loss_scale),
        "state_bytes_per_param": lowp.state_bytes_per_param(state.params, state.opt_state),
    }
