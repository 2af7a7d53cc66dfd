"""``TrainState`` and the jitted mixed-precision train and eval steps.

The precision policy is applied at exactly two places: the forward pass, which sees
the master params as ``cast_params`` says (one global cast; per module, for any Flax
model; or none, for models that cast per module themselves, as jaxmp's own do), and
the loss, which is always fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxmp.fp8 import DelayedScaling
from jaxmp.module_policy import cast_params_per_module, linen_policy
from jaxmp.optim import current_learning_rate, update_applied
from jaxmp.precision import Policy, get_policy
from jaxmp.scaling import LossScale, NoOpLossScale

__all__ = ["TrainState", "make_train_step", "make_eval_step", "leaf_paths"]

LossFn = Callable[..., tuple[jax.Array, Any]]
CastParams = bool | Literal["per_module"]


def _forward(loss_fn: LossFn, policy: Policy, cast_params: CastParams) -> LossFn:
    """``loss_fn`` seeing the master params as ``cast_params`` says (see ``make_train_step``)."""
    if cast_params == "per_module":

        def per_module(params, batch, rng, *fp8_variables):
            with linen_policy(policy):
                return loss_fn(cast_params_per_module(params, policy), batch, rng, *fp8_variables)

        return per_module
    if cast_params is True:
        return lambda params, batch, rng, *fp8_variables: loss_fn(
            policy.cast_to_compute(params), batch, rng, *fp8_variables
        )
    if cast_params is False:
        return loss_fn
    raise ValueError(f"`cast_params` must be True, False or 'per_module', got {cast_params!r}")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue, as one pytree of arrays.

    Attributes:
      step: int32 scalar, micro-steps taken (skipped ones included); batches are a
        function of it, so a resumed run sees the batches it would have seen.
      params: master parameters in the policy's param dtype.
      opt_state: the optimizer's state (MultiSteps accumulator included).
      loss_scale: a ``NoOpLossScale``, ``StaticLossScale`` or ``DynamicLossScale``.
      rng: a PRNG key; each step uses ``fold_in(rng, step)``.
      skipped_steps: int32 scalar, micro-steps dropped for non-finite gradients.
      fp8: the delayed-scaling state of the model's fp8 dots (:class:`jaxmp.fp8.DelayedScaling`:
        amax histories and scales), or None when no dot uses delayed scaling.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScale
    rng: jax.Array
    skipped_steps: jax.Array
    fp8: DelayedScaling | None = None

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        optimizer: optax.GradientTransformation,
        loss_scale: LossScale | None = None,
        rng: jax.Array | None = None,
        fp8: DelayedScaling | None = None,
    ) -> TrainState:
        """A fresh state: step 0, ``optimizer.init(params)``, no loss scaling by default; ``fp8`` as
        ``jaxmp.models.init_fp8_scaling(model)`` gives it for a model with delayed-scaling fp8 dots."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            loss_scale=NoOpLossScale() if loss_scale is None else loss_scale,
            rng=jax.random.key(0) if rng is None else rng,
            skipped_steps=jnp.zeros((), jnp.int32),
            fp8=fp8,
        )


