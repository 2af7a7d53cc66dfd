"""``TrainConfig``: every setting of a run, its default declared once, and the CLI built from it."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import os
import re
import reprlib
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from jaxmp.cli import UsageParser
from jaxmp.errors import UsageError

__all__ = [
    "TrainConfig",
    "build_parser",
    "config_from_args",
    "merge_config",
    "read_config_file",
    "FLAG_GROUPS",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Field names are the CLI flags (``seq_len`` is ``--seq-len``)."""

    # model and precision
    model: str = "gpt2-tiny"  # preset name (jaxmp.models.PRESETS); ignored with --init
    policy: str = "auto"  # precision policy string, e.g. params=float32,compute=bfloat16
    task: str = "lm"  # lm (next-token) or classify (sequence classification)
    init: str | None = None  # Hugging Face directory to start from (config.json + weights)
    loss_scale: str = "auto"  # auto | none | dynamic | static:N (auto: dynamic iff fp16 computes)
    param_update: str = "nearest"  # low-precision params: nearest | stochastic | kahan rounding
    moment_dtype: str = "float32"  # Adam moment dtype: float32 or bfloat16
    scan_layers: bool = False  # one nn.scan-ned block for all layers: compiles in a fraction of the time
    remat: bool = False  # recompute each block's activations in the backward pass: less memory, more compute
    # data
    data: str | None = None  # text file or directory (lm), TSV/CSV/JSONL (classify); none: tiny Shakespeare
    eval_data: str | None = None  # validation file (classify); lm holds out the corpus' tail
    tokenizer: str = "byte"  # byte | bpe:N | tokenizer.json | HF tokenizer dir (lm; classify uses --init)
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


FLAG_GROUPS = {
    "model and precision": (
        "model",
        "policy",
        "task",
        "init",
        "loss_scale",
        "param_update",
        "moment_dtype",
        "scan_layers",
        "remat",
    ),
    "data": ("data", "eval_data", "tokenizer", "seq_len", "pad_multiple", "max_rows"),
    "optimization": (
        "steps",
        "epochs",
        "batch_size",
        "accum_steps",
        "lr",
        "warmup_steps",
        "weight_decay",
        "clip_norm",
        "seed",
    ),
    "run directory, evaluation and checkpoints": (
        "out",
        "resume",
        "overwrite",
        "eval_every",
        "eval_batches",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "max_consecutive_skips",
        "export_hf",
        "sample_tokens",
        "no_tensorboard",
        "wandb",
    ),
    "devices and hosts": ("mesh", "coordinator", "num_processes", "process_id"),
}
_EXCLUSIVE = ("steps", "epochs")  # at most one of these flags may be given
_CHOICES = {
    "task": ("lm", "classify"),
    "param_update": ("nearest", "stochastic", "kahan"),
    "moment_dtype": ("float32", "bfloat16"),
}
_FIELD_TYPES = typing.get_type_hints(TrainConfig)  # field name -> type hint, in field order
_IGNORED_FILE_KEYS = ("identity", "resume", "overwrite")  # a run's record; flags acting on --out
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_CONFIG_HELP = (
    "JSON or YAML file (.json, .yaml, .yml) mapping TrainConfig fields (the flags below, with "
    "underscores: seq_len) to values; a run's own config.json works as is. Flags given override it; "
    "--steps also drops its epochs (a file setting both trains for epochs). Its resume and overwrite are "
    "ignored (give them as flags), and so is a run's identity record"
)


def _field_comments() -> dict[str, str]:
    """The one-line comment after each field in the source above: the flag's help text."""
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            comments[name] = rest.split("#", 1)[1].strip().replace("%", "%%")  # argparse formats help
    return comments


def _without_none(hint: object) -> object:
    """``int`` for ``int | None``; any other type hint unchanged."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if len(kinds) == 1 else hint


def build_parser(
    prog: str = "python -m jaxmp.train", description: str | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with ``--config FILE`` and one flag per ``TrainConfig`` field, grouped.

    The field flags default to ``argparse.SUPPRESS`` (their help shows ``TrainConfig``'s default), so the
    parsed namespace holds exactly the flags given: :func:`config_from_args` lays them over the file's.
    """
    parser = UsageParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE", default=None, help=_CONFIG_HELP)
    comments = _field_comments()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        if any(name in _EXCLUSIVE for name in names):
            exclusive = group.add_mutually_exclusive_group()  # _EXCLUSIVE's flags share one group
        for name in names:
            flag = "--" + name.replace("_", "-")
            shown = str(fields[name].default).replace("%", "%%")  # argparse formats help
            options = {"default": argparse.SUPPRESS, "help": f"{comments[name]} (default: {shown})"}
            if _FIELD_TYPES[name] is bool:
                group.add_argument(flag, action="store_true", **options)
                continue
            kind = {int: int, float: float}.get(_without_none(_FIELD_TYPES[name]), str)
            (exclusive if name in _EXCLUSIVE else group).add_argument(
                flag, type=kind, choices=_CHOICES.get(name), **options
            )
    return parser


def config_from_args(args: argparse.Namespace, ignored_file_keys: Collection[str] = ()) -> TrainConfig:
    """The config of a command line parsed by :func:`build_parser`: the flags given, over the
    ``--config`` file's values (if any; less ``ignored_file_keys``), over ``TrainConfig``'s defaults."""
    given = {name: value for name, value in vars(args).items() if name in _FIELD_TYPES}
    from_file = read_config_file(args.config) if args.config else {}
    return merge_config({k: v for k, v in from_file.items() if k not in ignored_file_keys}, given)


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
    record = _read_mapping(Path(path), source)
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
    hint = f"did you mean {nearest[0]!r}?" if nearest else "keys are TrainConfig field names, see --help"
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
        if name in _CHOICES and value not in _CHOICES[name]:
            raise UsageError(f"{source}: {name} must be one of {', '.join(_CHOICES[name])}, got {value!r}")
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
    """``runs/<model>-<policy>-<now>``: the model (preset or ``--init`` directory name) and policy as given."""
    model = Path(config.init).name if config.init else config.model
    return Path("runs") / f"{model}-{path_slug(config.policy)}-{now}"


def path_slug(text: str) -> str:
    """``text`` made safe as one path component: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"
