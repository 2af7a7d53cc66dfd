"""Hugging Face checkpoints in and out: GPT-2, BERT and Llama, read and written locally.

``from_pretrained(dir)`` reads ``config.json`` through ``transformers.AutoConfig`` (local
files only, never remote code) and the weights from ``model.safetensors`` (or a sharded
``model.safetensors.index.json``); ``pytorch_model.bin`` only through
``torch.load(..., weights_only=True)``. ``save_pretrained`` writes ``config.json`` and
``model.safetensors`` (each to a temporary name, then renamed) that transformers' PyTorch
classes load, and with a tokenizer given, its files for ``transformers.AutoTokenizer``.

Name mapping: torch ``Linear`` weights ``[out, in]`` are transposed to kernels
``[in, out]``; GPT-2's ``Conv1D`` weights are already ``[in, out]`` and its fused
``c_attn`` is split into ``attn/query``, ``attn/key`` and ``attn/value`` (and joined again
on save). LayerNorm/RMSNorm ``weight`` is ``scale``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from jaxmp.files import atomic_write, write_text_atomically
from jaxmp.models import registry
from jaxmp.models.bert import BertConfig
from jaxmp.models.gpt2 import GPT2Config
from jaxmp.models.layers import RopeScaling
from jaxmp.models.llama import LlamaConfig
from jaxmp.module_policy import cast_params_per_module
from jaxmp.precision import Policy

__all__ = ["from_pretrained", "save_pretrained", "save_tokenizer", "cast_params"]

_LOG = logging.getLogger(__name__)
_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def _import_transformers():
    """``import transformers`` without its "PyTorch was not found" advice, which every run would print:
    jaxmp's models are its own Flax code, and it uses only transformers' configs and tokenizers.

    transformers reads ``TRANSFORMERS_NO_ADVISORY_WARNINGS`` when it advises; it is set for the
    import only, so the user's environment and transformers' later advice stay as they were.
    """
    previous = os.environ.get(_NO_ADVICE)
    os.environ[_NO_ADVICE] = "1"
    try:
        import transformers
    finally:
        if previous is None:
            del os.environ[_NO_ADVICE]
        else:
            os.environ[_NO_ADVICE] = previous
    return transformers


transformers = _import_transformers()


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor and the jaxmp params it holds."""

    name: str  # checkpoint name without the base-model prefix, e.g. "h.0.attn.c_attn.weight"
    params: tuple[str, ...]  # jaxmp param paths; several are concatenated along the last axis
    transpose: bool = False  # torch Linear [out, in] versus a jaxmp kernel [in, out]
    base: bool = True  # saved under the base-model prefix ("transformer.", "bert.", "model.")


def _linear(
    name: str, *modules: str, bias: bool = True, transpose: bool = True, base: bool = True
) -> list[_Tensor]:
    tensors = [_Tensor(f"{name}.weight", tuple(f"{m}/kernel" for m in modules), transpose, base)]
    if bias:
        tensors.append(_Tensor(f"{name}.bias", tuple(f"{m}/bias" for m in modules), False, base))
    return tensors


def _norm(name: str, module: str, *, bias: bool = True, base: bool = True) -> list[_Tensor]:
    tensors = [_Tensor(f"{name}.weight", (f"{module}/scale",), False, base)]
    if bias:
        tensors.append(_Tensor(f"{name}.bias", (f"{module}/bias",), False, base))
    return tensors


def _embedding(name: str, module: str) -> list[_Tensor]:
    return [_Tensor(f"{name}.weight", (f"{module}/embedding",))]


