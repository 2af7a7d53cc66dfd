"""PNG figures for ``jaxmp.compare`` and ``jaxmp.diagnose`` (matplotlib's Agg canvas, no pyplot state).

Every figure is written atomically: to a temporary name, then renamed over ``path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxmp.diagnostics import Histogram
from jaxmp.files import atomic_write
from jaxmp.value_stats import FP16_MAX, FP16_SMALLEST_NORMAL, FP16_SMALLEST_SUBNORMAL, LOG2_BINS

__all__ = ["plot_losses", "plot_loss_scales", "plot_grad_histograms"]

Records = Sequence[Mapping[str, Any]]  # metrics.jsonl records of one run, in step order

# bfloat16 shares float32's exponent range: normals from 2**-126, subnormals down to 2**-133, max < 2**128.
_BF16_LOG2_RANGE = (-133.0, 128.0)
_FP16_LOG2_RANGE = (float(np.log2(FP16_SMALLEST_SUBNORMAL)), float(np.log2(FP16_MAX)))


def _save(figure: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(figure)
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))


def _series(records: Records, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def plot_losses(runs: Mapping[str, Records], path: str | os.PathLike) -> None:
    """Train loss (left) and validation loss (right) against step, one line per run, shared axes."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    train_axes, val_axes = figure.subplots(1, 2, sharex=True, sharey=True)
    for name, records in runs.items():
        line = train_axes.plot(*_series(records, "loss"), label=name)[0]
        val_axes.plot(*_series(records, "val_loss"), marker="o", color=line.get_color(), label=name)
    for axes, title in (
        (train_axes, "train loss (mean over each logging window)"),
        (val_axes, "validation loss"),
    ):
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    train_axes.set_ylabel("loss (nats/token)")
    val_axes.legend()
    _save(figure, path)


def plot_loss_scales(runs: Mapping[str, Records], path: str | os.PathLike) -> None:
    """Loss scale (log2, left) and cumulative skipped steps (right) against step, for scaled runs."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    scale_axes, skip_axes = figure.subplots(1, 2, sharex=True)
    for name, records in runs.items():
        steps, scales = _series(records, "loss_scale")
        line = scale_axes.step(steps, np.log2(scales), where="post", label=name)[0]
        skip_axes.step(*_series(records, "skipped_steps"), where="post", color=line.get_color(), label=name)
    if not runs:
        scale_axes.text(0.5, 0.5, "no policy uses loss scaling", ha="center", transform=scale_axes.transAxes)
    scale_axes.set_title("loss scale")
    scale_axes.set_ylabel("log2 loss scale")
    skip_axes.set_title("skipped (non-finite) micro-steps, cumulative")
    for axes in (scale_axes, skip_axes):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    if runs:
        skip_axes.legend()
    _save(figure, path)


def plot_fp8_scales(runs: Mapping[str, Records], path: str | os.PathLike, layers: int = 3) -> None:
    """Delayed fp8 scales (log2) against step: one panel per tensor (``x``, ``w``, ``grad``), one line
    per run and layer, for the first, middle and last of each run's fp8 dots (``fp8_scale`` records)."""
    figure = Figure(figsize=(13, 4.2), layout="constrained")
    panels = figure.subplots(1, 3, sharex=True)
    for name, records in runs.items():
        logged = [r for r in records if r.get("fp8_scale")]
        dots = list(logged[0]["fp8_scale"]) if logged else []
        chosen = sorted({dots[i] for i in np.linspace(0, len(dots) - 1, min(layers, len(dots))).astype(int)})
        for dot in chosen:
            steps = [r["step"] for r in logged]
            for tensor, axes in enumerate(panels):
                axes.plot(
                    steps, np.log2([r["fp8_scale"][dot][tensor] for r in logged]), label=f"{name}: {dot}"
                )
    for axes, tensor in zip(panels, ("x (E4M3)", "w (E4M3)", "output gradient (E5M2)"), strict=True):
        axes.set_title(f"scale of {tensor}")
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("log2 scale = log2(fp8 max / amax)")
    panels[-1].legend(fontsize="small")
    _save(figure, path)


