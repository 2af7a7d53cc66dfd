"""Mixed-precision inference: a trained run's quality under each policy, and decode speed at GPT-2 size.

    python benchmarks/decode.py [--run RUN_DIR] [--skip-speed] [--json out.json]

Quality (with ``--run``, a directory made by ``python -m jaxmp.train``): perplexity of the run's
validation split under each policy, as a ratio to fp32 (target: within 1%), and greedy
continuations of 20 validation prompts compared token by token with fp32's (target: >= 95% agree;
prompt and continuation together fill the run's ``seq_len``).
Speed: decode tokens/s of the 124M-parameter ``gpt2`` shape with random weights, fp32 params versus
bf16 params (``params=bfloat16,compute=bfloat16``), batch 1 and 8, 16-token prompts. Times exclude
compilation; each row is the best of 3 runs. "program MiB" is the compiled program's arguments plus
temporaries: where the backend has no native bf16 matmul (XLA:CPU without AMX) it upcasts the bf16
weights to fp32 once, outside the decode loop, so bf16 params then save memory at rest but not while
decoding.
Prints markdown tables; ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import jax
import numpy as np

from jaxmp import hf, models
from jaxmp.data.lm import LMDataConfig, load_lm_dataset
from jaxmp.inference.decode import generate, init_cache
from jaxmp.inference.load import load_model, with_policy
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
}
SPEED_POLICIES = {"fp32": "fp32", "bf16 params": "params=bfloat16,compute=bfloat16"}
PROMPTS, SPEED_PROMPT_TOKENS, SPEED_NEW_TOKENS = 20, 16, 64


def quality(run_dir: str) -> dict:
    """Validation perplexity per policy, and greedy agreement with fp32 over ``PROMPTS`` prompts."""
    loaded = load_model(run_dir, "fp32")
    run = loaded.run_config
    data = LMDataConfig(data=run.data, tokenizer=run.tokenizer, cache_dir=str(Path(run_dir) / "cache"))
    val_N = np.asarray(load_lm_dataset(data).val_tokens, np.int32)
    seq_len = run.seq_len
    perplexities = evaluate_policies(loaded, list(QUALITY_POLICIES.values()), val_N, seq_len, batch_size=16)
    prompt_tokens = seq_len // 2
    starts = np.linspace(0, len(val_N) - prompt_tokens, PROMPTS).astype(int)
    prompts = [val_N[start : start + prompt_tokens] for start in starts]
    greedy = {}
    for name, spec in QUALITY_POLICIES.items():
        serving = with_policy(loaded, get_policy(spec))
        greedy[name] = generate(serving.model, serving.params, prompts, seq_len - prompt_tokens).tokens
    rows = []
    for (name, spec), ppl in zip(QUALITY_POLICIES.items(), perplexities, strict=True):
        agreement = float(np.mean(greedy[name] == greedy["fp32"]))
        rows.append(
            {
                "name": name,
                "policy": spec,
                "perplexity": ppl.perplexity,
                "ratio": ppl.ratio,
                "param_bytes": ppl.param_bytes,
                "greedy_agreement": agreement,
            }
        )
    print(f"## Quality of {run_dir} ({run.model}, {len(val_N)} validation tokens, seq_len {seq_len})\n")
    print(markdown_table(perplexities) + "\n")
    print("| policy | perplexity vs fp32 | greedy tokens agreeing with fp32 |")
    print("| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['name']} | {row['ratio']:.5f} | {row['greedy_agreement']:.1%} |")
    print()
    return {"run": run_dir, "validation_tokens": len(val_N), "seq_len": seq_len, "policies": rows}


def speed() -> list[dict]:
    """Decode tokens/s of the ``gpt2`` shape (random init) for each speed policy and batch size."""
    config = models.get_config("gpt2")
    params = models.init_params(models.create_model(config, "fp32"), jax.random.key(0), 1)
    rng = np.random.default_rng(0)
    rows = []
    for name, spec in SPEED_POLICIES.items():
        policy = get_policy(spec)
        model, serving_params = models.create_model(config, policy), hf.cast_params(params, policy)
        for batch in (1, 8):
            prompts = list(rng.integers(0, config.vocab_size, (batch, SPEED_PROMPT_TOKENS)))
            runs = [generate(model, serving_params, prompts, SPEED_NEW_TOKENS, seed=i) for i in range(4)]
            seconds = min(result.seconds for result in runs[1:])
            slots = SPEED_PROMPT_TOKENS + SPEED_NEW_TOKENS - 1
            cache = jax.eval_shape(functools.partial(init_cache, model, batch, slots))
            rows.append(
                {
                    "name": name,
                    "policy": spec,
                    "batch": batch,
                    "tokens_per_s": batch * SPEED_NEW_TOKENS / seconds,
                    "ms_per_step": 1000 * seconds / SPEED_NEW_TOKENS,
                    "param_bytes": tree_bytes(serving_params),
                    "cache_bytes": tree_bytes(cache),
                    "program_bytes": runs[0].program_bytes,
                    "compile_seconds": runs[0].compile_seconds,
                }
            )
    print(
        f"## Decode speed: gpt2 (124M) shape, random init, {SPEED_PROMPT_TOKENS}-token prompts, "
        f"{SPEED_NEW_TOKENS} new tokens, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs\n"
    )
    print("| params | batch | tokens/s | ms per step | params MiB | KV cache MiB | program MiB | compile s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['param_bytes'] / 2**20:.1f} | {r['cache_bytes'] / 2**20:.2f} | {r['program_bytes'] / 2**20:.1f} | "
            f"{r['compile_seconds']:.1f} |"
        )
    print()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory made by python -m jaxmp.train (quality benchmark)")
    parser.add_argument(
        "--skip-speed", action="store_true", help="skip the gpt2-shape decode speed benchmark"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    if args.run:
        results["quality"] = quality(args.run)
    if not args.skip_speed:
        results["speed"] = speed()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
