"""Pure-bf16 training: stochastic rounding and Kahan summation against fp32 master weights.

    python benchmarks/pure_bf16.py [--steps 400] [--lr 2e-3] [--json out.json]

Trains the default model on the default corpus (``python -m jaxmp.train`` defaults:
gpt2-tiny, tiny Shakespeare, batch 32 x 64, same seed and batches) four times:
``bf16`` (fp32 master weights) and ``pure-bf16`` with ``nearest``, ``stochastic`` and
``kahan`` param updates (bf16 Adam moments). Prints the final validation loss, its
ratio to ``bf16``, and train-state bytes per parameter as a markdown table. A lower ``--lr``
puts more of Adam's updates below half a bf16 ulp of their weights: the regime where
round-to-nearest loses them and stochastic rounding or Kahan summation must keep them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import print_run_losses

from jaxmp.training.config import TrainConfig
from jaxmp.training.loop import run

RUNS = (
    ("bf16 (fp32 master)", dict(policy="bf16")),
    ("pure-bf16 nearest", dict(policy="pure-bf16", param_update="nearest", moment_dtype="bfloat16")),
    ("pure-bf16 stochastic", dict(policy="pure-bf16", param_update="stochastic", moment_dtype="bfloat16")),
    ("pure-bf16 kahan", dict(policy="pure-bf16", param_update="kahan", moment_dtype="bfloat16")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, changes in RUNS:
            config = TrainConfig(
                steps=args.steps, lr=args.lr, sample_tokens=0, out=f"{scratch}/{len(results)}", **changes
            )
            summary = run(config, show_progress=False).summary
            results.append({"run": name, **summary})
            print(json.dumps(results[-1]), flush=True)
    reference = results[0]["final_val_loss"]
    print_run_losses(results, reference, "ratio to bf16")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
