"""``python -m jaxmp.tune``: the cheapest per-module policy that keeps a model's validation loss.

    python -m jaxmp.tune --model gpt2-tiny --candidates fp32,bf16,fp16 --objective speed --budget 0.5%

``--model`` is a preset (freshly initialised with ``--seed``), a jaxmp run directory or a Hugging
Face directory; the batches come from ``--data`` (default: the built-in tiny Shakespeare) and its
held-out split. The search is :mod:`jaxmp.training.tune`. Writes into ``--out``: ``tune.json``
(every measurement and the verified result), ``report.md`` (a per-unit table), ``sensitivity.png``
and ``loss.png`` (the verification run against float32); prints the policy string, which
``python -m jaxmp.train --policy`` takes as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxmp.cli import UsageParser, check_output_file, run_cli
from jaxmp.errors import UsageError

__all__ = ["main", "parse_budget", "parse_candidates"]

_PROG = "python -m jaxmp.tune"
_OUTPUTS = ("tune.json", "report.md", "sensitivity.png", "loss.png")


def _build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=_PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", default="gpt2-tiny", help="preset name, jaxmp run directory or Hugging Face directory")
    add("--data", help="text file or directory of *.txt (default: the built-in tiny Shakespeare)")
    add(
        "--candidates",
        default="fp32,bf16,fp16",
        help="comma-separated compute dtypes a module may take, or fp8",
    )
    add("--objective", default="speed", choices=("speed", "memory"), help="what the policy should save")
    add("--budget", default="0.5%", help="allowed validation loss increase over fp32: 0.5%% or 0.005")
    add(
        "--steps", type=int, default=100, help="training steps of the fp32 reference and of each verification"
    )
    add(
        "--depth", type=int, default=2, help="module path components per unit (2: blocks_0/attn; 1: blocks_0)"
    )
    add("--batch-size", type=int, default=8, help="sequences per batch")
    add("--seq-len", type=int, default=64, help="tokens per sequence")
    add("--val-batches", type=int, default=4, help="validation batches per loss measurement")
    add("--lr", type=float, default=1e-3, help="peak learning rate of the training runs")
    add("--seed", type=int, default=0, help="seeds a preset's initialisation and the batch order")
    add("--out", help="output directory (default: runs/tune-<model>-<time>)")
    add("--overwrite", action="store_true", help="replace the outputs of an earlier tune in --out")
    return parser


def parse_candidates(text: str) -> list[str]:
    """Canonical candidate names of a comma list (``fp32,bf16,fp8`` -> ``float32, bfloat16, fp8``)."""
    from jaxmp.policy_search import candidate_name

    names = [part.strip() for part in text.split(",") if part.strip()]
    try:
        parsed = [candidate_name(name) for name in names]
    except ValueError as error:
        raise UsageError(f"--candidates: {error} (or fp8: bf16 compute with fp8 matmuls)") from None
    if not any(name != "float32" for name in parsed):
        raise UsageError(f"--candidates {text!r} names no dtype below float32; e.g. fp32,bf16,fp16")
    return parsed


def parse_budget(text: str) -> float:
    """``0.5%`` or ``0.005`` as a fraction; > 0."""
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"--budget {text!r} is not a number; give e.g. 0.5% or 0.005") from None
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"--budget must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input)."""
    return run_cli(_PROG, _tune_cli, argv)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    for name in _OUTPUTS:
        if (out / name).exists() and not overwrite:
            raise UsageError(f"{out / name} exists; choose another --out or pass --overwrite")
    check_output_file(out / "tune.json", "--out")


