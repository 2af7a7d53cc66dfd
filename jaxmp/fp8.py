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

import dataclasses
import functools
import re
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
    "DelayedScaling",
    "Recipe",
    "DOT_TENSORS",
    "SCALING_COLLECTION",
    "AMAX_COLLECTION",
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
    return _scale_from_amax(_amax(x), fp8_max(dtype), margin)


def _amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)))


def _scale_from_amax(amax: jax.Array, max_value: Any, margin: int) -> jax.Array:
    """``max_value / amax / 2**margin``, and 1 where ``amax`` is zero or not finite."""
    scale = max_value / amax / 2.0**margin
    return jnp.where((amax > 0) & jnp.isfinite(amax), scale, 1.0).astype(jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` over the last axis of ``a`` and the first of ``b``, in float32."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# The order of the three tensors of an fp8 dot in its scales, amaxes and histories.
DOT_TENSORS = ("x", "w", "grad")


def dot_fp8_max() -> jax.Array:
    """float32 ``[3]``: the largest value of each tensor's format, in ``DOT_TENSORS`` order (E4M3 for
    ``x`` and ``w``, E5M2 for ``grad``)."""
    return jnp.asarray([fp8_max(E4M3), fp8_max(E4M3), fp8_max(E5M2)], jnp.float32)


@jax.custom_vjp
def fp8_dot(x: jax.Array, w: jax.Array, scales: jax.Array, amax_probe: jax.Array) -> jax.Array:
    """``x @ w`` with both operands quantised to E4M3, accumulated in float32.

    The backward pass quantises the output gradient to E5M2; ``dx`` and ``dw`` are its dots with the
    quantised ``w`` and ``x``. The scales get no gradient. ``amax_probe`` is how the amaxes get out
    of a jitted, scanned or rematerialised model without a mutable collection: its "gradient" is
    ``[amax(x), amax(w), amax(grad)]``, the three tensors' largest magnitudes before scaling (so
    ``jax.grad`` with respect to a zero probe returns them; a module called twice gets their sum, an
    upper bound of the max).

    Args:
      x: ``[..., K]`` activations, any float dtype.
      w: ``[K, N]`` weights.
      scales: float32 ``[3]``, the scales of ``x``, ``w`` and the output gradient (``DOT_TENSORS``).
      amax_probe: float32 ``[3]``, any value (zeros); only its gradient means anything.

    Returns:
      float32 ``[..., N]``.
    """
    del amax_probe
    return _fp8_forward(x, w, scales)[0]


def _fp8_forward(x, w, scales):
    x_q = dequantize(quantize(x, E4M3, scales[0]), scales[0])
    w_q = dequantize(quantize(w, E4M3, scales[1]), scales[1])
    return _dot(x_q, w_q), (x_q, w_q)


def _fp8_dot_fwd(x, w, scales, amax_probe):
    del amax_probe
    out, (x_q, w_q) = _fp8_forward(x, w, scales)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # residuals must be arrays
    return out, (x_q, w_q, scales, jnp.stack([_amax(x), _amax(w)]), dtypes)


def _fp8_dot_bwd(residuals, g):
    x_q, w_q, scales, forward_amax, (x_like, w_like) = residuals
    g_q = dequantize(quantize(g, E5M2, scales[2]), scales[2])
    dx = _dot(g_q, w_q.T).astype(x_like.dtype)
    dw = _dot(x_q.reshape(-1, x_q.shape[-1]).T, g_q.reshape(-1, g_q.shape[-1])).astype(w_like.dtype)
    amaxes = jnp.concatenate([forward_amax, _amax(g)[None]])
    return dx, dw, jnp.zeros_like(scales), amaxes


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
    """Delayed scaling of one or more tensors, as a pytree of arrays (checkpointed with the train state).

    ``S`` is the tensors' shape: ``[3]`` for one fp8 dot (``DOT_TENSORS``), ``[L, 3]`` for a stack of
    ``L`` scanned layers.

    Attributes:
      amax_history: float32 ``S + [H]``, the newest amax first.
      scale: float32 ``S``, the scales to quantise with now (from the history before this step).
    """

    amax_history: jax.Array
    scale: jax.Array

    @classmethod
    def create(cls, shape: tuple[int, ...] = (), history: int = 16) -> DelayedScale:
        """An empty history (all zeros) and scale 1."""
        if history < 1:
            raise ValueError(f"`history` must be >= 1, got {history}")
        return cls(jnp.zeros((*shape, history), jnp.float32), jnp.ones(shape, jnp.float32))

    def update(self, amax: jax.Array, max_value: Any, margin: int = 0) -> DelayedScale:
        """Records ``amax`` (float32 ``S``; newest first, the oldest drops out) and computes the next
        scales from each history's max: ``max_value / max(history) / 2**margin`` (1 while a history
        holds only zeros). ``max_value`` is the format's largest value (:func:`fp8_max`), a float or an
        array broadcastable to ``S``. A tensor whose ``amax`` is not finite keeps its history and scale."""
        amax = amax.astype(jnp.float32)
        history = jnp.concatenate([amax[..., None], self.amax_history[..., :-1]], axis=-1)
        scale = _scale_from_amax(jnp.max(history, axis=-1), jnp.broadcast_to(max_value, amax.shape), margin)
        finite = jnp.isfinite(amax)
        return DelayedScale(
            jnp.where(finite[..., None], history, self.amax_history),
            jnp.where(finite, scale, self.scale).astype(jnp.float32),
        )


# The Flax variable collections of a model whose fp8 dots use delayed scaling: per dot, its
# DelayedScale (read by the forward pass) and a zero amax probe (differentiated to get the amaxes).
SCALING_COLLECTION = "fp8_scaling"
AMAX_COLLECTION = "fp8_amax"


@flax.struct.dataclass
class DelayedScaling:
    """The delayed-scaling state of every fp8 dot of a model: ``TrainState.fp8``.

    The histories advance once per optimizer update, with the max amax over the micro-steps of its
    accumulation window (every micro-step since the previous update, including dropped non-finite
    ones: their finite amaxes measure real tensors, and a spike that made a step non-finite is what
    the next scales must see; a non-finite amax is itself dropped). Under a mesh the amaxes are of
    the global tensors: the step is one jitted program over global arrays, so XLA reduces each
    amax over the devices that hold its shards.

    Attributes:
      dots: the model's ``fp8_scaling`` collection: per fp8 dot a :class:`DelayedScale` of its three
        tensors (``DOT_TENSORS``; shape ``[3]``, or ``[L, 3]`` for ``L`` scanned layers).
      window_amax: float32, shaped like each dot's scale: the max amax of this accumulation window.
    """

    dots: Any
    window_amax: Any

    @classmethod
    def create(cls, dots: Any) -> DelayedScaling:
        """Fresh state (empty histories, scales 1) for a ``fp8_scaling`` collection of arrays or of
        ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape`` of the model's ``init``)."""
        fresh = jax.tree.map(
            lambda dot: DelayedScale(jnp.zeros(dot.amax_history.shape), jnp.ones(dot.scale.shape)),
            dots,
            is_leaf=_is_delayed_scale,
        )
        return cls(fresh, cls._scales(fresh, jnp.zeros_like))

    @staticmethod
    def _scales(dots: Any, fn: Any) -> Any:
        return jax.tree.map(lambda dot: fn(dot.scale), dots, is_leaf=_is_delayed_scale)

    def amax_probe(self) -> Any:
        """Zeros shaped like ``window_amax``: differentiate the loss with respect to them to get the
        micro-step's amaxes (:func:`fp8_dot`)."""
        return jax.tree.map(jnp.zeros_like, self.window_amax)

    def variables(self, amax_probe: Any) -> dict[str, Any]:
        """The collections to add to the model's ``apply`` variables."""
        return {SCALING_COLLECTION: self.dots, AMAX_COLLECTION: amax_probe}

    def scales(self) -> jax.Array:
        """float32 ``[D, 3]``: each dot's scales (a scanned stack's layers one by one), in
        :meth:`dot_names` order."""
        return jnp.concatenate([dot.scale.reshape(-1, 3) for _, dot in self._dots_with_names()])

    def dot_names(self) -> list[str]:
        """The module path of each row of :meth:`scales`, e.g. ``blocks_0/attn/query``. Layer ``i`` of
        a scanned stack (``blocks/attn/query``, scales ``[L, 3]``) is named as jaxmp's models name it
        unscanned: ``blocks_i/attn/query``."""
        names = []
        for name, dot in self._dots_with_names():
            if dot.scale.ndim == 1:
                names.append(name)
            else:
                stack, _, rest = name.partition("/")
                names += [f"{stack}_{layer}/{rest}" for layer in range(dot.scale.shape[0])]
        return names

    def _dots_with_names(self) -> list[tuple[str, DelayedScale]]:
        found = jax.tree_util.tree_flatten_with_path(self.dots, is_leaf=_is_delayed_scale)[0]
        return [("/".join(str(key.key) for key in path[:-1]), dot) for path, dot in found]  # less "dot"

    def record(self, amax: Any, window_closed: jax.Array) -> DelayedScaling:
        """Adds one micro-step's amaxes (shaped like ``window_amax``) to the window's max, non-finite
        ones dropped; when ``window_closed`` (bool scalar: the optimizer applied an update in this
        micro-step) every history records the window's max, the scales follow
        (:meth:`DelayedScale.update`) and the next window starts from zero."""
        window = jax.tree.map(
            lambda seen, new: jnp.maximum(seen, jnp.where(jnp.isfinite(new), new, 0.0)),
            self.window_amax,
            amax,
        )
        closed = jax.tree.map(
            lambda dot, window_max: dot.update(window_max, dot_fp8_max()),
            self.dots,
            window,
            is_leaf=_is_delayed_scale,
        )
        return DelayedScaling(
            dots=jax.tree.map(lambda new, old: jnp.where(window_closed, new, old), closed, self.dots),
            window_amax=jax.tree.map(lambda seen: jnp.where(window_closed, 0.0, seen), window),
        )


def _is_delayed_scale(node: Any) -> bool:
    return isinstance(node, DelayedScale)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How an fp8 dot finds its scales: ``delayed`` over an amax history of ``history`` updates, or
    ``current`` (each tensor's own amax, at every call).

    Written in a policy's ``matmul`` key as ``fp8`` (the default: ``fp8-delayed-16``, as Transformer
    Engine's ``DelayedScaling``), ``fp8-delayed``, ``fp8-delayed-H`` or ``fp8-current``.
    """

    scaling: str
    history: int = 16

    GRAMMAR = "compute, fp8, fp8-current, fp8-delayed or fp8-delayed-HISTORY (e.g. fp8-delayed-32)"

    @classmethod
    def parse(cls, text: str) -> Recipe | None:
        """The recipe a ``matmul`` value names; None for ``compute``. ``ValueError`` if it names none."""
        text = text.strip().lower()
        if text == "compute":
            return None
        if text == "fp8-current":
            return cls("current")
        found = re.fullmatch(r"fp8(?:-delayed(?:-(\d+))?)?", text)
        if not found or (found.group(1) is not None and int(found.group(1)) < 1):
            raise ValueError(f"unknown matmul {text!r}; valid: {cls.GRAMMAR}")
        return cls("delayed", int(found.group(1) or 16))

    def __str__(self) -> str:
        return "fp8-current" if self.scaling == "current" else f"fp8-delayed-{self.history}"
