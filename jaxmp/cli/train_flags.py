"""The flags of every command that trains (``jaxmp.train``, ``jaxmp.compare``): one per
``TrainConfig`` field, grouped, plus ``--config FILE``; flags given override the file."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Collection

from jaxmp.cli import UsageParser
from jaxmp.training.config import FIELD_CHOICES, TrainConfig, field_kind, merge_config, read_config_file

__all__ = ["build_parser", "config_from_args", "FLAG_GROUPS"]

_FIELD_NAMES = frozenset(field.name for field in dataclasses.fields(TrainConfig))

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


def build_parser(
    prog: str = "python -m jaxmp.train", description: str | None = None, leave_out: Collection[str] = ()
) -> argparse.ArgumentParser:
    """An argparse parser with ``--config FILE`` and one flag per ``TrainConfig`` field (less the fields
    in ``leave_out``), grouped.

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
        for name in (name for name in names if name not in leave_out):
            flag = "--" + name.replace("_", "-")
            shown = str(fields[name].default).replace("%", "%%")  # argparse formats help
            options = {"default": argparse.SUPPRESS, "help": f"{comments[name]} (default: {shown})"}
            if field_kind(name) is bool:
                group.add_argument(flag, action="store_true", **options)
                continue
            kind = {int: int, float: float}.get(field_kind(name), str)
            (exclusive if name in _EXCLUSIVE else group).add_argument(
                flag, type=kind, choices=FIELD_CHOICES.get(name), **options
            )
    return parser


def config_from_args(args: argparse.Namespace, ignored_file_keys: Collection[str] = ()) -> TrainConfig:
    """The config of a command line parsed by :func:`build_parser`: the flags given, over the
    ``--config`` file's values (if any; less ``ignored_file_keys``), over ``TrainConfig``'s defaults."""
    given = {name: value for name, value in vars(args).items() if name in _FIELD_NAMES}
    from_file = read_config_file(args.config) if args.config else {}
    return merge_config({k: v for k, v in from_file.items() if k not in ignored_file_keys}, given)