def _gpt2_tensors(c: GPT2Config) -> list[_Tensor]:
    tensors = _embedding("wte", "token_embed") + _embedding("wpe", "position_embed")
    for i in range(c.n_layers):
        h, b = f"h.{i}", f"blocks_{i}"
        qkv = (f"{b}/attn/query", f"{b}/attn/key", f"{b}/attn/value")
        tensors += _norm(f"{h}.ln_1", f"{b}/norm1") + _linear(f"{h}.attn.c_attn", *qkv, transpose=False)
        tensors += _linear(f"{h}.attn.c_proj", f"{b}/attn/out", transpose=False) + _norm(
            f"{h}.ln_2", f"{b}/norm2"
        )
        tensors += _linear(f"{h}.mlp.c_fc", f"{b}/mlp/fc_in", transpose=False)
        tensors += _linear(f"{h}.mlp.c_proj", f"{b}/mlp/fc_out", transpose=False)
    return tensors + _norm("ln_f", "final_norm")


def _bert_tensors(c: BertConfig) -> list[_Tensor]:
    tensors = _embedding("embeddings.word_embeddings", "token_embed")
    tensors += _embedding("embeddings.position_embeddings", "position_embed")
    tensors += _embedding("embeddings.token_type_embeddings", "type_embed") + _norm(
        "embeddings.LayerNorm", "embed_norm"
    )
    for i in range(c.n_layers):
        h, b = f"encoder.layer.{i}", f"blocks_{i}"
        for part in ("query", "key", "value"):
            tensors += _linear(f"{h}.attention.self.{part}", f"{b}/attn/{part}")
        tensors += _linear(f"{h}.attention.output.dense", f"{b}/attn/out")
        tensors += _norm(f"{h}.attention.output.LayerNorm", f"{b}/norm1")
        tensors += _linear(f"{h}.intermediate.dense", f"{b}/mlp/fc_in") + _linear(
            f"{h}.output.dense", f"{b}/mlp/fc_out"
        )
        tensors += _norm(f"{h}.output.LayerNorm", f"{b}/norm2")
    if c.task == "lm":
        tensors += _linear("cls.predictions.transform.dense", "mlm_transform", base=False)
        tensors += _norm("cls.predictions.transform.LayerNorm", "mlm_norm", base=False)
        return tensors + [_Tensor("cls.predictions.bias", ("lm_head/bias",), base=False)]
    tensors += _linear("pooler.dense", "pooler")
    if c.task == "classify":
        tensors += _linear("classifier", "classifier", base=False)
    return tensors


def _llama_tensors(c: LlamaConfig) -> list[_Tensor]:
    tensors = _embedding("embed_tokens", "token_embed")
    for i in range(c.n_layers):
        h, b = f"layers.{i}", f"blocks_{i}"
        tensors += _norm(f"{h}.input_layernorm", f"{b}/norm1", bias=False)
        for hf_part, part in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "out")):
            tensors += _linear(f"{h}.self_attn.{hf_part}", f"{b}/attn/{part}", bias=False)
        tensors += _norm(f"{h}.post_attention_layernorm", f"{b}/norm2", bias=False)
        for part in ("gate", "up", "down"):
            tensors += _linear(f"{h}.mlp.{part}_proj", f"{b}/mlp/{part}", bias=False)
    tensors += _norm("norm", "final_norm", bias=False)
    if c.task == "lm" and not c.tie_embeddings:
        tensors += _linear("lm_head", "lm_head", bias=False, base=False)
    return tensors


def _require(hf_config: Any, **supported: Any) -> None:
    """Raises ValueError when ``hf_config`` sets an option jaxmp does not implement."""
    for name, value in supported.items():
        actual = getattr(hf_config, name, value)
        if actual != value:
            raise ValueError(
                f"{hf_config.model_type} option {name}={actual!r} is not supported (need {value!r})"
            )


