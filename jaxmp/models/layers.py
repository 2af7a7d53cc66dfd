"""Transformer layers whose dtypes come from a precision policy, module by module.

Every layer carries the whole ``policy`` and reads its own dtypes from
``policy.for_module(path)``, where ``path`` is the layer's ``/``-joined Flax scope
path (``blocks_0/attn/query``):

* ``dtype`` is the compute dtype: inputs and the master params the layer owns are
  cast to it; matmuls take it as input and accumulate in float32.
* ``param_dtype`` is the storage dtype params are created in.

So ``"bf16;.*attn.*:compute=float32"`` really runs every attention matmul in fp32.
The fp32 islands of :mod:`jaxmp.precision` appear here one line each: norm statistics
(:class:`LayerNorm`, :class:`RMSNorm`), the attention softmax (``<attn>/softmax``)
and the final logits (``<head>/logits``).

A served model may hold 8-bit weights (the policy's ``weights=int8|fp8``, :mod:`jaxmp.quantize`):
:class:`Dense`, :class:`Embed` and :class:`LogitsHead` then read an int8/E4M3 ``kernel`` or
``embedding`` and its float32 ``<name>_scale`` and multiply by the scale after the matmul or lookup.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np

from jaxmp import cpu_matvec, fastdot, fp8, quantize
from jaxmp.module_policy import resolve_subpath
from jaxmp.precision import Policy

__all__ = [
    "PolicyModule",
    "Dense",
    "Embed",
    "LayerNorm",
    "RMSNorm",
    "RopeScaling",
    "rope_inverse_frequencies",
    "apply_rotary",
    "Attention",
    "AttentionCache",
    "KVCache",
    "GeluMLP",
    "SwiGLU",
    "LogitsHead",
    "ModelOutput",
    "ACTIVATIONS",
    "make_attention_mask",
    "apply_blocks",
    "apply_decoder_blocks",
    "causal_positions_and_mask",
    "tied_embedding",
]

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf form (BERT)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (GPT-2)
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


def _last_axis(vector_D: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a ``[D]`` vector to ``[1, ..., 1, D]`` (explicit rank, no implicit promotion)."""
    return vector_D.reshape((1,) * (ndim - 1) + vector_D.shape)


def _stored_weight(
    module: PolicyModule, name: str, init: nn.initializers.Initializer, shape: tuple[int, ...]
) -> tuple[jax.Array, jax.Array | None]:
    """``module``'s weight ``name`` and, when the policy stores it in 8 bits, its float32 scale.

    ``weights=param``: the weight in the param dtype and None. ``weights=int8|fp8``: the 8-bit values
    and the ``<name>_scale`` param (one scale per output channel, :func:`jaxmp.quantize.quantize`);
    initialising under such a policy quantises the float initialiser's draw.
    """
    fmt = module.policy.weights_for(module.module_path)
    if fmt == "param":
        return module.param(name, init, shape, module.param_dtype), None
    axis = quantize.reduced_axis(name)
    drawn: dict[str, jax.Array] = {}

    def draw(rng: jax.Array) -> dict[str, jax.Array]:  # both params come from one float draw
        if not drawn:
            drawn["q"], drawn["scale"] = quantize.quantize(init(rng, shape, jnp.float32), fmt, axis)
        return drawn

    return module.param(name, lambda rng: draw(rng)["q"]), module.param(
        f"{name}_scale", lambda rng: draw(rng)["scale"]
    )


