"""8-bit Adam moments against fp32 moments on the default run: final validation loss side by side.

    python benchmarks/moments8_quality.py [--steps 400] [--lr 2e-3] [--runs default] [--reference-loss L]
        [--json out.json]

Trains the default model on the default corpus (``python -m jaxmp.train`` defaults: gpt2-tiny, tiny
Shakespeare, batch 32 x 64, same seed and batches) once per run of the chosen set, one after another, and
prints the final validation loss, its ratio to the set's first run (or to ``--reference-loss``), and
train-state bytes per parameter.

* ``default``: fp32 moments, int8, fp8, and int8 with ``.*embed.*:moments=float32`` (the embeddings keep
  fp32 moments), all with the default policy.
* ``lowlr`` (use with ``--lr 2e-4``, section "The small-update regime"): ``bf16`` with int8 moments, and
  ``pure-bf16`` with stochastic rounding and int8 moments (the 4-byte configuration); ``lowlr-reference``
  is its fp32-moment reference (``bf16``), a set of its own so that it can run alongside; pass its loss as
  ``--reference-loss``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import print_run_losses

from jaxmp.training.config import TrainConfig
from jaxmp.training.loop import run

RUN_SETS = {
    "default": (
        ("fp32 moments", dict()),
        ("int8 moments", dict(moment_dtype="int8")),
        ("fp8 moments", dict(moment_dtype="fp8")),
        ("int8, embeddings fp32", dict(moment_dtype="int8", policy="auto;.*embed.*:moments=float32")),
    ),
    "lowlr-reference": (("bf16, fp32 moments", dict(policy="bf16")),),
    "lowlr": (
        ("bf16, int8 moments", dict(policy="bf16", moment_dtype="int8")),
        (
            "pure-bf16 stochastic, int8 moments",
            dict(policy="pure-bf16", param_update="stochastic", moment_dtype="int8"),
        ),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    parser.add_argument("--runs", choices=sorted(RUN_SETS), default="default")
    parser.add_argument(
        "--reference-loss", type=float, help="divide by this val loss (default: the first run's)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, changes in RUN_SETS[args.runs]:
            config = TrainConfig(
                steps=args.steps, lr=args.lr, sample_tokens=0, out=f"{scratch}/{len(results)}", **changes
            )
            summary = run(config, show_progress=False).summary
            results.append({"run": name, **summary})
            print(json.dumps(results[-1]), flush=True)
    reference = args.reference_loss or results[0]["final_val_loss"]
    print_run_losses(results, reference, "ratio")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
