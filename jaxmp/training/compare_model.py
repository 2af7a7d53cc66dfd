"""The same training of any Flax model under several policies, side by side, from Python.

``python -m jaxmp.compare`` trains jaxmp's models from a ``TrainConfig``; this is its counterpart for
a model a user wrote (Linen or NNX): give it, its params, a loss and batches, and each policy trains
from the same params on the same batches with ``make_train_step`` (the policy applied per module,
:func:`jaxmp.module_policy.model_forward`), then is evaluated on held-out batches::

    runs = compare_policies(model, params, ["fp32", "bf16", "bf16;.*attention.*:c=f32"], batches,
                            steps=200, eval_batches=held_out)
    print(markdown_table(runs))
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.losses import lm_loss_of
from jaxmp.module_policy import cast_params_per_module, model_forward
from jaxmp.optim import make_optimizer
from jaxmp.precision import get_policy
from jaxmp.scaling import make_loss_scale
from jaxmp.train_step import TrainState, make_eval_step, make_train_step

__all__ = ["PolicyRun", "compare_policies", "markdown_table", "policy_loss"]


@dataclasses.dataclass(frozen=True)
class PolicyRun:
    """One policy's training.

    Attributes:
      policy: the policy, as its canonical string.
      losses: the fp32 training loss of every step.
      eval_loss: mean loss over the evaluation batches after training (None without them).
      step_seconds: median wall time of a step (compilation left out).
      skipped_steps: steps dropped for non-finite gradients.
      final_loss_scale: the loss scale at the end.
      params: the trained params (on the host), with ``keep_params``; else None.
    """

    policy: str
    losses: tuple[float, ...]
    eval_loss: float | None
    step_seconds: float
    skipped_steps: int
    final_loss_scale: float
    params: Any = None


def policy_loss(model: Any, policy: Any, loss_fn: Callable[[Any, Any], jax.Array]) -> Callable:
    """``train_loss(params, batch, rng) -> (loss, {})`` of ``model`` under ``policy`` (per module,
    :func:`model_forward`), for ``make_train_step``/``make_eval_step`` with ``cast_params=False``."""
    forward = model_forward(model, policy)

    def train_loss(params, batch, rng):
        del rng
        return loss_fn(forward(params, batch["input_ids"]), batch), {}

    return train_loss


def compare_policies(
    model: Any,
    params: Any,
    policies: Sequence[str],
    batches: Sequence[Any],
    *,
    steps: int,
    loss_fn: Callable[[Any, Any], jax.Array] = lm_loss_of,
    eval_batches: Sequence[Any] = (),
    learning_rate: float = 1e-3,
    loss_scale: str = "auto",
    keep_params: bool = False,
) -> list[PolicyRun]:
    """Trains ``model`` from ``params`` for ``steps`` steps under each policy.

    Args:
      model: a Linen or NNX model (or one of jaxmp's), called as ``model(batch["input_ids"])``.
      params: its float32 master params (Linen params tree, or NNX ``State`` of ``nnx.Param``).
      policies: policy strings; each run starts from ``params`` cast to its param dtypes.
      batches: training batches, used in order and cycled (dicts with ``input_ids`` and what
        ``loss_fn`` reads).
      steps: optimizer steps per policy.
      loss_fn: ``loss_fn(outputs, batch) -> scalar``; default: next-token cross-entropy against
        ``batch["targets"]``.
      eval_batches: batches for the evaluation after training.
      learning_rate: AdamW's peak rate (linear warmup over the first tenth, cosine decay).
      loss_scale: ``auto`` (dynamic when a policy uses float16), ``none``, ``dynamic`` or ``static:N``.
      keep_params: return each run's trained params (``PolicyRun.params``).

    Raises:
      ValueError: no policy, no batch, ``steps < 1``, or a policy that does not parse.
    """
    if not policies or not batches or steps < 1:
        raise ValueError(
            f"need policies, batches and `steps` >= 1; got {len(policies)}, {len(batches)}, {steps}"
        )
    parsed = [get_policy(policy) for policy in policies]  # every policy parses before any training
    runs = []
    for policy in parsed:
        train_loss = policy_loss(model, policy, loss_fn)

        optimizer = make_optimizer(
            learning_rate=learning_rate, warmup_steps=max(steps // 10, 1), total_steps=steps, weight_decay=0.0
        )
        state = TrainState.create(
            # a copy: the step donates its state, and the next policy starts from the same params
            params=jax.tree.map(jnp.array, cast_params_per_module(params, policy, to="param")),
            optimizer=optimizer,
            loss_scale=make_loss_scale(loss_scale, policy),
        )
        step = make_train_step(train_loss, optimizer, policy, cast_params=False, cast_batch=False)
        losses, seconds = [], []
        for index in range(steps):
            started = time.perf_counter()
            state, metrics = step(state, batches[index % len(batches)])
            losses.append(float(metrics["loss"]))  # waits for the step
            seconds.append(time.perf_counter() - started)
        evaluate = make_eval_step(train_loss, policy, cast_params=False, cast_batch=False)
        eval_losses = [float(evaluate(state.params, batch)[0]) for batch in eval_batches]
        runs.append(
            PolicyRun(
                policy=str(policy),
                losses=tuple(losses),
                eval_loss=float(np.mean(eval_losses)) if eval_losses else None,
                step_seconds=statistics.median(seconds[1:] or seconds),  # the first step compiles
                skipped_steps=int(state.skipped_steps),
                final_loss_scale=float(state.loss_scale.loss_scale),
                params=jax.device_get(state.params) if keep_params else None,
            )
        )
    return runs


def markdown_table(runs: Sequence[PolicyRun]) -> str:
    """The runs as a markdown table; ratios against the float32 run (or the first)."""
    reference = next((run for run in runs if run.policy == str(get_policy("fp32"))), runs[0])

    def ratio(value: float | None, base: float | None) -> str:
        return "—" if value is None or not base else f"{value / base:.4f}"

    lines = [
        "| policy | final train loss | eval loss | ×fp32 | step ms | ×fp32 | skipped | final scale |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        eval_text = "—" if run.eval_loss is None else f"{run.eval_loss:.4f}"
        lines.append(
            f"| `{run.policy}` | {run.losses[-1]:.4f} | {eval_text} | {ratio(run.eval_loss, reference.eval_loss)} "
            f"| {1000 * run.step_seconds:.1f} | {ratio(run.step_seconds, reference.step_seconds)} "
            f"| {run.skipped_steps} | {run.final_loss_scale:g} |"
        )
    return "\n".join(lines)
