"""jaxmp's models: GPT-2, BERT and Llama in Flax linen with per-module precision.

Every layer reads its compute dtype (``dtype``) and storage dtype (``param_dtype``)
from ``policy.for_module(path)``, ``path`` being its ``/``-joined Flax scope path:
``token_embed``, ``blocks_3/attn/query``, ``blocks_3/mlp/fc_in``, ``final_norm``,
``lm_head`` ... (``blocks/...`` with ``scan_layers``). Paths the policy is asked about
without being modules: ``<attn>/softmax`` (softmax dtype) and ``<head>/logits`` (logits
dtype), fp32 islands by default like every path containing ``norm``.

Outputs: ``logits`` in ``policy.for_module(head).output_dtype`` (head ``lm_head`` or
``classifier``); ``last_hidden_state`` and ``pooler_output`` in ``policy.output_dtype``.

    model = jaxmp.models.get_model("gpt2-tiny", "bf16")
    params = jaxmp.models.init_params(model, jax.random.key(0), seq_len=128)
    out = model.apply({"params": params}, input_ids, attention_mask=mask)
"""

from jaxmp.models.bert import Bert, BertConfig
from jaxmp.models.gpt2 import GPT2, GPT2Config
from jaxmp.models.layers import ModelOutput, RopeScaling
from jaxmp.models.llama import Llama, LlamaConfig
from jaxmp.models.registry import (
    PRESETS,
    ModelConfig,
    count_params,
    create_model,
    for_decoding,
    get_config,
    get_model,
    init_fp8_scaling,
    init_params,
    is_causal_lm,
    stack_layer_params,
    unstack_layer_params,
)

__all__ = [
    "PRESETS",
    "ModelConfig",
    "ModelOutput",
    "GPT2",
    "GPT2Config",
    "Bert",
    "BertConfig",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "get_config",
    "create_model",
    "for_decoding",
    "get_model",
    "init_params",
    "init_fp8_scaling",
    "is_causal_lm",
    "count_params",
    "stack_layer_params",
    "unstack_layer_params",
]
