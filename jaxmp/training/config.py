"""``TrainConfig``: every setting of a run, its default declared once, checked by itself; config files.

Field names are the flags of ``python -m jaxmp.train`` (``seq_len`` is ``--seq-len``, see
:mod:`jaxmp.cli.train_flags`). Errors name a field in backticks (```seq_len` must be >= 1``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import reprlib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxmp.errors import UsageError
from jaxmp.precision import Policy, get_policy
from jaxmp.scaling import LossScale, make_loss_scale, parse_loss_scale

__all__ = ["TrainConfig", "merge_config", "read_config_file", "config_values", "default_run_dir", "path_slug"]

_MAX_SEED = 2**63 - 1  # jax.random.key takes a signed 64-bit seed
_POSITIVE = ("steps", "batch_size", "accum_steps", "seq_len", "log_every", "keep_checkpoints", "eval_batches")
_NON_NEGATIVE = (
    "warmup_steps",
    "eval_every",
    "save_every",
    "max_consecutive_skips",
    "pad_multiple",
    "sample_tokens",
)
# Fields that only one task reads: set for the other task, they would be silently ignored.
_TASK_ONLY_FIELDS = {
    "lm": ("tokenizer", "eval_batches"),
    "classify": ("eval_data", "pad_multiple", "max_rows", "epochs"),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Field names are the CLI flags (``seq_len`` is ``--seq-len``)."""

    # model and precision
    model: str = "gpt2-tiny"  # preset name (jaxmp.models.PRESETS); ignored with init
    policy: str = "auto"  # precision policy string, e.g. params=float32,compute=bfloat16
    task: str = "lm"  # lm (next-token) or classify (sequence classification)
    init: str | None = None  # Hugging Face directory to start from (config.json + weights)
    loss_scale: str = "auto"  # auto | none | dynamic | static:N (auto: dynamic iff fp16 computes)
    param_update: str = "nearest"  # low-precision params: nearest | stochastic | kahan rounding
    moment_dtype: str = "float32"  # Adam moment storage: float32, bfloat16, int8 or fp8 (8-bit: block-wise)
    scan_layers: bool = False  # one nn.scan-ned block for all layers: compiles in a fraction of the time
    remat: bool = False  # recompute each block's activations in the backward pass: less memory, more compute
    # data
    data: str | None = None  # text file or directory (lm), TSV/CSV/JSONL (classify); none: tiny Shakespeare
    eval_data: str | None = None  # validation file (classify); lm holds out the corpus' tail
    tokenizer: str = "byte"  # byte | bpe:N | tokenizer.json | HF tokenizer dir (lm; classify uses init's)
    seq_len: int = 64  # tokens per sequence (classify: max length after truncation)
    pad_multiple: int = 16  # classify: pad a batch to its longest row, rounded up to this (0: to --seq-len)
    max_rows: int | None = None  # classify: train on the first N rows of --data only (none: all)
    # optimization
    steps: int = 400  # optimizer updates; each takes accum_steps micro-batches
    epochs: float | None = None  # classify: passes over the training rows, instead of --steps
    batch_size: int = 32  # sequences per micro-batch
    accum_steps: int = 1  # micro-batches averaged into one update (one scanned call; checkpoints and signals between updates)
    lr: float = 2e-3  # peak learning rate (linear warmup, cosine decay to 10%)
    warmup_steps: int = 50  # updates of linear warmup
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    clip_norm: float = 1.0  # global-norm clip of the accumulated gradient (0 disables)
    seed: int = 0  # seeds init, dropout and the batch order
    # run directory, evaluation and checkpoints
    out: str | None = None  # run directory; default runs/<model>-<policy>-<time>
    resume: bool = False  # continue the run in --out from its newest checkpoint
    overwrite: bool = False  # replace an existing run directory
    eval_every: int = 100  # updates between validation passes (0: only at the end)
    eval_batches: int = 20  # validation batches per pass (lm)
    log_every: int = 10  # updates between metrics.jsonl records
    save_every: int = 200  # updates between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    max_consecutive_skips: int = 100  # stop after this many non-finite micro-steps in a row
    export_hf: str | None = None  # also write the final model as a Hugging Face directory
    sample_tokens: int = 300  # tokens of text generated at the end of an lm run (0: none)
    no_tensorboard: bool = False  # do not write TensorBoard event files (RUN_DIR/tensorboard/)
    wandb: str | None = None  # also log to this Weights & Biases project (needs the wandb package)
    # devices and hosts
    mesh: str | None = None  # device mesh, e.g. data=4,fsdp=2 or fsdp=8 (none: every device on data)
    coordinator: str | None = None  # multi-host: process 0's HOST:PORT (same in all processes), or auto
    num_processes: int = 1  # multi-host: processes in the run (with --coordinator HOST:PORT)
    process_id: int = 0  # multi-host: this process's index, 0 .. num-processes - 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @functools.cached_property
    def precision_policy(self) -> Policy:
        """The parsed ``policy``. ``auto`` asks the devices: read it after ``jax.distributed.initialize``.

        Raises:
          UsageError: naming ``policy``, for a string that does not parse.
        """
        try:
            return get_policy(self.policy)
        except ValueError as error:
            raise UsageError(f"`policy`: {error}") from None

    def initial_loss_scale(self) -> LossScale:
        """A fresh loss-scale state as ``loss_scale`` says (``auto``: as the policy needs)."""
        return make_loss_scale(self.loss_scale, self.precision_policy)

    def check(self) -> None:
        """Raises ``UsageError`` naming the first field whose value no run could use: a size out of
        range, a non-finite rate, a policy or loss scale that does not parse, a field set that the
        chosen task does not read. Reads :attr:`precision_policy` (see there)."""
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise UsageError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed <= _MAX_SEED:
            raise UsageError(f"`seed` must be in 0..{_MAX_SEED}, got {self.seed}")
        if not 0 < self.lr < float("inf"):  # also refuses nan
            raise UsageError(f"`lr` must be a finite number > 0, got {self.lr}")
        for name in ("clip_norm", "weight_decay"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise UsageError(f"`{name}` must be a finite number >= 0, got {getattr(self, name)}")
        if self.task == "lm" and self.sample_tokens and self.seq_len < 2:
            raise UsageError(
                f"`sample_tokens` generates with a context of `seq_len` tokens, which must then be >= 2 "
                f"(got {self.seq_len}); or set `sample_tokens` 0"
            )
        if self.max_rows is not None and self.max_rows < 1:
            raise UsageError(f"`max_rows` must be >= 1, got {self.max_rows}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UsageError(f"`epochs` must be a finite number > 0, got {self.epochs}")
        self._check_task_fields()
        try:
            parse_loss_scale(self.loss_scale)
        except ValueError as error:
            raise UsageError(f"`loss_scale`: {error}") from None
        serving_keys = (
            self.precision_policy.serving_only
        )  # raises UsageError for a policy that does not parse
        if serving_keys:
            raise UsageError(
                f"`policy` {self.policy!r} sets {' and '.join(serving_keys)}, which say how a trained model is "
                "served (jaxmp.generate, jaxmp.evaluate, jaxmp.predict); train without them"
            )

    def _check_task_fields(self) -> None:
        """Refuses a field, set away from its default, that ``task`` does not read."""
        defaults = TrainConfig.__dataclass_fields__
        for task, names in _TASK_ONLY_FIELDS.items():
            for name in names:
                if self.task != task and getattr(self, name) != defaults[name].default:
                    raise UsageError(
                        f"`{name}` applies to `task` {task} only, and this run's task is {self.task}; "
                        f"leave `{name}` unset"
                    )


FIELD_CHOICES = {
    "task": ("lm", "classify"),
    "param_update": ("nearest", "stochastic", "kahan"),
    "moment_dtype": ("float32", "bfloat16", "int8", "fp8"),
}
_FIELD_TYPES = typing.get_type_hints(TrainConfig)  # field name -> type hint, in field order
_IGNORED_FILE_KEYS = ("identity", "resume", "overwrite")  # a run's record; flags acting on the run directory
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def field_kind(name: str) -> type:
    """The type of field ``name``, without its ``| None``: ``int`` for ``max_rows``."""
    return _without_none(_FIELD_TYPES[name])


def _without_none(hint: object) -> object:
    """``int`` for ``int | None``; any other type hint unchanged."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 else hint


def merge_config(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> TrainConfig:
    """``TrainConfig`` with ``flag_values`` over ``file_values`` over its defaults.

    ``steps`` in ``flag_values`` also drops ``epochs`` from ``file_values``: the two flags exclude each
    other, while a file may set both (a classification run's config.json records the steps its epochs
    came to), and then ``epochs`` decides the run's length.
    """
    values = dict(file_values)
    if "steps" in flag_values:
        values.pop("epochs", None)
    return TrainConfig(**(values | dict(flag_values)))


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The ``TrainConfig`` values of a JSON or YAML file (chosen by extension), each checked.

    Keys are ``TrainConfig`` field names; an int is accepted for a float field (and becomes a float).
    A run's own ``config.json`` is read as written: its ``identity`` record is ignored, and so are
    ``resume`` and ``overwrite``, which act on a run directory and are given as flags only.

    Raises:
      UsageError: naming ``path``: a missing, unreadable or unparsable file, one that is not a mapping,
        an unknown key (with the nearest field name), a value of the wrong type or not one of the choices.
    """
    source = f"config file {path}"
    return config_values(_read_mapping(Path(path), source), source)


def config_values(record: Mapping[Any, Any], source: str) -> dict[str, Any]:
    """The checked ``TrainConfig`` values of ``record`` (a config file's or a run's ``config.json``);
    see :func:`read_config_file`. Errors name ``source``."""
    unknown = [str(key) for key in record if key not in _FIELD_TYPES and key not in _IGNORED_FILE_KEYS]
    if unknown:
        raise UsageError(f"{source}: " + "; ".join(_unknown_key_message(key) for key in unknown))
    return {
        name: _checked_value(name, value, source)
        for name, value in record.items()
        if name not in _IGNORED_FILE_KEYS
    }


def _read_mapping(path: Path, source: str) -> dict[Any, Any]:
    """The parsed ``.json``/``.yaml``/``.yml`` file at ``path``, which must be a mapping."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise UsageError(f"{source}: give a .json, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{source}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{source} is not UTF-8 text (bad byte at offset {error.start})") from None
    record = _parse_json(text, source) if suffix == ".json" else _parse_yaml(text, source)
    if record is None:
        raise UsageError(f"{source} is empty; give a mapping of TrainConfig fields to values")
    if not isinstance(record, dict):
        raise UsageError(
            f"{source} holds a {type(record).__name__}, not a mapping of TrainConfig fields to values"
        )
    return record


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{source} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None


def _parse_yaml(text: str, source: str) -> Any:
    import yaml  # only for YAML files: --help and JSON configs stay fast

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise UsageError(f"{source} is not valid YAML ({problem}{where})") from None


def _unknown_key_message(key: str) -> str:
    nearest = difflib.get_close_matches(key, list(_FIELD_TYPES), n=1)
    hint = (
        f"did you mean {nearest[0]!r}?"
        if nearest
        else "keys are TrainConfig field names (the flags, with underscores)"
    )
    return f"unknown key {key!r} ({hint})"


def _checked_value(name: str, value: Any, source: str) -> Any:
    """``value`` for field ``name`` if its type fits (an int widened for a float field), else UsageError."""
    hint = _FIELD_TYPES[name]
    kind = _without_none(hint)
    optional = kind is not hint
    if value is None and optional:
        return None
    if isinstance(value, bool) == (kind is bool) and isinstance(
        value, (int, float) if kind is float else kind
    ):
        if name in FIELD_CHOICES and value not in FIELD_CHOICES[name]:
            raise UsageError(
                f"{source}: {name} must be one of {', '.join(FIELD_CHOICES[name])}, got {value!r}"
            )
        return float(value) if kind is float else value
    expected = _TYPE_NAMES.get(kind, str(kind)) + (" or null" if optional else "")
    advice = ""
    if kind is float and isinstance(value, str) and _is_yaml_1_1_text_number(value):
        advice = "; YAML reads an exponent without a decimal point as text: write 1.0e-3, not 1e-3"
    raise UsageError(f"{source}: {name} must be {expected}, got {reprlib.repr(value)}{advice}")


def _is_yaml_1_1_text_number(text: str) -> bool:
    """Whether ``text`` is a number such as ``1e-3`` that YAML 1.1 (PyYAML) reads as a string."""
    try:
        float(text)
    except ValueError:
        return False
    return "e" in text.lower() and "." not in text


def default_run_dir(config: TrainConfig, now: str) -> Path:
    """``runs/<model>-<policy>-<now>``: the model (preset or ``init`` directory name) and policy as given."""
    model = Path(config.init).name if config.init else config.model
    return Path("runs") / f"{model}-{path_slug(config.policy)}-{now}"


def path_slug(text: str) -> str:
    """``text`` made safe as one path component: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"