def _scaled_matmul(
    module: PolicyModule, x: jax.Array, kernel: jax.Array, scale_F: jax.Array | None, contract_axis: int = 0
) -> jax.Array:
    """float32 ``x @ kernel`` (``kernel`` contracted on ``contract_axis``) as ``module``'s policy says: an
    int8 dot (``matmul=int8``), or on its compute-dtype inputs, an 8-bit ``kernel`` entering in that
    dtype (exact) and the product multiplied by its per-column ``scale_F``."""
    if module.policy.matmul_for(module.module_path) == "int8":  # int8 operands, int32 accumulation
        return quantize.int8_matmul(x, kernel, scale_F, contract_axis)
    dtype = module.dtype
    x = x.astype(dtype)
    rows_NxK = x.reshape(-1, x.shape[-1])
    as_stored = kernel.dtype == dtype or kernel.dtype.itemsize == 1  # 8-bit weights are exact in `dtype`
    if as_stored and cpu_matvec.supports(rows_NxK.shape[0], kernel.dtype):  # decoding on a CPU
        columns = kernel.shape[1 - contract_axis]
        scale_F = jnp.ones((columns,), jnp.float32) if scale_F is None else scale_F
        y_NxF = cpu_matvec.matvec(rows_NxK.astype(jnp.float32), kernel, scale_F, contract_axis)
        return y_NxF.reshape(*x.shape[:-1], columns)
    y = fastdot.matmul(x, kernel.astype(dtype), contract_axis)
    return y if scale_F is None else y * _last_axis(scale_F, y.ndim)


def _take_rows(table_VxD: jax.Array, ids_BxL: jax.Array) -> jax.Array:
    """``table[ids]``: ``[B, L, D]`` rows in the table's dtype. A 16-bit float table is not gathered by
    XLA:CPU as it is: it runs a bfloat16/float16 gather in float32, converting the whole table first, and
    hoists that float32 copy out of a decode loop (twice the memory of fp32 weights at rest). For
    decoding's few ids jaxmp's CPU kernel copies the rows as stored; otherwise the table is gathered as
    its uint16 bits (in a decode loop without the kernel, a uint16 copy of the table stays there)."""
    if table_VxD.dtype.itemsize != 2 or not jnp.issubdtype(table_VxD.dtype, jnp.floating):
        return jnp.take(table_VxD, ids_BxL, axis=0)
    if ids_BxL.size <= cpu_matvec.MAX_LOOKUP_IDS and cpu_matvec.usable():
        return cpu_matvec.take_rows(table_VxD, ids_BxL.reshape(-1)).reshape(*ids_BxL.shape, -1)
    bits_VxD = jax.lax.bitcast_convert_type(table_VxD, jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.take(bits_VxD, ids_BxL, axis=0), table_VxD.dtype)


class PolicyModule(nn.Module):
    """A layer whose dtypes are read from ``policy`` at its own scope path.

    Attributes:
      policy: the model's :class:`jaxmp.Policy`.
    """

    policy: Policy

    @property
    def module_path(self) -> str:
        """The ``/``-joined scope path the policy is asked about, e.g. ``blocks_0/attn``."""
        return "/".join(self.path)

    @property
    def module_policy(self) -> jmp.Policy:
        return self.policy.for_module(self.module_path)

    @property
    def dtype(self) -> Any:
        """Compute dtype of this layer."""
        return self.module_policy.compute_dtype

    @property
    def param_dtype(self) -> Any:
        """Storage dtype of the params this layer creates."""
        return self.module_policy.param_dtype


