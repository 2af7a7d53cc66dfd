"""The same training under several precision policies, side by side (CLI: ``python -m jaxmp.compare``).

``compare(config, variants, out)`` trains each :class:`Variant` with :func:`jaxmp.training.loop.run`
(the code path of ``python -m jaxmp.train``) from the same seed, so every run starts from the same
parameters and sees the same batches; every other setting of ``config`` applies to all of them.
Variant ``NAME`` trains into ``out/NAME``; the report is ``report.md``, ``report.json``,
``loss.png`` and ``loss_scale.png`` in ``out``, and ``amax.png`` (delayed fp8 scales over the steps, for
a few layers) when a policy has delayed-scaling fp8 matmuls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxmp.errors import DataError, UsageError
from jaxmp.precision import get_policy
from jaxmp.scaling import NoOpLossScale, make_loss_scale
from jaxmp.training.config import TrainConfig, path_slug
from jaxmp.training.run_dir import RunDir

__all__ = ["Variant", "compare", "markdown_table"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One policy of a comparison.

    Attributes:
      name: what the report calls it (``fp16-noscale``); the run's subdirectory is its :attr:`slug`.
      policy: the policy string trained.
      loss_scale: the loss scale it trains with (``auto``, ``none``, ``dynamic``, ``static:N``).
    """

    name: str
    policy: str
    loss_scale: str

    @property
    def slug(self) -> str:
        return path_slug(self.name)


