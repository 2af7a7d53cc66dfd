"""A model served under several precision policies, compared with float32: perplexity, greedy decoding.

The tokens are cut into non-overlapping windows of ``seq_len`` (each token predicted from the ones
before it in its window, as a run's validation loss is); the mean negative log-likelihood is
computed in float32 from the model's float32 logits. A policy that stores the KV cache in another
format (``kv=int8``...) computes each window through that cache: every token attends to the keys
and values as the cache stored them. Greedy continuations of prompts cut from the same tokens are
compared token by token with float32's, and their decoding speed is measured.
CLI: ``python -m jaxmp.evaluate``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp.inference.decode import generate, init_cache
from jaxmp.inference.load import LoadedModel, with_policy
from jaxmp.lowp import tree_bytes
from jaxmp.precision import get_policy

__all__ = ["PolicyPerplexity", "perplexity", "greedy_prompts", "evaluate_policies", "markdown_table"]


@dataclasses.dataclass(frozen=True)
class PolicyPerplexity:
    """One policy's result.

    Attributes:
      policy: the policy, as its canonical string.
      nll: mean negative log-likelihood per predicted token, nats.
      perplexity: ``exp(nll)``.
      ratio: perplexity divided by the float32 policy's (or the first policy's).
      tokens: predicted tokens.
      param_bytes: bytes of the params as stored for this policy (8-bit weights with their scales).
      seconds: wall time of the evaluation, compilation included.
      greedy_agreement: share of greedy continuation tokens equal to float32's (None: no prompts).
      decode_tokens_per_s: new tokens per second of those continuations, compilation excluded.
    """

    policy: str
    nll: float
    perplexity: float
    ratio: float
    tokens: int
    param_bytes: int
    seconds: float
    greedy_agreement: float | None = None
    decode_tokens_per_s: float | None = None


def _stores_kv(model: Any) -> bool:
    """Whether some attention layer caches keys and values in other than its compute dtype."""
    policy = model.policy
    return any(
        policy.kv_dtype(f"blocks_{layer}/attn") != policy.for_module(f"blocks_{layer}/attn").compute_dtype
        for layer in range(model.config.n_layers)
    )


@functools.partial(jax.jit, static_argnames="model")
def _nll_sum(params, ids_BxL, targets_BxL, weights_BxL, *, model):
    """float32 sum of ``-log p(target)`` over the weighted positions of one batch."""
    cache = init_cache(model, *ids_BxL.shape) if _stores_kv(model) else None
    out = model.apply({"params": params}, ids_BxL, cache=cache)
    logits_BxLxV = out.logits.astype(jnp.float32)  # fp32 island: loss
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


def greedy_prompts(tokens_N: np.ndarray, count: int, prompt_len: int) -> list[np.ndarray]:
    """``count`` prompts of ``prompt_len`` tokens at evenly spaced offsets of ``tokens_N``."""
    starts = np.linspace(0, max(len(tokens_N) - prompt_len, 0), count).astype(int)
    return [np.asarray(tokens_N[start : start + prompt_len], np.int32) for start in starts]


def evaluate_policies(
    loaded: LoadedModel,
    policies: list[str],
    tokens_N: np.ndarray,
    seq_len: int,
    batch_size: int,
    prompts: int = 0,
) -> list[PolicyPerplexity]:
    """Perplexity of ``tokens_N`` under each policy, and greedy decoding of ``prompts`` prompts.

    Args:
      loaded: the model with float32 params.
      policies: serving policies; the float32 one (else the first) is the reference.
      tokens_N: int token ids.
      seq_len: window length; a greedy prompt is its first half, its continuation the rest.
      batch_size: windows per forward pass.
      prompts: prompts decoded greedily in one batch per policy (0: none).
    """
    measured = []
    prompt_len = max(seq_len // 2, 1)
    greedy_inputs = greedy_prompts(tokens_N, prompts, prompt_len) if prompts else []
    for spec in policies:
        started = time.perf_counter()
        serving = with_policy(loaded, get_policy(spec))
        nll, count = perplexity(serving.model, serving.params, tokens_N, seq_len, batch_size)
        greedy = None
        if greedy_inputs:
            greedy = generate(serving.model, serving.params, greedy_inputs, max(seq_len - prompt_len, 1))
        measured.append(
            (
                str(serving.model.policy),
                nll,
                count,
                tree_bytes(serving.params),
                time.perf_counter() - started,
                greedy,
            )
        )
    reference_index = next(
        (index for index, (policy, *_) in enumerate(measured) if policy == str(get_policy("fp32"))), 0
    )
    reference_nll, reference_greedy = measured[reference_index][1], measured[reference_index][5]
    results = []
    for policy, nll, count, param_bytes, seconds, greedy in measured:
        agreement = speed = None
        if greedy is not None:
            agreement = float(np.mean(greedy.tokens == reference_greedy.tokens))
            speed = greedy.tokens.size / greedy.seconds
        results.append(
            PolicyPerplexity(
                policy,
                nll,
                math.exp(nll),
                math.exp(nll - reference_nll),
                count,
                param_bytes,
                seconds,
                agreement,
                speed,
            )
        )
    return results


def markdown_table(results: list[PolicyPerplexity]) -> str:
    """The results as a markdown table, one row per policy (greedy columns when measured)."""
    greedy = results and results[0].greedy_agreement is not None
    extra_header = " greedy = fp32 | decode tok/s |" if greedy else ""
    lines = [
        "| policy | params MiB | tokens | NLL | perplexity | vs fp32 | seconds |" + extra_header,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if greedy else ""),
    ]
    for r in results:
        extra = f" {r.greedy_agreement:.1%} | {r.decode_tokens_per_s:.1f} |" if greedy else ""
        lines.append(
            f"| `{r.policy}` | {r.param_bytes / 2**20:.2f} | {r.tokens} | {r.nll:.5f} | {r.perplexity:.4f} "
            f"| {r.ratio:.5f} | {r.seconds:.1f} |" + extra
        )
    return "\n".join(lines)
