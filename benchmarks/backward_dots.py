"""The speed work, before and after: matmul kernels on this CPU, and train steps with and without fastdot.

    python benchmarks/backward_dots.py [--shapes tiny,gpt2] [--repeats 5] [--json backward_dots.json]

Kernels: one ``[M, K] x [K, N] -> fp32`` dot with fp32 operands, with bf16 operands run natively
(XLA's bf16 kernel, fast only with AMX), and with bf16 operands upcast to fp32 inside the compiled
dot (``DotAlgorithmPreset.F32_F32_F32``, what ``jaxmp.fastdot`` does on CPUs without AMX).
Steps: the same ``make_train_step`` with the layers' matmuls as plain autodiff of
``lax.dot_general(..., preferred_element_type=float32)`` and their attention as
``jax.nn.dot_product_attention`` ("before", jaxmp until fastdot), and with ``jaxmp.fastdot.matmul``
and ``jaxmp.fastdot.attention`` ("after"), fp32 and bf16, all timed round-robin in one process.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from common import interleaved_times, lm_train_step, markdown_table, median, report
from policies import SHAPES

from jaxmp import fastdot

KERNEL_SHAPES = ((2048, 2048, 2048), (2048, 256, 1024), (1024, 768, 3072))


def plain_matmul(x, w, w_contract_axis=0):
    """The layers' matmul before fastdot: plain autodiff of an fp32-accumulating dot."""
    dims = (((x.ndim - 1,), (w_contract_axis,)), ((), ()))
    return jax.lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=jnp.float32)


def xla_attention(q, k, v, mask):
    """The layers' attention before fastdot: autodiff of ``jax.nn.dot_product_attention``'s XLA path."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def kernels(repeats: int) -> list[dict]:
    """GFLOP/s of fp32, native bf16 and upcast bf16 dots for each of ``KERNEL_SHAPES``."""
    variants = {
        "fp32": (jnp.float32, None),
        "bf16 native": (jnp.bfloat16, None),
        "bf16 upcast": (jnp.bfloat16, jax.lax.DotAlgorithmPreset.F32_F32_F32),
    }
    candidates, flops = {}, {}
    for m, k, n in KERNEL_SHAPES:
        for name, (dtype, precision) in variants.items():
            x = jnp.ones((m, k), dtype)
            w = jnp.ones((k, n), dtype)
            dot = jax.jit(
                lambda a, b, precision=precision: jax.lax.dot_general(
                    a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
                )
            )
            key = f"{m}x{k}x{n} {name}"
            jax.block_until_ready(dot(x, w))
            candidates[key] = lambda dot=dot, x=x, w=w: jax.block_until_ready(dot(x, w))
            flops[key] = 2 * m * k * n
    times = interleaved_times(candidates, repeats)
    return [
        {"kernel": key, "gflops": flops[key] / median(t["wall"]) / 1e9, "seconds": median(t["wall"])}
        for key, t in times.items()
    ]


def steps(shape: str, repeats: int) -> list[dict]:
    """Train-step seconds before and after fastdot, fp32 and bf16, for ``shape``."""
    preset, batch_size, seq_len = SHAPES[shape]
    candidates, compiled = {}, {}
    for policy in ("fp32", "bf16"):
        for when, matmul, attention in (
            ("before", plain_matmul, xla_attention),
            ("after", fastdot.matmul, fastdot.attention),
        ):
            originals = fastdot.matmul, fastdot.attention
            fastdot.matmul, fastdot.attention = matmul, attention  # both read when the step is traced
            try:
                step = lm_train_step(preset, policy, batch_size, seq_len)
            finally:
                fastdot.matmul, fastdot.attention = originals
            candidates[f"{policy} {when}"] = step.run_once
            compiled[f"{policy} {when}"] = step
    times = interleaved_times(candidates, repeats)
    rows = []
    for name, t in times.items():
        policy, when = name.split()
        step = compiled[name]
        stats = step.compiled.memory_analysis()
        rows.append(
            {
                "shape": shape,
                "model": preset,
                "policy": policy,
                "dots": when,
                "step_seconds": median(t["wall"]),
                "cpu_seconds": median(t["cpu"]),
                "tokens_per_second": step.tokens / median(t["wall"]),
                "speedup": median(times[f"{policy} before"]["wall"]) / median(t["wall"]),
                "cpu_speedup": median(times[f"{policy} before"]["cpu"]) / median(t["cpu"]),
                "temp_bytes": stats.temp_size_in_bytes,
                "times": t,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,gpt2", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per candidate")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    kernel_rows = kernels(max(args.repeats, 5))
    step_rows = [row for shape in args.shapes.split(",") for row in steps(shape, args.repeats)]
    kernel_table = markdown_table(
        ("dot [M,K]x[K,N] -> fp32", "GFLOP/s", "ms"),
        [(r["kernel"], f"{r['gflops']:.0f}", f"{r['seconds'] * 1e3:.1f}") for r in kernel_rows],
    )
    step_table = markdown_table(
        (
            "shape",
            "policy",
            "dots",
            "step ms",
            "CPU ms",
            "tokens/s",
            "speedup",
            "speedup (CPU)",
            "temp GiB",
        ),
        [
            (
                f"{r['model']} {SHAPES[r['shape']][1]}x{SHAPES[r['shape']][2]}",
                f"`{r['policy']}`",
                r["dots"],
                f"{r['step_seconds'] * 1e3:.0f}",
                f"{r['cpu_seconds'] * 1e3:.0f}",
                f"{r['tokens_per_second']:.0f}",
                f"{r['speedup']:.2f}x",
                f"{r['cpu_speedup']:.2f}x",
                f"{r['temp_bytes'] / 2**30:.2f}",
            )
            for r in step_rows
        ],
    )
    results = {"kernels": kernel_rows, "steps": step_rows}
    report("Backward dots: before and after fastdot", f"{kernel_table}\n\n{step_table}", results, args.json)


if __name__ == "__main__":
    main()
