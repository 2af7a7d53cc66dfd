"""Perplexity of a token sequence under several precision policies, compared with float32.

The tokens are cut into non-overlapping windows of ``seq_len`` (each token predicted from the ones
before it in its window, as a run's validation loss is); the mean negative log-likelihood is
computed in float32 from the model's float32 logits. CLI: ``python -m jaxmp.evaluate``.
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

from jaxmp.inference.load import LoadedModel, with_policy
from jaxmp.lowp import tree_bytes
from jaxmp.precision import get_policy

__all__ = ["PolicyPerplexity", "perplexity", "evaluate_policies", "markdown_table"]


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
