"""GPT-2: a pre-LayerNorm causal language model with learned positions and tied embeddings.

Module paths (what policy overrides match): ``token_embed``, ``position_embed``,
``blocks_{i}/norm1``, ``blocks_{i}/attn/{query,key,value,out}``, ``blocks_{i}/attn/softmax``,
``blocks_{i}/norm2``, ``blocks_{i}/mlp/{fc_in,fc_out}``, ``final_norm``, ``lm_head`` and
``lm_head/logits`` (``blocks/...`` with ``scan_layers``).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax

from jaxmp.models.layers import (
    ACTIVATIONS,
    Attention,
    AttentionCache,
    Embed,
    GeluMLP,
    KVCache,
    LayerNorm,
    LogitsHead,
    ModelOutput,
    PolicyModule,
    apply_decoder_blocks,
    causal_positions_and_mask,
    tied_embedding,
)
from jaxmp.precision import Policy

__all__ = ["GPT2Config", "GPT2"]

TASKS = ("lm", "none")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 shapes and options; the defaults are GPT-2 small (124,439,808 params)."""

    vocab_size: int = 50257  # token ids 0..vocab_size-1 (GPT-2 BPE)
    max_positions: int = 1024  # learned position embeddings: the longest sequence
    d_model: int = 768  # residual stream width
    n_layers: int = 12  # transformer blocks
    n_heads: int = 12  # attention heads; head_dim = d_model // n_heads
    d_ff: int = 3072  # MLP hidden width
    activation: str = "gelu_new"  # MLP nonlinearity, a key of layers.ACTIVATIONS
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    initializer_range: float = 0.02  # std of normal initialisers (residual projections: / sqrt(2 n_layers))
    dropout_rate: float = 0.0  # dropout on embeddings and residual branches
    attention_dropout_rate: float = 0.0  # dropout on attention probabilities
    task: str = "lm"  # "lm": causal-LM head tied to token_embed; "none": hidden states only
    remat: bool = False  # recompute block activations in the backward pass
    scan_layers: bool = False  # one nn.scan-ned block named "blocks" with stacked params

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"GPT-2 task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class GPT2Block(PolicyModule):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; the residual leaves in the block's compute dtype."""

    config: GPT2Config

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
        residual_init_std = c.initializer_range / math.sqrt(2 * c.n_layers)
        dropout = nn.Dropout(c.dropout_rate)
        attn = Attention(
            self.policy,
            n_heads=c.n_heads,
            n_kv_heads=c.n_heads,
            head_dim=c.head_dim,
            dropout_rate=c.attention_dropout_rate,
            init_std=c.initializer_range,
            out_init_std=residual_init_std,
            name="attn",
        )
        h_BxLxD = attn(
            LayerNorm(self.policy, c.layer_norm_eps, name="norm1")(x_BxLxD),
            mask_Bx1xLxL,
            deterministic,
            positions_BxL,
            cache,
        )
        if cache is not None:  # decoding: the attention also returns its advanced cache
            h_BxLxD, cache = h_BxLxD
        x_BxLxD = x_BxLxD + dropout(h_BxLxD, deterministic=deterministic)
        mlp = GeluMLP(self.policy, c.d_ff, c.activation, c.initializer_range, residual_init_std, name="mlp")
        h_BxLxD = mlp(LayerNorm(self.policy, c.layer_norm_eps, name="norm2")(x_BxLxD))
        x_BxLxD = x_BxLxD + dropout(h_BxLxD, deterministic=deterministic)
        return x_BxLxD.astype(self.dtype), cache


class GPT2(nn.Module):
    """GPT-2 (``GPT2LMHeadModel`` with ``task="lm"``, ``GPT2Model`` with ``task="none"``).

    Attributes:
      config: shapes and options.
      policy: precision policy; each layer reads its dtypes from it.
    """

    config: GPT2Config
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
          input_ids: ``[B, L]`` integer token ids, ``L <= max_positions``.
          attention_mask: ``[B, L]`` 1/True for real tokens, 0/False for padding; None: no padding.
          token_type_ids: optional ``[B, L]`` ids embedded with the token table (as transformers does).
          deterministic: False enables dropout (rng ``"dropout"``).
          cache: decoding: the :class:`KVCache` of the tokens so far (``scan_layers=False``). The
            ``L`` new tokens take positions after each row's real tokens; ``attention_mask`` marks
            which of the new tokens are real.

        Returns:
          :class:`ModelOutput` with ``logits [B, L, V]`` (task ``lm``) and ``last_hidden_state
          [B, L, D]``, both in the output dtype (logits: ``policy.for_module("lm_head")``), and
          the advanced ``cache`` when one was given.
        """
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_positions {c.max_positions}")
        token_embed = Embed(self.policy, c.vocab_size, c.d_model, c.initializer_range, name="token_embed")
        position_embed = Embed(
            self.policy, c.max_positions, c.d_model, c.initializer_range, name="position_embed"
        )
        positions_BxL, mask, cache = causal_positions_and_mask(attention_mask, length, cache)
        x_BxLxD = token_embed(input_ids) + position_embed(positions_BxL)
        if token_type_ids is not None:
            x_BxLxD = x_BxLxD + token_embed(token_type_ids)
        x_BxLxD = nn.Dropout(c.dropout_rate)(x_BxLxD, deterministic=deterministic)
        x_BxLxD, cache = apply_decoder_blocks(
            GPT2Block, c, self.policy, x_BxLxD, mask, positions_BxL, deterministic, cache
        )
        h_BxLxD = LayerNorm(self.policy, c.layer_norm_eps, name="final_norm")(x_BxLxD)
        logits = None
        if c.task == "lm":
            logits = LogitsHead(self.policy, c.vocab_size, name="lm_head")(
                h_BxLxD, tied_embedding(token_embed)
            )
        return ModelOutput(
            last_hidden_state=h_BxLxD.astype(self.policy.output_dtype), logits=logits, cache=cache
        )