def leaf_paths(tree: Any) -> list[str]:
    """'/'-joined key paths of a tree's leaves, in ``jax.tree.leaves`` order."""
    return [
        "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _gradient_checks(grads: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Finiteness and zeros of a gradient tree, reading each leaf once.

    Each leaf is reduced to one fp32 sum: 1 for an exact zero, +inf for a non-finite value, so a
    non-finite sum flags the leaf and a finite one counts its zeros. (Three separate reductions, as
    ``all_finite`` plus a zero count would make, cost 3-4% of a gpt2-tiny bf16 step each on CPU.)

    Returns:
      bool scalar, every value finite; int32 scalar, index (in ``jax.tree.leaves`` order) of the
      first leaf with a non-finite value, or -1; fp32 scalar, the fraction of values that are
      exactly zero (non-finite leaves count as having none).
    """
    leaves = jax.tree.leaves(grads)
    sums = jnp.stack(
        [jnp.sum(jnp.where(jnp.isfinite(g), (g == 0).astype(jnp.float32), jnp.inf)) for g in leaves]
    )
    nonfinite = ~jnp.isfinite(sums)
    any_nonfinite = nonfinite.any()
    first = jnp.where(any_nonfinite, jnp.argmax(nonfinite), -1).astype(jnp.int32)
    zero_fraction = jnp.where(nonfinite, 0.0, sums).sum() / sum(g.size for g in leaves)
    return ~any_nonfinite, first, zero_fraction


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    policy: Policy | str,
    *,
    cast_params: CastParams = True,
    cast_batch: bool = True,
    jit: bool = True,
    donate: bool = True,
    scan_micro_steps: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``step(state, batch) -> (state, metrics)``.

    One micro-step: cast params to the compute dtype (if ``cast_params``), scale the
    fp32 loss, differentiate w.r.t. the master params, unscale in fp32, check
    finiteness, adjust the loss scale, and hand finite gradients to the optimizer. A
    non-finite micro-step is dropped entirely: params, optimizer state and the
    MultiSteps accumulator keep their exact bits, and it does not count toward the
    accumulation window.

    With ``state.fp8`` (delayed-scaling fp8 dots), ``loss_fn`` gets a fourth argument: the variable
    collections to add to the model's ``apply`` (``{"params": params, **fp8_variables}``): the dots'
    scales and a zero amax probe; the micro-step's amaxes are the loss's gradient with respect to
    that probe, and ``state.fp8`` records them (:meth:`jaxmp.fp8.DelayedScaling.record`: histories
    advance once per optimizer update, with the accumulation window's max).

    Args:
      loss_fn: ``loss_fn(params, batch, rng[, fp8_variables]) -> (loss, aux)``; ``loss`` a scalar.
      optimizer: e.g. ``make_optimizer(...)``.
      policy: a ``Policy`` or policy string.
      cast_params: how ``loss_fn`` sees the master params. ``True``: every floating
        param cast to the policy's base compute dtype (a plain function).
        ``"per_module"``: any Flax model gets the policy per module, overrides and fp32
        islands included: each param is cast to the compute dtype of the module that owns
        it (by its path in ``params``), and every Linen module called inside ``loss_fn``
        casts its inputs and outputs at its path (:mod:`jaxmp.module_policy`); an NNX
        model is passed through ``jaxmp.nnx_with_policy`` first. ``False``: the model
        casts per module itself (jaxmp's models), so a module overridden to fp32 really
        sees fp32 weights. In every mode gradients are w.r.t. the master params.
      cast_batch: cast the batch's floating-point leaves to the compute dtype; integer
        leaves (token ids, labels) are never cast.
      jit: wrap in ``jax.jit``.
      donate: donate the input state's buffers (with ``jit``).
      scan_micro_steps: the step takes micro-batches stacked on a new leading axis
        (``[n, ...]`` per leaf, typically ``n = accum_steps``: one accumulation window)
        and runs them one after another inside one call with ``lax.scan``. Each is the
        same micro-step as above (MultiSteps accumulation, per-micro-step skipping and
        loss-scale adjustment), so the result equals ``n`` separate calls; it saves the
        host round trip and dispatch between micro-steps. Every metric gains the
        leading ``[n]`` axis.

    Returns:
      The step. ``metrics`` holds fp32 scalars ``loss`` (unscaled), ``grad_norm``
      (of this micro-step's unscaled gradient), ``loss_scale`` (after adjustment),
      ``learning_rate``, ``grad_zero_fraction``; bool ``grads_finite``; int32
      ``skipped_steps`` (cumulative) and ``nonfinite_leaf`` (first non-finite
      gradient leaf, -1 if none; see ``leaf_paths``); ``aux``; and with ``state.fp8``, float32
      ``fp8_scales`` ``[D, 3]`` (every fp8 dot's scales after this micro-step, named by
      ``state.fp8.dot_names()``).
    """
    policy = get_policy(policy)
    forward = _forward(loss_fn, policy, cast_params)

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        step_rng = jax.random.fold_in(state.rng, state.step)

        compute_batch = policy.cast_to_compute(batch) if cast_batch else batch

        def scaled_loss(params, amax_probe):
            fp8_variables = () if state.fp8 is None else (state.fp8.variables(amax_probe),)
            loss, aux = forward(params, compute_batch, step_rng, *fp8_variables)
            loss = loss.astype(jnp.float32)  # fp32 island: the loss
            return state.loss_scale.scale(loss), (loss, aux)

        amax_probe = None if state.fp8 is None else state.fp8.amax_probe()
        (scaled_grads, amax), (loss, aux) = jax.grad(scaled_loss, argnums=(0, 1), has_aux=True)(
            state.params, amax_probe
        )
        grads = state.loss_scale.unscale(scaled_grads)  # fp32
        grads_finite, nonfinite_leaf, zero_fraction = _gradient_checks(grads)

        def apply_update(params_and_opt_state):
            params, opt_state = params_and_opt_state
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # lax.cond runs one branch: a dropped micro-step returns the state as it was, bit for bit, and a
        # finite one updates it in place (selecting between two computed states would copy all of it).
        new_params, new_opt_state = jax.lax.cond(
            grads_finite, apply_update, lambda unchanged: unchanged, (state.params, state.opt_state)
        )
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            loss_scale=state.loss_scale.adjust(grads_finite),
            skipped_steps=state.skipped_steps + (~grads_finite).astype(jnp.int32),
            fp8=None
            if state.fp8 is None
            else state.fp8.record(amax, grads_finite & update_applied(new_opt_state)),
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
            "loss_scale": new_state.loss_scale.loss_scale,
            "grads_finite": grads_finite,
            "skipped_steps": new_state.skipped_steps,
            "learning_rate": current_learning_rate(new_state.opt_state),
            "grad_zero_fraction": zero_fraction,
            "nonfinite_leaf": nonfinite_leaf,
            "aux": aux,
        }
        if new_state.fp8 is not None:
            metrics["fp8_scales"] = new_state.fp8.scales()
        return new_state, metrics

    def window_step(state: TrainState, batches: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        return jax.lax.scan(train_step, state, batches)

    step = window_step if scan_micro_steps else train_step
    if jit:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    return step


def make_eval_step(
    loss_fn: LossFn,
    policy: Policy | str,
    *,
    cast_params: CastParams = True,
    cast_batch: bool = True,
    jit: bool = True,
) -> Callable[[Any, Any], tuple[jax.Array, Any]]:
    """Builds ``eval_step(params, batch) -> (loss, aux)`` under the policy (fp32 loss).

    ``cast_params`` and ``cast_batch`` as in ``make_train_step``. The rng passed to
    ``loss_fn`` is a fixed key; models should run deterministically.
    """
    policy = get_policy(policy)
    forward = _forward(loss_fn, policy, cast_params)

    def eval_step(params: Any, batch: Any) -> tuple[jax.Array, Any]:
        compute_batch = policy.cast_to_compute(batch) if cast_batch else batch
        loss, aux = forward(params, compute_batch, jax.random.key(0))
        return loss.astype(jnp.float32), aux

    return jax.jit(eval_step) if jit else eval_step
