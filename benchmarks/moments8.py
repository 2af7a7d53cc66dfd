"""8-bit Adam moments: train-state bytes per parameter of gpt2 (124M), and step time against bf16 moments.

    python benchmarks/moments8.py [--parts bytes,step,update] [--repeats 15] [--json moments8.json]

Bytes: the params and optimizer state of ``gpt2`` built with ``jax.eval_shape`` (nothing allocated), counted
by ``jaxmp.lowp.state_bytes_per_param`` (8-bit codes, their fp32 block scales, the fp32 moments of norms,
biases and small tensors, counters and PRNG keys all included). Step time: the default run's train step
(gpt2-tiny, batch 32 x 64, the ``auto`` policy) with float32, bfloat16, int8 and fp8 moments, compiled
first, then run round-robin; medians of wall and CPU time. Update alone: ``optimizer.update`` on one
[4096, 4096] fp32 tensor (16.8M values, MiniLM's size), where the moments' element-wise work is all there is.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from common import interleaved_times, lm_train_step, markdown_table, median, report

import jaxmp
from jaxmp import lowp, models

BYTES_CASES = (  # (name, policy, param update, moment storage, policy override of the moments)
    ("fp32 params, fp32 moments", "fp32", "nearest", "float32", ""),
    ("fp32 params, int8 moments", "fp32", "nearest", "int8", ""),
    ("fp32 params, fp8 moments", "fp32", "nearest", "fp8", ""),
    ("pure-bf16 stochastic, bf16 moments", "pure-bf16", "stochastic", "bfloat16", ""),
    ("pure-bf16 stochastic, int8 moments", "pure-bf16", "stochastic", "int8", ""),
    ("pure-bf16 stochastic, fp8 moments", "pure-bf16", "stochastic", "fp8", ""),
    ("pure-bf16 kahan, int8 moments", "pure-bf16", "kahan", "int8", ""),
    (
        "pure-bf16 stochastic, int8, embeddings fp32",
        "pure-bf16",
        "stochastic",
        "int8",
        ";.*embed.*:moments=float32",
    ),
)
STEP_MOMENTS = ("float32", "bfloat16", "int8", "fp8")


def bytes_per_param(policy: str, param_update: str, moment_dtype: str, override: str) -> float:
    model = models.get_model("gpt2", policy)
    params = jax.eval_shape(lambda key: models.init_params(model, key, 8), jax.random.key(0))
    optimizer = jaxmp.make_optimizer(
        moment_dtype=moment_dtype, param_update=param_update, policy=policy + override
    )
    return lowp.state_bytes_per_param(params, jax.eval_shape(optimizer.init, params))


def update_only(moment_dtype: str):
    """A blocking call of the jitted optimizer update on one 4096 x 4096 tensor (state donated)."""
    optimizer = jaxmp.make_optimizer(moment_dtype=moment_dtype)
    params = {"kernel": jnp.full((4096, 4096), 0.02)}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3), params)
    update = jax.jit(optimizer.update, donate_argnums=1)
    state = [optimizer.init(params)]

    def run_once():
        updates, state[0] = update(grads, state[0], params)
        jax.block_until_ready((updates, state[0]))

    run_once()
    return run_once


def bytes_table() -> tuple[str, dict]:
    rows = [(name, f"{bytes_per_param(*case):.3f}") for name, *case in BYTES_CASES]
    return markdown_table(["gpt2 (124M) train state", "bytes/param"], rows), dict(rows)


def _timing_rows(times: dict, extra: dict[str, tuple[str, ...]] | None = None) -> list[tuple[str, ...]]:
    """Per moment storage: median wall and CPU ms and the wall-time ratio to bf16 moments, then ``extra``."""
    reference = median(times["bfloat16"]["wall"])
    return [
        (
            moments,
            f"{median(times[moments]['wall']) * 1e3:.0f}",
            f"{median(times[moments]['cpu']) * 1e3:.0f}",
            f"{median(times[moments]['wall']) / reference:.3f}",
            *(extra or {}).get(moments, ()),
        )
        for moments in STEP_MOMENTS
    ]


def step_table(repeats: int) -> tuple[str, dict]:
    steps = {
        moments: lm_train_step("gpt2-tiny", "auto", 32, 64, moment_dtype=moments) for moments in STEP_MOMENTS
    }
    times = interleaved_times({moments: step.run_once for moments, step in steps.items()}, repeats)
    rows = _timing_rows(times, {moments: (f"{step.compile_seconds:.1f}",) for moments, step in steps.items()})
    headers = ["moments", "wall ms/step", "CPU ms/step", "wall vs bf16", "compile s"]
    return markdown_table(headers, rows), times


def update_table(repeats: int) -> tuple[str, dict]:
    times = interleaved_times({moments: update_only(moments) for moments in STEP_MOMENTS}, repeats)
    rows = _timing_rows(times)
    return markdown_table(["moments", "update alone, wall ms", "CPU ms", "wall vs bf16"], rows), times


PARTS = {"bytes": lambda repeats: bytes_table(), "step": step_table, "update": update_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default="bytes,step,update", help=f"comma-separated, of {', '.join(PARTS)}"
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    tables, results = [], {}
    for part in args.parts.split(","):
        table, results[part] = PARTS[part](args.repeats)
        tables.append(table)
        print(table, "\n", flush=True)
    report(
        "8-bit moments (gpt2 bytes; gpt2-tiny 32x64 step, auto policy; update alone)",
        "\n\n".join(tables),
        results,
        args.json,
    )


if __name__ == "__main__":
    main()