class Dense(PolicyModule):
    """``y = x @ kernel + bias`` on compute-dtype inputs with fp32 accumulation.

    Attributes:
      features: output width ``F``.
      use_bias: whether to add a bias.
      init_std: std of the normal kernel initialiser (the bias starts at zero).
    """

    features: int
    use_bias: bool = True
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_BxLxK: jax.Array) -> jax.Array:
        """Maps ``[..., K]`` (any float dtype) to ``[..., F]`` in the compute dtype."""
        kernel_KxF, scale_F = _stored_weight(
            self, "kernel", _normal(self.init_std), (x_BxLxK.shape[-1], self.features)
        )
        recipe = self.policy.fp8_recipe(self.module_path)
        if recipe is not None:  # E4M3 operands, fp32 accumulation
            if scale_F is not None:
                kernel_KxF = quantize.dequantize(kernel_KxF, scale_F, axis=0)
            y = self._fp8_matmul(x_BxLxK.astype(self.dtype), kernel_KxF, recipe)
        else:
            y = _scaled_matmul(self, x_BxLxK, kernel_KxF, scale_F)  # fp32 or int32 accumulation
        if self.use_bias:
            bias_F = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + _last_axis(bias_F.astype(self.dtype), y.ndim)
        return y.astype(self.dtype)

    def _fp8_matmul(self, x_BxLxK: jax.Array, kernel_KxF: jax.Array, recipe: fp8.Recipe) -> jax.Array:
        """float32 ``[..., F]``: ``x @ kernel`` as an fp8 dot. Delayed scaling reads this dot's
        :class:`jaxmp.fp8.DelayedScale` from the ``fp8_scaling`` collection and reports its amaxes
        through the ``fp8_amax`` probe (:func:`jaxmp.fp8.fp8_dot`); where those collections are not
        given (evaluation, inference, diagnostics) and for ``fp8-current``, each tensor is scaled by
        its own amax."""
        if recipe.scaling == "delayed" and (
            self.is_initializing() or self.has_variable(fp8.SCALING_COLLECTION, "dot")
        ):
            scaling = self.variable(
                fp8.SCALING_COLLECTION, "dot", lambda: fp8.DelayedScale.create((3,), recipe.history)
            ).value
            probe = self.variable(fp8.AMAX_COLLECTION, "dot", lambda: jnp.zeros((3,), jnp.float32)).value
            return fp8.fp8_dot(x_BxLxK, kernel_KxF, scaling.scale, probe)
        contract = (((x_BxLxK.ndim - 1,), (0,)), ((), ()))
        return fp8.fp8_dot_general(x_BxLxK, kernel_KxF, contract, preferred_element_type=jnp.float32)


class Embed(PolicyModule):
    """A lookup table ``[V, D]``; integer ids are never cast to float.

    Attributes:
      num_embeddings: table rows ``V``.
      features: width ``D``.
      init_std: std of the normal initialiser.
    """

    num_embeddings: int
    features: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, ids_BxL: jax.Array) -> jax.Array:
        """Integer ``[B, L]`` ids to ``[B, L, D]`` rows in the compute dtype (gather, then cast)."""
        table_VxD, scale_V = _stored_weight(
            self, "embedding", _normal(self.init_std), (self.num_embeddings, self.features)
        )
        rows_BxLxD = _take_rows(table_VxD, ids_BxL)
        if scale_V is not None:
            rows_BxLxD = rows_BxLxD.astype(jnp.float32) * jnp.take(scale_V, ids_BxL, axis=0)[..., None]
        return rows_BxLxD.astype(self.dtype)


class LayerNorm(PolicyModule):
    """LayerNorm with learned scale and bias; returns its input's dtype.

    Attributes:
      eps: added to the variance.
    """

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        width = x_BxLxD.shape[-1]
        scale_D = self.param("scale", nn.initializers.ones, (width,), self.param_dtype)
        bias_D = self.param("bias", nn.initializers.zeros, (width,), self.param_dtype)
        x = x_BxLxD.astype(self.dtype)  # fp32 island: norm statistics (any path naming a norm)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(variance + self.eps)
        y = y * _last_axis(scale_D.astype(self.dtype), y.ndim) + _last_axis(bias_D.astype(self.dtype), y.ndim)
        return y.astype(x_BxLxD.dtype)