def _gpt2_from_hf(hf: Any, task: str, num_labels: int | None) -> GPT2Config:
    del num_labels  # GPT-2 has no classification head here
    _require(hf, add_cross_attention=False, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
    return GPT2Config(
        vocab_size=hf.vocab_size,
        max_positions=hf.n_positions,
        d_model=hf.n_embd,
        n_layers=hf.n_layer,
        n_heads=hf.n_head,
        d_ff=hf.n_inner or 4 * hf.n_embd,
        activation=hf.activation_function,
        layer_norm_eps=hf.layer_norm_epsilon,
        initializer_range=hf.initializer_range,
        dropout_rate=hf.resid_pdrop,
        attention_dropout_rate=hf.attn_pdrop,
        task=task,
    )


def _gpt2_to_hf(c: GPT2Config) -> transformers.PretrainedConfig:
    special = 50256 if c.vocab_size > 50256 else None  # GPT-2's <|endoftext|> when the vocabulary has it
    return transformers.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.max_positions,
        n_embd=c.d_model,
        n_layer=c.n_layers,
        n_head=c.n_heads,
        n_inner=c.d_ff,
        activation_function=c.activation,
        layer_norm_epsilon=c.layer_norm_eps,
        initializer_range=c.initializer_range,
        resid_pdrop=c.dropout_rate,
        embd_pdrop=c.dropout_rate,
        attn_pdrop=c.attention_dropout_rate,
        bos_token_id=special,
        eos_token_id=special,
    )


def _bert_from_hf(hf: Any, task: str, num_labels: int | None) -> BertConfig:
    _require(hf, is_decoder=False, add_cross_attention=False, position_embedding_type="absolute")
    classifier_dropout = (
        hf.classifier_dropout if hf.classifier_dropout is not None else hf.hidden_dropout_prob
    )
    return BertConfig(
        vocab_size=hf.vocab_size,
        max_positions=hf.max_position_embeddings,
        type_vocab_size=hf.type_vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        activation=hf.hidden_act,
        layer_norm_eps=hf.layer_norm_eps,
        initializer_range=hf.initializer_range,
        dropout_rate=hf.hidden_dropout_prob,
        attention_dropout_rate=hf.attention_probs_dropout_prob,
        classifier_dropout_rate=classifier_dropout,
        task=task,
        num_labels=num_labels or hf.num_labels,
    )


def _bert_to_hf(c: BertConfig) -> transformers.PretrainedConfig:
    return transformers.BertConfig(
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_positions,
        type_vocab_size=c.type_vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        intermediate_size=c.d_ff,
        hidden_act=c.activation,
        layer_norm_eps=c.layer_norm_eps,
        initializer_range=c.initializer_range,
        hidden_dropout_prob=c.dropout_rate,
        attention_probs_dropout_prob=c.attention_dropout_rate,
        classifier_dropout=c.classifier_dropout_rate,
        num_labels=c.num_labels,
    )


def _llama_from_hf(hf: Any, task: str, num_labels: int | None) -> LlamaConfig:
    del num_labels  # Llama has no classification head here
    _require(hf, hidden_act="silu", attention_bias=False, mlp_bias=False)
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta, **(hf.rope_scaling or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"llama rope_type {rope_type!r} is not supported (need 'default' or 'llama3')")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_positions=rope["original_max_position_embeddings"],
        )
    return LlamaConfig(
        vocab_size=hf.vocab_size,
        max_positions=hf.max_position_embeddings,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        d_ff=hf.intermediate_size,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=rope["rope_theta"],
        rope_scaling=scaling,
        tie_embeddings=hf.tie_word_embeddings,
        initializer_range=hf.initializer_range,
        attention_dropout_rate=hf.attention_dropout,
        task=task,
    )


def _llama_to_hf(c: LlamaConfig) -> transformers.PretrainedConfig:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_positions,
        )
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_positions,
        hidden_size=c.d_model,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        intermediate_size=c.d_ff,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.initializer_range,
        attention_dropout=c.attention_dropout_rate,
    )


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one model family's checkpoints are laid out."""

    config_type: type
    prefix: str  # base-model prefix inside task models' checkpoints
    architectures: Mapping[str, str]  # jaxmp task -> transformers class written to config.json
    tensors: Callable[[Any], list[_Tensor]]
    from_hf: Callable[[Any, str, int | None], Any]
    to_hf: Callable[[Any], transformers.PretrainedConfig]
    head_modules: tuple[str, ...]  # jaxmp modules a checkpoint may lack (initialised fresh)
    head_names: tuple[str, ...]  # checkpoint name prefixes of heads other tasks use (left unused)
    ignored: re.Pattern  # buffers and tied copies, dropped silently


