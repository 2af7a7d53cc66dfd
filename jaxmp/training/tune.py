"""Adaptive precision: the cheapest per-unit policy that keeps a model's validation loss within a budget.

``tune(model, params, train_batches, val_batches, candidates=..., objective=..., budget=...)``:

1. **Reference.** The model trains ``steps`` steps in float32 (:func:`compare_policies`); its final
   params are where sensitivity is measured (an untrained model's sensitivity says little), and its
   validation loss is the reference.
2. **Sensitivity.** For every unit (a module path prefix of ``depth`` components that owns params:
   ``blocks_2/mlp``; fp32 islands stay float32) and candidate dtype, the validation loss with only
   that unit's compute lowered, minus the reference (inf when it is not finite); and, from
   ``diagnose`` with every unit lowered, the share of the unit's float32 activations beyond the
   candidate's range (float16's 65504): a unit with any cannot take that candidate.
3. **Cost**, measured, not assumed: ``memory``: the bytes the forward pass keeps for the backward
   pass (the residuals of ``jax.vjp``: activation memory, whatever the backend then does with it),
   float32 minus lowered; ``speed``: the median time of a compiled train step with only that unit
   lowered, float32 minus lowered, over interleaved rounds; a saving within twice the float32
   step's own spread (median absolute deviation over the rounds) is noise and counts as none (on
   a CPU without native bf16 every saving can be negative or noise, and the answer is float32).
4. **Search** (:func:`jaxmp.policy_search.choose`): the greedy multiple-choice knapsack within
   ``budget`` (relative to the reference loss).
5. **Verify.** The chosen policy trains from the same params on the same batches; if its validation
   loss exceeds the reference by more than the budget, the lowered unit most at risk (largest
   underflow share in ``diagnose``, then largest predicted increase) goes back to float32 and it trains again (at most ``max_backoffs`` times). With float16
   in the policy, it trains with the static loss scale ``diagnose`` recommends for it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.diagnostics import diagnose
from jaxmp.losses import lm_loss_of
from jaxmp.module_policy import model_forward, module_path_of
from jaxmp.optim import make_optimizer
from jaxmp.policy_search import Option, candidate_name, check_assignment, choose, policy_string, units_of
from jaxmp.precision import get_policy
from jaxmp.train_step import TrainState, make_train_step
from jaxmp.training.compare_model import PolicyRun, compare_policies, policy_loss

__all__ = ["OBJECTIVES", "TuneResult", "tune"]

OBJECTIVES = ("memory", "speed")


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found and verified.

    Attributes:
      policy: the verified policy string (``jaxmp.train --policy`` takes it as is).
      assignment: ``{unit: dtype name}`` of the lowered units.
      options: every measured (unit, candidate): predicted loss increase and saving.
      reference: the float32 run.
      verified: the chosen policy's last verification run.
      predicted_increase: summed predicted loss increase of the assignment.
      verified_increase: verified validation loss minus the reference's.
      budget: the allowed increase, absolute (``budget`` times the reference loss).
      backed_off: units returned to float32 after a failed verification, in order.
      loss_scale: the loss scale the verification trained with.
      objective: ``memory`` (bytes) or ``speed`` (seconds per step).
      units: every unit searched, in model order.
    """

    policy: str
    assignment: dict[str, str]
    options: list[Option]
    reference: PolicyRun
    verified: PolicyRun
    predicted_increase: float
    verified_increase: float
    budget: float
    backed_off: list[str]
    loss_scale: str
    objective: str
    units: list[str]

    @property
    def predicted_saving(self) -> float:
        chosen = {(o.unit, o.dtype): o.saving for o in self.options}
        return sum(chosen[(unit, dtype)] for unit, dtype in self.assignment.items())


