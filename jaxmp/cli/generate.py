"""``python -m jaxmp.generate``: generate text from a run or Hugging Face directory under a policy.

    python -m jaxmp.generate --model RUN_DIR|HF_DIR --policy params=bfloat16,compute=bfloat16 \\
        --prompt "ROMEO:" --prompt "To be" --max-new-tokens 100 --temperature 0.8 --top-k 40

A policy with ``params=bfloat16`` (or ``float16``) casts the weights once for serving, halving
their memory; weights beyond float16's range are refused rather than turned into ``inf``. The
decoding itself is :func:`jaxmp.inference.decode.generate`.
"""

from __future__ import annotations

import argparse
import sys

import jax

from jaxmp.cli import UsageParser, run_cli
from jaxmp.errors import UsageError
from jaxmp.inference.decode import Generation, Sampling, generate, init_cache
from jaxmp.inference.load import LoadedModel, load_model
from jaxmp.lowp import tree_bytes

__all__ = ["main"]

_PROG = "python -m jaxmp.generate"


def _build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog=_PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a jaxmp run directory or a Hugging Face directory")
    parser.add_argument(
        "--policy", default="fp32", help="precision policy, e.g. params=bfloat16,compute=bfloat16"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer spec (default: the run's, or the Hugging Face directory's)"
    )
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="new tokens per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument(
        "--top-p", type=float, help="sample among the fewest tokens reaching this probability"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


def _report(loaded: LoadedModel, prompts: list[str], result: Generation, cache_bytes: int) -> None:
    tokenizer = loaded.tokenizer
    for prompt, tokens_N, length in zip(prompts, result.tokens, result.lengths, strict=True):
        print(f"=== {prompt!r}")
        print(prompt + tokenizer.decode(tokens_N[:length]))
    new_tokens = int(result.lengths.sum())
    print(
        f"--- {new_tokens} new tokens in {result.seconds:.3f} s ({new_tokens / result.seconds:.1f} tokens/s; "
        f"compile {result.compile_seconds:.1f} s) | policy {loaded.model.policy} | params "
        f"{tree_bytes(loaded.params) / 2**20:.2f} MiB + KV cache {cache_bytes / 2**20:.2f} MiB"
        + ("" if result.program_bytes is None else f" (whole program {result.program_bytes / 2**20:.2f} MiB)")
    )


def _check_prompts(prompts: list[str]) -> None:
    """Raises ``UsageError`` for a prompt that is not UTF-8 text.

    Python hands command-line bytes that are not UTF-8 over as lone surrogates, which no tokenizer can
    encode.
    """
    for number, prompt in enumerate(prompts, start=1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            raise UsageError(
                f"--prompt {number} holds bytes that are not valid UTF-8 (at character {error.start}); "
                "give UTF-8 text"
            ) from None


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input, 1 for non-finite logits)."""
    return run_cli(_PROG, _generate_cli, argv)


def _generate_cli(argv: list[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    _check_prompts(args.prompt)
    loaded = load_model(args.model, args.policy, args.tokenizer)
    prompts = [loaded.tokenizer.encode(prompt) for prompt in args.prompt]
    result = generate(
        loaded.model,
        loaded.params,
        prompts,
        args.max_new_tokens,
        sampling,
        loaded.tokenizer.eos_id,
        args.seed,
    )
    slots = max(len(prompt) for prompt in prompts) + args.max_new_tokens - 1
    cache_bytes = tree_bytes(jax.eval_shape(lambda: init_cache(loaded.model, len(prompts), slots)))
    _report(loaded, args.prompt, result, cache_bytes)
    if not result.finite:
        print(
            f"{parser.prog}: error: non-finite logits under policy {loaded.model.policy} (activations overflowed); "
            "use bfloat16 or float32 compute",
            file=sys.stderr,
        )
        return 1
    return 0
