"""What jaxmp's machinery costs: ``make_train_step`` against a hand-written JAX step, and loss scaling.

    python benchmarks/overhead.py [--shapes tiny,gpt2] [--repeats 7] [--json overhead.json]

The hand-written step is the minimal one a JAX user writes: ``value_and_grad`` of the same loss of
the same model (same per-module dtypes), the same optax chain, ``apply_updates``, jitted with the
params and optimizer state donated; no policy casts, no loss scale, no finiteness checks, no
metrics beyond the loss. Loss scaling: the fp16 policy with ``--loss-scale dynamic`` against
``none``. Every candidate of a shape is timed round-robin in one process.
"""

from __future__ import annotations

import argparse

import jax
import optax
from common import LMStep, interleaved_times, lm_train_step, markdown_table, median, report
from policies import SHAPES


class HandWrittenStep:
    """The minimal JAX train step over the same model, loss, optimizer and batch as ``like``."""

    def __init__(self, like: LMStep):
        loss_fn, optimizer = like.loss_fn, like.optimizer

        def step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0])(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.params = jax.tree.map(lambda x: x.copy(), like.state.params)
        self.opt_state = optimizer.init(self.params)
        self.batch = like.batch
        self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.opt_state, self.batch)
        self.compiled = self.compiled.compile()
        self.run_once()

    def run_once(self) -> None:
        self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.batch)
        jax.block_until_ready((self.params, self.opt_state, loss))


def measure(shape: str, repeats: int) -> dict:
    preset, batch_size, seq_len = SHAPES[shape]
    candidates = {}
    for policy in ("fp32", "bf16"):
        jaxmp_step = lm_train_step(preset, policy, batch_size, seq_len)
        candidates[f"{policy} jaxmp"] = jaxmp_step.run_once
        candidates[f"{policy} hand-written"] = HandWrittenStep(jaxmp_step).run_once
    for loss_scale in ("none", "dynamic"):
        step = lm_train_step(preset, "fp16", batch_size, seq_len, loss_scale=loss_scale)
        candidates[f"fp16 loss-scale {loss_scale}"] = step.run_once
    times = interleaved_times(candidates, repeats)
    wall = {name: median(t["wall"]) for name, t in times.items()}
    cpu = {name: median(t["cpu"]) for name, t in times.items()}

    def overhead(seconds, name, baseline):
        return seconds[name] / seconds[baseline] - 1

    comparisons = {
        "fp32: make_train_step vs hand-written": ("fp32 jaxmp", "fp32 hand-written"),
        "bf16: make_train_step vs hand-written": ("bf16 jaxmp", "bf16 hand-written"),
        "fp16: dynamic loss scale vs none": ("fp16 loss-scale dynamic", "fp16 loss-scale none"),
    }
    return {
        "shape": shape,
        "model": preset,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "step_seconds": wall,
        "cpu_seconds": cpu,
        "times": times,
        "overhead": {label: overhead(wall, *pair) for label, pair in comparisons.items()},
        "cpu_overhead": {label: overhead(cpu, *pair) for label, pair in comparisons.items()},
        "pairs": comparisons,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,gpt2", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per candidate")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = [measure(shape, args.repeats) for shape in args.shapes.split(",")]
    rows = [
        (
            f"{r['model']} {r['batch_size']}x{r['seq_len']}",
            label,
            f"{r['step_seconds'][name] * 1e3:.0f} vs {r['step_seconds'][baseline] * 1e3:.0f}",
            f"{r['overhead'][label]:+.1%}",
            f"{r['cpu_seconds'][name] * 1e3:.0f} vs {r['cpu_seconds'][baseline] * 1e3:.0f}",
            f"{r['cpu_overhead'][label]:+.1%}",
        )
        for r in results
        for label, (name, baseline) in r["pairs"].items()
    ]
    headers = ("shape", "comparison", "step ms", "overhead", "CPU ms", "overhead (CPU)")
    report("Overhead", markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
