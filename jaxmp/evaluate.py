"""Perplexity of a text under several precision policies, compared with float32.

    python -m jaxmp.evaluate --model RUN_DIR|HF_DIR --data FILE --policies fp32,bf16,fp16 [--json OUT]

The text is cut into non-overlapping windows of ``--seq-len`` tokens (each token predicted from
the ones before it in its window, as a run's validation loss is); the mean negative
log-likelihood is computed in float32 from the model's float32 logits. Without ``--data`` a run
directory is evaluated on its own validation split. Policies are separated by ``+`` or ``,`` when
every part is a preset (``fp32,bf16``); key=dtype policies are separated by ``+``
(``params=bfloat16,compute=bfloat16+fp32``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.cli import UsageParser, check_output_file, run_cli
from jaxmp.data import LMDataConfig, load_lm_dataset, read_corpus
from jaxmp.errors import UsageError
from jaxmp.files import write_text_atomically
from jaxmp.lowp import tree_bytes
from jaxmp.precision import get_policy
from jaxmp.serving import LoadedModel, load_model, with_policy

__all__ = ["PolicyPerplexity", "perplexity", "evaluate_policies", "markdown_table", "main"]

_PROG = "python -m jaxmp.evaluate"


@dataclasses.dataclass(frozen=True)
class PolicyPerplexity:
    """One policy's result.

    Attributes:
      policy: the policy, as its canonical string.
      nll: mean negative log-likelihood per predicted token, nats.
      perplexity: ``exp(nll)``.
      ratio: perplexity divided by the float32 policy's (or the first policy's).
      tokens: predicted tokens.
      param_bytes: bytes of the params as cast for this policy.
      seconds: wall time of the evaluation, compilation included.
    """

    policy: str
    nll: float
    perplexity: float
    ratio: float
    tokens: int
    param_bytes: int
    seconds: float


@functools.partial(jax.jit, static_argnames="model")
def _nll_sum(params, ids_BxL, targets_BxL, weights_BxL, *, model):
    """float32 sum of ``-log p(target)`` over the weighted positions of one batch."""
    logits_BxLxV = model.apply({"params": params}, ids_BxL).logits.astype(jnp.float32)  # fp32 island: loss
    target_logits_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    nll_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_logits_BxL
    return jnp.sum(nll_BxL * weights_BxL)


def perplexity(
    model: Any, params: Any, tokens_N: np.ndarray, seq_len: int, batch_size: int
) -> tuple[float, int]:
    """Mean NLL (nats) of tokens ``1 .. N-1`` of ``tokens_N``, each given the earlier ones in its window.

    Args:
      model: a causal LM; its policy sets the dtypes.
      params: its params.
      tokens_N: int token ids, ``N >= 2``.
      seq_len: window length ``L`` (inputs ``tokens[kL : (k+1)L]``, targets shifted by one).
      batch_size: windows per forward pass; the last batch is padded with zero-weight windows.

    Returns:
      ``(mean NLL, number of predicted tokens)``.
    """
    inputs_T, targets_T = np.asarray(tokens_N[:-1], np.int32), np.asarray(tokens_N[1:], np.int32)
    windows = -(-len(targets_T) // seq_len)
    padded = -(-windows // batch_size) * batch_size * seq_len
    weights_T = np.zeros(padded, np.float32)
    weights_T[: len(targets_T)] = 1.0
    shape = (-1, batch_size, seq_len)
    ids_NxBxL = np.pad(inputs_T, (0, padded - len(inputs_T))).reshape(shape)
    targets_NxBxL = np.pad(targets_T, (0, padded - len(targets_T))).reshape(shape)
    weights_NxBxL = weights_T.reshape(shape)
    total = 0.0
    for ids_BxL, targets_BxL, weights_BxL in zip(ids_NxBxL, targets_NxBxL, weights_NxBxL, strict=True):
        total += float(_nll_sum(params, ids_BxL, targets_BxL, weights_BxL, model=model))
    return total / len(targets_T), len(targets_T)


def evaluate_policies(
    loaded: LoadedModel, policies: list[str], tokens_N: np.ndarray, seq_len: int, batch_size: int
) -> list[PolicyPerplexity]:
    """Perplexity of ``tokens_N`` under each policy; ``loaded`` holds float32 params."""
    measured = []
    for spec in policies:
        started = time.perf_counter()
        serving = with_policy(loaded, get_policy(spec))
        nll, count = perplexity(serving.model, serving.params, tokens_N, seq_len, batch_size)
        measured.append(
            (str(serving.model.policy), nll, count, tree_bytes(serving.params), time.perf_counter() - started)
        )
    reference = next(
        (nll for policy, nll, *_ in measured if policy == str(get_policy("fp32"))), measured[0][1]
    )
    return [
        PolicyPerplexity(policy, nll, math.exp(nll), math.exp(nll - reference), count, param_bytes, seconds)
        for policy, nll, count, param_bytes, seconds in measured
    ]


def markdown_table(results: list[PolicyPerplexity]) -> str:
    """The results as a markdown table, one row per policy."""
    lines = [
        "| policy | params MiB | tokens | NLL | perplexity | vs fp32 | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| `{r.policy}` | {r.param_bytes / 2**20:.2f} | {r.tokens} | {r.nll:.5f} | {r.perplexity:.4f} "
            f"| {r.ratio:.5f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def _split_policies(text: str) -> list[str]:
    parts = text.split("+") if "+" in text or "=" in text else text.split(",")
    policies = [part.strip() for part in parts if part.strip()]
    if not policies:
        raise UsageError("--policies is empty; give e.g. fp32,bf16,fp16")
    for policy in policies:
        try:
            get_policy(policy)
        except ValueError as error:
            raise UsageError(f"--policies: {error}") from None
    return policies


def _read_text(data: str | None) -> str | None:
    """The text of ``--data`` (None when not given), with the checks ``jaxmp.train`` makes of a corpus."""
    if data is None:
        return None
    if not Path(data).is_file():
        raise UsageError(f"--data {data} is not a file; give a UTF-8 text file")
    return "".join(read_corpus(data).documents())  # DataError: empty, unreadable or not UTF-8


def _tokens(loaded: LoadedModel, model_dir: str, text: str | None, max_tokens: int | None) -> np.ndarray:
    if text is not None:
        tokens_N = loaded.tokenizer.encode(text)
    elif loaded.run_config is not None:
        run = loaded.run_config
        data_config = LMDataConfig(
            data=run["data"], tokenizer=run["tokenizer"], cache_dir=str(Path(model_dir) / "cache")
        )
        tokens_N = load_lm_dataset(data_config).val_tokens
    else:
        raise UsageError(
            "--data FILE is required for a Hugging Face model (a run defaults to its validation split)"
        )
    tokens_N = np.asarray(tokens_N[:max_tokens], np.int32)
    if len(tokens_N) < 2:
        raise UsageError(f"the text has {len(tokens_N)} token(s); perplexity needs at least 2")
    return tokens_N


def _build_parser() -> UsageParser:
    parser = UsageParser(prog=_PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a jaxmp run directory or a Hugging Face directory")
    parser.add_argument("--data", help="UTF-8 text file (default for a run: its validation split)")
    parser.add_argument(
        "--policies", default="fp32,bf16,fp16", help="policies to compare, e.g. fp32,bf16,fp16"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer spec (default: the run's, or the Hugging Face directory's)"
    )
    parser.add_argument(
        "--seq-len", type=int, help="window length (default: the run's seq_len, else the context)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def _check_sizes(seq_len: int | None, batch_size: int, max_tokens: int | None) -> None:
    """Raises ``UsageError`` for sizes no model could take (the context is checked once it is loaded)."""
    if seq_len is not None and seq_len < 1:
        raise UsageError(f"--seq-len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2 (perplexity needs at least 2 tokens), got {max_tokens}")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input)."""
    return run_cli(_PROG, _evaluate_cli, argv)


def _evaluate_cli(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    policies = _split_policies(args.policies)
    _check_sizes(args.seq_len, args.batch_size, args.max_tokens)
    if args.json:
        check_output_file(args.json, "--json")
    text = _read_text(args.data)
    loaded = load_model(args.model, "fp32", args.tokenizer)
    context = loaded.model.config.max_positions
    seq_len = args.seq_len or (loaded.run_config["seq_len"] if loaded.run_config else min(context, 1024))
    if seq_len > context:
        raise UsageError(f"--seq-len must be in 1..{context} (the model's context), got {seq_len}")
    tokens_N = _tokens(loaded, args.model, text, args.max_tokens)
    results = evaluate_policies(loaded, policies, tokens_N, seq_len, args.batch_size)
    print(markdown_table(results))
    if args.json:
        record = {
            "model": args.model,
            "seq_len": seq_len,
            "results": [dataclasses.asdict(r) for r in results],
        }
        write_text_atomically(Path(args.json), json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
