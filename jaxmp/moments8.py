"""8-bit Adam moments: block-wise absmax quantisation with stochastic rounding.

A moment tensor is cut into blocks of ``BLOCK_SIZE`` consecutive values of its flattened (row-major) form, the
last block padded with zeros. Each block keeps one fp32 scale, its absolute maximum, and each value one byte::

    x_B = pad(flatten(x), to a multiple of 256).reshape(num_blocks, 256)
    scale_B = max |x_B| over the block                          # fp32, [num_blocks]
    code = stochastic_round(x / scale_B * CODE_MAX)             # one byte per value, in the param's own shape

Two codes (``kind``):

* ``int8``: a linear integer code. The signed first moment is an ``int8`` in [-127, 127] (step ``scale / 127``);
  the non-negative RMS ``sqrt(nu)`` (stored instead of ``nu``, as ``lowp.scale_by_adam_lowp`` does) is a
  ``uint8`` in [0, 255] (step ``scale / 255``), so the sign bit is not wasted.
* ``fp8``: ``float8_e4m3fn`` values in [-448, 448]: relative steps of 2^-3 down to 2^-6 * scale / 448, then
  subnormal steps of 2^-9 * scale / 448, so small values in a block with a large one keep their size.

Rounding to a code is stochastic and unbiased (``E[dequantize(quantize(x))] = x``): each value becomes one of
its two neighbouring codes, the upper one with probability ``(y - lo) / (hi - lo)``. bitsandbytes rounds to
nearest; here that would freeze the second moment as in bf16 (an EMA step of 0.1-5% per update is below half a
code step), the reason ``lowp.scale_by_adam_lowp`` rounds stochastically too.

The codes keep the parameter's shape, so the sharding plan splits them exactly like the parameter; only the
scales (``[num_blocks]``) follow their own rule.

References:
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization <https://arxiv.org/abs/2110.02861>`_, 2022.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxmp import lowp

__all__ = [
    "BLOCK_SIZE",
    "KINDS",
    "STORAGES",
    "QuantizedMoment",
    "ScaleByAdamMixedState",
    "num_blocks",
    "quantize",
    "dequantize",
    "is_quantized",
    "scale_by_adam_mixed",
]

BLOCK_SIZE = 256
KINDS = ("int8", "fp8")
STORAGES = ("float32", "bfloat16", "float16", *KINDS)  # what scale_by_adam_mixed can store a moment in
_FP8 = np.dtype(jnp.float8_e4m3fn)
_FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
_FP8_MAGNITUDE_MAX = 0x7E  # e4m3fn bits 0x7F are nan; 0x00..0x7E are the magnitudes 0..448 in order


class QuantizedMoment(NamedTuple):
    """One block-wise quantised moment tensor.

    ``codes`` (int8, uint8 or float8_e4m3fn, the parameter's shape) times ``scale / code_max`` of its block is
    the fp32 value; ``scale`` is fp32 of shape ``[num_blocks(size)]``. The codes' dtype says which code it is.
    """

    codes: jax.Array
    scale: jax.Array


def num_blocks(size: int) -> int:
    """Blocks of ``BLOCK_SIZE`` needed for ``size`` values (the last one padded)."""
    return max(1, math.ceil(size / BLOCK_SIZE))


def _code_dtype(kind: str, signed: bool) -> np.dtype:
    if kind == "int8":
        return np.dtype(np.int8 if signed else np.uint8)
    if kind == "fp8":
        return _FP8
    raise ValueError(f"unknown 8-bit moment kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _code_max(dtype: np.dtype) -> float:
    """The largest code: 127 (int8), 255 (uint8) or 448 (float8_e4m3fn)."""
    return _FP8_MAX if dtype == _FP8 else float(np.iinfo(dtype).max)


def _to_blocks(flat: jax.Array) -> jax.Array:
    """``[n]`` -> ``[num_blocks(n), BLOCK_SIZE]``, zero-padded."""
    blocks = num_blocks(flat.size)
    return jnp.pad(flat, (0, blocks * BLOCK_SIZE - flat.size)).reshape(blocks, BLOCK_SIZE)


def _neighbours(y: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """The codes just below and above fp32 ``y`` (``|y| <= code_max``), as fp32; equal when ``y`` is a code."""
    if dtype != _FP8:
        lo = jnp.floor(y)
        return lo, jnp.minimum(lo + 1.0, _code_max(dtype))
    nearest = y.astype(_FP8)
    bits = lax.bitcast_convert_type(nearest, jnp.uint8)
    magnitude = (bits & 0x7F).astype(jnp.int32)
    nearest = nearest.astype(jnp.float32)
    # One e4m3 magnitude step away from zero when |nearest| <= |y|, else toward it (the bits are monotonic).
    step = jnp.where(jnp.abs(nearest) <= jnp.abs(y), 1, -1)
    other_bits = (bits & 0x80) | jnp.clip(magnitude + step, 0, _FP8_MAGNITUDE_MAX).astype(jnp.uint8)
    other = lax.bitcast_convert_type(other_bits, _FP8).astype(jnp.float32)
    return jnp.minimum(nearest, other), jnp.maximum(nearest, other)


def quantize(x: jax.Array, kind: str, key: jax.Array, *, signed: bool = True) -> QuantizedMoment:
    """Block-wise quantises fp32 ``x`` with unbiased stochastic rounding.

    Args:
      x: finite values of any shape (cast to float32); ``signed=False`` requires ``x >= 0``.
      kind: ``"int8"`` (linear code) or ``"fp8"`` (float8_e4m3fn).
      key: a JAX PRNG key (typed or raw uint32 data) for the rounding.
      signed: int8 only: an ``int8`` code for signed values, else ``uint8`` (twice the resolution).

    Returns:
      A ``QuantizedMoment``: codes in ``x``'s shape, fp32 scales ``[num_blocks(x.size)]``. An all-zero block has
      scale 0 and zero codes.
    """
    dtype = _code_dtype(kind, signed)
    code_max = _code_max(dtype)
    x_B = _to_blocks(jnp.asarray(x, jnp.float32).reshape(-1))
    scale = jnp.max(jnp.abs(x_B), axis=1)
    y_B = jnp.clip(x_B * (code_max / jnp.where(scale > 0, scale, 1.0))[:, None], -code_max, code_max)
    lo, hi = _neighbours(y_B, dtype)
    gap = hi - lo
    round_up = jax.random.uniform(key, y_B.shape, jnp.float32) * gap < y_B - lo
    codes_B = jnp.where(round_up, hi, lo).astype(dtype)
    codes = codes_B.reshape(-1)[: x.size].reshape(x.shape)
    return QuantizedMoment(codes=codes, scale=scale)


def dequantize(moment: QuantizedMoment) -> jax.Array:
    """The fp32 values of ``moment``, in its codes' shape."""
    codes = moment.codes
    step = moment.scale / _code_max(np.dtype(codes.dtype))
    x_B = _to_blocks(codes.reshape(-1).astype(jnp.float32)) * step[:, None]
    return x_B.reshape(-1)[: codes.size].reshape(codes.shape)


def is_quantized(leaf: Any) -> bool:
    """Whether a moment-state leaf is a ``QuantizedMoment`` (for ``is_leaf`` in tree maps)."""
    return isinstance(leaf, QuantizedMoment)


def _storage(stored: jax.Array | QuantizedMoment) -> str:
    """How a stored moment is kept: a float dtype name, ``int8`` or ``fp8`` (read from the codes' dtype)."""
    if not is_quantized(stored):
        return np.dtype(stored.dtype).name
    return "fp8" if np.dtype(stored.codes.dtype) == _FP8 else "int8"


def _zeros(shape: tuple[int, ...], storage: str, *, signed: bool) -> jax.Array | QuantizedMoment:
    """A zero moment of ``shape`` stored as ``storage`` (see ``STORAGES``)."""
    if storage in KINDS:
        scale = jnp.zeros([num_blocks(math.prod(shape))], jnp.float32)
        return QuantizedMoment(codes=jnp.zeros(shape, _code_dtype(storage, signed)), scale=scale)
    if storage not in STORAGES:
        raise ValueError(f"unknown moment storage {storage!r}; valid: {', '.join(STORAGES)}")
    return jnp.zeros(shape, storage)


def _store(x: jax.Array, storage: str, key: jax.Array, *, signed: bool) -> jax.Array | QuantizedMoment:
    """fp32 ``x`` stored as ``storage`` (see ``STORAGES``), rounded stochastically."""
    if storage in KINDS:
        return quantize(x, storage, key, signed=signed)
    return lowp.stochastic_round(x, storage, key)


def _load(stored: jax.Array | QuantizedMoment) -> jax.Array:
    """A stored moment as fp32."""
    return dequantize(stored) if is_quantized(stored) else stored.astype(jnp.float32)


class ScaleByAdamMixedState(NamedTuple):
    """State of ``scale_by_adam_mixed``; ``mu`` and ``nu_sqrt`` have the params' structure, each leaf an
    fp32/bf16/fp16 array or a ``QuantizedMoment``."""

    count: jax.Array  # int32 number of updates, for bias correction
    key: jax.Array  # uint32 PRNG key data for stochastic rounding of the stored moments
    mu: optax.Updates  # first moment
    nu_sqrt: optax.Updates  # square root of the second moment (the gradient RMS)


def scale_by_adam_mixed(
    storage_for: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
) -> optax.GradientTransformation:
    """``lowp.scale_by_adam_lowp`` with each parameter's moments stored its own way, 8-bit codes included.

    The arithmetic is ``scale_by_adam_lowp``'s (its private helpers are reused, not copied), in fp32 (moments loaded, updated, clipped to the
    Cauchy-Schwarz bound, then stored again with stochastic rounding); each leaf's storage is read back
    from its state leaf, so ``update`` needs no configuration and a restored state carries its own layout.
    Both moments of a leaf use the same storage; a quantised first moment uses a signed code, the RMS
    ``sqrt(nu) >= 0`` an unsigned one.

    Args:
      storage_for: ``storage_for(params)`` -> a tree of the params' structure whose leaves are one of
        ``STORAGES`` per parameter; called once, by ``init``.
      b1, b2, eps: Adam's hyperparameters, as in ``optax.scale_by_adam``.
      seed: seed of the PRNG key (in the state) used for stochastic rounding.

    Returns:
      An ``optax.GradientTransformation`` whose updates are fp32.
    """

    def init_fn(params):
        treedef = jax.tree.structure(params)
        leaves = treedef.flatten_up_to(params)
        storages = treedef.flatten_up_to(storage_for(params))
        return ScaleByAdamMixedState(
            count=jnp.zeros([], jnp.int32),
            key=lowp._key_data(seed),
            mu=treedef.unflatten(
                [_zeros(p.shape, s, signed=True) for p, s in zip(leaves, storages, strict=True)]
            ),
            nu_sqrt=treedef.unflatten(
                [_zeros(p.shape, s, signed=False) for p, s in zip(leaves, storages, strict=True)]
            ),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        treedef = jax.tree.structure(updates)
        grads = [g.astype(jnp.float32) for g in treedef.flatten_up_to(updates)]
        stored_mu = treedef.flatten_up_to(state.mu)
        stored_nu_sqrt = treedef.flatten_up_to(state.nu_sqrt)
        leaf_keys = jax.random.split(step_key, (len(grads), 2))
        t = count.astype(jnp.float32)
        mu_correction = 1.0 / (1.0 - b1**t)
        nu_sqrt_correction = 1.0 / jnp.sqrt(1.0 - b2**t)
        bound = lowp._adam_ratio_bound(b1, b2, count)
        new_updates, new_mu, new_nu_sqrt = [], [], []
        for g, m_stored, s_stored, keys in zip(grads, stored_mu, stored_nu_sqrt, leaf_keys, strict=True):
            m = b1 * _load(m_stored) + (1.0 - b1) * g
            s = lowp._rms_update(b2, _load(s_stored), g)
            new_updates.append(jnp.clip(m * mu_correction / (s * nu_sqrt_correction + eps), -bound, bound))
            new_mu.append(_store(m, _storage(m_stored), keys[0], signed=True))
            new_nu_sqrt.append(_store(s, _storage(s_stored), keys[1], signed=False))
        new_state = ScaleByAdamMixedState(
            count=count,
            key=jax.random.key_data(key),
            mu=treedef.unflatten(new_mu),
            nu_sqrt=treedef.unflatten(new_nu_sqrt),
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)
