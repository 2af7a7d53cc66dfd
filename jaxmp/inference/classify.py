"""Batch classification under a precision policy: a ``jaxmp.train --task classify`` run or a Hugging Face
``BertForSequenceClassification`` directory.

``load_classifier(path, policy)`` reads the weights in float32 and prepares them for the policy in one
place, :func:`jaxmp.inference.load.serving_params`. ``predict_rows(classifier, rows)`` streams ``(text, label)`` rows through
the model ``chunk_rows`` at a time (never all of them): each chunk is tokenized as training tokenized its
rows (:func:`jaxmp.data.classify.encode_texts`), cut into batches of ``batch_size`` rows, each batch cut to
its longest row rounded up to ``pad_multiple`` tokens (as training's ``pad_multiple``: a few shapes, so a
few compilations), the last one filled up with copies of its first row whose outputs are dropped. With a
run's ``seq_len``, ``pad_multiple`` and ``batch_size`` (the defaults) the batches are those of the run's
evaluation, so under the run's policy the accuracy is the run's ``val_accuracy``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp import models
from jaxmp.data.classify import encode_texts, load_hf_tokenizer, padded_length
from jaxmp.errors import UsageError
from jaxmp.inference.load import (
    checkpointer_with_a_checkpoint,
    read_hf_directory,
    serving_params,
    serving_policy,
)
from jaxmp.precision import Policy
from jaxmp.training.config import TrainConfig
from jaxmp.training.run_dir import RunDir

__all__ = ["Classifier", "Prediction", "CompileTimes", "load_classifier", "predict_rows"]

HF_SEQ_LEN = 128  # a Hugging Face directory's default max length (``load_classification_data``'s)
HF_PAD_MULTIPLE = 16  # a Hugging Face directory's default bucket (``jaxmp.train``'s ``pad_multiple``)
HF_BATCH_SIZE = 32  # a Hugging Face directory's default rows per forward pass (``jaxmp.train``'s)
_VALID_MODEL = "give the run directory of a classify training run or a Hugging Face BertForSequenceClassification directory"


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
    """A sequence classifier ready for inference.

    Attributes:
      model: the BERT module (task ``classify``), carrying the serving policy.
      params: params in that policy's param dtypes (:func:`jaxmp.inference.load.serving_params`).
      tokenizer: the ``transformers`` tokenizer the model was fine-tuned with.
      seq_len: the run's max length (a Hugging Face directory: :data:`HF_SEQ_LEN`).
      pad_multiple: the run's bucket size (a Hugging Face directory: :data:`HF_PAD_MULTIPLE`).
      batch_size: the run's batch size (a Hugging Face directory: :data:`HF_BATCH_SIZE`).
      run_config: a run directory's settings (None for a Hugging Face directory).
      compiled: the forward pass compiled per batch shape ``(B, T)``, filled by :func:`predict_rows`.
    """

    model: Any
    params: Any
    tokenizer: Any
    seq_len: int
    pad_multiple: int
    batch_size: int
    run_config: TrainConfig | None = None
    compiled: dict[tuple[int, int], Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_labels(self) -> int:
        return self.model.config.num_labels


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One row's prediction.

    Attributes:
      row: the row's index in the input, from 0.
      label: the predicted class, argmax of the float32 logits.
      probabilities: float32[C], the softmax of the float32 logits.
      true_label: the row's label, None when the input has none.
    """

    row: int
    label: int
    probabilities: np.ndarray
    true_label: int | None


@dataclasses.dataclass
class CompileTimes:
    """What :func:`predict_rows` spent compiling: one compilation per batch length it met."""

    seconds: float = 0.0
    lengths: list[int] = dataclasses.field(default_factory=list)


def _require_classifier(config: Any, path: Path) -> None:
    if getattr(config, "task", None) != "classify":
        kind = "a causal language model" if models.is_causal_lm(config) else f"a {type(config).__name__}"
        raise UsageError(f"`model` {path} is {kind} without a classification head; {_VALID_MODEL}")


