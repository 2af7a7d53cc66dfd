"""Memory per policy: train-state bytes per parameter, and XLA's compiled memory of the train step.

    python benchmarks/memory.py [--models gpt2,gpt2-medium] [--shapes 4x256,8x1024] [--json memory.json]

Nothing full-size is allocated: the state comes from ``jax.eval_shape`` and the step is lowered on
``ShapeDtypeStruct`` arguments, then compiled for this backend. State bytes per parameter count
params + optimizer state (+ the fp32 MultiSteps accumulator with ``accum_steps=8``) with
``jaxmp.lowp.state_bytes_per_param``. ``memory_analysis()`` gives the step's arguments (state and
batch), outputs, temporaries and XLA's peak estimate; the state is donated, so outputs alias
arguments and live memory is about arguments + temporaries (XLA:CPU's own peak figure counts only
the arguments). ``--shapes`` are batch x sequence length; at 1024 tokens the attention dominates.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from common import lm_loss_fn, markdown_table, report

import jaxmp
from jaxmp import lowp, models

POLICIES = ("fp32", "bf16", "fp16", "pure-bf16")
GIB = 2**30


def _state_shapes(model, policy: str, seq_len: int, accum_steps: int):
    optimizer = jaxmp.make_optimizer(accum_steps=accum_steps)

    def create():
        params = models.init_params(model, jax.random.key(0), seq_len)
        loss_scale = jaxmp.default_loss_scale(jaxmp.get_policy(policy))
        return jaxmp.TrainState.create(params=params, optimizer=optimizer, loss_scale=loss_scale)

    return optimizer, jax.eval_shape(create)


def measure(preset: str, policy: str, batch_size: int, seq_len: int, **model_options) -> dict:
    """State bytes per parameter and the compiled step's memory (and compile time) for one case;
    ``model_options`` are model config fields such as ``scan_layers=True``."""
    model = models.get_model(preset, policy, **model_options)
    _, state8 = _state_shapes(model, policy, seq_len, accum_steps=8)
    optimizer, state = _state_shapes(model, policy, seq_len, accum_steps=1)
    batch = {
        name: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for name in ("input_ids", "targets")
    }
    step = jaxmp.make_train_step(lm_loss_fn(model), optimizer, policy, cast_params=False)
    start = time.perf_counter()
    stats = step.lower(state, batch).compile().memory_analysis()
    compile_seconds = time.perf_counter() - start
    return {
        "model": preset,
        "policy": policy,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params": models.count_params(state.params),
        "state_bytes_per_param": lowp.state_bytes_per_param(state.params, state.opt_state),
        "state_bytes_per_param_accum8": lowp.state_bytes_per_param(state8.params, state8.opt_state),
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "peak_bytes": stats.peak_memory_in_bytes,
        "compile_seconds": compile_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,gpt2-medium", help="comma-separated presets")
    parser.add_argument("--shapes", default="4x256,8x1024", help="comma-separated BATCHxSEQ")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    results = [
        measure(preset, policy, batch_size, seq_len)
        for preset in args.models.split(",")
        for batch_size, seq_len in shapes
        for policy in POLICIES
    ]
    rows = [
        (
            f"{r['model']} ({r['params'] / 1e6:.0f}M) {r['batch_size']}x{r['seq_len']}",
            f"`{r['policy']}`",
            f"{r['state_bytes_per_param']:.2f}",
            f"{r['state_bytes_per_param_accum8']:.2f}",
            f"{r['argument_bytes'] / GIB:.2f}",
            f"{r['output_bytes'] / GIB:.2f}",
            f"{r['temp_bytes'] / GIB:.2f}",
            f"{(r['argument_bytes'] + r['temp_bytes']) / GIB:.2f}",
            f"{r['peak_bytes'] / GIB:.2f}",
        )
        for r in results
    ]
    headers = (
        "model",
        "policy",
        "state B/param",
        "state B/param (accum 8)",
        "arguments GiB",
        "outputs GiB",
        "temp GiB",
        "arguments + temp GiB",
        "XLA peak GiB",
    )
    report("Memory", markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
