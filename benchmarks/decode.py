"""Serving in low precision: a trained model's quality under each policy, and decode speed at GPT-2 size.

    python benchmarks/decode.py [--run RUN_DIR|HF_DIR [--data TEXT]] [--skip-speed] [--skip-torch] [--json out.json]

Quality (with ``--run``: a directory made by ``python -m jaxmp.train``, or a Hugging Face GPT-2 directory
with ``--data``): perplexity under each serving policy as a ratio to fp32 (targets: within 1% for int8
weights, 2% for fp8 weights and 8-bit KV caches), greedy continuations of 20 prompts compared token by
token with fp32's, and the bytes of the weights as stored (:func:`jaxmp.inference.perplexity.evaluate_policies`).
Speed: greedy decoding of the 124M-parameter ``gpt2`` shape with random weights (the same for every
row), 32-token prompts and 64 new tokens, batch 1 and 8: jaxmp under fp32, bf16 weights, int8 weights
(weight-only) and int8 weights with int8 dots, beside transformers' PyTorch ``generate`` in fp32 and
bf16 on the same weights. Each row is the best of 3 runs, the rows interleaved; compilation excluded.
"bound share" is the time reading every weight and the whole KV cache once per step takes at the
memory bandwidth a copy of 1 GiB measures in the same run (bytes read + written per second), over the
measured step time. "program MiB" is the compiled program's arguments plus temporaries: the weights
and, where the compiler keeps converted copies of 8-bit or bf16 weights, those too.
Prints markdown tables and the issue's targets; ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile
import time
from pathlib import Path

# PyTorch's OpenMP threads busy-wait at barriers; on a shared machine that stalls them (torch_peer.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np
from common import environment

from jaxmp import hf, models, quantize
from jaxmp.data.lm import LMDataConfig, load_lm_dataset
from jaxmp.inference.decode import generate, init_cache
from jaxmp.inference.load import load_model
from jaxmp.inference.perplexity import evaluate_policies, markdown_table
from jaxmp.lowp import tree_bytes
from jaxmp.precision import get_policy

QUALITY_POLICIES = {
    "fp32": "fp32",
    "bf16 compute": "bf16",
    "fp16 compute": "fp16",
    "bf16 params": "params=bfloat16,compute=bfloat16",
    "fp16 params": "params=float16,compute=float16",
    # fp8 operands (weights and activations scaled per tensor by their own amax, E4M3), bf16 elsewhere
    "fp8 matmuls": "fp8",
    "int8 weights": "fp32,weights=int8",
    "int8 weights and embeddings": "fp32,weights=int8;.*embed.*:weights=int8",
    "fp8 weights": "fp32,weights=fp8",
    "int8 weights, int8 dots": "fp32,weights=int8,matmul=int8",
    "int8 KV cache": "fp32,kv=int8",
    "fp8 KV cache": "fp32,kv=fp8",
    "bf16, int8 weights and KV cache": "bf16,weights=int8,kv=int8",
}
SPEED_POLICIES = {
    "fp32": "fp32",
    "bf16 weights": "params=bfloat16,compute=bfloat16",
    # every weight in 8 bits, the tied embedding / LM head included (it is a third of gpt2's weights)
    "int8 weights": "fp32,weights=int8;.*embed.*:weights=int8",
    "int8 weights, int8 dots": "fp32,weights=int8,matmul=int8;.*embed.*:weights=int8;lm_head:matmul=int8",
}
PROMPTS, SPEED_PROMPT_TOKENS, SPEED_NEW_TOKENS, SPEED_REPEATS = 20, 32, 64, 3


def quality(model_dir: str, data: str | None) -> dict:
    """Validation perplexity per policy, and greedy agreement with fp32 over ``PROMPTS`` prompts.

    ``model_dir`` is a run directory (its validation split) or a Hugging Face directory (``data``: a
    text file, its last tenth evaluated)."""
    loaded = load_model(model_dir, "fp32")
    if loaded.run_config is not None:
        run = loaded.run_config
        cache_dir = str(Path(model_dir) / "cache")
        data_config = LMDataConfig(data=run.data, tokenizer=run.tokenizer, cache_dir=cache_dir)
        tokens_N, seq_len = load_lm_dataset(data_config).val_tokens, run.seq_len
    else:
        text = Path(data).read_text()
        tokens_N, seq_len = loaded.tokenizer.encode(text[-len(text) // 10 :]), 128
    tokens_N = np.asarray(tokens_N, np.int32)
    results = evaluate_policies(
        loaded, list(QUALITY_POLICIES.values()), tokens_N, seq_len, batch_size=16, prompts=PROMPTS
    )
    print(f"## Quality of {model_dir} ({len(tokens_N)} validation tokens, seq_len {seq_len})\n")
    print("| serving | " + markdown_table(results).split("\n", 1)[0].removeprefix("| "))
    print("| --- | " + markdown_table(results).split("\n")[1].removeprefix("| "))
    for name, line in zip(QUALITY_POLICIES, markdown_table(results).split("\n")[2:], strict=True):
        print(f"| {name} {line}")
    print()
    rows = [
        dict(dataclasses.asdict(result), name=name)
        for name, result in zip(QUALITY_POLICIES, results, strict=True)
    ]
    return {"model": model_dir, "validation_tokens": len(tokens_N), "seq_len": seq_len, "policies": rows}


def memory_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second a copy of a ``mib`` MiB buffer moves (read + written), best of ``repeats``."""
    source = np.ones(mib * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    best = min(_seconds(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _torch_generate(directory: Path, dtype_name: str):
    """A callable ``(prompts [B, P]) -> seconds`` running transformers' greedy ``generate``."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()

    def run(prompts_BxP: np.ndarray) -> float:
        ids = torch.from_numpy(prompts_BxP).long()
        with torch.no_grad():
            return _seconds(
                lambda: model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=SPEED_NEW_TOKENS,
                    min_new_tokens=SPEED_NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=0,
                )
            )

    return run


def speed(skip_torch: bool) -> dict:
    """Decode tokens/s of the ``gpt2`` shape (random init, the same weights for every row) per policy and
    batch, transformers' PyTorch ``generate`` beside it, and the bound set by memory bandwidth."""
    config = models.get_config("gpt2")
    params = models.init_params(models.create_model(config, "fp32"), jax.random.key(0), 1)
    rng = np.random.default_rng(0)
    prompts = {batch: rng.integers(0, config.vocab_size, (batch, SPEED_PROMPT_TOKENS)) for batch in (1, 8)}
    candidates, rows = {}, []
    for name, spec in SPEED_POLICIES.items():
        policy = get_policy(spec)
        model, served = models.create_model(config, policy), quantize.quantize_params(params, policy)
        for batch, prompts_BxP in prompts.items():
            first = generate(model, served, list(prompts_BxP), SPEED_NEW_TOKENS)  # compiles
            slots = SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS - 1
            cache = jax.eval_shape(functools.partial(init_cache, model, batch, slots))
            rows.append(
                {
                    "name": f"jaxmp {name}",
                    "policy": spec,
                    "batch": batch,
                    "weight_bytes": tree_bytes(served),
                    "cache_bytes": tree_bytes(cache),
                    "program_bytes": first.program_bytes,
                    "compile_seconds": first.compile_seconds,
                    "tokens": first.tokens,
                }
            )
            candidates[(f"jaxmp {name}", batch)] = functools.partial(
                lambda m, p, b: generate(m, p, list(b), SPEED_NEW_TOKENS).seconds, model, served, prompts_BxP
            )
    if not skip_torch:
        with tempfile.TemporaryDirectory() as directory:
            hf.save_pretrained(models.create_model(config, "fp32"), params, directory)
            for dtype_name in ("fp32", "bf16"):
                run = _torch_generate(Path(directory), dtype_name)
                for batch, prompts_BxP in prompts.items():
                    run(prompts_BxP)  # warm-up
                    rows.append({"name": f"PyTorch {dtype_name}", "policy": dtype_name, "batch": batch})
                    candidates[(f"PyTorch {dtype_name}", batch)] = functools.partial(run, prompts_BxP)
    bandwidth = memory_bandwidth()
    seconds = {key: [] for key in candidates}
    for _ in range(SPEED_REPEATS):  # interleaved: a neighbour's load hits every row alike
        for key, run in candidates.items():
            seconds[key].append(run())
    bandwidth = max(bandwidth, memory_bandwidth())  # before and after the timings
    for row in rows:
        best = min(seconds[(row["name"], row["batch"])])
        row["tokens_per_s"] = row["batch"] * SPEED_NEW_TOKENS / best
        row["ms_per_step"] = 1000 * best / SPEED_NEW_TOKENS
        if "weight_bytes" in row:  # each step reads every weight once and the whole cache
            bound_seconds = (row["weight_bytes"] + row["cache_bytes"]) / bandwidth
            row["share_of_bound"] = bound_seconds / (best / SPEED_NEW_TOKENS)
    fp32_tokens = {row["batch"]: row["tokens"] for row in rows if row["name"] == "jaxmp fp32"}
    for row in rows:
        if "tokens" in row:
            row["greedy_agreement"] = float(np.mean(row.pop("tokens") == fp32_tokens[row["batch"]]))
    by_key = {(row["name"], row["batch"]): row for row in rows}
    targets = _targets(by_key, skip_torch)
    print(
        f"## Decode speed: gpt2 (124M) shape, random init, {SPEED_PROMPT_TOKENS}-token prompts, "
        f"{SPEED_NEW_TOKENS} new tokens, greedy, best of {SPEED_REPEATS} interleaved; "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; copy bandwidth {bandwidth / 1e9:.1f} GB/s\n"
    )
    print(
        "| run | batch | tokens/s | ms per step | weights MiB | KV cache MiB | program MiB | bound share "
        "| greedy = fp32 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        jaxmp_row = "weight_bytes" in r
        print(
            f"| {r['name']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | "
            + (
                f"{r['weight_bytes'] / 2**20:.1f} | {r['cache_bytes'] / 2**20:.2f} | "
                f"{r['program_bytes'] / 2**20:.1f} | {r['share_of_bound']:.0%} | {r['greedy_agreement']:.1%} |"
                if jaxmp_row
                else "| | | | |"
            )
        )
    print("\n| target | measured | met |\n| --- | ---: | --- |")
    for name, (value, goal) in targets.items():
        print(f"| {name} | {value:.2f} | {'yes' if value >= goal else 'no'} (>= {goal}) |")
    print()
    return {"bandwidth_bytes_per_s": bandwidth, "rows": rows, "targets": targets}


def _targets(by_key: dict, skip_torch: bool) -> dict[str, tuple[float, float]]:
    """Issue 18's decode targets: ``{name: (measured ratio, goal)}``."""
    fp32 = by_key[("jaxmp fp32", 1)]
    targets = {
        "int8 weights / fp32, batch 1": (
            by_key[("jaxmp int8 weights", 1)]["tokens_per_s"] / fp32["tokens_per_s"],
            1.5,
        ),
        "fp32 batch 1: share of the bandwidth bound": (fp32["share_of_bound"], 0.5),
        "program memory: fp32 / bf16 weights (>= 1/0.6)": (
            fp32["program_bytes"] / by_key[("jaxmp bf16 weights", 1)]["program_bytes"],
            1 / 0.6,
        ),
    }
    if not skip_torch:
        targets["jaxmp fp32 / PyTorch fp32, batch 1"] = (
            fp32["tokens_per_s"] / by_key[("PyTorch fp32", 1)]["tokens_per_s"],
            1.5,
        )
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run",
        help="quality benchmark of a run directory (python -m jaxmp.train) or a Hugging Face directory",
    )
    parser.add_argument("--data", help="text file evaluated for a Hugging Face directory (its last tenth)")
    parser.add_argument(
        "--skip-speed", action="store_true", help="skip the gpt2-shape decode speed benchmark"
    )
    parser.add_argument("--skip-torch", action="store_true", help="no PyTorch rows in the speed benchmark")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    if args.run:
        results["quality"] = quality(args.run, args.data)
    if not args.skip_speed:
        results["speed"] = speed(args.skip_torch)
    env = environment()
    print(
        f"{env['date']} · {env['cpu']} ({' '.join(env['cpu_flags'])}) · load {env['load_average_1min']:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
