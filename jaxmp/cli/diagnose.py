"""``python -m jaxmp.diagnose``: where a precision policy loses a model's activations and gradients.

    python -m jaxmp.diagnose --model gpt2-tiny --policy fp16 --out runs/diagnose-fp16

``--model`` is a preset (freshly initialised with ``--seed``), a jaxmp run directory (its newest
checkpoint) or a Hugging Face directory. The batches are the first ``--batches`` training batches
of ``--data`` (default: the built-in tiny Shakespeare) under the model's tokenizer. Writes
``diagnostics.json`` (every entry, see :mod:`jaxmp.diagnostics`) and ``grad_hist.png`` into
``--out``, and prints the recommended static loss scale and the entries most at risk; with fp8
matmuls in the policy, also the fp8 tensors that lose most to saturation and underflow, each scaled
by its own amax (a run's delayed scales: ``jaxmp.diagnostics.diagnose(..., fp8_scaling=state.fp8)``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxmp.cli import UsageParser, check_output_file, run_cli
from jaxmp.errors import UsageError

__all__ = ["main", "load_model_and_batches", "format_table", "format_fp8_table"]

_PROG = "python -m jaxmp.diagnose"


def _build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=_PROG,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", default="gpt2-tiny", help="preset name, jaxmp run directory or Hugging Face directory")
    add("--policy", default="fp16", help="precision policy to diagnose, e.g. params=float32,compute=float16")
    add("--loss-scale", default="auto", help="auto | none | dynamic | static:N, as in jaxmp.train")
    add("--data", help="text file or directory of *.txt (default: the built-in tiny Shakespeare)")
    add("--batches", type=int, default=4, help="training batches to run forward and backward")
    add("--batch-size", type=int, default=8, help="sequences per batch")
    add("--seq-len", type=int, default=64, help="tokens per sequence")
    add("--seed", type=int, default=0, help="seeds a preset's initialisation and the batch order")
    add("--top", type=int, default=12, help="entries shown in the table of those most at risk")
    add("--out", help="output directory (default: runs/diagnose-<model>-<time>)")
    add("--overwrite", action="store_true", help="replace diagnostics.json and grad_hist.png in --out")
    return parser


def load_model_and_batches(
    model: str,
    data: str | None,
    *,
    seed: int,
    batches: int,
    batch_size: int,
    seq_len: int,
    val_batches: int = 0,
) -> tuple[Any, Any, list[dict], list[dict]]:
    """Returns ``(model, float32 params, training batches, validation batches)`` for a preset, run
    directory or Hugging Face directory (at most ``val_batches`` of the latter: the corpus' held-out
    split).

    Raises:
      UsageError: an unknown model, a model that is not a causal LM, or a sequence too long for it.
      DataError: unreadable data or too few tokens (for a validation batch too, when asked for one).
    """
    import jax

    from jaxmp import models
    from jaxmp.data.corpus import read_corpus
    from jaxmp.data.lm import LMDataConfig, LMDataset, pack_tokens
    from jaxmp.data.tokenizer import load_tokenizer
    from jaxmp.inference import load as serving

    if min(batches, batch_size, seq_len) < 1:
        raise UsageError("--batches, --batch-size and --seq-len must be >= 1")
    corpus = read_corpus(data)  # DataError before the model is loaded
    if Path(model).is_dir():
        loaded = serving.load_model(model, "fp32")
        flax_model, params, tokenizer = loaded.model, loaded.params, loaded.tokenizer
    else:
        tokenizer = load_tokenizer("byte")
        try:
            config = models.get_config(model, vocab_size=tokenizer.vocab_size)
        except ValueError as error:
            raise UsageError(f"--model: {error}; or give a run or Hugging Face directory") from None
        if not models.is_causal_lm(config):
            raise UsageError(
                f"--model {model} is not a causal language model; use a gpt2-* or llama-* preset"
            )
        flax_model, params = models.create_model(config, "fp32"), None
    if seq_len > flax_model.config.max_positions:
        raise UsageError(
            f"--seq-len {seq_len} is beyond the model's {flax_model.config.max_positions} positions"
        )
    if params is None:
        params = models.init_params(flax_model, jax.random.key(seed), seq_len)
    tokens_N = pack_tokens(corpus, tokenizer, LMDataConfig().cache_dir)
    dataset = LMDataset(tokens_N, int(len(tokens_N) * LMDataConfig().val_fraction), tokenizer)
    train = [dataset.batch(seed, step, batch_size, seq_len) for step in range(batches)]
    val = list(dataset.val_batches(batch_size, seq_len, val_batches)) if val_batches else []
    return flax_model, params, train, val


def _percent(fraction: float, digits: int | None = None) -> str:
    """``fraction`` in percent: two decimals, or ``digits`` significant digits; ``0`` for none."""
    if not fraction:
        return "0"
    return f"{100 * fraction:.2f}%" if digits is None else f"{100 * fraction:.{digits}g}%"


def format_table(diagnosis: Any, top: int) -> str:
    """A markdown table of the ``top`` entries most at risk (fractions at the settled loss scale)."""
    lines = [
        "| kind | name | dtype | max abs (fp32) | overflow | underflow | subnormal | policy zeros | rel. error |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in diagnosis.at_risk(top):
        reference = entry.at_scale.reference.fractions()
        zeros = entry.at_scale.policy.fractions()["zero"]
        lines.append(
            f"| {entry.kind} | `{entry.name}` | {entry.dtype} | {reference['max_abs']:.3g} | {_percent(reference['overflow'])} "
            f"| {_percent(reference['underflow'])} | {_percent(reference['subnormal'])} | {_percent(zeros)} "
            f"| {entry.at_scale.relative_error:.3g} |"
        )
    return "\n".join(lines)


def format_fp8_table(tensors: Sequence[Any], top: int) -> str:
    """A markdown table of the ``top`` fp8 tensors with the largest saturated + underflowed fraction."""
    lines = [
        "| fp8 dot | tensor | format | amax | scale | saturated | underflow |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for t in sorted(tensors, key=lambda t: t.saturated + t.underflow, reverse=True)[:top]:
        lines.append(
            f"| `{t.dot}` | {t.tensor} | {t.format} | {t.amax:.3g} | {t.scale:.4g} | {_percent(t.saturated, 2)} "
            f"| {_percent(t.underflow, 2)} |"
        )
    return "\n".join(lines)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    from jaxmp.files import write_text_atomically

    write_text_atomically(path, json.dumps(record, indent=1) + "\n")


def _check_out(out: Path, overwrite: bool) -> None:
    """Raises ``UsageError`` unless ``out`` can take diagnostics.json and grad_hist.png."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    for name in ("diagnostics.json", "grad_hist.png"):
        if (out / name).exists() and not overwrite:
            raise UsageError(f"{out / name} exists; choose another --out or pass --overwrite")
    check_output_file(out / "diagnostics.json", "--out")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input)."""
    return run_cli(_PROG, _diagnose_cli, argv)


def _diagnose_cli(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    from jaxmp import diagnostics, plots, precision, scaling

    now = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/diagnose-{Path(args.model).name}-{now}")
    _check_out(out, args.overwrite)
    try:
        policy = precision.get_policy(args.policy)
        scaling.make_loss_scale(args.loss_scale, policy)
    except ValueError as error:
        raise UsageError(f"--policy/--loss-scale: {error}") from None
    model, params, batches, _ = load_model_and_batches(
        args.model,
        args.data,
        seed=args.seed,
        batches=args.batches,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    diagnosis = diagnostics.diagnose(model, params, policy, batches, loss_scale=args.loss_scale)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
    }
    _write_json(out / "diagnostics.json", record | diagnosis.to_json(args.top))
    title = f"{args.model} under {args.policy} (--loss-scale {args.loss_scale}: {diagnosis.loss_scale:g})"
    plots.plot_grad_histograms(diagnosis.histograms, title, out / "grad_hist.png")
    recommended = diagnosis.recommended_loss_scale
    print(f"policy: {policy}")
    print(
        f"recommended static loss scale (largest power of two without overflow): {recommended or 'none works'}"
    )
    if not diagnosis.uses_float16:
        print("  (nothing here is float16, so no loss scaling is needed: this is what float16 would take)")
    print(f"loss scale --loss-scale {args.loss_scale} settles on: {diagnosis.loss_scale:g}")
    print(format_table(diagnosis, args.top))
    if diagnosis.fp8:
        print(f"fp8 matmul tensors (current scaling: each by its own amax), {len(diagnosis.fp8)} in all:")
        print(format_fp8_table(diagnosis.fp8, args.top))
    print(f"wrote {out / 'diagnostics.json'} and {out / 'grad_hist.png'}")
    return 0
