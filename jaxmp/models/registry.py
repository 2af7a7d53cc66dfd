"""Named model presets and the functions that turn a config into a model and its params."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmp import fp8
from jaxmp.models.bert import Bert, BertConfig
from jaxmp.models.gpt2 import GPT2, GPT2Config
from jaxmp.models.layers import RopeScaling
from jaxmp.models.llama import Llama, LlamaConfig
from jaxmp.precision import Policy, get_policy

__all__ = [
    "ModelConfig",
    "PRESETS",
    "get_config",
    "is_causal_lm",
    "create_model",
    "get_model",
    "init_params",
    "count_params",
    "for_decoding",
    "stack_layer_params",
    "unstack_layer_params",
]

ModelConfig = GPT2Config | BertConfig | LlamaConfig

PRESETS: Mapping[str, ModelConfig] = types.MappingProxyType(
    {
        "gpt2-tiny": GPT2Config(
            vocab_size=256, max_positions=256, d_model=256, n_layers=4, n_heads=4, d_ff=1024
        ),
        "gpt2": GPT2Config(),
        "gpt2-medium": GPT2Config(d_model=1024, n_layers=24, n_heads=16, d_ff=4096),
        # Google's BERT-Tiny shapes with the uncased WordPiece vocabulary (all-MiniLM-L6-v2's tokenizer).
        "bert-tiny": BertConfig(d_model=128, n_layers=2, n_heads=2, d_ff=512),
        "bert-base": BertConfig(),
        "llama-tiny": LlamaConfig(
            vocab_size=256,
            max_positions=256,
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=64,
            d_ff=688,
            rope_theta=10000.0,
            rope_scaling=None,
        ),
        # Llama-3.2-1B: 1,235,814,400 params with its tied embeddings.
        "llama-1b": LlamaConfig(rope_scaling=RopeScaling(), tie_embeddings=True),
    }
)

_MODELS: Mapping[type, type[nn.Module]] = {GPT2Config: GPT2, BertConfig: Bert, LlamaConfig: Llama}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with fields replaced by ``overrides`` (e.g. ``vocab_size=50257``).

    Raises:
      ValueError: for an unknown preset (listing the valid ones) or an unknown/invalid field.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(PRESETS)}")
    config = PRESETS[name]
    fields = {field.name for field in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{name} has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **overrides)


def is_causal_lm(config: ModelConfig) -> bool:
    """True for a GPT-2 or Llama config with a language-model head (what training ``lm``, generation
    and perplexity need); False for BERT and for heads of other tasks."""
    return not isinstance(config, BertConfig) and getattr(config, "task", "lm") == "lm"


def create_model(config: ModelConfig, policy: Policy | str = "fp32") -> nn.Module:
    """The Flax module for ``config`` whose layers take their dtypes from ``policy``."""
    return _MODELS[type(config)](config=config, policy=get_policy(policy))


def get_model(name: str, policy: Policy | str = "fp32", **overrides: Any) -> nn.Module:
    """``create_model(get_config(name, **overrides), policy)``."""
    return create_model(get_config(name, **overrides), policy)


def init_params(model: nn.Module, rng: jax.Array, seq_len: int) -> dict[str, Any]:
    """Freshly initialised params (each in its module's param dtype) for ``[1, seq_len]`` inputs.

    Wrap in ``jax.eval_shape`` to get shapes and dtypes without allocating.
    """
    input_ids = jnp.zeros((1, seq_len), jnp.int32)
    return jax.jit(model.init)({"params": rng}, input_ids)["params"]


def init_fp8_scaling(model: nn.Module) -> fp8.DelayedScaling | None:
    """Fresh delayed-scaling state for the model's fp8 dots (``TrainState.create(..., fp8=...)``);
    None when its policy gives no dot a delayed recipe."""
    if not model.policy.uses_delayed_fp8:
        return None
    input_ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, input_ids))
    dots = shapes.get(fp8.SCALING_COLLECTION)
    return fp8.DelayedScaling.create(dots) if dots else None


def count_params(params: Any) -> int:
    """Total number of parameters (works on arrays and ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def for_decoding(model: nn.Module, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` and ``params`` laid out one block per layer (``scan_layers=False``, no ``remat``), as
    decoding with a KV cache needs; unchanged when they already are."""
    if not (model.config.scan_layers or model.config.remat):
        return model, params
    config = dataclasses.replace(model.config, scan_layers=False, remat=False)
    if model.config.scan_layers:
        params = unstack_layer_params(params, config.n_layers)
    return create_model(config, model.policy), params


def stack_layer_params(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Turns ``blocks_0 .. blocks_{n-1}`` into one ``blocks`` tree stacked on axis 0 (``scan_layers``)."""
    layers = [params[f"blocks_{i}"] for i in range(n_layers)]
    rest = {key: value for key, value in params.items() if not key.startswith("blocks_")}
    return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layer_params(params: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Inverse of :func:`stack_layer_params`."""
    rest = {key: value for key, value in params.items() if key != "blocks"}
    layers = {f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(n_layers)}
    return {**rest, **layers}
