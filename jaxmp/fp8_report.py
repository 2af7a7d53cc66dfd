"""How each fp8 dot's tensors fare in their format: the fraction that saturates and the fraction
that underflows to zero, at the scale they are quantised with.

For every dense layer whose matmul the policy runs in fp8 (jaxmp's ``Dense``), the three tensors
of its dot (``jaxmp.fp8.DOT_TENSORS``): the input ``x`` and weight ``w`` (E4M3) and the gradient of
its output (E5M2; the loss multiplied by ``loss_scale`` first, as training would). A value
saturates when ``|v * scale|`` is beyond the format's largest value (448 or 57344) by more than
rounding would absorb (half a unit in the last place: beyond 464 or 61440; a tensor scaled by its
own amax lands on 448 give or take float32 rounding, which is not saturation), and underflows when
it is nonzero but quantises to zero. With delayed scaling the scales are a run's
(:class:`jaxmp.fp8.DelayedScaling`); without, each tensor's own amax (current scaling, which by
construction never saturates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmp import fp8
from jaxmp.models.layers import Dense
from jaxmp.precision import Policy

__all__ = ["Fp8Tensor", "fp8_report"]

_FORMATS = (fp8.E4M3, fp8.E4M3, fp8.E5M2)


@dataclasses.dataclass(frozen=True)
class Fp8Tensor:
    """One tensor of one fp8 dot, over all batches.

    Attributes:
      dot: the dense layer's module path, e.g. ``blocks_0/mlp/fc_in``.
      tensor: ``x``, ``w`` or ``grad``.
      format: ``float8_e4m3fn`` or ``float8_e5m2``.
      scale: the scale it was quantised with (current scaling: the last batch's).
      amax: its largest magnitude before scaling.
      saturated: fraction of values beyond the format's range after scaling.
      underflow: fraction of values that are nonzero but quantise to zero.
    """

    dot: str
    tensor: str
    format: str
    scale: float
    amax: float
    saturated: float
    underflow: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_fp8_dense(module: nn.Module, policy: Policy) -> bool:
    return isinstance(module, Dense) and policy.fp8_recipe("/".join(module.path)) is not None


def _recording(forward: Callable, params: Any, input_ids: jax.Array, policy: Policy, perturbations: dict):
    """The model's outputs and, per fp8 dense layer, its dot's input and kernel as the dot sees them;
    each layer's output plus its entry of ``perturbations`` (to differentiate with respect to it)."""
    operands: dict[str, tuple[jax.Array, jax.Array]] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not _is_fp8_dense(module, policy):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        output = next_fun(*args, **kwargs)
        operands[path] = (args[0].astype(module.dtype), module.get_variable("params", "kernel"))
        return output + perturbations[path] if path in perturbations else output

    with nn.intercept_methods(interceptor):
        out = forward(params, input_ids)
    return out, operands


def _saturation_threshold(dtype: Any) -> float:
    """The largest value plus half its unit in the last place: 464 for E4M3, 61440 for E5M2."""
    largest = fp8.fp8_max(dtype)
    return largest + 2.0 ** np.floor(np.log2(largest)) * float(jnp.finfo(dtype).eps) / 2


def _counts(value: jax.Array, dtype: Any, scale: jax.Array) -> jax.Array:
    """float32 ``[4]``: values saturated, values underflowed, values, amax."""
    scaled = jnp.abs(value.astype(jnp.float32)) * scale
    quantized = fp8.quantize(value, dtype, scale)
    return jnp.stack(
        [
            jnp.sum(scaled > _saturation_threshold(dtype)),
            jnp.sum((quantized == 0) & (value != 0)),
            jnp.float32(value.size),
            jnp.max(jnp.abs(value.astype(jnp.float32))),
        ]
    ).astype(jnp.float32)


def fp8_report(
    forward: Callable,
    params: Any,
    policy: Policy,
    batches: list[dict],
    loss_fn: Callable[[Any, dict], jax.Array],
    *,
    scales: dict[str, np.ndarray] | None = None,
    loss_scale: float = 1.0,
) -> list[Fp8Tensor]:
    """Saturation and underflow of every fp8 dot's tensors over ``batches``.

    Args:
      forward: ``forward(params, input_ids) -> outputs`` under ``policy`` (a jaxmp model, laid out
        one block per layer).
      params: the params ``forward`` takes.
      policy: the policy (which dots are fp8).
      batches: dicts with ``input_ids`` and what ``loss_fn`` reads.
      loss_fn: ``loss_fn(outputs, batch) -> scalar loss``.
      scales: ``{dot path: float32 [3]}``, the delayed scales of ``x``, ``w`` and ``grad``
        (``dict(zip(scaling.dot_names(), scaling.scales()))``); None: current scaling.
      loss_scale: the loss is multiplied by it before the backward pass.

    Returns:
      One :class:`Fp8Tensor` per dot and tensor, ordered by dot path; empty without fp8 dots.
    """

    @jax.jit
    def batch_counts(params, batch):
        input_ids = batch["input_ids"]
        operands = jax.eval_shape(lambda p: _recording(forward, p, input_ids, policy, {})[1], params)
        zeros = {path: jnp.zeros(x.shape[:-1] + w.shape[-1:], x.dtype) for path, (x, w) in operands.items()}

        def scaled_loss(perturbations):
            out, operands = _recording(forward, params, input_ids, policy, perturbations)
            return loss_fn(out, batch).astype(jnp.float32) * loss_scale, operands

        grads, operands = jax.grad(scaled_loss, has_aux=True)(zeros)
        counts, used = {}, {}
        for path, (x, w) in operands.items():
            tensors = (x, w, grads[path])
            if scales is None:
                dot_scales = jnp.stack(
                    [fp8.current_scale(t, f) for t, f in zip(tensors, _FORMATS, strict=True)]
                )
            else:
                dot_scales = jnp.asarray(scales[path], jnp.float32)
            used[path] = dot_scales
            counts[path] = jnp.stack(
                [_counts(t, f, dot_scales[i]) for i, (t, f) in enumerate(zip(tensors, _FORMATS, strict=True))]
            )
        return counts, used

    totals: dict[str, np.ndarray] = {}
    used: dict[str, np.ndarray] = {}
    for batch in batches:
        counts, used = jax.device_get(batch_counts(params, batch))
        for path, table in counts.items():
            table = np.asarray(table, np.float64)
            if path in totals:  # sums of counts, max of amax
                previous = totals[path]
                table = np.concatenate(
                    [previous[:, :3] + table[:, :3], np.maximum(previous[:, 3:], table[:, 3:])], 1
                )
            totals[path] = table
    return [
        Fp8Tensor(
            dot=path,
            tensor=tensor,
            format=np.dtype(_FORMATS[i]).name,
            scale=float(used[path][i]),
            amax=float(totals[path][i, 3]),
            saturated=float(totals[path][i, 0] / totals[path][i, 2]),
            underflow=float(totals[path][i, 1] / totals[path][i, 2]),
        )
        for path in sorted(totals)
        for i, tensor in enumerate(fp8.DOT_TENSORS)
    ]
