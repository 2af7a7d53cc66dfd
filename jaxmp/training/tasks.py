"""What a run trains: model, initial params, data, loss and evaluation for each ``task``.

``build_task(config, cache_dir)`` returns a :class:`Task`; the training loop in
``jaxmp.training.loop`` knows nothing about language modelling or classification.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp import hf, models
from jaxmp.data.classify import load_classification_data, load_hf_tokenizer, read_labelled_rows
from jaxmp.data.lm import LMDataConfig, load_lm_dataset
from jaxmp.data.tokenizer import Tokenizer
from jaxmp.errors import UsageError
from jaxmp.losses import classification_loss, lm_loss
from jaxmp.module_policy import check_overrides, module_paths
from jaxmp.train_step import make_eval_step
from jaxmp.training.config import TrainConfig

__all__ = ["Task", "build_task", "resolve_epochs", "export_tokenizer"]

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Everything the loop needs from a task.

    Attributes:
      model: the Flax module (its layers carry the policy).
      params: initial master params (fresh, or read from ``--init``).
      loss_fn: ``(params, batch, rng[, fp8_variables]) -> (fp32 loss, aux)`` for ``make_train_step``.
      window: ``(first micro-step, count) ->`` the training batches of micro-steps ``first ..
        first + count - 1`` stacked on a leading ``[count]`` axis (the step scans over it); each is a
        pure function of ``(seed, micro-step)``.
      evaluate: params -> ``{"val_loss": float}`` (+ ``"val_accuracy"`` for classify).
      tokens_per_batch: tokens in one micro-batch (for tokens/s; classify: batch x --seq-len, as if
        every row were padded to it).
      identity: what must not change across ``--resume`` (model, tokenizer, task).
      tokenizer: the LM tokenizer (None for classify).
    """

    model: Any
    params: Any
    loss_fn: Callable
    window: Callable[[int, int], Batch]
    evaluate: Callable[[Any], dict[str, float]]
    tokens_per_batch: int
    identity: dict[str, Any]
    tokenizer: Tokenizer | None = None


