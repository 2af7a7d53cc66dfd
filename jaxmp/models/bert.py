"""BERT: a post-LayerNorm bidirectional encoder with token types, a pooler and optional heads.

Module paths: ``token_embed``, ``position_embed``, ``type_embed``, ``embed_norm``,
``blocks_{i}/attn/{query,key,value,out}``, ``blocks_{i}/attn/softmax``, ``blocks_{i}/norm1``,
``blocks_{i}/mlp/{fc_in,fc_out}``, ``blocks_{i}/norm2``; then per task ``pooler`` and
``classifier`` (+ ``classifier/logits``), or ``mlm_transform``, ``mlm_norm`` and ``lm_head``
(+ ``lm_head/logits``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmp.models.layers import (
    ACTIVATIONS,
    Attention,
    Dense,
    Embed,
    GeluMLP,
    LayerNorm,
    LogitsHead,
    ModelOutput,
    PolicyModule,
    apply_blocks,
    make_attention_mask,
    tied_embedding,
)
from jaxmp.precision import Policy

__all__ = ["BertConfig", "Bert"]

TASKS = ("lm", "classify", "none")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT shapes and options; the defaults are bert-base-uncased."""

    vocab_size: int = 30522  # token ids 0..vocab_size-1 (BERT uncased WordPiece)
    max_positions: int = 512  # learned position embeddings: the longest sequence
    type_vocab_size: int = 2  # token type (segment) ids 0..type_vocab_size-1
    d_model: int = 768  # hidden width
    n_layers: int = 12  # transformer blocks
    n_heads: int = 12  # attention heads; head_dim = d_model // n_heads
    d_ff: int = 3072  # MLP hidden width
    activation: str = "gelu"  # MLP and MLM-transform nonlinearity, a key of layers.ACTIVATIONS
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    initializer_range: float = 0.02  # std of normal initialisers
    dropout_rate: float = 0.0  # dropout on embeddings and residual branches
    attention_dropout_rate: float = 0.0  # dropout on attention probabilities
    classifier_dropout_rate: float = 0.0  # dropout on the pooled output before the classifier
    task: str = "lm"  # "lm": masked-LM head; "classify": pooler + classifier; "none": pooler only
    num_labels: int = 2  # classifier outputs (task "classify")
    remat: bool = False  # recompute block activations in the backward pass
    scan_layers: bool = False  # one nn.scan-ned block named "blocks" with stacked params

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"BERT task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class BertBlock(PolicyModule):
    """``x = norm1(x + attn(x))`` then ``x = norm2(x + mlp(x))``; output in the block's compute dtype."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: jax.Array, mask_Bx1x1xL: jax.Array | None, deterministic: bool
    ) -> tuple[jax.Array, None]:
        c = self.config
        dropout = nn.Dropout(c.dropout_rate)
        attn = Attention(
            self.policy,
            n_heads=c.n_heads,
            n_kv_heads=c.n_heads,
            head_dim=c.head_dim,
            dropout_rate=c.attention_dropout_rate,
            init_std=c.initializer_range,
            out_init_std=c.initializer_range,
            name="attn",
        )
        h_BxLxD = dropout(attn(x_BxLxD, mask_Bx1x1xL, deterministic), deterministic=deterministic)
        x_BxLxD = LayerNorm(self.policy, c.layer_norm_eps, name="norm1")(x_BxLxD + h_BxLxD)
        mlp = GeluMLP(self.policy, c.d_ff, c.activation, c.initializer_range, c.initializer_range, name="mlp")
        h_BxLxD = dropout(mlp(x_BxLxD), deterministic=deterministic)
        x_BxLxD = LayerNorm(self.policy, c.layer_norm_eps, name="norm2")(x_BxLxD + h_BxLxD)
        return x_BxLxD.astype(self.dtype), None


class Bert(nn.Module):
    """BERT (``BertForMaskedLM`` / ``BertForSequenceClassification`` / ``BertModel`` by ``task``).

    Attributes:
      config: shapes and options.
      policy: precision policy; each layer reads its dtypes from it.
    """

    config: BertConfig
    policy: Policy

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> ModelOutput:
        """Runs the encoder and the task's head.

        Args:
          input_ids: ``[B, L]`` integer token ids, ``L <= max_positions``.
          attention_mask: ``[B, L]`` 1/True for real tokens, 0/False for padding; None: no padding.
          token_type_ids: ``[B, L]`` integer segment ids; None: all zero.
          deterministic: False enables dropout (rng ``"dropout"``).

        Returns:
          :class:`ModelOutput`: ``last_hidden_state [B, L, D]``; ``logits [B, L, V]`` (task
          ``lm``) or ``[B, C]`` (``classify``) in the head's output dtype; ``pooler_output
          [B, D]`` (tasks ``classify`` and ``none``). Hidden states use the policy's output dtype.
        """
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_positions {c.max_positions}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        token_embed = Embed(self.policy, c.vocab_size, c.d_model, c.initializer_range, name="token_embed")
        x_BxLxD = (
            token_embed(input_ids)
            + Embed(self.policy, c.max_positions, c.d_model, c.initializer_range, name="position_embed")(
                jnp.arange(length)[None, :]
            )
            + Embed(self.policy, c.type_vocab_size, c.d_model, c.initializer_range, name="type_embed")(
                token_type_ids
            )
        )
        x_BxLxD = LayerNorm(self.policy, c.layer_norm_eps, name="embed_norm")(x_BxLxD)
        x_BxLxD = nn.Dropout(c.dropout_rate)(x_BxLxD, deterministic=deterministic)
        x_BxLxD = apply_blocks(
            BertBlock,
            {"policy": self.policy, "config": c},
            x_BxLxD,
            make_attention_mask(attention_mask, length, causal=False),
            deterministic,
            n_layers=c.n_layers,
            remat=c.remat,
            scan_layers=c.scan_layers,
        )
        last_hidden_state = x_BxLxD.astype(self.policy.output_dtype)
        if c.task == "lm":
            h_BxLxD = Dense(self.policy, c.d_model, init_std=c.initializer_range, name="mlm_transform")(
                x_BxLxD
            )
            h_BxLxD = LayerNorm(self.policy, c.layer_norm_eps, name="mlm_norm")(
                ACTIVATIONS[c.activation](h_BxLxD)
            )
            lm_head = LogitsHead(self.policy, c.vocab_size, use_bias=True, name="lm_head")
            logits = lm_head(h_BxLxD, tied_embedding(token_embed))
            return ModelOutput(last_hidden_state=last_hidden_state, logits=logits)
        pooled_BxD = jnp.tanh(
            Dense(self.policy, c.d_model, init_std=c.initializer_range, name="pooler")(x_BxLxD[:, 0])
        )
        logits = None
        if c.task == "classify":
            pooled = nn.Dropout(c.classifier_dropout_rate)(pooled_BxD, deterministic=deterministic)
            classifier = LogitsHead(
                self.policy, c.num_labels, use_bias=True, init_std=c.initializer_range, name="classifier"
            )
            logits = classifier(pooled)
        return ModelOutput(
            last_hidden_state=last_hidden_state,
            logits=logits,
            pooler_output=pooled_BxD.astype(self.policy.output_dtype),
        )
