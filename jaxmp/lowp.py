"""Low-precision optimizer pieces: stochastic rounding, compensated updates, lean Adam moments.

With ``pure-bf16`` master params, ``optax.apply_updates`` computes ``(p + u).astype(bf16)`` and rounds to
nearest, so every update smaller than half a bf16 ulp (2^-9 relative) vanishes and training stalls
(Zamirai et al., 2020). ``param_update(kind)`` is the last transform of the optimizer chain: it rewrites the
fp32 updates so that ``apply_updates`` lands *exactly* on the low-precision params the chosen rounding wants.
``scale_by_adam_lowp`` stores Adam's moments in bf16/fp16 without stalling or blowing up, and
``state_bytes_per_param`` reports what a configuration costs.

fp32 params pass through every transform here untouched.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
    "PARAM_UPDATE_KINDS",
    "KahanUpdateState",
    "ScaleByAdamLowpState",
    "StochasticUpdateState",
    "kahan_update",
    "param_update",
    "scale_by_adam_lowp",
    "state_bytes_per_param",
    "stochastic_round",
    "stochastic_update",
    "tree_bytes",
]

PARAM_UPDATE_KINDS = ("nearest", "stochastic", "kahan")
_LOW_PRECISION = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
# The Kahan residual is stored as a signed count of 2^-15 ulp(p); |residual| <= ulp/2 needs only 2^14 counts.
_RESIDUAL_COUNTS_PER_ULP = 2.0**15


def _is_low_precision(dtype: Any) -> bool:
    return np.dtype(dtype) in _LOW_PRECISION


def _key_data(seed: int) -> jax.Array:
    """Raw uint32 key data: a plain array that checkpoints like any other state leaf."""
    return jax.random.key_data(jax.random.key(seed))


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """Rounds fp32 ``x`` to ``dtype``, up or down at random, unbiased.

    Each element becomes one of its two neighbours in ``dtype``, ``hi`` with probability
    ``(x - lo) / (hi - lo)``, so ``E[result] = x``. Values already representable, ``inf`` and ``nan`` are kept;
    finite values beyond the largest finite value saturate there instead of becoming ``inf``.

    bfloat16 is the top half of float32, so rounding is integer arithmetic on the bit pattern::

        bits = bitcast(x, uint32) + uniform_uint32[0, 2**16)   # carries into the kept half w.p. low/2**16
        result = bitcast(bits & 0xFFFF0000, float32)            # truncate: exactly a bf16 value

    float16 has another exponent range, so its two neighbours are found explicitly::

        lo, hi = the float16 values around x        # via nearest rounding and nextafter
        result = hi if uniform[0, 1) < (x - lo) / (hi - lo) else lo

    Args:
      x: values to round; cast to float32 first.
      dtype: ``bfloat16`` or ``float16``; ``float32`` returns ``x`` unchanged.
      key: a JAX PRNG key (typed or raw uint32 data).

    Returns:
      An array of ``dtype`` with the shape of ``x``.

    Raises:
      ValueError: for any other ``dtype``.

    References:
      Gupta et al., `Deep Learning with Limited Numerical Precision <https://arxiv.org/abs/1502.02551>`_, 2015.
    """
    dtype = np.dtype(dtype)
    x = jnp.asarray(x, jnp.float32)
    if dtype == np.dtype(jnp.float32):
        return x
    if dtype == np.dtype(jnp.bfloat16):
        rounded = _stochastic_round_bits_bf16(x, key)
    elif dtype == np.dtype(jnp.float16):
        rounded = _stochastic_round_neighbours(x, dtype, key)
    else:
        raise ValueError(f"stochastic_round supports bfloat16, float16 and float32, not {dtype}")
    largest = jnp.float32(jnp.finfo(dtype).max)
    rounded = jnp.where(jnp.isinf(rounded), jnp.copysign(largest, x), rounded)
    return jnp.where(jnp.isfinite(x), rounded, x).astype(dtype)


def _stochastic_round_bits_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> jnp.uint32(16)
    return lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)


def _stochastic_round_neighbours(x: jax.Array, dtype: np.dtype, key: jax.Array) -> jax.Array:
    largest = jnp.float32(jnp.finfo(dtype).max)
    x = jnp.clip(x, -largest, largest)
    nearest = x.astype(dtype)
    toward_x = jnp.where(nearest.astype(jnp.float32) <= x, jnp.inf, -jnp.inf).astype(dtype)
    other = jnp.nextafter(nearest, toward_x).astype(jnp.float32)
    lo = jnp.minimum(nearest.astype(jnp.float32), other)
    hi = jnp.maximum(nearest.astype(jnp.float32), other)
    round_up = jax.random.uniform(key, x.shape, jnp.float32) < (x - lo) / (hi - lo)
    return jnp.where(round_up, hi, lo)


class StochasticUpdateState(NamedTuple):
    """State of ``stochastic_update``."""

    key: jax.Array  # uint32 PRNG key data, split on every update


def stochastic_update(seed: int = 0) -> optax.GradientTransformation:
    """Makes ``apply_updates`` round the new low-precision params stochastically.

    For each bf16/fp16 leaf (fp32 leaves pass through)::

        target = stochastic_round(f32(p) + u, p.dtype, key_leaf)   # E[target] = p + u
        u' = f32(target) - f32(p)                                   # apply_updates: p + u' == target

    ``u'`` is exact in fp32 whenever ``target`` and ``p`` differ by less than a factor of 2^15 (bf16) or 2^12
    (fp16), which covers every update smaller than the param itself; then ``(p + u').astype(p.dtype)`` is
    exactly ``target`` (when an update almost cancels the param, it is off by at most an fp32 ulp of ``p``,
    as with plain round-to-nearest). The key lives in the state and is split on every update, so a restored state
    continues bit for bit.

    Args:
      seed: seed of the PRNG key carried in the state.

    Returns:
      An ``optax.GradientTransformation``; put it last in the chain (it needs ``params``).

    References:
      Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_, 2020.
    """

    def init_fn(params):
        del params
        return StochasticUpdateState(key=_key_data(seed))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        leaf_keys = optax.tree.split_key_like(step_key, params)

        def update_leaf(u, p, leaf_key):
            if not _is_low_precision(p.dtype):
                return u
            p32 = p.astype(jnp.float32)
            target = stochastic_round(p32 + u.astype(jnp.float32), p.dtype, leaf_key)
            return target.astype(jnp.float32) - p32

        new_updates = jax.tree.map(update_leaf, updates, params, leaf_keys)
        return new_updates, StochasticUpdateState(key=jax.random.key_data(key))

    return optax.GradientTransformation(init_fn, update_fn)


class KahanUpdateState(NamedTuple):
    """State of ``kahan_update``."""

    # Per bf16/fp16 leaf: int16 residual in units of 2^-15 ulp(p); None for fp32 leaves.
    compensation: optax.Params


def _ulp(x: jax.Array) -> jax.Array:
    """fp32 spacing of ``x.dtype`` just above ``|x|``; 0 where it is not finite (inf, nan, the largest value)."""
    magnitude = jnp.abs(x)
    spacing = jnp.nextafter(magnitude, jnp.asarray(jnp.inf, x.dtype)).astype(jnp.float32)
    spacing = spacing - magnitude.astype(jnp.float32)
    return jnp.where(jnp.isfinite(spacing), spacing, 0.0)


def _decode_residual(counts: jax.Array, p: jax.Array) -> jax.Array:
    return counts.astype(jnp.float32) * (_ulp(p) / _RESIDUAL_COUNTS_PER_ULP)


def _encode_residual(residual: jax.Array, p: jax.Array) -> jax.Array:
    unit = _ulp(p) / _RESIDUAL_COUNTS_PER_ULP
    counts = jnp.round(residual / jnp.where(unit > 0, unit, 1.0))
    counts = jnp.where((unit > 0) & jnp.isfinite(counts), counts, 0.0)
    limit = jnp.iinfo(jnp.int16).max
    return jnp.clip(counts, -limit, limit).astype(jnp.int16)


def kahan_update() -> optax.GradientTransformation:
    """Kahan-compensated updates: what rounding to bf16/fp16 drops is carried into the next update.

    For each bf16/fp16 leaf (fp32 leaves pass through, with no state)::

        y = u + c                      # fp32: this update plus what earlier roundings dropped
        t = round_nearest(p + y)       # the new param, in p.dtype
        u' = f32(t) - f32(p)           # apply_updates: p + u' == t (exact, as in stochastic_update)
        c = y - u'                     # what this rounding dropped, |c| <= ulp(t) / 2

    ``p + c`` is the full-precision master value. ``c`` is stored as an int16 count of 2^-15 ulp(t), i.e.
    fixed point relative to the param's own ulp, not as a bf16 number: a bf16 ``c`` keeps only 8 bits of the
    residual and rounds every small update the same way (10,000 updates of 1e-4 to 1.0 end at 2.031, two
    ulps off; this ends on 2.0 exactly), and an fp16 ``c`` goes subnormal for ``|p| < 1/8``. The
    int16 buffer costs the same 2 bytes and gives ``p + c`` about fp32's 24 significant bits.

    Returns:
      An ``optax.GradientTransformation``; put it last in the chain (it needs ``params``).

    References:
      Kahan, `Further remarks on reducing truncation errors <https://doi.org/10.1145/363707.363723>`_, 1965.
      Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_, 2020.
    """

    def init_fn(params):
        def init_leaf(p):
            return jnp.zeros(p.shape, jnp.int16) if _is_low_precision(p.dtype) else None

        return KahanUpdateState(compensation=jax.tree.map(init_leaf, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)

        def update_leaf(u, p, counts):
            if counts is None:
                return u, None
            p32 = p.astype(jnp.float32)
            y = u.astype(jnp.float32) + _decode_residual(counts, p)
            t = (p32 + y).astype(p.dtype)
            applied = t.astype(jnp.float32) - p32
            return applied, _encode_residual(y - applied, t)

        treedef = jax.tree.structure(params)
        leaves = [
            update_leaf(u, p, counts)
            for u, p, counts in zip(
                treedef.flatten_up_to(updates),
                treedef.flatten_up_to(params),
                treedef.flatten_up_to(state.compensation),
                strict=True,
            )
        ]
        new_updates = treedef.unflatten([applied for applied, _ in leaves])
        compensation = treedef.unflatten([counts for _, counts in leaves])
        return new_updates, KahanUpdateState(compensation=compensation)

    return optax.GradientTransformation(init_fn, update_fn)


def param_update(kind: str, seed: int = 0) -> optax.GradientTransformation:
    """The last transform of the chain: how low-precision params absorb fp32 updates.

    Args:
      kind: ``"nearest"`` (plain round-to-nearest in ``apply_updates``; updates unchanged),
        ``"stochastic"`` (``stochastic_update``) or ``"kahan"`` (``kahan_update``).
      seed: PRNG seed for ``"stochastic"``.

    Returns:
      An ``optax.GradientTransformation``; fp32 params pass through every kind unchanged.

    Raises:
      ValueError: for an unknown ``kind``.
    """
    if kind == "nearest":
        return optax.identity()
    if kind == "stochastic":
        return stochastic_update(seed)
    if kind == "kahan":
        return kahan_update()
    raise ValueError(f"unknown param update {kind!r}; valid kinds: {', '.join(PARAM_UPDATE_KINDS)}")


class ScaleByAdamLowpState(NamedTuple):
    """State of ``scale_by_adam_lowp``."""

    count: jax.Array  # int32 number of updates, for bias correction
    key: jax.Array  # uint32 PRNG key data for stochastic rounding of the stored moments
    mu: optax.Updates  # first moment, in mu_dtype
    nu_sqrt: optax.Updates  # square root of the second moment (the gradient RMS), in nu_dtype


def _adam_ratio_bound(b1: float, b2: float, count: jax.Array) -> jax.Array:
    """Largest ``|mu_hat| / sqrt(nu_hat)`` any gradient sequence can give exact Adam after ``count`` steps.

    Cauchy-Schwarz on ``mu_t = (1-b1) sum_k b1^k g_{t-k}`` against ``nu_t = (1-b2) sum_k b2^k g_{t-k}^2``::

        |mu_t| <= (1-b1) * sqrt(sum_{k<t} (b1^2/b2)^k) * sqrt(nu_t / (1-b2))

    which, bias-corrected, is 1 at the first step and tends to ~7.3 for ``b1=0.9, b2=0.999``.
    """
    t = count.astype(jnp.float32)
    ratio = b1**2 / b2
    geometric = t if ratio == 1.0 else (1.0 - ratio**t) / (1.0 - ratio)
    return (1.0 - b1) / (1.0 - b1**t) * jnp.sqrt(geometric * (1.0 - b2**t) / (1.0 - b2))


def _rms_update(b2: float, rms: jax.Array, g: jax.Array) -> jax.Array:
    """``sqrt(b2 * rms^2 + (1 - b2) * g^2)`` computed on values scaled to at most 1, so nothing under/overflows."""
    scale = jnp.maximum(rms, jnp.abs(g))
    scale = jnp.where(scale > 0, scale, 1.0)
    return scale * jnp.sqrt(b2 * jnp.square(rms / scale) + (1.0 - b2) * jnp.square(g / scale))


def scale_by_adam_lowp(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Any = jnp.float32,
    nu_dtype: Any = jnp.float32,
    seed: int = 0,
) -> optax.GradientTransformation:
    """Adam's scaling with both moments stored in a chosen (low) precision.

    Everything is computed in fp32; only storage is low precision::

        mu = b1 * mu + (1 - b1) * g
        s = sqrt(b2 * s^2 + (1 - b2) * g^2)                # s = sqrt(nu), on values scaled to <= 1
        u = mu_hat / (s_hat + eps), clipped to +-bound(t)  # bias-corrected; bound: see below
        store mu in mu_dtype, s in nu_dtype by stochastic rounding

    Three choices keep bf16/fp16 moments safe:

    * The RMS ``s = sqrt(nu)`` is stored, not ``nu``: it needs half the exponent range (``g = 1e-30`` gives
      ``s ~ 3e-32``, while ``nu`` would be ``1e-60``, below even fp32's range), and it is updated on values
      scaled to at most 1, so ``g^2`` never underflows or overflows before it is stored.
    * Stored moments are rounded stochastically: with ``b2 = 0.999`` the EMA moves ``nu`` by 0.1% per step,
      under half a bf16 ulp, so with round-to-nearest it freezes (after a spike it never decays; measured:
      updates 38% too small 500 steps after a 10-step spike). Stochastic rounding is unbiased; it adds
      ~2-4% relative noise to bf16-moment updates (~0.5% for fp16) and no drift.
    * The ratio is clipped to the Cauchy-Schwarz bound ``|mu_hat| / sqrt(nu_hat) <= bound(t)`` that exact
      Adam always satisfies (1 at step 1, ~7.3 later for the defaults), so the clip changes nothing in fp32
      but stops ``s`` that underflowed to 0 in fp16 from turning ``mu / eps`` into a blow-up. Every update
      is therefore bounded by ``bound(t)`` (times the learning rate, downstream).

    With fp32 moments this matches ``optax.scale_by_adam`` to fp32 rounding.

    Args:
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: added to the denominator, as in ``optax.scale_by_adam``.
      mu_dtype: storage dtype of the first moment (float32, bfloat16 or float16).
      nu_dtype: storage dtype of the RMS ``sqrt(nu)`` (float32, bfloat16 or float16).
      seed: seed of the PRNG key (in the state) used for stochastic rounding.

    Returns:
      An ``optax.GradientTransformation`` whose updates are fp32.

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization <https://arxiv.org/abs/1412.6980>`_, 2014.
      Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_, 2020.
    """
    mu_dtype, nu_dtype = np.dtype(mu_dtype), np.dtype(nu_dtype)
    for dtype in (mu_dtype, nu_dtype):
        if dtype not in (np.dtype(jnp.float32), *_LOW_PRECISION):
            raise ValueError(f"Adam moment dtype must be float32, bfloat16 or float16, not {dtype}")

    def init_fn(params):
        return ScaleByAdamLowpState(
            count=jnp.zeros([], jnp.int32),
            key=_key_data(seed),
            mu=jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype), params),
            nu_sqrt=jax.tree.map(lambda p: jnp.zeros(p.shape, nu_dtype), params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        key, mu_key, nu_key = jax.random.split(jax.random.wrap_key_data(state.key), 3)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda g, m: b1 * m.astype(jnp.float32) + (1.0 - b1) * g, grads, state.mu)
        nu_sqrt = jax.tree.map(lambda g, s: _rms_update(b2, s.astype(jnp.float32), g), grads, state.nu_sqrt)
        t = count.astype(jnp.float32)
        mu_correction = 1.0 / (1.0 - b1**t)
        nu_sqrt_correction = 1.0 / jnp.sqrt(1.0 - b2**t)
        bound = _adam_ratio_bound(b1, b2, count)
        new_updates = jax.tree.map(
            lambda m, s: jnp.clip(m * mu_correction / (s * nu_sqrt_correction + eps), -bound, bound),
            mu,
            nu_sqrt,
        )

        def store(tree, dtype, store_key):
            keys = optax.tree.split_key_like(store_key, tree)
            return jax.tree.map(lambda x, k: stochastic_round(x, dtype, k), tree, keys)

        new_state = ScaleByAdamLowpState(
            count=count,
            key=jax.random.key_data(key),
            mu=store(mu, mu_dtype, mu_key),
            nu_sqrt=store(nu_sqrt, nu_dtype, nu_key),
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def state_bytes_per_param(params: Any, opt_state: Any) -> float:
    """Bytes of ``params`` plus every array in ``opt_state``, per parameter.

    Counted from the pytree leaves' shapes and dtypes, so ``jax.eval_shape`` outputs work too (size a
    full-size model without allocating it). Scalars such as step counts and PRNG keys are included.

    Args:
      params: the parameter pytree.
      opt_state: the optimizer state pytree (``None`` entries are empty).

    Returns:
      ``(bytes(params) + bytes(opt_state)) / number of parameter elements``.
    """

    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return (tree_bytes(params) + tree_bytes(opt_state)) / num_params


def tree_bytes(tree: Any) -> int:
    """Bytes of every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``), from shapes and dtypes."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))