def _load_run(directory: Path) -> tuple[Any, Any, TrainConfig]:
    """A classify run's model, newest params (float32) and config."""
    run_dir = RunDir.open(directory)
    config = run_dir.read_config()
    if config.task != "classify":
        raise UsageError(
            f"`model` {directory} is a run of task {config.task!r}, not classify; {_VALID_MODEL}"
        )
    checkpointer = checkpointer_with_a_checkpoint(run_dir)
    num_labels = checkpointer.param_shapes()["classifier/bias"][0]
    hf_log = logging.getLogger("jaxmp.hf")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # no warning that `init` lacks the head: the checkpoint holds it
    try:
        model, params = read_hf_directory(
            Path(config.init), task="classify", num_labels=num_labels, scan_layers=config.scan_layers
        )
    finally:
        hf_log.setLevel(level)
    return model, checkpointer.restore_params(jax.eval_shape(lambda: params)), config


def load_classifier(path: str | os.PathLike, policy: Policy | str = "fp32") -> Classifier:
    """Loads a ``jaxmp.train --task classify`` run directory or a Hugging Face classifier directory.

    Args:
      path: the directory. A run's tokenizer is its ``init`` directory's; a Hugging Face directory's
        is its own.
      policy: the serving policy (see :func:`jaxmp.inference.load.serving_params`).

    Raises:
      UsageError: an unknown path or policy, a model without a classification head (an LM, a run of
        another task), a missing checkpoint or tokenizer, weights beyond float16's range for fp16.
    """
    policy = serving_policy(policy)
    directory = Path(path)
    if not directory.is_dir():
        raise UsageError(f"`model` {path} is not a directory; {_VALID_MODEL}")
    if (directory / "config.json").is_file() and (directory / "checkpoints").is_dir():
        model, params, run_config = _load_run(directory)
        tokenizer_dir = run_config.init
        sizes = (run_config.seq_len, run_config.pad_multiple, run_config.batch_size)
    elif (directory / "config.json").is_file():
        model, params = read_hf_directory(directory)
        run_config, tokenizer_dir = None, directory
        sizes = (min(HF_SEQ_LEN, model.config.max_positions), HF_PAD_MULTIPLE, HF_BATCH_SIZE)
    else:
        raise UsageError(f"`model` {path} has no config.json; {_VALID_MODEL}")
    _require_classifier(model.config, directory)
    model, params = serving_params(model.config, params, policy)
    tokenizer = load_hf_tokenizer(tokenizer_dir)
    return Classifier(model, params, tokenizer, *sizes, run_config)