class RMSNorm(PolicyModule):
    """Root-mean-square norm with a learned scale (Llama); returns its input's dtype.

    Attributes:
      eps: added to the mean square.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.initializers.ones, (x_BxLxD.shape[-1],), self.param_dtype)
        x = x_BxLxD.astype(self.dtype)  # fp32 island: norm statistics (any path naming a norm)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (y * _last_axis(scale_D.astype(self.dtype), y.ndim)).astype(x_BxLxD.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling of rotary embeddings (``rope_type="llama3"`` in transformers)."""

    factor: float = 32.0  # long wavelengths are divided by this
    low_freq_factor: float = 1.0  # wavelengths above original_max_positions / low_freq_factor are scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max_positions / high_freq_factor are kept
    original_max_positions: int = 8192  # context length the model was pre-trained with


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotary inverse frequencies ``[head_dim // 2]`` (float64 numpy, a trace-time constant)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_max_positions / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_max_positions / scaling.high_freq_factor
    smooth = (scaling.original_max_positions / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    in_between = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(in_between, blended, scaled)


def apply_rotary(
    x_BxLxHxK: jax.Array, inv_freq_half: np.ndarray, positions_BxL: jax.Array | None = None
) -> jax.Array:
    """Rotates halves ``(x1, x2)`` of each head by its position (transformers' layout).

    Args:
      x_BxLxHxK: queries or keys.
      inv_freq_half: ``[K // 2]`` inverse frequencies.
      positions_BxL: integer position of each token; None: ``0..L-1`` in every row.

    Angles and the rotation are computed in float32; the result has ``x``'s dtype.
    """
    if positions_BxL is None:
        positions_BxL = jnp.arange(x_BxLxHxK.shape[1])[None, :]
    angles_BxLxK2 = (
        positions_BxL.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq_half, jnp.float32)[None, None, :]
    )
    angles_BxLx1xK = jnp.concatenate([angles_BxLxK2, angles_BxLxK2], axis=-1)[:, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated_half = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles_BxLx1xK) + rotated_half * jnp.sin(angles_BxLx1xK)).astype(x_BxLxHxK.dtype)


def make_attention_mask(
    attention_mask_BxL: jax.Array | None, length: int, *, causal: bool
) -> jax.Array | None:
    """Boolean ``[B or 1, 1, L, L]`` mask, True where a query may attend to a key; None if all may."""
    mask = None
    if attention_mask_BxL is not None:
        mask = jnp.asarray(attention_mask_BxL).astype(bool)[:, None, None, :]
    if causal:
        causal_1x1xLxL = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        mask = causal_1x1xLxL if mask is None else mask & causal_1x1xLxL
    return mask


@flax.struct.dataclass
class AttentionCache:
    """One attention layer's preallocated keys and values, stored as the policy's ``kv`` key says.

    Attributes:
      key: ``[B, S, G, K]`` keys of slots ``0 .. index-1`` (later slots are not yet written), in the
        layer's compute dtype, another float dtype, or int8/E4M3 (``kv=int8|fp8``).
      value: ``[B, S, G, K]`` values, as ``key``.
      index: int32 ``[]``, the number of slots written; the next ``L`` tokens go to ``index .. index+L-1``.
      key_scale: float32 ``[B, S, G]``, one scale per token and head of an 8-bit ``key``; None otherwise.
      value_scale: float32 ``[B, S, G]``, as ``key_scale`` for ``value``.
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array
    key_scale: jax.Array | None = None
    value_scale: jax.Array | None = None

    def write(self, key_BxLxGxK: jax.Array, value_BxLxGxK: jax.Array) -> AttentionCache:
        """This cache with ``L`` new tokens' keys and values stored at ``index`` (quantised per token and
        head when the cache is 8-bit) and ``index`` advanced by ``L``."""
        start = (0, self.index, 0, 0)
        fmt = quantize.format_of(self.key.dtype)

        def store(cache_BxSxGxK, scale_BxSxG, new_BxLxGxK):
            if fmt is None:
                return jax.lax.dynamic_update_slice(
                    cache_BxSxGxK, new_BxLxGxK.astype(cache_BxSxGxK.dtype), start
                ), None
            q_BxLxGxK, new_scale_BxLxG = quantize.quantize(new_BxLxGxK, fmt, axis=-1)
            return (
                jax.lax.dynamic_update_slice(cache_BxSxGxK, q_BxLxGxK, start),
                jax.lax.dynamic_update_slice(scale_BxSxG, new_scale_BxLxG, start[:3]),
            )

        key, key_scale = store(self.key, self.key_scale, key_BxLxGxK)
        value, value_scale = store(self.value, self.value_scale, value_BxLxGxK)
        return AttentionCache(key, value, self.index + key_BxLxGxK.shape[1], key_scale, value_scale)

    def read(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """Every slot's keys and values ``[B, S, G, K]`` in ``dtype`` (dequantised when 8-bit)."""
        if self.key_scale is None:
            return self.key.astype(dtype), self.value.astype(dtype)
        return (
            quantize.dequantize(self.key, self.key_scale, axis=-1, dtype=dtype),
            quantize.dequantize(self.value, self.value_scale, axis=-1, dtype=dtype),
        )


