"""A matmul whose backward pass runs on the same fast path as its forward pass.

``matmul(x, w)`` computes ``x[..., K] @ w`` on compute-dtype inputs with fp32 accumulation, and so
does its gradient. Plain ``jax.grad`` of ``lax.dot_general(x, w, preferred_element_type=float32)`` does
not: the cotangent arrives in fp32, so the backward dots mix an fp32 cotangent with bf16 operands and
XLA runs them in fp32, and the weight gradient ``xᵀ·dy`` is emitted with a transposed ``dy`` that XLA's
CPU backend materialises by re-fusing the whole residual-stream gradient chain into each transpose
(28% of a gpt2-tiny train step's time before this module). Here the backward pass is written out::

    dy = cotangent.astype(x.dtype)          # compute dtype, as the forward inputs
    dx = dy · wᵀ                            # dot_general contracting dy's last axis with w's F axis
    dw = xᵀ · dy                            # contracting the token axis of both: no transposed copy
    (both with preferred_element_type=float32, then cast to the input dtypes)

For fp32 inputs the cast is a no-op and the result equals plain autodiff (up to summation order).

Which kernel multiplies bf16/fp16 operands is a backend question, not a numerics one: a product of two
bf16 (or fp16) values is exact in fp32, so upcasting the operands and running an fp32 dot computes the
same fp32-accumulated result. XLA's CPU bf16 dots are fast only with AMX; on CPUs without it
(AVX512-BF16 alone) they run about 1.6× slower than fp32 dots, so there the dot is asked for the
``F32_F32_F32`` algorithm (XLA converts the operands inside the compiled step; the jaxpr still shows
a bf16 x bf16 -> fp32 dot).
``JAXMP_NATIVE_LOW_PRECISION_DOTS=1`` (or ``0``) forces the choice, read when a function is traced.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

__all__ = ["matmul", "native_low_precision_dots"]

_NATIVE_ENV = "JAXMP_NATIVE_LOW_PRECISION_DOTS"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_low_precision_dots(dtype: jnp.dtype) -> bool:
    """Whether dots on ``dtype`` operands should run natively (True) or on exactly upcast fp32 operands.

    Native everywhere but on a CPU without AMX for ``dtype`` (``amx_bf16`` / ``amx_fp16``);
    ``JAXMP_NATIVE_LOW_PRECISION_DOTS=1``/``0`` overrides.
    """
    forced = os.environ.get(_NATIVE_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if jax.default_backend() != "cpu":
        return True
    amx_flag = {jnp.dtype(jnp.bfloat16): "amx_bf16", jnp.dtype(jnp.float16): "amx_fp16"}.get(jnp.dtype(dtype))
    return amx_flag in _cpu_flags()


def _dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """Contracts ``a``'s axis ``a_axis`` with ``b``'s axis ``b_axis`` of 2-D operands; fp32 result."""
    precision = None
    if a.dtype != jnp.float32 and not native_low_precision_dots(a.dtype):
        precision = jax.lax.DotAlgorithmPreset.F32_F32_F32  # exact upcast: the same fp32-accumulated products
    dims = (((a_axis,), (b_axis,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _rows(x: jax.Array) -> jax.Array:
    """``[..., K]`` as ``[N, K]``."""
    return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, w_contract_axis: int = 0) -> jax.Array:
    """``x[..., K] @ w`` on ``x``'s dtype with fp32 accumulation, forward and backward.

    Args:
      x: ``[..., K]`` inputs in the compute dtype.
      w: ``[K, F]`` (``w_contract_axis=0``) or ``[F, K]`` (``w_contract_axis=1``, e.g. a tied
        embedding table), typically the master weights: they are cast to ``x``'s dtype inside, so
        the backward pass keeps ``w`` itself rather than a low-precision copy, and recasts it.
      w_contract_axis: which axis of ``w`` is contracted with ``x``'s last axis.

    Returns:
      ``[..., F]`` fp32. ``x``'s gradient comes back in ``x``'s dtype; ``w``'s in ``w``'s dtype,
      converted straight from the fp32 accumulator (not rounded to the compute dtype on the way).
    """
    return _forward(x, w, w_contract_axis)[0]


def _forward(x, w, w_contract_axis):
    y_NxF = _dot(_rows(x), w.astype(x.dtype), 1, w_contract_axis)
    return y_NxF.reshape(*x.shape[:-1], y_NxF.shape[-1]), (x, w)


def _backward(w_contract_axis, residuals, cotangent):
    x, w = residuals
    dy_NxF = _rows(cotangent).astype(x.dtype)  # the backward dots take compute-dtype inputs too
    x_NxK = _rows(x)
    dx_NxK = _dot(dy_NxF, w.astype(x.dtype), 1, 1 - w_contract_axis)
    if w_contract_axis == 0:
        dw = _dot(x_NxK, dy_NxF, 0, 0)  # [K, F]
    else:
        dw = _dot(dy_NxF, x_NxK, 0, 0)  # [F, K]
    return dx_NxK.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_forward, _backward)
