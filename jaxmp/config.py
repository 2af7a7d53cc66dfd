"""``TrainConfig``: every setting of a run, its default declared once, and the CLI built from it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import typing
from pathlib import Path

from jaxmp.cli import UsageParser

__all__ = ["TrainConfig", "build_parser", "config_from_args", "FLAG_GROUPS"]


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
    accum_steps: int = 1  # micro-batches averaged into one update
    lr: float = 2e-3  # peak learning rate (linear warmup, cosine decay to 10%)
    warmup_steps: int = 50  # updates of linear warmup
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    clip_norm: float = 1.0  # global-norm clip of the accumulated gradient (0 disables)
    seed: int = 0  # seeds init, dropout and the batch order
    # run directory, evaluation and checkpoints
    out: str | None = None  # run directory; default runs/<model>-<policy preset>-<time>
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
    # devices and hosts
    mesh: str | None = None  # device mesh, e.g. data=4,fsdp=2 or fsdp=8 (none: every device on data)
    coordinator: str | None = None  # multi-host: process 0's HOST:PORT (same in all processes), or auto
    num_processes: int = 1  # multi-host: processes in the run (with --coordinator HOST:PORT)
    process_id: int = 0  # multi-host: this process's index, 0 .. num-processes - 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in fields})


FLAG_GROUPS = {
    "model and precision": ("model", "policy", "task", "init", "loss_scale", "param_update", "moment_dtype"),
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
    ),
    "devices and hosts": ("mesh", "coordinator", "num_processes", "process_id"),
}
_EXCLUSIVE = ("steps", "epochs")  # at most one of these flags may be given
_CHOICES = {
    "task": ("lm", "classify"),
    "param_update": ("nearest", "stochastic", "kahan"),
    "moment_dtype": ("float32", "bfloat16"),
}


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
    """An argparse parser with one flag per ``TrainConfig`` field, grouped, defaults shown."""
    parser = UsageParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    comments = _field_comments()
    types = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        if any(name in _EXCLUSIVE for name in names):
            exclusive = group.add_mutually_exclusive_group()  # _EXCLUSIVE's flags share one group
        for name in names:
            flag = "--" + name.replace("_", "-")
            default = fields[name].default
            if types[name] is bool:
                group.add_argument(flag, action="store_true", help=comments[name])
                continue
            kind = {int: int, float: float}.get(_without_none(types[name]), str)
            (exclusive if name in _EXCLUSIVE else group).add_argument(
                flag, type=kind, default=default, choices=_CHOICES.get(name), help=comments[name]
            )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def default_run_dir(config: TrainConfig, now: str) -> Path:
    return Path("runs") / f"{Path(config.init).name if config.init else config.model}-{now}"
