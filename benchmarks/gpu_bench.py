"""One prepared GPU run: GPT-2-medium-sized training in bf16 — tokens/s, MFU, and what precision costs.

    python benchmarks/gpu_bench.py [--batch-size 8] [--seq-len 1024] [--json gpu_bench.json]
    python benchmarks/gpu_bench.py --smoke        # tiny shapes, any backend (checks the script on CPU)

Prints, for the ``gpt2-medium`` preset (355M parameters; layers scanned so five variants compile
within the time box) on one device:

* bf16 (``params=float32,compute=bfloat16``): step time, tokens/s and model FLOPs utilisation,
  ``tokens/s x (6 N + 12 L H Q T) / peak``, with N the parameters less the position table, L layers,
  H heads, Q head width, T sequence length, and the chip's dense bf16 peak (``--peak-tflops``
  overrides the built-in table);
* the step-time ratio bf16 : TF32 : strict fp32 (the fp32 policy compiled under
  ``jax.default_matmul_precision("tensorfloat32")`` and ``("float32")``);
* fp16 with dynamic loss scaling against fp16 without, the cost of scaling;
* fp8 matmuls (the ``fp8`` preset: delayed scaling, and ``fp8-current``) against bf16, with the
  compiled program's custom calls whose target names an fp8 type (``__cublas$lt$matmul$f8`` on
  Hopper-class GPUs: XLA made FP8 GEMMs of the quantise -> dequantise -> dot pattern; none means
  the dots ran emulated);
* each variant's compiled temporary memory (``memory_analysis``), where bf16 activations should
  take about half of fp32's (on CPU they do not: BENCHMARKS.md section 5).

Candidates are compiled first, then timed in interleaved rounds of ``--steps`` steps each. A
section that would start after ``--budget-s`` seconds is skipped, and a variant that fails (out of
memory: fp32 at batch 8 x 1024 wants tens of GiB; use ``--batch-size 4`` on a 40 GiB card) is
reported, not fatal.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
import types


def _stub_missing(names: tuple[str, ...]) -> list[str]:
    """Placeholder modules for optional imports of ``jaxmp`` (Hugging Face I/O), unused here."""
    missing = [name for name in names if importlib.util.find_spec(name.split(".")[0]) is None]
    for name in missing:
        sys.modules[name] = types.ModuleType(name)
    return missing


STUBBED = _stub_missing(("transformers", "safetensors", "safetensors.numpy"))

import jax  # noqa: E402
from common import environment, lm_loss_fn, markdown_table, random_batch  # noqa: E402

import jaxmp  # noqa: E402
from jaxmp import models  # noqa: E402

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity), matched against jax's device_kind in order.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def flops_per_token(config) -> float:
    """``6 N + 12 L H Q T`` (PaLM, appendix B); N excludes the position table (a lookup, no matmul)."""
    model = models.create_model(config)
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), config.max_positions))
    n = models.count_params(params) - config.max_positions * config.d_model
    return 6 * n + 12 * config.n_layers * config.n_heads * config.head_dim * config.max_positions


class Candidate:
    """A compiled train step of one policy / matmul precision, run ``steps`` at a time."""

    def __init__(self, config, policy: str, batch, matmul_precision: str | None, loss_scale: str = "auto"):
        model = models.create_model(config, policy)
        optimizer = jaxmp.make_optimizer(learning_rate=1e-4)
        parsed = jaxmp.get_policy(policy)
        with jax.default_matmul_precision(matmul_precision):
            params = models.init_params(model, jax.random.key(0), config.max_positions)
            self.state = jaxmp.TrainState.create(
                params=params,
                optimizer=optimizer,
                loss_scale=jaxmp.make_loss_scale(loss_scale, parsed),
                fp8=models.init_fp8_scaling(model),
            )
            step = jaxmp.make_train_step(lm_loss_fn(model), optimizer, parsed, cast_params=False)
            start = time.perf_counter()
            self.compiled = step.lower(self.state, batch).compile()
            self.compile_seconds = time.perf_counter() - start
        self.fp8_custom_calls = sorted(
            {
                name
                for name in re.findall(r'custom_call_target="([^"]+)"', self.compiled.as_text())
                if "f8" in name
            }
        )
        stats = self.compiled.memory_analysis()  # None where the backend does not report it
        self.temp_bytes = stats.temp_size_in_bytes if stats is not None else None
        self.batch = batch
        self.seconds: list[float] = []
        self.run(1)

    def run(self, steps: int) -> float:
        """Seconds per step over ``steps`` back-to-back steps (one device sync at the end)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def time_round_robin(candidates: dict[str, Candidate], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each candidate over ``rounds`` interleaved rounds."""
    for _ in range(rounds):
        for candidate in candidates.values():
            candidate.seconds.append(candidate.run(steps))
    return {name: sorted(c.seconds)[len(c.seconds) // 2] for name, c in candidates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script on any backend")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument(
        "--peak-tflops", type=float, help="the chip's dense bf16 peak (default: built-in table)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=400.0, help="start no section after this many seconds"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    started = time.perf_counter()
    preset, batch_size, seq_len = (
        ("gpt2-tiny", 2, 32) if args.smoke else ("gpt2-medium", args.batch_size, args.seq_len)
    )
    if args.smoke:
        args.steps, args.rounds = 2, 2
    config = models.get_config(preset, max_positions=seq_len, scan_layers=True)
    batch = random_batch(config.vocab_size, batch_size, seq_len)
    tokens = batch_size * seq_len
    device_kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_tflops(device_kind)
    sections = {
        "precision": {
            "bf16": ("bf16", None, "auto"),
            "tf32": ("fp32", "tensorfloat32", "auto"),
            "fp32": ("fp32", "float32", "auto"),
        },
        "fp8": {
            "bf16 (beside fp8)": ("bf16", None, "auto"),
            "fp8 delayed": ("fp8", None, "auto"),
            "fp8 current": ("fp8-current", None, "auto"),
        },
        "loss scaling": {
            "fp16 dynamic": ("fp16", None, "dynamic"),
            "fp16 none": ("fp16", None, "none"),
        },
    }
    flops = flops_per_token(config)
    seconds, compile_seconds, temp_bytes, skipped, failed, fp8_calls = {}, {}, {}, [], {}, {}
    for section, variants in sections.items():
        if time.perf_counter() - started > args.budget_s:
            skipped.append(section)
            continue
        candidates = {}
        for name, (policy, precision, loss_scale) in variants.items():
            try:  # e.g. out of memory for this variant: report it and go on
                candidates[name] = Candidate(config, policy, batch, precision, loss_scale)
                compile_seconds[name] = candidates[name].compile_seconds
                temp_bytes[name] = candidates[name].temp_bytes
                fp8_calls[name] = candidates[name].fp8_custom_calls
            except jax.errors.JaxRuntimeError as error:
                failed[name] = str(error).splitlines()[0][:300]
        seconds.update(time_round_robin(candidates, args.rounds, args.steps))
        del candidates
    rows = []
    for name, step_seconds in seconds.items():
        tflops = tokens / step_seconds * flops / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "n/a"
        ratio = f"{step_seconds / seconds['bf16']:.2f}" if "bf16" in seconds else "n/a"
        rows.append(
            (
                name,
                f"{compile_seconds[name]:.0f}",
                f"{step_seconds * 1e3:.1f}",
                f"{tokens / step_seconds:.0f}",
                f"{tflops:.1f}",
                mfu,
                ratio,
                f"{temp_bytes[name] / 2**30:.2f}" if temp_bytes[name] is not None else "n/a",
            )
        )
    results = {
        "model": preset,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "device_kind": device_kind,
        "peak_bf16_tflops": peak,
        "flops_per_token": flops,
        "step_seconds": seconds,
        "compile_seconds": compile_seconds,
        "temp_bytes": temp_bytes,
        "fp8_custom_calls": fp8_calls,
        "tokens_per_second": {name: tokens / s for name, s in seconds.items()},
        "mfu": {name: tokens / s * flops / 1e12 / peak for name, s in seconds.items()} if peak else None,
        "skipped_sections": skipped,
        "failed_variants": failed,
        "stubbed_modules": STUBBED,
        "wall_seconds": time.perf_counter() - started,
        "environment": environment(),
    }
    if "fp16 dynamic" in seconds and "fp16 none" in seconds:
        results["loss_scaling_overhead"] = seconds["fp16 dynamic"] / seconds["fp16 none"] - 1
    headers = (
        "variant",
        "compile s",
        "step ms",
        "tokens/s",
        "model TFLOP/s",
        "MFU",
        "step time vs bf16",
        "XLA temp GiB",
    )
    print(f"## GPU: {preset} {batch_size}x{seq_len} on {device_kind} (peak {peak} TFLOP/s bf16)\n")
    print(markdown_table(headers, rows))
    for name in ("fp8 delayed", "fp8 current"):
        if name in seconds and "bf16 (beside fp8)" in seconds:
            speedup = seconds["bf16 (beside fp8)"] / seconds[name]
            calls = ", ".join(fp8_calls[name]) or "none: the fp8 dots ran emulated"
            print(f"\n{name}: {speedup:.2f}x bf16's step speed (target >= 1.3x); fp8 custom calls: {calls}")
    if "loss_scaling_overhead" in results:
        print(f"\nfp16 dynamic loss scaling overhead: {results['loss_scaling_overhead']:+.1%}")
    if skipped:
        print(f"\nskipped (over --budget-s {args.budget_s:.0f}): {', '.join(skipped)}")
    for name, message in failed.items():
        print(f"\n{name} failed (try a smaller --batch-size): {message}")
    print(f"\nwall {results['wall_seconds']:.0f} s; jax {jax.__version__}; backend {jax.default_backend()}")
    if args.json:
        import json

        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
