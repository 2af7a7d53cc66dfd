"""Loading a model for inference under a precision policy: a jaxmp run or a Hugging Face directory.

``load_model(path, policy)`` reads the weights in float32, refuses a policy that would store or
compute a weight in float16 beyond float16's range (it would become ``inf``), then casts the
params once to each module's param dtype, or quantises them to 8 bits where the policy's
``weights`` key says so. Bad input raises :class:`jaxmp.errors.UsageError`
with a one-line message.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxmp import hf, models, quantize
from jaxmp.checkpoint import Checkpointer
from jaxmp.data.tokenizer import Tokenizer, load_tokenizer
from jaxmp.errors import DataError, UsageError
from jaxmp.precision import Policy, get_policy
from jaxmp.training.config import TrainConfig
from jaxmp.training.run_dir import RunDir

__all__ = [
    "LoadedModel",
    "load_model",
    "with_policy",
    "serving_policy",
    "serving_params",
    "read_hf_directory",
    "checkpointer_with_a_checkpoint",
    "check_float16_range",
]

_FLOAT16_MAX = float(jnp.finfo(jnp.float16).max)


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal language model ready for inference.

    Attributes:
      model: the GPT-2 or Llama module, carrying the serving policy.
      params: params in that policy's param dtypes.
      tokenizer: the tokenizer the model was trained with (or the one asked for).
      run_config: a run directory's settings (None for a Hugging Face directory).
    """

    model: Any
    params: Any
    tokenizer: Tokenizer
    run_config: TrainConfig | None = None


def check_float16_range(params: Any, policy: Policy) -> None:
    """Raises ``UsageError`` if a weight held or computed in float16 under ``policy`` exceeds float16's range."""
    if not policy.uses_float16:
        return
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        module_policy = policy.for_module(path.rsplit("/", 1)[0])
        if np.dtype(np.float16) not in {
            np.dtype(module_policy.param_dtype),
            np.dtype(module_policy.compute_dtype),
        }:
            continue
        peak = float(jnp.max(jnp.abs(value)))
        if peak > _FLOAT16_MAX:
            raise UsageError(
                f"weight {path} reaches {peak:.4g}, beyond float16's largest value {_FLOAT16_MAX:g}; "
                f"policy {policy} would turn it into inf: use bfloat16 or float32 for it (e.g. `policy` bf16)"
            )


def _tokenizer(spec: str) -> Tokenizer:
    try:
        return load_tokenizer(spec)
    except DataError as error:
        raise UsageError(f"{error}; or pass `tokenizer` byte|FILE|DIR") from None


def _run_tokenizer(run_dir: RunDir) -> Tokenizer:
    """The run's tokenizer: ``byte``, a file or directory, or its trained BPE in ``cache/``."""
    spec, expected = run_dir.read_config().tokenizer, run_dir.identity()["tokenizer"]
    directory = run_dir.path
    if not spec.startswith("bpe:"):
        return _tokenizer(spec)
    for path in sorted(run_dir.cache_dir.glob(f"bpe{spec.removeprefix('bpe:')}-*.json")):
        tokenizer = _tokenizer(str(path))
        if tokenizer.name == expected:
            return tokenizer
    raise UsageError(
        f"run {directory} has no cached {spec} tokenizer named {expected} in cache/; pass `tokenizer`"
    )


def _load_run(directory: Path) -> tuple[Any, Any, TrainConfig, Tokenizer]:
    """The run's model (float32 policy), newest params in float32, config and tokenizer."""
    run_dir = RunDir.open(directory)
    config = run_dir.read_config()
    if config.task != "lm":
        raise UsageError(f"run {directory} trained task {config.task!r}; generation needs an lm run")
    tokenizer = _run_tokenizer(run_dir)
    layers = {"scan_layers": config.scan_layers}  # the layout the run's params were saved in
    if config.init:
        model, _ = _load_hf(Path(config.init), **layers)
    else:
        model = models.get_model(config.model, "fp32", vocab_size=tokenizer.vocab_size, **layers)
    abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 1))
    params = checkpointer_with_a_checkpoint(run_dir).restore_params(abstract)
    model, params = models.for_decoding(model, params)
    return model, params, config, tokenizer


