"""8-bit storage for serving: int8 and fp8 (E4M3) weights per output channel, KV cache per token and head.

Symmetric absmax quantisation, the scheme of weight-only int8 in torchao and Qwix and of vLLM's fp8
KV cache, with a float32 scale for every slice along the kept axes::

    scale = amax(|x|, over the reduced axis) / QMAX         # QMAX: 127 (int8) or 448 (E4M3's largest)
    q     = round(x / scale)  as int8,  or  (x / scale)  rounded to nearest E4M3
    x    ~= q * scale                                        # dequantised

A slice of zeros gets scale 1 (and q 0), never a division by zero. int8 values and E4M3 values are
exact in bfloat16, float16 and float32, so a quantised matmul computes ``(x @ q) * scale`` in the
compute dtype with float32 accumulation and is exact up to the quantisation itself:
``x @ (q * scale) == (x @ q) * scale`` per output column.

Weights are quantised once, when a model is loaded for serving (:func:`quantize_params`), under the
policy's ``weights=`` key; jaxmp's layers read the stored ``<name>_scale`` param next to an 8-bit
``kernel`` or ``embedding``. The KV cache is quantised as it is written, one scale per token and
head (a token's keys are never rescaled later). ``matmul=int8`` runs a dense layer as an int8 dot
(:func:`int8_matmul`): activations quantised per token too, int32 accumulation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxmp import fastdot
from jaxmp.precision import Policy, get_policy

__all__ = [
    "FORMATS",
    "format_of",
    "quantize",
    "dequantize",
    "quantize_params",
    "reduced_axis",
    "int8_matmul",
]

# Storage dtype and largest magnitude used of each 8-bit format. int8 stays symmetric (-127..127).
FORMATS: dict[str, tuple[Any, float]] = {
    "int8": (jnp.int8, 127.0),
    "fp8": (jnp.float8_e4m3fn, float(jnp.finfo(jnp.float8_e4m3fn).max)),
}
# Which weights a ``weights=`` key quantises, and the axis whose amax sets each scale: a ``kernel``
# ``[K, F]`` gets one scale per output column F, an ``embedding`` ``[V, D]`` one per row V (a row is
# an output channel when the table is the tied LM head).
_REDUCED_AXIS = {"kernel": 0, "embedding": 1}


def format_of(dtype: Any) -> str | None:
    """``"int8"`` or ``"fp8"`` for an 8-bit storage dtype; None for a float dtype stored as is."""
    dtype = np.dtype(dtype)
    for name, (storage, _) in FORMATS.items():
        if dtype == np.dtype(storage):
            return name
    return None


def quantize(x: jax.Array, fmt: str, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax quantisation of ``x`` with one scale per slice along ``axis``.

    Args:
      x: any float array; computed in float32.
      fmt: ``"int8"`` or ``"fp8"`` (E4M3).
      axis: the axis reduced for each scale (e.g. 0 for a kernel ``[K, F]``: one scale per column).

    Returns:
      ``(q, scale)``: ``q`` of ``x``'s shape in int8 or float8_e4m3fn; ``scale`` float32 of ``x``'s
      shape without ``axis``.
    """
    storage, qmax = FORMATS[fmt]
    x = jnp.asarray(x, jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    scaled = jnp.clip(x / scale, -qmax, qmax)
    q = jnp.round(scaled).astype(storage) if fmt == "int8" else scaled.astype(storage)
    return q, jnp.squeeze(scale, axis)


def dequantize(q: jax.Array, scale: jax.Array, axis: int, dtype: Any = jnp.float32) -> jax.Array:
    """``q * scale`` in ``dtype``; ``scale`` has ``q``'s shape without ``axis``."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)


def reduced_axis(name: str) -> int:
    """The axis whose amax sets each scale of the weight called ``name`` (``kernel``: 0, ``embedding``: 1)."""
    return _REDUCED_AXIS[name]


def quantize_params(params: Any, policy: Policy | str) -> Any:
    """A jaxmp model's params as served under ``policy``, from float (ideally float32) params.

    Each ``kernel`` and ``embedding`` of a module whose ``weights`` is ``int8``/``fp8``
    (:meth:`jaxmp.Policy.weights_for`) becomes its 8-bit values plus a float32 ``<name>_scale``
    param beside it; every other floating param is cast to its module's param dtype.

    Args:
      params: a params tree (``variables["params"]``) of a jaxmp GPT-2, Llama or BERT, unscanned.

    Returns:
      A new tree of jax arrays.
    """
    policy = get_policy(policy)
    served = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        module, name = path.rsplit("/", 1) if "/" in path else ("", path)
        fmt = policy.weights_for(module) if name in _REDUCED_AXIS else "param"
        leaf = jnp.asarray(leaf)
        if fmt != "param":
            served[path], served[f"{path}_scale"] = quantize(leaf, fmt, _REDUCED_AXIS[name])
        elif jnp.issubdtype(leaf.dtype, jnp.floating):
            served[path] = leaf.astype(policy.for_module(module).param_dtype)
        else:
            served[path] = leaf
    return traverse_util.unflatten_dict(served, sep="/")


def int8_matmul(
    x: jax.Array, kernel: jax.Array, scale_F: jax.Array | None, contract_axis: int = 0
) -> jax.Array:
    """float32 ``x[..., K] @ kernel`` as an int8 x int8 dot with int32 accumulation (``matmul=int8``).

    Each row of ``x`` (a token) is quantised by its own absmax; an int8 kernel with its ``scale_F`` is
    used as stored, any other kernel (float, or E4M3 with its scales) is quantised per output channel
    first. The int32 sums are exact; the result is ``sum * x_scale * scale_F``.

    Args:
      x: ``[..., K]`` activations, any float dtype.
      kernel: ``[K, F]`` (``contract_axis=0``) or ``[F, K]`` (``contract_axis=1``, a tied embedding).
      scale_F: float32 ``[F]`` scales of an 8-bit ``kernel``; None for a float kernel.
    """
    if kernel.dtype != jnp.int8:
        floats = kernel if scale_F is None else dequantize(kernel, scale_F, axis=contract_axis)
        kernel, scale_F = quantize(floats, "int8", axis=contract_axis)
    x_q, x_scale = quantize(x, "int8", axis=-1)
    x_NxK = x_q.reshape(-1, x.shape[-1])
    if x_NxK.shape[0] == 1:
        # XLA:CPU runs an int8 dot natively (a YNNPACK fusion reading the int8 kernel) only for two or
        # more rows; a single row is multiplied in int32, hoisting an int32 copy of every kernel out
        # of the decode loop (4 bytes per weight instead of 1).
        sums = _int_dot(fastdot.pad_single_row(x_NxK), kernel, contract_axis)[:1]
    else:
        sums = _int_dot(x_NxK, kernel, contract_axis)
    sums = sums.reshape(*x.shape[:-1], -1)
    return sums.astype(jnp.float32) * x_scale[..., None] * scale_F.reshape((1,) * (x.ndim - 1) + (-1,))


def _int_dot(x_NxK: jax.Array, kernel: jax.Array, contract_axis: int) -> jax.Array:
    """int32 ``[N, F]``: int8 ``x @ kernel`` (``kernel`` contracted on ``contract_axis``), exact."""
    contract = (((1,), (contract_axis,)), ((), ()))
    return jax.lax.dot_general(x_NxK, kernel, contract, preferred_element_type=jnp.int32)