def _probabilities_and_labels(model: Any, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
    """float32[B, C] softmax probabilities and int32[B] argmax labels of a batch's float32 logits."""
    logits_BxC = model.apply(
        {"params": params},
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    ).logits.astype(jnp.float32)  # fp32 island: the logits
    return jax.nn.softmax(logits_BxC, axis=-1), jnp.argmax(logits_BxC, axis=-1).astype(jnp.int32)


def _batches(
    encoded: dict[str, np.ndarray], batch_size: int, pad_multiple: int
) -> Iterator[tuple[dict, int]]:
    """Yields ``(batch, rows)``: int32[batch_size, T] arrays, T the bucket of its longest row, and how many
    of its rows are real (the last batch is filled up with copies of its first row)."""
    count = len(encoded["input_ids"])
    for start in range(0, count, batch_size):
        rows = min(batch_size, count - start)
        index_B = np.concatenate([np.arange(start, start + rows), np.full(batch_size - rows, start)])
        length = padded_length(encoded["attention_mask"][index_B], pad_multiple)
        yield {name: array[index_B, :length] for name, array in encoded.items()}, rows


def predict_rows(
    classifier: Classifier,
    rows: Iterable[tuple[str, int | None]],
    batch_size: int | None = None,
    seq_len: int | None = None,
    pad_multiple: int | None = None,
    chunk_rows: int = 4096,
    compile_times: CompileTimes | None = None,
) -> Iterator[Prediction]:
    """Returns an iterator of one :class:`Prediction` per row, in order, holding ``chunk_rows`` rows at a time.

    Args:
      classifier: from :func:`load_classifier`.
      rows: ``(text, label or None)`` pairs, e.g. :func:`jaxmp.data.classify.iter_rows`.
      batch_size: rows per forward pass (None: the classifier's).
      seq_len: max length after truncation (None: the classifier's).
      pad_multiple: bucket size of a batch's length (None: the classifier's; 0: every batch ``seq_len``).
      chunk_rows: rows read and tokenized at once, a multiple of ``batch_size`` (so the batches do not
        depend on it).
      compile_times: when given, each compilation's time and batch length are added to it (a shape
        the classifier has met before is not compiled again).

    Raises:
      UsageError: a size out of range (raised here, before any row is read).
    """
    batch_size = classifier.batch_size if batch_size is None else batch_size
    seq_len = classifier.seq_len if seq_len is None else seq_len
    pad_multiple = classifier.pad_multiple if pad_multiple is None else pad_multiple
    _check_sizes(classifier, batch_size, seq_len, pad_multiple, chunk_rows)
    compile_times = CompileTimes() if compile_times is None else compile_times
    return _predict(classifier, iter(rows), batch_size, seq_len, pad_multiple, chunk_rows, compile_times)


def _predict(
    classifier: Classifier,
    rows: Iterator[tuple[str, int | None]],
    batch_size: int,
    seq_len: int,
    pad_multiple: int,
    chunk_rows: int,
    compile_times: CompileTimes,
) -> Iterator[Prediction]:
    """:func:`predict_rows` once its arguments are checked."""
    chunk_start = 0
    while chunk := list(itertools.islice(rows, chunk_rows)):
        texts, labels = zip(*chunk, strict=True)
        encoded = encode_texts(classifier.tokenizer, list(texts), seq_len)
        batch_start = 0
        for batch, count in _batches(encoded, batch_size, pad_multiple):
            forward = _compiled(classifier, batch, compile_times)
            probabilities_BxC, labels_B = jax.device_get(forward(classifier.params, batch))
            for offset in range(count):
                row = batch_start + offset
                yield Prediction(
                    chunk_start + row, int(labels_B[offset]), probabilities_BxC[offset], labels[row]
                )
            batch_start += count
        chunk_start += len(chunk)


def _compiled(classifier: Classifier, batch: dict[str, np.ndarray], compile_times: CompileTimes) -> Any:
    """The classifier's forward pass compiled for ``batch``'s shape (once per shape, timed)."""
    shape = batch["input_ids"].shape
    if shape not in classifier.compiled:
        started = time.perf_counter()
        forward = jax.jit(functools.partial(_probabilities_and_labels, classifier.model))
        classifier.compiled[shape] = forward.lower(classifier.params, batch).compile()
        compile_times.seconds += time.perf_counter() - started
        compile_times.lengths.append(shape[1])
    return classifier.compiled[shape]


def _check_sizes(classifier: Classifier, batch_size: int, seq_len: int, pad_multiple: int, chunk_rows: int):
    """Raises ``UsageError`` for a size :func:`predict_rows` cannot use."""
    context = classifier.model.config.max_positions
    if batch_size < 1:
        raise UsageError(f"`batch_size` must be >= 1, got {batch_size}")
    if not 1 <= seq_len <= context:
        raise UsageError(f"`seq_len` must be in 1..{context} (the model's positions), got {seq_len}")
    if pad_multiple < 0:
        raise UsageError(f"`pad_multiple` must be >= 0 (0: pad every batch to `seq_len`), got {pad_multiple}")
    if chunk_rows < 1 or chunk_rows % batch_size:
        raise UsageError(
            f"`chunk_rows` must be a positive multiple of `batch_size` {batch_size}, got {chunk_rows}"
        )
