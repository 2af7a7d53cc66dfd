"""``python -m jaxmp.policy``: what a precision policy gives each module of a model, and why.

    python -m jaxmp.policy --model gpt2-tiny --policy "bf16;.*attn.*:compute=float32"

``--model`` is a preset, a jaxmp run directory or a Hugging Face directory. Prints one row per
module: its path, params / compute / output dtype and the rule that decided them (``base``, an
fp32 ``island``, or ``override N``). An override that matches no module is an error naming it and
the closest module paths (:func:`jaxmp.describe_policy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxmp.cli import UsageParser, run_cli
from jaxmp.errors import UsageError

__all__ = ["main"]

_PROG = "python -m jaxmp.policy"


def _build_parser() -> UsageParser:
    parser = UsageParser(prog=_PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="preset name, jaxmp run directory or Hugging Face directory"
    )
    parser.add_argument("--policy", default="auto", help="policy string, e.g. bf16;.*attn.*:compute=float32")
    return parser


def _load_model(spec: str) -> Any:
    """The Flax module of a preset, a run directory (its config; no weights) or a HF directory."""
    from jaxmp import hf, models
    from jaxmp.training.run_dir import RunDir

    path = Path(spec)
    if not path.is_dir():
        try:
            return models.get_model(spec)
        except ValueError as error:
            raise UsageError(f"--model: {error}; or give a run or Hugging Face directory") from None
    try:
        config = RunDir.open(path).read_config()
    except UsageError:  # not a jaxmp run: a Hugging Face directory
        try:
            return hf.from_pretrained(path, "fp32")[0]
        except (ValueError, OSError) as error:
            raise UsageError(f"--model {path}: {str(error).splitlines()[0]}") from None
    layers = {"scan_layers": config.scan_layers}
    if config.init:
        return hf.from_pretrained(config.init, "fp32", task=config.task, **layers)[0]
    return models.get_model(config.model, **layers)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input)."""
    return run_cli(_PROG, _policy_cli, argv)


def _policy_cli(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    import jax.numpy as jnp

    from jaxmp.module_policy import describe_policy
    from jaxmp.precision import get_policy

    try:
        policy = get_policy(args.policy)
    except ValueError as error:
        raise UsageError(f"--policy: {error}") from None
    model = _load_model(args.model)
    ids = jnp.zeros((1, min(8, model.config.max_positions)), jnp.int32)
    try:
        table = describe_policy(model, policy, ids)
    except ValueError as error:
        raise UsageError(f"--policy: {error}") from None
    print(table)
    return 0
