"""Llama: RMSNorm, rotary positions, SwiGLU and grouped-query attention; untied head by default.

Module paths: ``token_embed``, ``blocks_{i}/norm1``, ``blocks_{i}/attn/{query,key,value,out}``,
``blocks_{i}/attn/softmax``, ``blocks_{i}/norm2``, ``blocks_{i}/mlp/{gate,up,down}``,
``final_norm``, ``lm_head`` and ``lm_head/logits`` (``blocks/...`` with ``scan_layers``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from jaxmp.models.layers import (
    Attention,
    AttentionCache,
    Embed,
    KVCache,
    LogitsHead,
    ModelOutput,
    PolicyModule,
    RMSNorm,
    RopeScaling,
    SwiGLU,
    apply_decoder_blocks,
    causal_positions_and_mask,
    tied_embedding,
)
from jaxmp.precision import Policy

__all__ = ["LlamaConfig", "Llama"]

TASKS = ("lm", "none")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama shapes and options; the defaults are Llama-3.2-1B's shapes with an untied head."""

    vocab_size: int = 128256  # token ids 0..vocab_size-1
    max_positions: int = 131072  # longest supported sequence (rotary positions have no table)
    d_model: int = 2048  # residual stream width
    n_layers: int = 16  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads (grouped-query attention); divides n_heads
    head_dim: int = 64  # width of each attention head
    d_ff: int = 8192  # SwiGLU hidden width
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # rotary base
    rope_scaling: RopeScaling | None = RopeScaling()  # Llama 3 frequency scaling; None for plain RoPE
    tie_embeddings: bool = False  # lm_head reuses token_embed's table (Llama 3.2 1B/3B do)
    initializer_range: float = 0.02  # std of normal initialisers
    attention_dropout_rate: float = 0.0  # dropout on attention probabilities
    task: str = "lm"  # "lm": causal-LM head; "none": hidden states only
    remat: bool = False  # recompute block activations in the backward pass
    scan_layers: bool = False  # one nn.scan-ned block named "blocks" with stacked params

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Llama task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads} does not divide n_heads {self.n_heads}")


class LlamaBlock(PolicyModule):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; the residual leaves in the block's compute dtype."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask_Bx1xLxL: jax.Array | None,
        deterministic: bool,
        positions_BxL: jax.Array | None = None,
        cache: AttentionCache | None = None,
    ) -> tuple[jax.Array, AttentionCache | None]:
        """Returns the block's output and, when decoding with ``cache``, the advanced cache."""
        c = self.config
        attn = Attention(
            self.policy,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            use_bias=False,
            rope_theta=c.rope_theta,
            rope_scaling=c.rope_scaling,
            dropout_rate=c.attention_dropout_rate,
            init_std=c.initializer_range,
            out_init_std=c.initializer_range,
            name="attn",
        )
        h_BxLxD = attn(
            RMSNorm(self.policy, c.rms_norm_eps, name="norm1")(x_BxLxD),
            mask_Bx1xLxL,
            deterministic,
            positions_BxL,
            cache,
        )
        if cache is not None:  # decoding: the attention also returns its advanced cache
            h_BxLxD, cache = h_BxLxD
        x_BxLxD = x_BxLxD + h_BxLxD
        mlp = SwiGLU(self.policy, c.d_ff, c.initializer_range, name="mlp")
        x_BxLxD = x_BxLxD + mlp(RMSNorm(self.policy, c.rms_norm_eps, name="norm2")(x_BxLxD))
        return x_BxLxD.astype(self.dtype), cache


class Llama(nn.Module):
    """Llama (``LlamaForCausalLM`` with ``task="lm"``, ``LlamaModel`` with ``task="none"``).

    Attributes:
      config: shapes and options.
      policy: precision policy; each layer reads its dtypes from it.
    """

    config: LlamaConfig
    policy: Policy

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Runs the model.

        Args:
          input_ids: ``[B, L]`` integer token ids; positions are ``0..L-1``.
          attention_mask: ``[B, L]`` 1/True for real tokens, 0/False for padding; None: no padding.
          token_type_ids: must be None (Llama has no token types).
          deterministic: False enables attention dropout (rng ``"dropout"``).
          cache: decoding: the :class:`KVCache` of the tokens so far (``scan_layers=False``). The
            ``L`` new tokens take positions after each row's real tokens; ``attention_mask`` marks
            which of the new tokens are real.

        Returns:
          :class:`ModelOutput` with ``logits [B, L, V]`` (task ``lm``) and ``last_hidden_state
          [B, L, D]``, both in the output dtype (logits: ``policy.for_module("lm_head")``), and
          the advanced ``cache`` when one was given.
        """
        if token_type_ids is not None:
            raise ValueError("Llama has no token types; pass token_type_ids=None")
        c = self.config
        length = input_ids.shape[1]
        token_embed = Embed(self.policy, c.vocab_size, c.d_model, c.initializer_range, name="token_embed")
        positions_BxL, mask, cache = causal_positions_and_mask(attention_mask, length, cache)
        x_BxLxD, cache = apply_decoder_blocks(
            LlamaBlock, c, self.policy, token_embed(input_ids), mask, positions_BxL, deterministic, cache
        )
        h_BxLxD = RMSNorm(self.policy, c.rms_norm_eps, name="final_norm")(x_BxLxD)
        logits = None
        if c.task == "lm":
            tied = tied_embedding(token_embed) if c.tie_embeddings else None
            lm_head = LogitsHead(self.policy, c.vocab_size, init_std=c.initializer_range, name="lm_head")
            logits = lm_head(h_BxLxD, tied)
        return ModelOutput(
            last_hidden_state=h_BxLxD.astype(self.policy.output_dtype), logits=logits, cache=cache
        )