@flax.struct.dataclass
class KVCache:
    """Every attention layer's cache plus which slots hold real (not padding) tokens.

    A model called with ``cache`` writes its ``L`` tokens into slots ``index .. index+L-1``,
    attends over the slots written so far, and returns the advanced cache. A token's position
    is the number of real tokens before it in its row, so left-padded rows get positions
    ``0, 1, ...`` from their first real token on, and padding is never attended to.

    Attributes:
      layers: one :class:`AttentionCache` per block.
      mask: bool ``[B, S]``, True at written slots that hold real tokens.
    """

    layers: tuple[AttentionCache, ...]
    mask: jax.Array

    @property
    def index(self) -> jax.Array:
        """int32 ``[]``: slots written so far."""
        return self.layers[0].index

    def advance(
        self, attention_mask_BxL: jax.Array | None, length: int
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """Positions and attention mask of ``length`` new tokens, and the cache whose ``mask`` includes them.

        Args:
          attention_mask_BxL: 1/True for the new real tokens, 0/False for padding; None: all real.
          length: ``L``, the number of new tokens.

        Returns:
          ``(positions_BxL, mask_Bx1xLxS, cache)``: int32 positions, the boolean mask (True where a new
          token may attend to a slot: a real token at or before its own slot), and this cache with its
          ``mask`` updated (``layers`` unchanged; each attention layer writes its own).
        """
        batch, slots = self.mask.shape
        new_BxL = (
            jnp.ones((batch, length), bool) if attention_mask_BxL is None else attention_mask_BxL.astype(bool)
        )
        seen_Bx1 = jnp.sum(self.mask, axis=1, dtype=jnp.int32)[:, None]
        positions_BxL = jnp.maximum(seen_Bx1 + jnp.cumsum(new_BxL, axis=1, dtype=jnp.int32) - 1, 0)
        mask_BxS = jax.lax.dynamic_update_slice(self.mask, new_BxL, (0, self.index))
        causal_LxS = jnp.arange(slots)[None, :] <= self.index + jnp.arange(length)[:, None]
        mask_Bx1xLxS = mask_BxS[:, None, None, :] & causal_LxS[None, None]
        return positions_BxL, mask_Bx1xLxS, self.replace(mask=mask_BxS)


def _attend_softmax(
    q_BxLxHxK,
    k_BxSxGxK,
    v_BxSxGxK,
    mask_Bx1xLxS,
    softmax_dtype,
    dropout: nn.Module | None,
    deterministic: bool,
) -> jax.Array:
    """Explicit attention: fp32-accumulated scores, softmax in ``softmax_dtype``, then ``probs @ v``."""
    batch, length, heads, head_dim = q_BxLxHxK.shape
    kv_heads = k_BxSxGxK.shape[2]
    q_BxLxGxRxK = q_BxLxHxK.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
    scores_BxGxRxLxS = (scores / math.sqrt(head_dim)).astype(softmax_dtype)  # fp32 island: attention softmax
    if mask_Bx1xLxS is not None:
        neg = jnp.finfo(softmax_dtype).min
        scores_BxGxRxLxS = jnp.where(mask_Bx1xLxS[:, :, None], scores_BxGxRxLxS, neg)
    probs = jax.nn.softmax(scores_BxGxRxLxS, axis=-1)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    out = jnp.einsum(
        "bgrls,bsgk->blgrk", probs.astype(v_BxSxGxK.dtype), v_BxSxGxK, preferred_element_type=jnp.float32
    )
    return out.astype(v_BxSxGxK.dtype).reshape(batch, length, heads, head_dim)


class Attention(PolicyModule):
    """Multi-head / grouped-query self-attention (``n_kv_heads`` divides ``n_heads``).

    Submodules: ``query``, ``key``, ``value``, ``out`` (:class:`Dense`). The softmax
    computes in ``policy.for_module(f"{path}/softmax")`` (fp32 by default). With an fp32
    softmax and no active attention dropout the core is :func:`jaxmp.fastdot.attention`
    (fp32 scores and softmax, compute-dtype ``probs @ v``, a backward pass that recomputes the
    probabilities instead of keeping them); otherwise an explicit einsum softmax with the same
    numerics but the softmax in the requested dtype.

    Attributes:
      n_heads: query heads ``H``.
      n_kv_heads: key/value heads ``G``.
      head_dim: width ``K`` of each head.
      use_bias: biases on the four projections.
      rope_theta: rotary base; None for no rotary embeddings.
      rope_scaling: Llama 3 rotary frequency scaling, or None.
      dropout_rate: dropout on attention probabilities (rng ``"dropout"``).
      init_std: std of the q/k/v initialiser.
      out_init_std: std of the output projection initialiser.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    use_bias: bool = True
    rope_theta: float | None = None
    rope_scaling: RopeScaling | None = None
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.02

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask_Bx1xLxL: jax.Array | None,
        deterministic: bool = True,
        positions_BxL: jax.Array | None = None,
        cache: AttentionCache | None = None,
    ) -> jax.Array | tuple[jax.Array, AttentionCache]:
        """``[B, L, D]`` to ``[B, L, D]`` in the compute dtype; ``mask`` True where attending is allowed.

        Args:
          x_BxLxD: input hidden states.
          mask_Bx1xLxL: boolean mask over keys (``[B, 1, L, S]`` with a cache), or None.
          deterministic: False enables attention dropout.
          positions_BxL: rotary positions; None: ``0..L-1``.
          cache: decoding: this layer's keys and values so far. The new keys and values are
            written at ``cache.index`` and the queries attend over all ``S`` cache slots.

        Returns:
          The output, or ``(output, advanced cache)`` when ``cache`` is given.
        """
        batch, length, width = x_BxLxD.shape

        def project(name: str, heads: int) -> jax.Array:
            dense = Dense(
                self.policy, heads * self.head_dim, use_bias=self.use_bias, init_std=self.init_std, name=name
            )
            return dense(x_BxLxD).astype(self.dtype).reshape(batch, length, heads, self.head_dim)

        q_BxLxHxK = project("query", self.n_heads)
        k_BxLxGxK = project("key", self.n_kv_heads)
        v_BxLxGxK = project("value", self.n_kv_heads)
        if self.rope_theta is not None:
            inv_freq = rope_inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
            q_BxLxHxK = apply_rotary(q_BxLxHxK, inv_freq, positions_BxL)
            k_BxLxGxK = apply_rotary(k_BxLxGxK, inv_freq, positions_BxL)
        if cache is not None:
            cache = cache.write(k_BxLxGxK, v_BxLxGxK)
            k_BxLxGxK, v_BxLxGxK = cache.read(self.dtype)

        softmax_dtype = resolve_subpath(self.policy, f"{self.module_path}/softmax", "softmax").compute_dtype
        dropout_active = self.dropout_rate > 0.0 and not deterministic
        if jnp.dtype(softmax_dtype) == jnp.float32 and not dropout_active:
            out_BxLxHxK = fastdot.attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_Bx1xLxL)
        else:
            dropout = nn.Dropout(self.dropout_rate) if dropout_active else None
            out_BxLxHxK = _attend_softmax(
                q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_Bx1xLxL, softmax_dtype, dropout, deterministic
            )
        out_BxLxF = out_BxLxHxK.reshape(batch, length, self.n_heads * self.head_dim)
        out_BxLxD = Dense(self.policy, width, use_bias=self.use_bias, init_std=self.out_init_std, name="out")(
            out_BxLxF
        )
        return out_BxLxD if cache is None else (out_BxLxD, cache)


class GeluMLP(PolicyModule):
    """``fc_out(act(fc_in(x)))`` (GPT-2, BERT).

    Attributes:
      d_ff: hidden width.
      activation: key of :data:`ACTIVATIONS`.
      init_std: std of ``fc_in``'s initialiser.
      out_init_std: std of ``fc_out``'s initialiser.
    """

    d_ff: int
    activation: str = "gelu_new"
    init_std: float = 0.02
    out_init_std: float = 0.02

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """``[B, L, D]`` to ``[B, L, D]``; the activation runs in ``fc_in``'s compute dtype."""
        h_BxLxF = ACTIVATIONS[self.activation](
            Dense(self.policy, self.d_ff, init_std=self.init_std, name="fc_in")(x_BxLxD)
        )
        return Dense(self.policy, x_BxLxD.shape[-1], init_std=self.out_init_std, name="fc_out")(h_BxLxF)


class SwiGLU(PolicyModule):
    """``down(silu(gate(x)) * up(x))`` without biases (Llama).

    Attributes:
      d_ff: hidden width.
      init_std: std of every projection's initialiser.
    """

    d_ff: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """``[B, L, D]`` to ``[B, L, D]``; the gating runs in the MLP's compute dtype."""
        gate_BxLxF = Dense(self.policy, self.d_ff, use_bias=False, init_std=self.init_std, name="gate")(
            x_BxLxD
        ).astype(self.dtype)
        up_BxLxF = Dense(self.policy, self.d_ff, use_bias=False, init_std=self.init_std, name="up")(
            x_BxLxD
        ).astype(self.dtype)
        return Dense(self.policy, x_BxLxD.shape[-1], use_bias=False, init_std=self.init_std, name="down")(
            jax.nn.silu(gate_BxLxF) * up_BxLxF
        )


class LogitsHead(PolicyModule):
    """The final projection to ``F`` logits (vocabulary or labels), optionally tied to an embedding.

    The matmul takes inputs in this head's compute dtype (``policy.for_module(path)``) and
    accumulates in fp32; the accumulator is kept in ``policy.for_module(f"{path}/logits")``
    (fp32 by default, so logits are never rounded to bf16), then cast to the head's output
    dtype. Set ``lm_head:compute=float32`` to run the matmul itself in fp32.

    Attributes:
      features: number of logits ``F``.
      use_bias: whether to add a bias (BERT's MLM and classification heads).
      init_std: std of the kernel initialiser (unused when tied).
    """

    features: int
    use_bias: bool = False
    init_std: float = 0.02

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        tied: tuple[jax.Array, jax.Array | None] | None = None,
    ) -> jax.Array:
        """``[..., D]`` to ``[..., F]`` logits in the output dtype.

        Args:
          x_BxLxD: hidden states.
          tied: ``(table_FxD, scale_F or None)`` of a tied embedding (:func:`tied_embedding`), used in
            place of a kernel of this head's own.
        """
        if tied is None:
            kernel, scale_F = _stored_weight(
                self, "kernel", _normal(self.init_std), (x_BxLxD.shape[-1], self.features)
            )
            contract_axis = 0
        else:
            (kernel, scale_F), contract_axis = tied, 1
        logits_dtype = resolve_subpath(self.policy, f"{self.module_path}/logits", "logits").compute_dtype
        accumulator = _scaled_matmul(self, x_BxLxD, kernel, scale_F, contract_axis)
        logits = accumulator.astype(logits_dtype)  # fp32 island: final logits
        if self.use_bias:
            bias_F = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            logits = logits + _last_axis(bias_F.astype(logits_dtype), logits.ndim)
        return logits.astype(self.module_policy.output_dtype)