def _param_module_paths(params: Any) -> list[str]:
    return list(
        dict.fromkeys(module_path_of(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    )


def _val_loss(forward: Callable, params: Any, batches: Sequence[dict], loss_fn: Callable) -> float:
    evaluate = jax.jit(
        lambda params, batch: loss_fn(forward(params, batch["input_ids"]), batch).astype(jnp.float32)
    )
    losses = [float(evaluate(params, batch)) for batch in batches]
    mean = float(np.mean(losses))
    return mean if math.isfinite(mean) else math.inf


def _residual_bytes(forward: Callable, params: Any, batch: dict, loss_fn: Callable) -> int:
    """Bytes the forward pass keeps for the backward pass: the residuals ``jax.vjp`` closes over."""

    def residuals(params):
        return jax.tree.leaves(jax.vjp(lambda p: loss_fn(forward(p, batch["input_ids"]), batch), params)[1])

    return sum(int(np.prod(r.shape)) * np.dtype(r.dtype).itemsize for r in jax.eval_shape(residuals, params))


def _step_seconds(
    model: Any, params: Any, policies: Sequence[str], batch: dict, loss_fn: Callable, rounds: int
) -> tuple[list[float], float]:
    """Median seconds of a compiled train step under each policy, over ``rounds`` interleaved rounds,
    and the median absolute deviation of the first policy's rounds (the timing noise)."""
    optimizer = make_optimizer(learning_rate=1e-4)
    steps = []
    for policy in policies:
        train_loss = policy_loss(model, policy, loss_fn)
        state = TrainState.create(params=params, optimizer=optimizer)
        step = make_train_step(
            train_loss, optimizer, policy, cast_params=False, cast_batch=False, donate=False
        )
        compiled = step.lower(state, batch).compile()
        jax.block_until_ready(compiled(state, batch))
        steps.append((compiled, state))
    seconds: list[list[float]] = [[] for _ in policies]
    for _ in range(rounds):
        for index, (compiled, state) in enumerate(steps):
            started = time.perf_counter()
            jax.block_until_ready(compiled(state, batch))
            seconds[index].append(time.perf_counter() - started)
    medians = [statistics.median(s) for s in seconds]
    return medians, statistics.median(abs(s - medians[0]) for s in seconds[0])


def tune(
    model: Any,
    params: Any,
    train_batches: Sequence[dict],
    val_batches: Sequence[dict],
    *,
    candidates: Sequence[str] = ("bfloat16", "float16"),
    objective: str = "memory",
    budget: float = 0.005,
    steps: int = 100,
    depth: int = 2,
    loss_fn: Callable[[Any, dict], jax.Array] = lm_loss_of,
    learning_rate: float = 1e-3,
    rounds: int = 15,
    max_backoffs: int = 3,
    log: Callable[[str], None] = lambda message: None,
) -> TuneResult:
    """Finds and verifies the cheapest per-unit policy (see the module docstring).

    Args:
      model: a jaxmp model or any Linen/NNX model, called as ``model(batch["input_ids"])``.
      params: its float32 params, where training starts.
      train_batches, val_batches: training and validation batches (dicts with ``input_ids`` and what
        ``loss_fn`` reads); training cycles through ``train_batches``.
      candidates: compute dtypes a unit may be lowered to (float32 is always allowed), or ``fp8``:
        bf16 compute with fp8 matmuls (current scaling).
      objective: ``memory`` or ``speed``.
      budget: allowed validation loss increase, as a fraction of the float32 run's (0.005: 0.5 %).
      steps: training steps of the reference and of each verification.
      depth: path components of a unit (2: ``blocks_0/attn``; 1: a whole block).
      loss_fn: ``loss_fn(outputs, batch) -> scalar``.
      learning_rate: of every training run.
      rounds: interleaved timing rounds (``speed``).
      max_backoffs: verification retries.
      log: receives a line per stage.

    Raises:
      ValueError: an unknown candidate or objective, ``budget <= 0``, no validation batch.
    """
    lowered = [candidate_name(c) for c in candidates]
    lowered = [c for c in dict.fromkeys(lowered) if c != "float32"]
    if not lowered:
        raise ValueError(f"`candidates` {list(candidates)} name no dtype below float32")
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not budget > 0:
        raise ValueError(f"`budget` must be > 0, got {budget}")
    if not val_batches:
        raise ValueError("tuning needs validation batches (`val_batches` is empty)")

    log(f"reference: float32, {steps} steps")
    (reference,) = compare_policies(
        model, params, ["fp32"], train_batches, steps=steps, loss_fn=loss_fn,
        eval_batches=val_batches, learning_rate=learning_rate, keep_params=True,
    )  # fmt: skip
    trained = reference.params
    paths = _param_module_paths(trained)
    units = units_of(paths, depth)
    base_loss = reference.eval_loss
    absolute_budget = budget * base_loss
    log(f"reference validation loss {base_loss:.4f}; budget +{absolute_budget:.4f}; {len(units)} units")

    def single(unit: str, dtype: str) -> str:
        return policy_string({unit: dtype}, paths)

    pairs = [(unit, dtype) for unit in units for dtype in lowered]
    increases = {
        pair: _val_loss(model_forward(model, single(*pair)), trained, val_batches, loss_fn) - base_loss
        for pair in pairs
    }
    ranges = {  # only float16 has a narrower range than float32
        dtype: _range_shares(
            model, trained, policy_string(dict.fromkeys(units, dtype), paths), units, val_batches, loss_fn
        )
        if dtype == "float16"
        else dict.fromkeys(units, (0.0, 0.0))
        for dtype in lowered
    }
    log(f"sensitivity: {len(pairs)} unit x candidate losses measured")
    if objective == "memory":
        batch = train_batches[0]
        full = _residual_bytes(model_forward(model, "fp32"), trained, batch, loss_fn)
        savings = {
            pair: float(full - _residual_bytes(model_forward(model, single(*pair)), trained, batch, loss_fn))
            for pair in pairs
        }
    else:
        seconds, noise = _step_seconds(
            model, trained, ["fp32", *(single(*pair) for pair in pairs)], train_batches[0], loss_fn, rounds
        )
        savings = {pair: seconds[0] - s for pair, s in zip(pairs, seconds[1:], strict=True)}
        savings = {
            pair: saving if saving > 2 * noise else min(saving, 0.0) for pair, saving in savings.items()
        }
        log(f"fp32 step {1e3 * seconds[0]:.1f} ms, timing noise {1e3 * noise:.2f} ms")
    log(f"cost ({objective}): measured")
    options = [
        Option(unit, dtype, increases[(unit, dtype)], savings[(unit, dtype)], ranges[dtype][unit][0])
        for unit, dtype in pairs
    ]
    risk = {(o.unit, o.dtype): (ranges[o.dtype][o.unit][1], o.loss_increase) for o in options}

    assignment = choose(options, absolute_budget)
    backed_off: list[str] = []
    while True:
        spec = policy_string(assignment, paths)
        check_assignment(spec, assignment, paths)
        loss_scale = _loss_scale_for(model, params, spec, train_batches, loss_fn)  # where training starts
        log(f"verifying {spec} (loss scale {loss_scale})")
        (verified,) = compare_policies(
            model, params, [spec], train_batches, steps=steps, loss_fn=loss_fn,
            eval_batches=val_batches, learning_rate=learning_rate, loss_scale=loss_scale,
        )  # fmt: skip
        verified_increase = verified.eval_loss - base_loss if verified.eval_loss is not None else math.inf
        if not math.isfinite(verified_increase):
            verified_increase = math.inf
        if verified_increase <= absolute_budget or not assignment or len(backed_off) >= max_backoffs:
            break
        worst = max(assignment, key=lambda unit: risk[(unit, assignment[unit])])
        backed_off.append(worst)
        del assignment[worst]
        log(f"verified +{verified_increase:.4f} is over the budget: {worst} back to float32")
    return TuneResult(
        policy=spec,
        assignment=dict(assignment),
        options=options,
        reference=reference,
        verified=verified,
        predicted_increase=sum(max(increases[(u, d)], 0.0) for u, d in assignment.items()),
        verified_increase=verified_increase,
        budget=absolute_budget,
        backed_off=backed_off,
        loss_scale=loss_scale,
        objective=objective,
        units=units,
    )


def _range_shares(
    model: Any, params: Any, spec: str, units: Sequence[str], batches: Sequence[dict], loss_fn: Callable
) -> dict[str, tuple[float, float]]:
    """Per unit, under ``spec`` (every unit lowered): the largest share of a module's float32 activations
    beyond the policy's dtype range, and the largest share of its gradients (at the loss scale the
    policy settles on) that underflow to zero."""
    diagnosis = diagnose(model, params, spec, list(batches[:1]), loss_fn=loss_fn)
    shares = dict.fromkeys(units, (0.0, 0.0))
    for entry in diagnosis.entries:
        unit = next((u for u in units if entry.name == u or entry.name.startswith(u + "/")), None)
        if unit is None or entry.dtype != "float16":
            continue
        overflow, underflow = shares[unit]
        if entry.kind == "activation":
            overflow = max(overflow, entry.at_one.reference.fractions()["overflow"])
        else:
            underflow = max(underflow, entry.at_scale.reference.fractions()["underflow"])
        shares[unit] = (overflow, underflow)
    return shares


def _loss_scale_for(model: Any, params: Any, spec: str, batches: Sequence[dict], loss_fn: Callable) -> str:
    """``static:N`` with the scale ``diagnose`` recommends when ``spec`` uses float16, else ``auto``."""
    if not get_policy(spec).uses_float16:
        return "auto"
    recommended = diagnose(model, params, spec, list(batches[:1]), loss_fn=loss_fn).recommended_loss_scale
    return "dynamic" if recommended is None else f"static:{recommended:g}"
