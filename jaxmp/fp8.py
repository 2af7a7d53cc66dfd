"""FP8 matmuls: scaled E4M3/E5M2 quantisation, an fp8 dot with its backward pass, and delayed scaling.

The building blocks of FP8 training, as Transformer Engine defines them:

* a tensor ``x`` is sent to fp8 as ``saturate(x * scale)`` cast to the format (E4M3, max 448, for
  activations and weights in the forward pass; E5M2, max 57344, for gradients in the backward
  pass), and comes back as ``x8 / scale`` in float32. Values beyond the format's range saturate
  to its largest value (a plain cast would give NaN for E4M3 and inf for E5M2);
* :func:`fp8_dot` multiplies two such tensors, accumulating in float32, and in its backward pass
  quantises the incoming gradient to E5M2 before both gradient dots. Its scales are arguments,
  so the caller decides how they are found; :func:`fp8_dot_general` is the same with current
  scaling, as a drop-in ``jax.lax.dot_general``;
* **current scaling** computes a tensor's scale from its own amax (:func:`current_scale`);
* **delayed scaling** (:class:`DelayedScale`) uses the scale computed from an amax history of the
  previous steps and then records the current amax: ``scale = max_fp8 / max(history) / 2**margin``.
  The state is a pytree of arrays, to be kept in ``TrainState`` and checkpointed.

XLA's GPU backend turns the quantise → dequantise → dot pattern into an FP8 GEMM on hardware that
has one; on CPU the dot is emulated in float32 (exact for the quantised values, not fast).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

__all__ = [
    "E4M3",
    "E5M2",
    "fp8_max",
    "quantize",
    "dequantize",
    "current_scale",
    "fp8_dot",
    "fp8_dot_general",
    "quantize_current",
    "e5m2_gradient",
    "DelayedScale",
]

E4M3 = jnp.dtype(jnp.float8_e4m3fn)  # forward: activations and weights
E5M2 = jnp.dtype(jnp.float8_e5m2)  # backward: gradients


def fp8_max(dtype: Any) -> float:
    """The largest finite value of an fp8 format: 448 for E4M3, 57344 for E5M2."""
    return float(jnp.finfo(dtype).max)


def quantize(x: jax.Array, dtype: Any, scale: jax.Array) -> jax.Array:
    """``x * scale`` saturated to ``dtype``'s range and cast to it (round to nearest even).

    Args:
      x: any float array.
      dtype: :data:`E4M3` or :data:`E5M2`.
      scale: float32 scalar (or broadcastable), > 0.
    """
    bound = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) * scale, -bound, bound).astype(dtype)


def dequantize(x8: jax.Array, scale: jax.Array) -> jax.Array:
    """The float32 value of an fp8 array quantised with ``scale``: ``x8 / scale``."""
    return x8.astype(jnp.float32) / scale


def current_scale(x: jax.Array, dtype: Any, margin: int = 0) -> jax.Array:
    """The float32 scale that maps ``x``'s own amax to ``dtype``'s largest value, divided by
    ``2**margin``; 1 for an all-zero (or non-finite) ``x``."""
    return _scale_from_amax(jnp.max(jnp.abs(x.astype(jnp.float32))), dtype, margin)


def _scale_from_amax(amax: jax.Array, dtype: Any, margin: int | jax.Array) -> jax.Array:
    scale = fp8_max(dtype) / amax / 2.0**margin
    return jnp.where((amax > 0) & jnp.isfinite(amax), scale, 1.0).astype(jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` over the last axis of ``a`` and the first of ``b``, in float32."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=())
def fp8_dot(
    x: jax.Array, w: jax.Array, x_scale: jax.Array, w_scale: jax.Array, g_scale: jax.Array
) -> jax.Array:
    """``x @ w`` with both operands quantised to E4M3, accumulated in float32.

    The backward pass quantises the output gradient to E5M2 with ``g_scale``; ``dx`` and ``dw`` are
    its dots with the quantised ``w`` and ``x`` (the scales get no gradient).

    Args:
      x: ``[..., K]`` activations, any float dtype.
      w: ``[K, N]`` weights.
      x_scale, w_scale, g_scale: float32 scalars.

    Returns:
      float32 ``[..., N]``.
    """
    return _fp8_forward(x, w, x_scale, w_scale)[0]


def _fp8_forward(x, w, x_scale, w_scale):
    x_q = dequantize(quantize(x, E4M3, x_scale), x_scale)
    w_q = dequantize(quantize(w, E4M3, w_scale), w_scale)
    return _dot(x_q, w_q), (x_q, w_q)


def _fp8_dot_fwd(x, w, x_scale, w_scale, g_scale):
    out, (x_q, w_q) = _fp8_forward(x, w, x_scale, w_scale)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # residuals must be arrays
    return out, (x_q, w_q, x_scale, w_scale, g_scale, dtypes)


def _fp8_dot_bwd(residuals, g):
    x_q, w_q, x_scale, w_scale, g_scale, (x_like, w_like) = residuals
    g_q = dequantize(quantize(g, E5M2, g_scale), g_scale)
    dx = _dot(g_q, w_q.T).astype(x_like.dtype)
    dw = _dot(x_q.reshape(-1, x_q.shape[-1]).T, g_q.reshape(-1, g_q.shape[-1])).astype(w_like.dtype)
    return dx, dw, jnp.zeros_like(x_scale), jnp.zeros_like(w_scale), jnp.zeros_like(g_scale)


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def quantize_current(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` sent to ``dtype`` with its own current scale and back, in float32; the gradient passes
    straight through (differentiating the cast itself would round the gradient to ``dtype``)."""
    scale = current_scale(x, dtype)
    return dequantize(quantize(x, dtype, scale), scale)