_FAMILIES: Mapping[str, _Family] = {
    "gpt2": _Family(
        GPT2Config,
        "transformer.",
        {"lm": "GPT2LMHeadModel", "none": "GPT2Model"},
        _gpt2_tensors,
        _gpt2_from_hf,
        _gpt2_to_hf,
        head_modules=(),
        head_names=("score.",),
        ignored=re.compile(r"h\.\d+\.attn\.(masked_)?bias|lm_head\.weight"),
    ),
    "bert": _Family(
        BertConfig,
        "bert.",
        {"lm": "BertForMaskedLM", "classify": "BertForSequenceClassification", "none": "BertModel"},
        _bert_tensors,
        _bert_from_hf,
        _bert_to_hf,
        head_modules=("pooler", "classifier", "mlm_transform", "mlm_norm", "lm_head"),
        head_names=("pooler.", "cls.", "classifier."),
        ignored=re.compile(r"embeddings\.position_ids|cls\.predictions\.decoder\.(weight|bias)"),
    ),
    "llama": _Family(
        LlamaConfig,
        "model.",
        {"lm": "LlamaForCausalLM", "none": "LlamaModel"},
        _llama_tensors,
        _llama_from_hf,
        _llama_to_hf,
        head_modules=("lm_head",),
        head_names=("lm_head.", "score."),
        ignored=re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    ),
}

_ARCHITECTURE_TASKS = {
    "LMHeadModel": "lm",
    "ForCausalLM": "lm",
    "ForMaskedLM": "lm",
    "ForPreTraining": "lm",
    "ForSequenceClassification": "classify",
}


def _infer_task(hf_config: Any) -> str:
    for architecture in hf_config.architectures or ():
        for suffix, task in _ARCHITECTURE_TASKS.items():
            if architecture.endswith(suffix):
                return task
    return "none"


def _read_checkpoint(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in ``directory`` as numpy arrays, safetensors first.

    Raises:
      ValueError: no weights file, or one that cannot be read (one line naming the file).
    """
    if (directory / "model.safetensors").is_file():
        return _read_safetensors(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_weight_map(index).values()))
        if any(Path(shard).name != shard for shard in shards):
            raise ValueError(f"{index} names shards outside its directory")
        return {name: t for shard in shards for name, t in _read_safetensors(directory / shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        return _read_torch_weights(directory / "pytorch_model.bin")
    raise ValueError(
        f"{directory} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _first_sentence(error: BaseException) -> str:
    """The start of a library's message: its first line, up to the first full stop."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except safetensors.SafetensorError as error:
        raise ValueError(
            f"{path} is damaged or not a safetensors file ({_first_sentence(error)}); "
            "replace it with an intact copy"
        ) from None


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index} is not a JSON object with a weight_map of tensor name -> shard file")
    return weight_map


