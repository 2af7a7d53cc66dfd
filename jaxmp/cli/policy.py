"""``python -m jaxmp.policy``: what a precision policy gives each module of a model, and why.

    python -m jaxmp.policy --model gpt2-tiny --policy "bf16;.*attn.*:compute=float32"

``--model`` is a preset, a jaxmp run directory or a Hugging Face directory. Prints one row per
module: its path, params / compute / output dtype, how its matmuls run and its weights are stored
when the policy says (``matmul=fp8``, ``weights=int8``...) and the rule that decided them (``base``,
an fp32 ``island``, or ``override N``); then the bytes of the params as the policy stores them. An override that matches no module is an error naming it and
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
    print(_stored_bytes(model, policy))
    return 0


def _stored_bytes(model: Any, policy: Any) -> str:
    """One line: the bytes of the model's params as ``policy`` stores them (8-bit weights with their
    scales), against float32. Shapes only: nothing is allocated."""
    import jax

    from jaxmp import models
    from jaxmp.lowp import tree_bytes

    def stored(spec: Any) -> int:
        served = models.create_model(model.config, spec)
        return tree_bytes(jax.eval_shape(lambda: models.init_params(served, jax.random.key(0), 1)))

    fp32, served = stored("fp32"), stored(policy)
    return (
        f"params as stored: {served / 2**20:.2f} MiB, {served / fp32:.3f}x float32 ({fp32 / 2**20:.2f} MiB)"
    )
