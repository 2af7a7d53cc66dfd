"""The optimizer chain: clip -> AdamW (warmup + cosine) -> MultiSteps accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmp import lowp, moments8
from jaxmp.module_policy import module_path_of
from jaxmp.precision import Policy, get_policy

__all__ = [
    "make_optimizer",
    "make_schedule",
    "current_learning_rate",
    "moment_storages",
    "MIN_QUANTIZED_SIZE",
]

# Tensors with fewer values keep fp32 moments when 8-bit ones are asked for: they cost little memory, and
# a block much smaller than 256 values gains nothing from a shared scale.
MIN_QUANTIZED_SIZE = 4096


def make_schedule(
    learning_rate: float, warmup_steps: int = 0, total_steps: int | None = None, final_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``final_fraction`` of it.

    Steps count optimizer updates (one per accumulation window), not micro-batches.
    With ``total_steps=None`` the rate stays at ``learning_rate`` after warmup.
    """
    if total_steps is None:
        if warmup_steps <= 0:
            return optax.constant_schedule(learning_rate)
        return optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * final_fraction,
    )


def _decay_mask(params):
    """Weight decay applies to matrices (ndim >= 2) only: not to biases or norm scales."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _storage_name(moment_dtype: str | np.dtype) -> str:
    """``int8``, ``fp8`` or a float dtype's name."""
    if isinstance(moment_dtype, str) and moment_dtype in moments8.KINDS:
        return moment_dtype
    return np.dtype(moment_dtype).name


def moment_storages(params, moment_dtype: str | np.dtype = "float32", policy: Policy | None = None):
    """How each parameter's Adam moments are stored (one of ``moments8.STORAGES``), in the params' structure.

    A parameter takes ``policy.moments_for(module)`` (``module``: its path without the last part, e.g.
    ``token_embed`` for ``token_embed/embedding``) when the policy names one, else ``moment_dtype``. An 8-bit
    storage (``int8``, ``fp8``) falls back to float32 for vectors (norm scales, biases) and tensors of fewer
    than ``MIN_QUANTIZED_SIZE`` values: they cost little, and their moments are the most sensitive.
    """
    default = _storage_name(moment_dtype)

    def storage(key_path, p) -> str:
        named = policy.moments_for(module_path_of(key_path)) if policy is not None else None
        chosen = named or default
        if chosen in moments8.KINDS and (jnp.ndim(p) < 2 or jnp.size(p) < MIN_QUANTIZED_SIZE):
            return "float32"
        return chosen

    return jax.tree_util.tree_map_with_path(storage, params)


def _scale_by_adam(b1, b2, eps, moment_dtype, policy, seed) -> optax.GradientTransformation:
    """optax's Adam when params and moments are all fp32; ``lowp.scale_by_adam_lowp`` when every moment has
    one float storage; ``moments8.scale_by_adam_mixed`` for 8-bit or mixed storages.

    Chosen from the params at ``init`` (``moment_storages``): ``optax.scale_by_adam`` keeps its second
    moment in the params' dtype, so bf16 params would silently get bf16 moments rounded to nearest, which
    freeze (see ``lowp.scale_by_adam_lowp``). ``update`` dispatches on the state's type.
    """

    def storage_for(params):
        return moment_storages(params, moment_dtype, policy)

    standard = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.float32)
    mixed = moments8.scale_by_adam_mixed(storage_for, b1, b2, eps, seed=seed)

    def lean(storage: str) -> optax.GradientTransformation:
        return lowp.scale_by_adam_lowp(b1, b2, eps, mu_dtype=storage, nu_dtype=storage, seed=seed)

    def init(params):
        storages = set(jax.tree.leaves(storage_for(params)))
        fp32_params = all(jnp.asarray(p).dtype == jnp.float32 for p in jax.tree.leaves(params))
        if storages <= {"float32"} and fp32_params:
            return standard.init(params)
        if len(storages) == 1 and not storages & set(moments8.KINDS):
            return lean(storages.pop()).init(params)
        return mixed.init(params)

    def update(updates, state, params=None):
        if isinstance(state, optax.ScaleByAdamState):
            return standard.update(updates, state, params)
        if isinstance(state, moments8.ScaleByAdamMixedState):
            return mixed.update(updates, state, params)
        stored_dtype = jax.tree.leaves(state.mu)[0].dtype  # one storage for every leaf (see init)
        return lean(np.dtype(stored_dtype).name).update(updates, state, params)

    return optax.GradientTransformation(init, update)