def _read_torch_weights(path: Path) -> dict[str, np.ndarray]:
    """A ``pytorch_model.bin`` state dict, read with ``weights_only=True`` (never an arbitrary unpickle)."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise ValueError(f"{path.parent} has only pytorch_model.bin; reading it needs torch") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} holds objects other than tensors, which jaxmp never unpickles; convert it to "
            "model.safetensors"
        ) from None
    except (RuntimeError, EOFError) as error:  # torch's errors for a truncated or foreign file
        raise ValueError(
            f"{path} is damaged or not a PyTorch checkpoint ({_first_sentence(error)}); "
            "replace it with an intact copy"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in state.items()
    ):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    return {name: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy() for name, t in state.items()}


def _read_hf_config(directory: Path) -> transformers.PretrainedConfig:
    """``config.json`` through ``transformers.AutoConfig``, once its ``model_type`` is one jaxmp loads.

    Checked first so that an unknown type (or one whose ``auto_map`` asks for custom code, which is
    never run) gets one line rather than transformers' advice.
    """
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} has no config.json (a local Hugging Face model directory is needed)")
    try:
        fields = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({_first_sentence(error)})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path} holds a JSON {type(fields).__name__}, not an object; give a config.json")
    model_type = fields.get("model_type")
    if model_type not in _FAMILIES:
        custom = " (its auto_map names custom code, which jaxmp never runs)" if "auto_map" in fields else ""
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported{custom}; supported: {', '.join(_FAMILIES)}"
        )
    return transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def _new_param(path: str, shape: tuple[int, ...], std: float, index: int) -> np.ndarray:
    """A fresh param initialised as transformers does: normal(std) weights, zero biases, unit scales."""
    if path.endswith("/bias"):
        return np.zeros(shape, np.float32)
    if path.endswith("/scale"):
        return np.ones(shape, np.float32)
    return np.asarray(jax.random.normal(jax.random.key(index), shape, jnp.float32) * std)


def _load_tensors(
    family: _Family, config: Any, checkpoint: Mapping[str, np.ndarray], expected: Mapping[str, Any]
):
    """Maps checkpoint tensors onto jaxmp param paths; one ValueError lists every problem."""
    by_name = {name.removeprefix(family.prefix): name for name in checkpoint}
    flat: dict[str, np.ndarray] = {}
    missing, mis_shaped, new_heads = [], [], []
    for tensor in family.tensors(config):
        if tensor.name not in by_name:
            head = all(p.split("/")[0] in family.head_modules for p in tensor.params)
            (new_heads if head else missing).append(tensor)
            continue
        stored_name = by_name.pop(tensor.name)
        array = checkpoint[stored_name].T if tensor.transpose else checkpoint[stored_name]
        parts = [expected[p].shape for p in tensor.params]
        want = (*parts[0][:-1], sum(shape[-1] for shape in parts))
        if array.shape != want:
            mis_shaped.append(f"{stored_name} {tuple(array.shape)} (model wants {want})")
            continue
        splits = np.cumsum([shape[-1] for shape in parts])[:-1]
        flat.update(zip(tensor.params, np.split(array, splits, axis=-1), strict=True))
    leftover = [name for name in by_name if not family.ignored.fullmatch(name)]
    unused = [by_name[name] for name in leftover if name.startswith(family.head_names)]
    unexpected = [by_name[name] for name in leftover if not name.startswith(family.head_names)]
    if missing or unexpected or mis_shaped:
        problems = [
            f"{label} ({len(names)}): {', '.join(names)}"
            for label, names in (
                ("missing", [t.name for t in missing]),
                ("unexpected", unexpected),
                ("mis-shaped", mis_shaped),
            )
            if names
        ]
        raise ValueError(
            f"checkpoint does not match its config ({type(config).__name__}): " + "; ".join(problems)
        )
    fresh = [p for t in new_heads for p in t.params]
    for index, path in enumerate(fresh):
        flat[path] = _new_param(path, expected[path].shape, config.initializer_range, index)
    if fresh:
        _LOG.warning("initialised new head params (not in the checkpoint; train them): %s", ", ".join(fresh))
    if unused:
        _LOG.warning("checkpoint tensors not used by task %r: %s", config.task, ", ".join(unused))
    return flat


def cast_params(params: Any, policy: Policy | str) -> Any:
    """Casts every param to ``policy.for_module(<its module path>).param_dtype``, as jax arrays."""
    return cast_params_per_module(jax.tree.map(jnp.asarray, params), policy, to="param")


def from_pretrained(
    local_dir: str | os.PathLike,
    policy: Policy | str = "fp32",
    task: str | None = None,
    num_labels: int | None = None,
    **config_overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a local Hugging Face GPT-2, BERT or Llama directory into a jaxmp model.

    Args:
      local_dir: directory with ``config.json`` and weights.
      policy: precision policy (or its string); params come back in each module's param dtype.
      task: ``"lm"``, ``"classify"`` (BERT) or ``"none"``; None: from ``config.json``'s
        ``architectures`` (``*LMHeadModel``/``*ForCausalLM``/``*ForMaskedLM``: lm,
        ``*ForSequenceClassification``: classify, otherwise none).
      num_labels: classifier outputs; None: the checkpoint config's ``num_labels``.
      **config_overrides: jaxmp config fields to change, e.g. ``scan_layers=True``, ``remat=True``.

    Returns:
      ``(model, params)``. Heads the checkpoint lacks (e.g. a classifier on a ``BertModel``)
      are initialised as transformers does and logged as a warning on ``jaxmp.hf``.

    Raises:
      ValueError: unsupported model type or option, no weights file, or one error listing
        every missing, unexpected and mis-shaped checkpoint tensor.
    """
    directory = Path(local_dir)
    hf_config = _read_hf_config(directory)
    family = _FAMILIES[hf_config.model_type]
    config = family.from_hf(hf_config, task or _infer_task(hf_config), num_labels)
    try:
        config = dataclasses.replace(config, **config_overrides)
    except TypeError as error:
        raise ValueError(f"bad config override for {type(config).__name__}: {error}") from None
    unscanned = dataclasses.replace(config, scan_layers=False)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda: registry.init_params(registry.create_model(unscanned), jax.random.key(0), 1)),
        sep="/",
    )
    flat = _load_tensors(family, unscanned, _read_checkpoint(directory), expected)
    params = traverse_util.unflatten_dict(flat, sep="/")
    if config.scan_layers:
        params = registry.stack_layer_params(params, config.n_layers)
    model = registry.create_model(config, policy)
    return model, cast_params(params, model.policy)