def _memory(result, accum_steps: int) -> dict[str, int] | None:
    """XLA's compiled argument/output/temp/alias bytes of the step that trained, one accumulation window
    per call (a cached compile)."""
    compiled = result.train_step.lower(result.state, result.task.window(0, accum_steps)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {
        f"{kind}_bytes": int(getattr(stats, f"{kind}_size_in_bytes"))
        for kind in ("argument", "output", "temp", "alias")
    }


def _row(variant: Variant, config: TrainConfig, summary: dict, records: list, memory: dict | None) -> dict:
    zero_fractions = [r["grad_zero_fraction"] for r in records if "grad_zero_fraction" in r]
    step_time = summary.get("step_time_s")
    return {
        "name": variant.name,
        "policy": str(get_policy(variant.policy)),
        "loss_scale": variant.loss_scale,
        "run_dir": variant.slug,
        "final_val_loss": summary.get("final_val_loss"),
        "step_time_s": step_time,
        "tokens_per_s": config.batch_size * config.seq_len / step_time if step_time else None,
        "state_bytes_per_param": summary.get("state_bytes_per_param"),
        "compiled_memory": memory,
        "skipped_steps": summary.get("skipped_steps"),
        "final_loss_scale": summary.get("final_loss_scale"),
        "grad_zero_fraction": statistics.fmean(zero_fractions) if zero_fractions else None,
        "grad_zero_fraction_last": zero_fractions[-1] if zero_fractions else None,
    }


def _add_ratios(rows: list[dict]) -> None:
    """``val_loss_ratio`` and ``step_time_ratio`` against the first plain-fp32 row (None without one)."""
    fp32 = str(get_policy("fp32"))
    reference = next((r for r in rows if r["policy"] == fp32 and r["final_val_loss"] is not None), None)
    for row in rows:
        for key, ratio in (("final_val_loss", "val_loss_ratio"), ("step_time_s", "step_time_ratio")):
            ok = reference is not None and row[key] is not None and reference[key]
            row[ratio] = row[key] / reference[key] if ok else None


def _format(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """The report's table, one row per policy."""
    mib = 2.0**20
    lines = [
        "| policy | loss scale | val loss | ×fp32 | step ms | ×fp32 | tokens/s | state B/param "
        "| XLA arg / out / temp MiB | skipped | final scale | grad zeros |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        memory = r["compiled_memory"]
        memory_text = (
            "—"
            if memory is None
            else " / ".join(f"{memory[f'{k}_bytes'] / mib:.1f}" for k in ("argument", "output", "temp"))
        )
        step_ms = None if r["step_time_s"] is None else 1000 * r["step_time_s"]
        zeros = None if r["grad_zero_fraction"] is None else 100 * r["grad_zero_fraction"]
        lines.append(
            f"| {r['name']} | {r['loss_scale']} | {_format(r['final_val_loss'], '.4f')} "
            f"| {_format(r['val_loss_ratio'], '.4f')} | {_format(step_ms, '.1f')} "
            f"| {_format(r['step_time_ratio'], '.2f')} | {_format(r['tokens_per_s'], ',.0f')} "
            f"| {_format(r['state_bytes_per_param'], '.2f')} | {memory_text} | {_format(r['skipped_steps'], 'd')} "
            f"| {_format(r['final_loss_scale'], 'g')} | {_format(zeros, '.4f')}% |"
        )
    return "\n".join(lines)


def _check(config: TrainConfig, variants: list[Variant], out: Path) -> list[TrainConfig]:
    """Every run's config, after checking everything that can be checked before training."""
    from jaxmp import models

    if config.resume or config.export_hf:
        raise UsageError("compare starts fresh runs: `resume` and `export_hf` are not supported")
    names = [variant.name for variant in variants]
    if not variants or len(set(names)) < len(names):
        raise UsageError(f"compare needs distinct variants, got {names}")
    slugs = [variant.slug for variant in variants]
    if len(set(slugs)) < len(slugs):
        raise UsageError(f"variants {' '.join(names)} share a directory name ({' '.join(slugs)}); rename one")
    if not config.init:
        try:
            models.get_config(config.model)
        except ValueError as error:
            raise UsageError(f"`model`: {error}") from None
    if out.exists() and not out.is_dir():
        raise UsageError(f"`out` {out} is a file; give a directory")
    if (out / "report.json").exists() and not config.overwrite:
        raise UsageError(f"{out} already holds a report; choose another `out` or pass `overwrite`")
    configs = []
    for variant in variants:
        run_config = dataclasses.replace(
            config, policy=variant.policy, loss_scale=variant.loss_scale, out=str(out / variant.slug)
        )
        run_config.check()
        RunDir(run_config.out, resume=False, overwrite=config.overwrite)
        configs.append(run_config)
    return configs


def compare(
    config: TrainConfig, variants: list[Variant], out: Path, log: Callable[[str], None] | None = None
) -> list[dict]:
    """Trains every variant into ``out/<slug>``, writes the report, returns its rows.

    ``log`` receives each run's messages and a line per finished run (default: stderr).

    Raises:
      UsageError, DataError: bad input, before anything is written.
    """
    from jaxmp import plots
    from jaxmp.files import write_text_atomically
    from jaxmp.training.loop import TrainingStopped, run

    log = log or (lambda message: print(message, file=sys.stderr))
    configs = _check(config, variants, out)
    out_existed = out.exists()
    rows, curves, scaled = [], {}, {}
    for index, (variant, run_config) in enumerate(zip(variants, configs, strict=True), start=1):
        status, memory, summary = "ok", None, {}
        try:
            result = run(run_config, log=lambda message, name=variant.name: log(f"  {name}: {message}"))
            summary, memory = result.summary, _memory(result, run_config.accum_steps)
            status = "interrupted" if result.interrupted_by is not None else status
        except TrainingStopped as error:
            status = str(error)
        except (UsageError, DataError):  # bad data or --init: the first run finds it before writing
            if not out_existed:
                with contextlib.suppress(OSError):
                    out.rmdir()  # made by that run's directory, now empty again
            raise
        log(
            f"[{index}/{len(variants)}] {variant.name}: {variant.policy} (loss scale {variant.loss_scale}): "
            f"{status}, val loss {_format(summary.get('final_val_loss'), '.4f')}"
        )
        records = RunDir.open(out / variant.slug).records()
        rows.append(_row(variant, run_config, summary, records, memory) | {"status": status})
        curves[variant.name] = records
        if not isinstance(make_loss_scale(variant.loss_scale, get_policy(variant.policy)), NoOpLossScale):
            scaled[variant.name] = records
        if status == "interrupted":
            break
    _add_ratios(rows)
    plots.plot_losses(curves, out / "loss.png")
    plots.plot_loss_scales(scaled, out / "loss_scale.png")
    delayed_fp8 = {
        name: records for name, records in curves.items() if any("fp8_scale" in r for r in records)
    }
    if delayed_fp8:
        plots.plot_fp8_scales(delayed_fp8, out / "amax.png")
    shared = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("policy", "loss_scale", "out")}
    report = {"config": shared, "policies": rows}
    write_text_atomically(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(out / "report.md", _markdown_report(rows, config, fp8_plot=bool(delayed_fp8)))
    return rows


def _markdown_report(rows: list[dict], config: TrainConfig, fp8_plot: bool) -> str:
    stopped = [f"- **{r['name']}**: {r['status']}" for r in rows if r["status"] != "ok"]
    return "\n".join(
        [
            f"# Precision comparison: {config.model}, {config.steps} steps",
            "",
            f"Same seed ({config.seed}), batches of {config.batch_size} x {config.seq_len} tokens, "
            f"learning rate {config.lr:g}. Each run's directory holds its config, metrics and summary.",
            "",
            markdown_table(rows),
            "",
            *(["Runs that did not finish:", *stopped, ""] if stopped else []),
            "- *val loss*: final validation loss; *×fp32*: ratio to the fp32 run.",
            "- *step ms*: median wall time per micro-step (compilation and evaluation fall outside the "
            "median); *tokens/s*: batch tokens / step time.",
            "- *state B/param*: bytes of params and optimizer state per parameter.",
            "- *XLA arg / out / temp*: the compiled train step's argument, output and scratch memory.",
            "- *skipped*: micro-steps dropped for non-finite gradients; *final scale*: loss scale at the end.",
            "- *grad zeros*: mean, over logged steps, of the fraction of gradient values that were exactly "
            "zero after unscaling.",
            "",
            "![train and validation loss](loss.png)",
            "",
            "![loss scale and skipped steps](loss_scale.png)",
            "",
            *(["![delayed fp8 scales of a few layers](amax.png)", ""] if fp8_plot else []),
        ]
    )
