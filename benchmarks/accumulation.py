"""Gradient accumulation: ``accum_steps=8`` micro-batches against one batch 8x larger, tokens/s.

    python benchmarks/accumulation.py [--model gpt2-tiny] [--batch-size 32] [--seq-len 64] [--policy bf16]
        [--repeats 5] [--json accumulation.json]

All three make one optimizer update from the same number of tokens: eight calls of the jitted
``make_train_step`` with ``optax.MultiSteps`` (fp32 accumulator); the same eight micro-steps in
one call (``scan_micro_steps=True``, a ``lax.scan`` over the window); or one step on the whole
batch without an accumulator. They are timed round-robin, one update at a time.
"""

from __future__ import annotations

import argparse

from common import interleaved_times, lm_train_step, markdown_table, median, report

ACCUM_STEPS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-tiny")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--policy", default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per candidate")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    micro = lm_train_step(args.model, args.policy, args.batch_size, args.seq_len, accum_steps=ACCUM_STEPS)
    scanned = lm_train_step(
        args.model, args.policy, args.batch_size, args.seq_len, accum_steps=ACCUM_STEPS, scan_micro_steps=True
    )
    large = lm_train_step(args.model, args.policy, ACCUM_STEPS * args.batch_size, args.seq_len)

    def accumulated_update():
        for _ in range(ACCUM_STEPS):
            micro.run_once()

    times = interleaved_times(
        {
            "accumulated": accumulated_update,
            "scanned window": scanned.run_once,
            "large batch": large.run_once,
        },
        args.repeats,
    )
    tokens = large.tokens
    results = {
        "model": args.model,
        "policy": args.policy,
        "micro_batch": [args.batch_size, args.seq_len],
        "accum_steps": ACCUM_STEPS,
        "tokens_per_update": tokens,
        "times": times,
        "tokens_per_second": {name: tokens / median(t["wall"]) for name, t in times.items()},
        "cpu_tokens_per_second": {name: tokens / median(t["cpu"]) for name, t in times.items()},
        "compile_seconds": {
            "accumulated": micro.compile_seconds,
            "scanned window": scanned.compile_seconds,
            "large batch": large.compile_seconds,
        },
    }
    tps, cpu_tps = results["tokens_per_second"], results["cpu_tokens_per_second"]
    labels = {
        "accumulated": f"{ACCUM_STEPS} calls of {args.batch_size}x{args.seq_len} (accum_steps={ACCUM_STEPS})",
        "scanned window": f"1 call, {ACCUM_STEPS} x {args.batch_size}x{args.seq_len} scanned",
        "large batch": f"1 x {ACCUM_STEPS * args.batch_size}x{args.seq_len}",
    }
    rows = [
        (
            label,
            f"{median(times[name]['wall']) * 1e3:.0f}",
            f"{median(times[name]['cpu']) * 1e3:.0f}",
            f"{tps[name]:.0f}",
            f"{tps[name] / tps['large batch']:.2f}",
            f"{cpu_tps[name] / cpu_tps['large batch']:.2f}",
        )
        for name, label in labels.items()
    ]
    headers = ("update", "ms per update", "CPU ms", "tokens/s", "vs large batch", "vs large batch (CPU)")
    title = f"Gradient accumulation ({args.model}, `{args.policy}`)"
    report(title, markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