def plot_sensitivity(options: Sequence[Any], assignment: Mapping[str, str], path: str | os.PathLike) -> None:
    """Per unit and candidate dtype (``jaxmp.policy_search.Option``): the predicted validation loss
    change (left; a cross where the unit breaks under the dtype) and the saving (right); the chosen
    options' bars are outlined."""
    figure = Figure(figsize=(13, 0.35 * len({o.unit for o in options}) + 2.5), layout="constrained")
    loss_axes, saving_axes = figure.subplots(1, 2, sharey=True)
    units = list(dict.fromkeys(o.unit for o in options))
    dtypes = list(dict.fromkeys(o.dtype for o in options))
    height = 0.8 / len(dtypes)
    for index, dtype in enumerate(dtypes):
        chosen = [o for o in options if o.dtype == dtype]
        rows = np.array([units.index(o.unit) for o in chosen]) + index * height - 0.4 + height / 2
        increases = np.array([o.loss_increase for o in chosen], dtype=float)
        finite = np.isfinite(increases)
        edges = ["black" if assignment.get(o.unit) == dtype else "none" for o in chosen]
        loss_axes.barh(
            rows[finite], increases[finite], height, label=dtype, edgecolor=np.array(edges)[finite]
        )
        loss_axes.plot(np.zeros((~finite).sum()), rows[~finite], "x", color="red", markersize=9)
        saving_axes.barh(rows, [o.saving for o in chosen], height, label=dtype, edgecolor=edges)
    loss_axes.set_yticks(range(len(units)), units)
    loss_axes.invert_yaxis()
    loss_axes.set_xscale("symlog", linthresh=1e-4)
    loss_axes.set_title("predicted validation loss change (x: breaks)")
    saving_axes.set_title("saving when lowered (outlined: chosen)")
    for axes in (loss_axes, saving_axes):
        axes.axvline(0, color="gray", linewidth=0.8)
        axes.grid(alpha=0.3, axis="x")
    saving_axes.legend()
    _save(figure, path)


def plot_grad_histograms(histograms: Sequence[Histogram], title: str, path: str | os.PathLike) -> None:
    """One panel per loss scale: ``log2 |gradient|`` of the policy (bars) and of fp32 (outline).

    fp16's subnormal and normal ranges and bf16's range are shaded; values left of fp16's range
    are zero in fp16, values right of it are inf.
    """
    figure = Figure(figsize=(11, 3.6 * len(histograms)), layout="constrained")
    axes_list = np.atleast_1d(figure.subplots(len(histograms), 1, sharex=True))
    occupied = [b for h in histograms for b, c in zip(LOG2_BINS, h.policy + h.reference, strict=True) if c]
    low = min([*occupied, -34]) - 4
    high = max([*occupied, 18]) + 4
    for axes, histogram in zip(axes_list, histograms, strict=True):
        axes.axvspan(
            *_BF16_LOG2_RANGE, color="tab:green", alpha=0.08, label="bf16 range (to 2^-133 .. 2^128)"
        )
        axes.axvspan(
            _FP16_LOG2_RANGE[0],
            np.log2(FP16_SMALLEST_NORMAL),
            color="tab:orange",
            alpha=0.18,
            label="fp16 subnormals",
        )
        axes.axvspan(
            np.log2(FP16_SMALLEST_NORMAL),
            _FP16_LOG2_RANGE[1],
            color="tab:blue",
            alpha=0.12,
            label="fp16 normals",
        )
        axes.bar(
            LOG2_BINS + 0.5,
            histogram.policy,
            width=1.0,
            color="tab:blue",
            alpha=0.7,
            label=f"policy ({histogram.policy_zeros:,} exact zeros)",
        )
        axes.stairs(
            histogram.reference,
            np.append(LOG2_BINS, LOG2_BINS[-1] + 1),
            color="black",
            label=f"fp32 x scale ({histogram.reference_zeros:,} exact zeros)",
        )
        axes.set_title(f"{title}\nparameter gradients at loss scale {histogram.scale:g}")
        axes.set_ylabel("values (log scale)")
        axes.set_yscale("log")
        axes.set_xlim(low, high)
        axes.legend(loc="upper left", fontsize="small")
    axes_list[-1].set_xlabel("log2 |gradient x loss scale|")
    _save(figure, path)
