"""Train-step time and tokens/s of each precision policy, after compilation; compile time apart.

    python benchmarks/policies.py [--shapes tiny,gpt2] [--repeats 5] [--json policies.json]

Shapes: ``tiny`` is ``gpt2-tiny`` at batch 32 x seq 64 (the default ``python -m jaxmp.train`` run),
``gpt2`` the 124M-parameter GPT-2 at batch 4 x seq 256. Each shape's policies are compiled
first, then timed round-robin in one process; the step is ``jaxmp.make_train_step`` exactly as
the CLI builds it (per-module casts, AdamW with clipping, the policy's default loss scale).
"""

from __future__ import annotations

import argparse

from common import interleaved_times, lm_train_step, markdown_table, median, report

POLICIES = ("fp32", "bf16", "fp16", "pure-bf16")
SHAPES = {"tiny": ("gpt2-tiny", 32, 64), "gpt2": ("gpt2", 4, 256)}


def measure(shape: str, repeats: int) -> list[dict]:
    """One result per policy for ``shape``."""
    preset, batch_size, seq_len = SHAPES[shape]
    steps = {policy: lm_train_step(preset, policy, batch_size, seq_len) for policy in POLICIES}
    times = interleaved_times({policy: step.run_once for policy, step in steps.items()}, repeats)
    wall = {policy: median(t["wall"]) for policy, t in times.items()}
    cpu = {policy: median(t["cpu"]) for policy, t in times.items()}
    return [
        {
            "shape": shape,
            "model": preset,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "policy": policy,
            "compile_seconds": step.compile_seconds,
            "step_seconds": wall[policy],
            "cpu_seconds": cpu[policy],
            "times": times[policy],
            "tokens_per_second": step.tokens / wall[policy],
            "speedup_vs_fp32": wall["fp32"] / wall[policy],
            "cpu_speedup_vs_fp32": cpu["fp32"] / cpu[policy],
        }
        for policy, step in steps.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,gpt2", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per policy")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = [row for shape in args.shapes.split(",") for row in measure(shape, args.repeats)]
    rows = [
        (
            f"{r['model']} {r['batch_size']}x{r['seq_len']}",
            f"`{r['policy']}`",
            f"{r['compile_seconds']:.1f}",
            f"{r['step_seconds'] * 1e3:.0f}",
            f"{r['cpu_seconds'] * 1e3:.0f}",
            f"{r['tokens_per_second']:.0f}",
            f"{r['speedup_vs_fp32']:.2f}x",
            f"{r['cpu_speedup_vs_fp32']:.2f}x",
        )
        for r in results
    ]
    headers = ("shape", "policy", "compile s", "step ms", "CPU ms", "tokens/s", "vs fp32", "vs fp32 (CPU)")
    report("Per-policy train step", markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