def _inner_chain(
    learning_rate, clip_norm, weight_decay, b1, b2, eps, moment_dtype, policy, param_update, seed
):
    """clip -> Adam -> decoupled weight decay -> learning rate -> low-precision param update.

    A factory, so that ``inject_hyperparams`` records the learning rate in the state.
    """
    transforms = []
    if clip_norm is not None and clip_norm > 0:
        transforms.append(optax.clip_by_global_norm(clip_norm))
    transforms.append(_scale_by_adam(b1, b2, eps, moment_dtype, policy, seed))
    transforms += [
        optax.add_decayed_weights(weight_decay, mask=_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
        lowp.param_update(param_update, seed=seed),
    ]
    return optax.chain(*transforms)


def make_optimizer(
    learning_rate: float = 3e-4,
    accum_steps: int = 1,
    clip_norm: float | None = 1.0,
    weight_decay: float = 0.1,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    moment_dtype: str | np.dtype = "float32",
    policy: Policy | str | None = None,
    param_update: str = "nearest",
    seed: int = 0,
) -> optax.GradientTransformation:
    """Global-norm clipping, AdamW with warmup + cosine decay, accumulated by ``optax.MultiSteps``.

    With ``accum_steps > 1`` the chain is wrapped in ``optax.MultiSteps`` with an fp32
    accumulator and ``should_skip_update_fn=optax.skip_not_finite`` (without it
    MultiSteps keeps a NaN in its accumulator forever: ``0 * NaN``). With
    ``accum_steps == 1`` there is nothing to accumulate and no accumulator is kept,
    which is what lets pure-bf16 training fit in 8 bytes per parameter.
    ``make_train_step`` drops non-finite micro-steps before they reach the optimizer.

    Args:
      learning_rate: peak learning rate.
      accum_steps: micro-batches averaged into one update (>= 1).
      clip_norm: clip the accumulated (mean) gradient to this global norm; None or 0 disables.
      weight_decay: decoupled AdamW weight decay on matrices (ndim >= 2).
      warmup_steps: linear warmup updates.
      total_steps: updates over which the cosine decays; None keeps the rate constant.
      b1, b2, eps: Adam's hyperparameters.
      moment_dtype: storage of Adam's moments: float32, bfloat16/float16 (``lowp.scale_by_adam_lowp``: RMS
        stored instead of the second moment, stochastic rounding), or ``int8``/``fp8`` (block-wise
        quantised, ``moments8``; norms, biases and small tensors keep float32: ``moment_storages``).
      policy: a precision policy whose ``moments`` key, in its base or per module, overrides
        ``moment_dtype`` for the params it matches; None: ``moment_dtype`` everywhere.
      param_update: how updates land on low-precision params: ``nearest``, ``stochastic``
        or ``kahan`` (``lowp.param_update``); fp32 params are unaffected.
      seed: seeds the PRNG keys of stochastic rounding (kept in the optimizer state).

    Returns:
      An optax ``GradientTransformation`` whose state records ``learning_rate``.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    schedule = make_schedule(learning_rate, warmup_steps, total_steps)
    inner = optax.inject_hyperparams(
        _inner_chain,
        static_args=("clip_norm", "b1", "b2", "eps", "moment_dtype", "policy", "param_update", "seed"),
    )(
        learning_rate=schedule,
        clip_norm=clip_norm,
        weight_decay=weight_decay,
        b1=b1,
        b2=b2,
        eps=eps,
        moment_dtype=_storage_name(moment_dtype),
        policy=None if policy is None else get_policy(policy),
        param_update=param_update,
        seed=seed,
    )
    if accum_steps == 1:
        return inner
    multi_steps = optax.MultiSteps(
        inner,
        every_k_schedule=accum_steps,
        should_skip_update_fn=optax.skip_not_finite,
        accumulator_dtype=jnp.float32,
    )
    return multi_steps.gradient_transformation()


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate recorded in an optimizer state by ``inject_hyperparams`` (NaN if none)."""
    # inject_hyperparams keeps both the value (an array) and the schedule's state
    # (a NamedTuple) under the name "learning_rate"; the value is the one wanted.
    found = optax.tree.get(
        opt_state, "learning_rate", default=None, filtering=lambda _, value: hasattr(value, "shape")
    )
    if found is None:
        return jnp.asarray(jnp.nan, jnp.float32)
    return jnp.asarray(found, jnp.float32)


def update_applied(opt_state) -> jax.Array:
    """bool scalar: whether the optimizer step that returned ``opt_state`` updated the params (under
    ``optax.MultiSteps``: it closed an accumulation window, so its counter is back at zero)."""
    mini_step = optax.tree.get(opt_state, "mini_step", default=None)
    if mini_step is None:
        return jnp.asarray(True)
    return mini_step == 0