def checkpointer_with_a_checkpoint(run_dir: RunDir) -> Checkpointer:
    """The run's :class:`Checkpointer`, which holds at least one checkpoint.

    Raises:
      UsageError: the run has no checkpoint yet.
    """
    checkpointer = Checkpointer(run_dir.checkpoint_dir)
    if checkpointer.latest_step() is None:
        raise UsageError(f"run {run_dir.path} has no checkpoint yet in {run_dir.checkpoint_dir}")
    return checkpointer


def read_hf_directory(directory: Path, **config_overrides: Any) -> tuple[Any, Any]:
    """The float32 model and params of a Hugging Face directory (``hf.from_pretrained``).

    Raises:
      UsageError: the directory cannot be read as a GPT-2, BERT or Llama checkpoint.
    """
    try:
        return hf.from_pretrained(directory, "fp32", **config_overrides)
    except (ValueError, OSError) as error:
        raise UsageError(f"`model` {directory}: {str(error).splitlines()[0]}") from None


def serving_policy(policy: Policy | str) -> Policy:
    """``policy`` parsed; ``UsageError`` naming `policy` for a string that does not parse."""
    try:
        return get_policy(policy)
    except ValueError as error:
        raise UsageError(f"`policy`: {error}") from None


def _load_hf(directory: Path, **config_overrides: Any) -> tuple[Any, Any]:
    model, params = read_hf_directory(directory, **config_overrides)
    if not models.is_causal_lm(model.config):
        raise UsageError(f"`model` {directory} is not a causal language model; give a GPT-2 or Llama LM")
    return model, params


def load_model(
    path: str | os.PathLike, policy: Policy | str = "fp32", tokenizer: str | None = None
) -> LoadedModel:
    """Loads a jaxmp run directory (``config.json`` + ``checkpoints/``) or a Hugging Face directory.

    Args:
      path: the directory.
      policy: serving policy; params are cast once to its param dtypes.
      tokenizer: a ``load_tokenizer`` spec; None: the run's tokenizer, or the Hugging Face directory.

    Raises:
      UsageError: an unknown path or policy, a non-LM model, a missing tokenizer or checkpoint, a
        tokenizer with more ids than the model, or weights beyond float16's range for an fp16 policy.
    """
    policy = serving_policy(policy)
    directory = Path(path)
    run_config = None
    if (directory / "config.json").is_file() and (directory / "checkpoints").is_dir():
        model, params, run_config, run_tokenizer = _load_run(directory)
        tokenizer_ = _tokenizer(tokenizer) if tokenizer else run_tokenizer
    elif (directory / "config.json").is_file():
        model, params = _load_hf(directory)
        tokenizer_ = _tokenizer(tokenizer or str(directory))
    else:
        raise UsageError(
            f"`model` {path} is neither a jaxmp run directory (config.json + checkpoints/) nor a Hugging Face "
            "directory (config.json + model.safetensors)"
        )
    if tokenizer_.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"tokenizer {tokenizer_.name} has {tokenizer_.vocab_size} ids but the model only "
            f"{model.config.vocab_size}; use the model's own tokenizer"
        )
    return with_policy(LoadedModel(model, params, tokenizer_, run_config), policy)


def with_policy(loaded: LoadedModel, policy: Policy) -> LoadedModel:
    """``loaded`` under ``policy``: its params cast once, and quantised where ``weights=int8|fp8``
    (:func:`jaxmp.quantize.quantize_params`; ``loaded.params`` should be float32).

    Raises:
      UsageError: a weight beyond float16's range where ``policy`` holds or computes it in float16.
    """
    model, params = serving_params(loaded.model.config, loaded.params, policy)
    return dataclasses.replace(loaded, model=model, params=params)


def serving_params(config: Any, params: Any, policy: Policy) -> tuple[Any, Any]:
    """The model of ``config`` and its params as served under ``policy``: the one place a loaded model's
    weights are prepared (generation, evaluation, classification).

    Args:
      config: a jaxmp model config (GPT-2, Llama, BERT).
      params: float32 params.
      policy: the serving policy: params are cast once to each module's param dtype, and quantised to
        8 bits where its ``weights`` key says so (:func:`jaxmp.quantize.quantize_params`).

    Raises:
      UsageError: a weight beyond float16's range where ``policy`` holds or computes it in float16.
    """
    check_float16_range(params, policy)
    return models.create_model(config, policy), quantize.quantize_params(params, policy)
