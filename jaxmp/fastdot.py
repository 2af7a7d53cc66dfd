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
import math
import os

import jax
import jax.numpy as jnp

from jaxmp import hardware

__all__ = ["attention", "matmul", "native_low_precision_dots"]

_NATIVE_ENV = "JAXMP_NATIVE_LOW_PRECISION_DOTS"


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
    return amx_flag in hardware.cpu_flags()


def _precision(dtype: jnp.dtype) -> jax.lax.DotAlgorithmPreset | None:
    """None (the backend's dot), or the exact fp32 upcast where ``dtype`` dots are slow."""
    if dtype != jnp.float32 and not native_low_precision_dots(dtype):
        return jax.lax.DotAlgorithmPreset.F32_F32_F32  # exact upcast: the same fp32-accumulated products
    return None


def _dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """Contracts ``a``'s axis ``a_axis`` with ``b``'s axis ``b_axis`` of 2-D operands; fp32 result."""
    dims = (((a_axis,), (b_axis,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``jnp.einsum`` of two operands of one dtype with fp32 accumulation and the kernel of :func:`_dot`."""
    return jnp.einsum(spec, a, b, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


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
    x_NxK = _rows(x)
    if x_NxK.shape[0] == 1 and x.dtype.itemsize < 4:
        # Batch-1 decoding: XLA:CPU multiplies a single bf16/fp16 row in float32, converting the weight
        # and hoisting a float32 copy of every weight out of the decode loop (twice fp32's memory). Two
        # rows take its native low-precision matmul (a YNNPACK fusion) on the weights as stored.
        y_NxF = _dot(pad_single_row(x_NxK), w.astype(x.dtype), 1, w_contract_axis)[:1]
    else:
        y_NxF = _dot(x_NxK, w.astype(x.dtype), 1, w_contract_axis)
    return y_NxF.reshape(*x.shape[:-1], y_NxF.shape[-1]), (x, w)


def pad_single_row(x_1xK: jax.Array) -> jax.Array:
    """``[2, K]``: the one row of ``x_1xK`` twice (a matmul of it keeps row 0 of its result)."""
    return jnp.concatenate([x_1xK, x_1xK])


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


@jax.custom_vjp
def attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask_Bx1xLxS) -> jax.Array:
    """Softmax attention with fp32 scores and softmax, compute-dtype ``probs @ v``, and a lean backward pass.

    The numerics of ``jax.nn.dot_product_attention``'s XLA path (and of grouped queries: ``G`` key/value
    heads serve ``H = G R`` query heads). Autodiff of that path keeps several ``[B, H, L, S]`` arrays per
    layer for the backward pass (fp32 scores, fp32 probabilities and their compute-dtype copy); here only
    the softmax's row max and row sum (fp32 ``[B, H, L]``) are kept and the probabilities are recomputed
    from ``q`` and ``k``, one extra ``q kᵀ`` against far less memory. Backward dots take compute-dtype
    inputs and accumulate in fp32, as :func:`matmul`'s::

        p = exp(s - max) / sum                        # recomputed, fp32, s = q kᵀ / sqrt(K) masked
        dv = pᵀ · dout        dp = dout · vᵀ          # p and dout in the compute dtype
        ds = p * (dp - rowsum(dp * p))                # fp32, zero where masked
        dq = ds · k / sqrt(K)   dk = dsᵀ · q / sqrt(K)   # ds in the compute dtype

    Args:
      q_BxLxHxK: queries; ``k_BxSxGxK``, ``v_BxSxGxK``: keys and values, all in one compute dtype.
      mask_Bx1xLxS: boolean (``B`` or 1 rows), True where a query may attend to a key; None: all may.

    Returns:
      ``[B, L, H, K]`` in ``v``'s dtype. A fully masked row attends uniformly, as XLA's path does.
    """
    return _attention_forward(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS)[0]


def _scores(q_BxLxGxRxK, k_BxSxGxK, mask_Bx1xLxS):
    """fp32 ``q kᵀ / sqrt(K)`` ``[B, G, R, L, S]``, masked positions at the most negative fp32."""
    scores = _einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK) / math.sqrt(q_BxLxGxRxK.shape[-1])
    if mask_Bx1xLxS is None:
        return scores
    return jnp.where(mask_Bx1xLxS[:, :, None], scores, jnp.finfo(jnp.float32).min)


def _grouped(q_BxLxHxK, kv_heads):
    batch, length, heads, head_dim = q_BxLxHxK.shape
    return q_BxLxHxK.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)


def _attention_forward(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS):
    q_BxLxGxRxK = _grouped(q_BxLxHxK, k_BxSxGxK.shape[2])
    scores = _scores(q_BxLxGxRxK, k_BxSxGxK, mask_Bx1xLxS)  # fp32 island: attention softmax
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    exp_scores = jnp.exp(scores - row_max)
    row_sum = jnp.sum(exp_scores, axis=-1, keepdims=True)
    probs = (exp_scores / row_sum).astype(v_BxSxGxK.dtype)
    out = _einsum("bgrls,bsgk->blgrk", probs, v_BxSxGxK).astype(v_BxSxGxK.dtype)
    residuals = (q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS, row_max, row_sum)
    return out.reshape(q_BxLxHxK.shape), residuals


def _attention_backward(residuals, dout_BxLxHxK):
    q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xLxS, row_max, row_sum = residuals
    q_BxLxGxRxK = _grouped(q_BxLxHxK, k_BxSxGxK.shape[2])
    dout = _grouped(dout_BxLxHxK.astype(v_BxSxGxK.dtype), k_BxSxGxK.shape[2])
    probs = jnp.exp(_scores(q_BxLxGxRxK, k_BxSxGxK, mask_Bx1xLxS) - row_max) / row_sum
    dv = _einsum("bgrls,blgrk->bsgk", probs.astype(v_BxSxGxK.dtype), dout)
    dprobs = _einsum("blgrk,bsgk->bgrls", dout, v_BxSxGxK)
    dscores = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
    if mask_Bx1xLxS is not None:
        dscores = jnp.where(mask_Bx1xLxS[:, :, None], dscores, 0.0)
    dscores = (dscores / math.sqrt(q_BxLxHxK.shape[-1])).astype(q_BxLxHxK.dtype)
    dq = _einsum("bgrls,bsgk->blgrk", dscores, k_BxSxGxK).reshape(q_BxLxHxK.shape)
    dk = _einsum("bgrls,blgrk->bsgk", dscores, q_BxLxGxRxK)
    return dq.astype(q_BxLxHxK.dtype), dk.astype(k_BxSxGxK.dtype), dv.astype(v_BxSxGxK.dtype), None


attention.defvjp(_attention_forward, _attention_backward)