def save_pretrained(model: nn.Module, params: Any, out_dir: str | os.PathLike, tokenizer: Any = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` that transformers loads.

    Tensors keep their stored dtypes; ``config.json`` names the task's transformers class
    (e.g. ``GPT2LMHeadModel``, ``BertForSequenceClassification``) and the policy's param dtype.
    With ``tokenizer`` (a ``transformers`` tokenizer) its files are written too (see
    :func:`save_tokenizer`): without them ``AutoTokenizer.from_pretrained(out_dir)`` quietly
    builds a near-empty tokenizer from ``config.json`` alone.
    """
    config = getattr(model, "config", None)
    family = next((f for f in _FAMILIES.values() if isinstance(config, f.config_type)), None)
    if family is None:
        raise ValueError(
            f"save_pretrained needs a jaxmp GPT-2, BERT or Llama model, not {type(model).__name__}"
        )
    if config.scan_layers:
        params = registry.unstack_layer_params(params, config.n_layers)
    flat = traverse_util.flatten_dict(params, sep="/")
    tensors = {}
    for tensor in family.tensors(config):
        array = np.concatenate([np.asarray(flat[p]) for p in tensor.params], axis=-1)
        name = family.prefix + tensor.name if tensor.base else tensor.name
        tensors[name] = np.ascontiguousarray(array.T if tensor.transpose else array)
    hf_config = family.to_hf(config)
    hf_config.architectures = [family.architectures[config.task]]
    hf_config.dtype = np.dtype(model.policy.param_dtype).name
    directory = Path(out_dir)
    atomic_write(
        directory / "model.safetensors",
        lambda file: file.write(safetensors.numpy.save(tensors, metadata={"format": "pt"})),
    )
    write_text_atomically(directory / "config.json", hf_config.to_json_string())
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike) -> None:
    """Writes the files of ``tokenizer.save_pretrained`` (a ``transformers`` tokenizer) into ``out_dir``.

    They are saved in a scratch directory first, then each is written with ``atomic_write``.
    """
    with tempfile.TemporaryDirectory(prefix="jaxmp-tokenizer-") as scratch:
        tokenizer.save_pretrained(scratch)
        for saved in sorted(Path(scratch).iterdir()):
            content = saved.read_bytes()
            atomic_write(Path(out_dir) / saved.name, lambda file, content=content: file.write(content))