def _check_init(init: str) -> None:
    if not (Path(init) / "config.json").is_file():
        raise UsageError(f"`init` {init} has no config.json; give a Hugging Face model directory")
    if not any((Path(init) / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise UsageError(f"`init` {init} has no model.safetensors or pytorch_model.bin weights")


def _load_pretrained(config: TrainConfig, task: str, **kwargs) -> tuple[Any, Any]:
    init = Path(config.init)
    layers = {"scan_layers": config.scan_layers, "remat": config.remat}
    try:
        return hf.from_pretrained(init, config.precision_policy, task=task, **kwargs, **layers)
    except (ValueError, OSError) as error:
        raise UsageError(f"`init` {init}: {error}") from None


def _mean_eval(eval_step: Callable, params: Any, batches: Iterator[Batch]) -> dict[str, float]:
    """Runs ``eval_step`` over ``batches``: the row-weighted mean loss, and accuracy when reported."""
    loss_sum = rows = correct = 0.0
    has_accuracy = False
    for batch in batches:
        loss, aux = jax.device_get(eval_step(params, batch))
        batch_rows = float(aux.get("count", 1.0))  # lm batches are all full: weight 1 each
        loss_sum, rows = loss_sum + float(loss) * batch_rows, rows + batch_rows
        if "correct" in aux:
            has_accuracy, correct = True, correct + float(aux["correct"])
    if rows == 0:
        raise UsageError("the validation data gave no batch; use a smaller `batch_size` or `seq_len`")
    return {"val_loss": loss_sum / rows, **({"val_accuracy": correct / rows} if has_accuracy else {})}


def _check_overrides(config: TrainConfig, model: Any) -> None:
    """Refuses a policy override that matches none of ``model``'s modules (a typo is no silent no-op)."""
    if not config.precision_policy.overrides:
        return
    paths = [path for path, _ in module_paths(model, jnp.zeros((1, config.seq_len), jnp.int32))]
    try:
        check_overrides(config.precision_policy, paths)
    except ValueError as error:
        raise UsageError(f"`policy`: {error}") from None


def _require_causal(model_config: Any, name: str) -> None:
    """Refuses a model ``task="lm"`` cannot train: a BERT encoder, or a model with another head."""
    if not models.is_causal_lm(model_config):
        raise UsageError(f"`task` lm trains causal models; {name} is not one (use a GPT-2 or Llama model)")


def _lm_task(config: TrainConfig, cache_dir: Path) -> Task:
    dataset = load_lm_dataset(
        LMDataConfig(data=config.data, tokenizer=config.tokenizer, cache_dir=str(cache_dir))
    )
    tokenizer = dataset.tokenizer
    if config.init:
        model, params = _load_pretrained(config, "lm")
        _require_causal(model.config, f"`init` {config.init}")
        if model.config.vocab_size < tokenizer.vocab_size:
            raise UsageError(
                f"`init` model has {model.config.vocab_size} token ids but tokenizer {tokenizer.name} "
                f"needs {tokenizer.vocab_size}; use the model's own tokenizer (`tokenizer` {config.init})"
            )
    else:
        model_config = _preset(
            config.model, vocab_size=tokenizer.vocab_size, scan_layers=config.scan_layers, remat=config.remat
        )
        _require_causal(model_config, config.model)
        model = models.create_model(model_config, config.precision_policy)
        params = None
    if config.seq_len > model.config.max_positions:
        raise UsageError(
            f"`seq_len` {config.seq_len} is beyond {config.model}'s {model.config.max_positions} positions"
        )
    _check_overrides(config, model)
    if params is None:
        params = models.init_params(model, jax.random.key(config.seed), config.seq_len)

    def loss_fn(params, batch, rng, fp8_variables=None):
        variables = {"params": params, **(fp8_variables or {})}
        out = model.apply(variables, batch["input_ids"], deterministic=False, rngs={"dropout": rng})
        return lm_loss(out.logits, batch["targets"]), {}

    def deterministic_loss(params, batch, rng):
        del rng
        return lm_loss(model.apply({"params": params}, batch["input_ids"]).logits, batch["targets"]), {}

    eval_step = make_eval_step(deterministic_loss, config.precision_policy, cast_params=False)
    dataset.batch(config.seed, 0, config.batch_size, config.seq_len)  # fail early on a short corpus
    next(iter(dataset.val_batches(config.batch_size, config.seq_len, 1)), None)
    return Task(
        model=model,
        params=params,
        loss_fn=loss_fn,
        window=lambda first, count: _stack(
            [
                dataset.batch(config.seed, step, config.batch_size, config.seq_len)
                for step in range(first, first + count)
            ]
        ),
        evaluate=lambda params: _mean_eval(
            eval_step, params, dataset.val_batches(config.batch_size, config.seq_len, config.eval_batches)
        ),
        tokens_per_batch=config.batch_size * config.seq_len,
        identity={"task": "lm", "model": config.init or config.model, "tokenizer": tokenizer.name},
        tokenizer=tokenizer,
    )


def _check_classify_inputs(config: TrainConfig) -> None:
    if not config.init:
        raise UsageError(
            "`task` classify fine-tunes a checkpoint: give `init` HF_DIR (e.g. a BERT directory)"
        )
    if not config.data or not config.eval_data:
        raise UsageError(
            "`task` classify needs `data` TRAIN_FILE and `eval_data` DEV_FILE (.tsv, .csv or .jsonl)"
        )


def _classify_task(config: TrainConfig) -> Task:
    _check_classify_inputs(config)
    lengths = {"max_length": config.seq_len, "pad_multiple": config.pad_multiple}
    train = load_classification_data(config.data, config.init, limit=config.max_rows, **lengths)
    dev = load_classification_data(config.eval_data, config.init, **lengths)
    num_labels = max(train.num_labels, dev.num_labels)
    model, params = _load_pretrained(config, "classify", num_labels=num_labels)
    if config.seq_len > model.config.max_positions:
        raise UsageError(
            f"`seq_len` {config.seq_len} is beyond the model's {model.config.max_positions} positions"
        )
    _check_overrides(config, model)

    def forward(params, batch, fp8_variables=None, **kwargs):
        return model.apply(
            {"params": params, **(fp8_variables or {})},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            **kwargs,
        ).logits

    def loss_fn(params, batch, rng, fp8_variables=None):
        logits = forward(params, batch, fp8_variables, deterministic=False, rngs={"dropout": rng})
        return classification_loss(logits, batch["labels"], batch["weight"])

    def deterministic_loss(params, batch, rng):
        del rng
        return classification_loss(forward(params, batch), batch["labels"], batch["weight"])

    eval_step = make_eval_step(deterministic_loss, config.precision_policy, cast_params=False)
    return Task(
        model=model,
        params=params,
        loss_fn=loss_fn,
        window=lambda first, count: train.window(config.seed, first, count, config.batch_size),
        evaluate=lambda params: _mean_eval(eval_step, params, dev.eval_batches(config.batch_size)),
        tokens_per_batch=config.batch_size * config.seq_len,
        identity={"task": "classify", "model": str(config.init), "tokenizer": str(config.init)},
    )


def _stack(batches: list[Batch]) -> Batch:
    """Batches of equal shapes stacked on a new leading axis."""
    return {name: np.stack([batch[name] for batch in batches]) for name in batches[0]}


def _preset(name: str, **overrides) -> Any:
    try:
        return models.get_config(name, **overrides)
    except ValueError as error:
        raise UsageError(f"`model`: {error}") from None


def resolve_epochs(config: TrainConfig) -> TrainConfig:
    """Returns ``config``, with ``steps`` set from ``epochs`` if given.

    ``steps = ceil(epochs * rows / (batch_size * accum_steps))``, ``rows`` being the training rows (those of
    ``data``, at most ``max_rows``): the fewest updates that see ``epochs * rows`` rows, computed exactly
    for ``epochs`` as written in decimal (0.1 is 1/10). Batches are one stream of shuffled epochs, so when
    ``epochs * rows`` does not fill the last update, it also takes the next epoch's first rows. ``config``
    must have passed ``config.check()``; bad values raise ``UsageError`` (a bad file ``DataError``).
    """
    if config.epochs is None:
        return config
    _check_classify_inputs(config)
    rows = len(read_labelled_rows(config.data, config.max_rows)[1])
    epochs = Fraction(repr(config.epochs))  # the decimal written, exactly
    steps = math.ceil(epochs * rows / (config.batch_size * config.accum_steps))
    return dataclasses.replace(config, steps=steps)


def export_tokenizer(config: TrainConfig, task: Task) -> Any:
    """The run's tokenizer as a ``transformers`` tokenizer, for ``export_hf``.

    classify: the ``init`` directory's, loaded as the run loaded it; lm: one whose
    ``tokenizer(text)["input_ids"]`` equal ``task.tokenizer.encode(text)``.
    """
    if task.tokenizer is not None:
        return task.tokenizer.to_transformers()
    return load_hf_tokenizer(config.init)


def build_task(config: TrainConfig, cache_dir: Path) -> Task:
    """The :class:`Task` for ``config.task``; bad input raises ``UsageError`` or ``DataError``."""
    if config.init:
        _check_init(config.init)
    if config.task == "lm":
        return _lm_task(config, cache_dir)
    return _classify_task(config)