def tied_embedding(embed: Embed) -> tuple[jax.Array, jax.Array | None]:
    """``(table_VxD, scale_V or None)`` of an :class:`Embed` already called, for a tied :class:`LogitsHead`."""
    params = embed.variables["params"]
    return params["embedding"], params.get("embedding_scale")


@flax.struct.dataclass
class ModelOutput:
    """What every jaxmp model returns.

    Attributes:
      last_hidden_state: ``[B, L, D]`` final hidden states in the policy's output dtype.
      logits: ``[B, L, V]`` (language modelling) or ``[B, C]`` (classification) in the
        head's output dtype; None for a model without a head.
      pooler_output: ``[B, D]`` BERT pooler output in the output dtype; None elsewhere.
      cache: the advanced :class:`KVCache` when the model was called with one; None otherwise.
    """

    last_hidden_state: jax.Array
    logits: jax.Array | None = None
    pooler_output: jax.Array | None = None
    cache: KVCache | None = None


def apply_blocks(
    block_cls: type[nn.Module],
    block_kwargs: dict[str, Any],
    x_BxLxD: jax.Array,
    mask_Bx1xLxL: jax.Array | None,
    deterministic: bool,
    *,
    n_layers: int,
    remat: bool,
    scan_layers: bool,
) -> jax.Array:
    """Runs ``n_layers`` blocks, called from inside a parent's compact ``__call__``.

    A block is ``block_cls(**block_kwargs)(x, mask, deterministic) -> (x, None)``. Blocks
    are named ``blocks_0 .. blocks_{n-1}``; with ``scan_layers`` one ``nn.scan``-ned block
    named ``blocks`` holds every layer's params stacked on a leading axis (so per-layer
    policy overrides such as ``blocks_0/...`` cannot apply; ``blocks/...`` does).
    ``remat`` recomputes each block's activations in the backward pass.
    """
    if remat:
        block_cls = nn.remat(block_cls, static_argnums=(3,), prevent_cse=not scan_layers)
    if scan_layers:
        stack = nn.scan(
            block_cls,
            variable_axes={"params": 0, fp8.SCALING_COLLECTION: 0, fp8.AMAX_COLLECTION: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=n_layers,
        )
        x_BxLxD, _ = stack(**block_kwargs, name="blocks")(x_BxLxD, mask_Bx1xLxL, deterministic)
        return x_BxLxD
    for layer in range(n_layers):
        x_BxLxD, _ = block_cls(**block_kwargs, name=f"blocks_{layer}")(x_BxLxD, mask_Bx1xLxL, deterministic)
    return x_BxLxD


def causal_positions_and_mask(
    attention_mask_BxL: jax.Array | None, length: int, cache: KVCache | None
) -> tuple[jax.Array, jax.Array | None, KVCache | None]:
    """Positions ``[B or 1, L]`` and attention mask of a causal decoder's ``length`` new tokens.

    Without ``cache``: positions ``0..L-1`` and the causal mask over them. With it: the positions
    after each row's real tokens, the mask over every slot, and the cache that includes the new tokens
    (:meth:`KVCache.advance`).
    """
    if cache is None:
        return jnp.arange(length)[None, :], make_attention_mask(attention_mask_BxL, length, causal=True), None
    return cache.advance(attention_mask_BxL, length)


def apply_decoder_blocks(
    block_cls: type[nn.Module],
    config: Any,
    policy: Policy,
    x_BxLxD: jax.Array,
    mask: jax.Array | None,
    positions_BxL: jax.Array,
    deterministic: bool,
    cache: KVCache | None,
) -> tuple[jax.Array, KVCache | None]:
    """Runs a causal decoder's ``config.n_layers`` blocks from inside its compact ``__call__``.

    A block is ``block_cls(policy=policy, config=config)``. Without ``cache`` this is
    :func:`apply_blocks` (``config.remat`` and ``config.scan_layers`` apply). With it (decoding:
    deterministic, no remat, ``scan_layers`` must be off) each block ``blocks_i`` is called as
    ``block(x, mask, True, positions, layer_cache) -> (x, layer_cache)``. Returns the output and the
    cache with every layer advanced (None without one).
    """
    block_kwargs = {"policy": policy, "config": config}
    if cache is None:
        x_BxLxD = apply_blocks(
            block_cls,
            block_kwargs,
            x_BxLxD,
            mask,
            deterministic,
            n_layers=config.n_layers,
            remat=config.remat,
            scan_layers=config.scan_layers,
        )
        return x_BxLxD, None
    if config.scan_layers:
        raise ValueError("decoding with a KV cache needs scan_layers=False (see unstack_layer_params)")
    advanced = []
    for layer, layer_cache in enumerate(cache.layers):
        block = block_cls(**block_kwargs, name=f"blocks_{layer}")
        x_BxLxD, layer_cache = block(x_BxLxD, mask, True, positions_BxL, layer_cache)
        advanced.append(layer_cache)
    return x_BxLxD, cache.replace(layers=tuple(advanced))