def _tune_cli(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    candidates, budget = parse_candidates(args.candidates), parse_budget(args.budget)
    if min(args.steps, args.depth, args.val_batches) < 1:
        raise UsageError("--steps, --depth and --val-batches must be >= 1")
    now = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/tune-{Path(args.model).name}-{now}")
    _check_out(out, args.overwrite)

    from jaxmp.cli.diagnose import load_model_and_batches
    from jaxmp.training.tune import tune

    model, params, train, val = load_model_and_batches(
        args.model,
        args.data,
        seed=args.seed,
        batches=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        val_batches=args.val_batches,
    )
    result = tune(
        model,
        params,
        train,
        val,
        candidates=candidates,
        objective=args.objective,
        budget=budget,
        steps=args.steps,
        depth=args.depth,
        learning_rate=args.lr,
        log=lambda message: print(f"tune: {message}", flush=True),
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, args, result)
    unit = "MiB" if result.objective == "memory" else "ms/step"
    reference, verified = result.reference, result.verified
    print(f"policy: {result.policy}")
    print(
        f"validation loss: fp32 {reference.eval_loss:.4f}, tuned {verified.eval_loss:.4f}; "
        f"change predicted {result.predicted_increase:+.4f}, verified {result.verified_increase:+.4f} "
        f"(budget {result.budget:+.4f})"
    )
    print(
        f"{result.objective}: predicted saving {_in_units(result.predicted_saving, result.objective):.3f} {unit}; "
        f"measured step {1e3 * reference.step_seconds:.1f} ms (fp32) vs {1e3 * verified.step_seconds:.1f} ms (tuned); "
        f"loss scale {result.loss_scale}, {verified.skipped_steps} skipped steps"
    )
    if not result.assignment:
        print(f"no unit is worth lowering for {result.objective} on this hardware: float32 it is")
    print(f"wrote {', '.join(str(out / name) for name in _OUTPUTS)}")
    return 0


def _in_units(saving: float, objective: str) -> float:
    return saving / 2**20 if objective == "memory" else 1e3 * saving


def _write_outputs(out: Path, args: argparse.Namespace, result: Any) -> None:
    from jaxmp import plots
    from jaxmp.files import write_text_atomically

    record = {
        "model": args.model,
        "candidates": args.candidates,
        "budget_fraction": parse_budget(args.budget),
        "policy": result.policy,
        "assignment": result.assignment,
        "objective": result.objective,
        "units": result.units,
        "budget": result.budget,
        "predicted_increase": result.predicted_increase,
        "verified_increase": _number(result.verified_increase),
        "predicted_saving": result.predicted_saving,
        "backed_off": result.backed_off,
        "loss_scale": result.loss_scale,
        "options": [
            dataclasses.asdict(option) | {"loss_increase": _number(option.loss_increase)}
            for option in result.options
        ],
        "reference": _run_json(result.reference),
        "verified": _run_json(result.verified),
    }
    write_text_atomically(out / "tune.json", json.dumps(record, indent=1) + "\n")
    write_text_atomically(out / "report.md", _report(args, result))
    plots.plot_sensitivity(result.options, result.assignment, out / "sensitivity.png")
    plots.plot_losses(
        {"fp32": _records(result.reference), "tuned": _records(result.verified)}, out / "loss.png"
    )


def _number(value: float) -> float | None:
    """``value``, or None (JSON null) when it is not finite: a unit that breaks under a dtype."""
    return value if math.isfinite(value) else None


def _run_json(run: Any) -> dict[str, Any]:
    fields = ("policy", "losses", "eval_loss", "step_seconds", "skipped_steps", "final_loss_scale")
    return {name: getattr(run, name) for name in fields}


def _records(run: Any) -> list[dict[str, Any]]:
    records = [{"step": step, "loss": loss} for step, loss in enumerate(run.losses, start=1)]
    records[-1]["val_loss"] = run.eval_loss
    return records


def _report(args: argparse.Namespace, result: Any) -> str:
    unit = "MiB" if result.objective == "memory" else "ms/step"
    lines = [
        f"# Tuned precision: {args.model}, objective {result.objective}, budget {args.budget}",
        "",
        f"Policy: `{result.policy}`",
        "",
        f"- validation loss: fp32 {result.reference.eval_loss:.4f}, tuned {result.verified.eval_loss:.4f} "
        f"(predicted {result.predicted_increase:+.4f}, verified {result.verified_increase:+.4f}, "
        f"budget {result.budget:+.4f})",
        f"- loss scale of the verification: {result.loss_scale}; skipped steps: {result.verified.skipped_steps}",
        f"- backed off after verification: {', '.join(result.backed_off) or 'none'}",
        "",
        f"| unit | candidate | predicted loss change | activations beyond range | saving ({unit}) | chosen |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for option in result.options:
        chosen = result.assignment.get(option.unit) == option.dtype
        lines.append(
            f"| `{option.unit}` | {option.dtype} | {option.loss_increase:+.2e} | {option.overflow:.2%} "
            f"| {_in_units(option.saving, result.objective):+.4f} | {'**yes**' if chosen else ''} |"
        )
    lines += ["", "![loss change and saving per unit](sensitivity.png)", "", "![verification](loss.png)", ""]
    return "\n".join(lines)
