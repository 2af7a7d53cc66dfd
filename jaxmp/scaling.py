"""Loss scaling: keeps small fp16 gradients from underflowing to zero.

Same interface as jmp (``loss_scale``, ``scale``, ``unscale``, ``adjust``), but every
state is a plain pytree whose fields are *all* array leaves. jmp's
``DynamicLossScale`` leaves ``min_loss_scale`` out of its flattening (it comes back
as 1.0 after ``jax.jit``) and validates in ``__post_init__``, which breaks
``jax.jit(f).lower``, ``tree_map`` to non-arrays and orbax restores; that is why
these are written here rather than taken from jmp.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey, register_pytree_with_keys_class

from jaxmp.precision import Policy

__all__ = [
    "NoOpLossScale",
    "StaticLossScale",
    "DynamicLossScale",
    "LossScale",
    "all_finite",
    "default_loss_scale",
    "make_loss_scale",
    "parse_loss_scale",
]


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool array: True when every floating-point leaf of ``tree`` is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def _unscale(grads: Any, loss_scale: jax.Array) -> Any:
    """Divides every floating-point leaf by ``loss_scale`` in fp32 (results are fp32)."""
    inverse = 1.0 / loss_scale.astype(jnp.float32)

    def unscale_leaf(g):
        if not jnp.issubdtype(g.dtype, jnp.floating):
            return g
        return g.astype(jnp.float32) * inverse

    return jax.tree.map(unscale_leaf, grads)


class _PytreeState:
    """Base for states whose ``_fields`` are all pytree leaves, restored without ``__init__``."""

    _fields: tuple[str, ...] = ()

    def tree_flatten_with_keys(self):
        return tuple((GetAttrKey(name), getattr(self, name)) for name in self._fields), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        del aux_data
        state = object.__new__(cls)
        for name, value in zip(cls._fields, children, strict=True):
            object.__setattr__(state, name, value)
        return state

    def _replace(self, **changes):
        values = {name: changes.get(name, getattr(self, name)) for name in self._fields}
        return type(self).tree_unflatten(None, [values[name] for name in self._fields])

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; adjust() returns a new state")

    def __repr__(self):
        body = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({body})"

    def scale(self, loss: jax.Array) -> jax.Array:
        """Returns ``loss * loss_scale`` in fp32."""
        return jnp.asarray(loss, jnp.float32) * self.loss_scale

    def unscale(self, grads: Any) -> Any:
        """Returns ``grads / loss_scale``, computed and returned in fp32."""
        return _unscale(grads, self.loss_scale)


@register_pytree_with_keys_class
class NoOpLossScale(_PytreeState):
    """No loss scaling: ``scale`` and ``unscale`` only cast to fp32."""

    _fields = ()

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.ones((), jnp.float32)

    def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
        del grads_finite
        return self


@register_pytree_with_keys_class
class StaticLossScale(_PytreeState):
    """A fixed loss scale.

    Attributes:
      loss_scale: fp32 scalar.
    """

    _fields = ("loss_scale",)

    def __init__(self, loss_scale: float):
        if not np.isfinite(loss_scale) or loss_scale <= 0:
            raise ValueError(f"static loss scale must be a finite number > 0, got {loss_scale}")
        object.__setattr__(self, "loss_scale", jnp.asarray(loss_scale, jnp.float32))

    def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
        del grads_finite
        return self


@register_pytree_with_keys_class
class DynamicLossScale(_PytreeState):
    """A loss scale that grows while gradients stay finite and backs off on overflow.

    ``adjust(grads_finite)`` runs once per micro-step::

        if grads_finite:
            counter += 1
            if counter == period:
                counter = 0
                if isfinite(loss_scale * factor):      # grow only to a finite value
                    loss_scale = loss_scale * factor
                hysteresis_left = hysteresis             # the budget refills on growth
        else:
            counter = 0
            if hysteresis_left <= 1:
                loss_scale = max(loss_scale / factor, min_scale)
            else:
                hysteresis_left -= 1                     # spend one tolerated overflow

    ``hysteresis`` is DeepSpeed's: 1 backs off at once; 2 tolerates one overflow before
    backing off. With ``hysteresis=1, min_scale=0, factor=2`` this is PyTorch's
    ``GradScaler`` rule (back-off 0.5, growth 2, growth interval ``period``).

    Attributes (all array leaves, so jit, ``.lower()``, ``tree_map`` and orbax keep them):
      loss_scale: fp32 scalar, the current scale.
      counter: int32 scalar, finite steps since the last change.
      hysteresis_left: int32 scalar, the overflow budget.
      period: int32 scalar. factor: fp32 scalar. min_scale: fp32 scalar.
      hysteresis: int32 scalar.
    """

    _fields = ("loss_scale", "counter", "hysteresis_left", "period", "factor", "min_scale", "hysteresis")

    def __init__(
        self,
        initial_scale: float = 2.0**15,
        period: int = 2000,
        factor: float = 2.0,
        min_scale: float = 1.0,
        hysteresis: int = 1,
    ):
        checks = [
            (np.isfinite(initial_scale) and initial_scale > 0, "initial_scale must be finite and > 0"),
            (int(period) >= 1, "period must be >= 1"),
            (np.isfinite(factor) and factor > 1, "factor must be finite and > 1"),
            (np.isfinite(min_scale) and min_scale >= 0, "min_scale must be finite and >= 0"),
            (int(hysteresis) >= 1, "hysteresis must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DynamicLossScale: {message}")
        values = {
            "loss_scale": jnp.asarray(initial_scale, jnp.float32),
            "counter": jnp.zeros((), jnp.int32),
            "hysteresis_left": jnp.asarray(hysteresis, jnp.int32),
            "period": jnp.asarray(period, jnp.int32),
            "factor": jnp.asarray(factor, jnp.float32),
            "min_scale": jnp.asarray(min_scale, jnp.float32),
            "hysteresis": jnp.asarray(hysteresis, jnp.int32),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        """Returns the state after one micro-step whose gradients were ``grads_finite``."""
        grads_finite = jnp.asarray(grads_finite, jnp.bool_)
        counter = self.counter + 1
        grow = counter >= self.period
        grown = self.loss_scale * self.factor
        scale_if_finite = jnp.where(grow & jnp.isfinite(grown), grown, self.loss_scale)
        counter_if_finite = jnp.where(grow, 0, counter)
        hysteresis_if_finite = jnp.where(grow, self.hysteresis, self.hysteresis_left)

        back_off = self.hysteresis_left <= 1
        reduced = jnp.maximum(self.loss_scale / self.factor, self.min_scale)
        scale_if_overflow = jnp.where(back_off, reduced, self.loss_scale)
        hysteresis_if_overflow = jnp.where(back_off, self.hysteresis_left, self.hysteresis_left - 1)

        return self._replace(
            loss_scale=jnp.where(grads_finite, scale_if_finite, scale_if_overflow),
            counter=jnp.where(grads_finite, counter_if_finite, 0).astype(jnp.int32),
            hysteresis_left=jnp.where(grads_finite, hysteresis_if_finite, hysteresis_if_overflow).astype(
                jnp.int32
            ),
        )


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def default_loss_scale(policy: Policy) -> LossScale:
    """Dynamic scaling when the policy stores or computes anything in float16, none otherwise."""
    return DynamicLossScale() if policy.uses_float16 else NoOpLossScale()


def parse_loss_scale(spec: str) -> tuple[str, float | None]:
    """Parses ``auto``, ``none``, ``dynamic`` or ``static:N`` into ``(kind, N or None)``; builds no arrays,
    so it may run before ``jax.distributed.initialize``.

    Raises:
      ValueError: an unknown spec, or a static scale that is not a number in (0, float32 max].
    """
    spec = spec.strip().lower()
    if spec in ("auto", "none", "dynamic"):
        return spec, None
    if spec.startswith("static:"):
        try:
            value = float(spec.split(":", 1)[1])
        except ValueError:
            value = float("nan")
        if not 0 < value <= float(np.finfo(np.float32).max):  # also refuses nan; the scale is held in fp32
            raise ValueError(
                f"bad static loss scale {spec!r}; write static:N with 0 < N <= 3.4e38 (float32), e.g. static:128"
            )
        return "static", value
    raise ValueError(f"unknown loss scale {spec!r}; valid: auto, none, dynamic, static:N")


def make_loss_scale(spec: str, policy: Policy) -> LossScale:
    """Builds a loss scale from ``auto`` (see :func:`default_loss_scale`), ``none``, ``dynamic`` or
    ``static:N``; raises ``ValueError`` for any other spec (see :func:`parse_loss_scale`)."""
    kind, value = parse_loss_scale(spec)
    if kind == "auto":
        return default_loss_scale(policy)
    if kind == "none":
        return NoOpLossScale()
    if kind == "dynamic":
        return DynamicLossScale()
    return StaticLossScale(value)