def _quantize_current_fwd(x, dtype):
    return quantize_current(x, dtype), jnp.zeros((0,), x.dtype)  # residuals must be arrays


def _quantize_current_bwd(dtype, like, g):
    del dtype
    return (g.astype(like.dtype),)


quantize_current.defvjp(_quantize_current_fwd, _quantize_current_bwd)


@jax.custom_vjp
def e5m2_gradient(y: jax.Array) -> jax.Array:
    """The identity, whose backward pass quantises the incoming gradient to E5M2 (current scaling)."""
    return y


e5m2_gradient.defvjp(lambda y: (y, None), lambda _, g: (quantize_current(g, E5M2).astype(g.dtype),))


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """A drop-in ``jax.lax.dot_general`` with fp8 operands: both quantised to E4M3 with current
    scaling, a float32 dot, the output gradient quantised to E5M2; the result in
    ``preferred_element_type`` (default: ``lhs``'s dtype). What NNX layers with an fp8 ``matmul``
    get as their ``dot_general`` (:func:`jaxmp.nnx_with_policy`)."""
    out = jax.lax.dot_general(
        quantize_current(lhs, E4M3),
        quantize_current(rhs, E4M3),
        dimension_numbers,
        precision=precision,
        preferred_element_type=jnp.float32,
        **kwargs,
    )
    return e5m2_gradient(out).astype(preferred_element_type or lhs.dtype)


@flax.struct.dataclass
class DelayedScale:
    """Delayed scaling of one tensor, as a pytree of arrays (checkpointed with the train state).

    Attributes:
      amax_history: float32 ``[H]``, the newest amax first.
      scale: float32 scalar, the scale to quantise with now (from the history before this step).
      margin: int32 scalar; the scale is divided by ``2**margin``.
    """

    amax_history: jax.Array
    scale: jax.Array
    margin: jax.Array

    @classmethod
    def create(cls, history: int = 16, margin: int = 0) -> DelayedScale:
        """An empty history (all zeros) and scale 1."""
        if history < 1:
            raise ValueError(f"`history` must be >= 1, got {history}")
        return cls(
            jnp.zeros((history,), jnp.float32), jnp.ones((), jnp.float32), jnp.asarray(margin, jnp.int32)
        )

    def update(self, amax: jax.Array, dtype: Any) -> DelayedScale:
        """Records this step's ``amax`` (newest first; the oldest drops out) and computes the scale for
        the next step from the history's max: ``max_fp8(dtype) / max(history) / 2**margin`` (1 while
        the history holds only zeros). A non-finite ``amax`` is not recorded: the state is unchanged."""
        history = jnp.roll(self.amax_history, 1).at[0].set(amax.astype(jnp.float32))
        scale = _scale_from_amax(jnp.max(history), dtype, self.margin.astype(jnp.float32))
        finite = jnp.isfinite(amax)
        return DelayedScale(
            jnp.where(finite, history, self.amax_history),
            jnp.where(finite, scale, self.scale).astype(jnp.float32),
            self.margin,
        )
