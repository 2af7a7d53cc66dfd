"""Text generation under any precision policy, with a preallocated KV cache (CLI: ``jaxmp.generate``).

The prompt batch (left-padded to one length ``P``) is prefilled in one pass; then one token
per step is sampled and fed back inside a single jit-compiled ``jax.lax.while_loop``, which
stops when every row has produced ``eos_id`` or after ``max_new_tokens``. Keys and values are
cached as the policy's ``kv`` key says (the attention layer's compute dtype by default); logits are
sampled in float32. Bad arguments raise ``UsageError`` (a ``ValueError``) naming the argument in
backticks.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp import quantize
from jaxmp.data.tokenizer import Tokenizer
from jaxmp.errors import UsageError
from jaxmp.models import LlamaConfig
from jaxmp.models.layers import AttentionCache, KVCache

__all__ = ["Sampling", "Generation", "init_cache", "sample_logits", "generate", "sample_text"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the float32 logits."""

    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_k: int | None = None  # sample among the k most likely tokens only (None: all)
    top_p: float | None = None  # sample among the fewest tokens whose probability reaches top_p (None: all)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UsageError(f"`temperature` must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"`top_k` must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"`top_p` must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns.

    Attributes:
      tokens: int32 ``[B, N]`` new tokens; after a row's ``eos_id`` the rest of it is ``eos_id``.
      lengths: int32 ``[B]`` new tokens per row, its ``eos_id`` included.
      finite: whether every logit sampled from was finite.
      seconds: wall time of prefill and decoding (compilation excluded).
      compile_seconds: wall time spent tracing and compiling (0 when already compiled).
      program_bytes: device memory of the compiled program: its arguments (params, prompts) plus
        temporaries (KV cache, activations, and any weight copies the compiler keeps); None if
        the backend does not say.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finite: bool
    seconds: float
    compile_seconds: float
    program_bytes: int | None


def init_cache(model: Any, batch: int, length: int) -> KVCache:
    """An empty :class:`KVCache` of ``length`` slots for ``model`` (GPT-2 or Llama, unscanned).

    Layer ``i``'s keys and values are ``[batch, length, G, K]`` zeros in the KV dtype of
    ``blocks_{i}/attn`` (:meth:`jaxmp.Policy.kv_dtype`: its compute dtype unless ``kv=`` says
    otherwise), with float32 ``[batch, length, G]`` scales when that is 8-bit; ``mask`` is all False
    and every ``index`` 0.
    """
    config = model.config
    kv_heads = config.n_kv_heads if isinstance(config, LlamaConfig) else config.n_heads
    layers = []
    for layer in range(config.n_layers):
        dtype = model.policy.kv_dtype(f"blocks_{layer}/attn")
        zeros = jnp.zeros((batch, length, kv_heads, config.head_dim), dtype)
        scales = jnp.ones((batch, length, kv_heads), jnp.float32) if quantize.format_of(dtype) else None
        layers.append(AttentionCache(zeros, zeros, jnp.zeros((), jnp.int32), scales, scales))
    return KVCache(layers=tuple(layers), mask=jnp.zeros((batch, length), bool))


def sample_logits(
    logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """int32 ``[B]`` next tokens from float32 ``[B, V]`` logits; the knobs may be traced scalars.

    Args:
      logits_BxV: float32 logits.
      rng: PRNG key (unused when greedy).
      temperature: 0 for greedy (argmax), else logits are divided by it.
      top_k: keep the ``top_k`` most likely tokens (``V``: all).
      top_p: then keep the fewest most likely tokens whose probability reaches ``top_p`` (1: all).
    """

    def keep_top(scaled_BxV):
        sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
        kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, top_k - 1, 1, axis=1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the more likely tokens
        nucleus_Bx1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled_BxV < jnp.maximum(kth_Bx1, nucleus_Bx1), -jnp.inf, scaled_BxV)

    def sample(logits_BxV):
        scaled_BxV = logits_BxV / temperature
        filtering = (top_k < logits_BxV.shape[-1]) | (top_p < 1)
        scaled_BxV = jax.lax.cond(filtering, keep_top, lambda scaled: scaled, scaled_BxV)
        return jax.random.categorical(rng, scaled_BxV, axis=-1).astype(jnp.int32)

    def greedy(logits_BxV):
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits_BxV)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _decode(params, ids_BxP, mask_BxP, rng, knobs, eos_id, *, model, max_new_tokens):
    """Prefill, then a while loop of (feed the last token, sample the next); see :func:`generate`.

    ``knobs`` is ``(temperature, top_k, top_p)`` and ``eos_id`` is -1 for none: traced, so changing
    them never recompiles.
    """
    batch, prompt_len = ids_BxP.shape
    # Slots for the prompt and every new token but the last, which is never fed back.
    cache = init_cache(model, batch, prompt_len + max_new_tokens - 1)
    out = model.apply({"params": params}, ids_BxP, attention_mask=mask_BxP, cache=cache)
    logits_BxV = out.logits[:, -1].astype(jnp.float32)
    token_B = sample_logits(logits_BxV, jax.random.fold_in(rng, 0), *knobs)
    tokens_BxN = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
    finite = jnp.all(jnp.isfinite(logits_BxV))

    def running(carry):
        step, _, ended_B, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(ended_B)

    def decode_step(carry):
        step, tokens_BxN, ended_B, cache, finite = carry
        out = model.apply({"params": params}, tokens_BxN[:, step - 1, None], cache=cache)
        logits_BxV = out.logits[:, -1].astype(jnp.float32)
        token_B = sample_logits(logits_BxV, jax.random.fold_in(rng, step), *knobs)
        token_B = jnp.where(ended_B, eos_id, token_B)
        tokens_BxN = tokens_BxN.at[:, step].set(token_B)
        return (
            step + 1,
            tokens_BxN,
            ended_B | (token_B == eos_id),
            out.cache,
            finite & jnp.all(jnp.isfinite(logits_BxV)),
        )

    carry = (jnp.int32(1), tokens_BxN, token_B == eos_id, out.cache, finite)
    steps, tokens_BxN, _, _, finite = jax.lax.while_loop(running, decode_step, carry)
    return tokens_BxN, steps, finite


def generate(
    model: Any,
    params: Any,
    prompts: Sequence[np.ndarray],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_id: int | None = None,
    seed: int = 0,
) -> Generation:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: a GPT-2 or Llama language model (``scan_layers=False``); its policy sets every dtype.
      params: its params (in the policy's param dtypes, e.g. from ``hf.cast_params``).
      prompts: int token ids, one ``[T_b]`` array per row, ``T_b >= 1``; shorter rows are left-padded.
      max_new_tokens: ``N >= 1``; ``max(T_b) + N`` must fit in the model's ``max_positions``.
      sampling: greedy by default.
      eos_id: a row ends at this token (None: rows end after ``N`` tokens).
      seed: seeds sampling (unused when greedy).

    Raises:
      UsageError: an empty prompt, ``N < 1`` or more tokens than the model's context.
    """
    if max_new_tokens < 1:
        raise UsageError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise UsageError("empty prompt: give every prompt at least one token of text")
    prompt_len = max(len(prompt) for prompt in prompts)
    context = model.config.max_positions
    if prompt_len + max_new_tokens > context:
        raise UsageError(
            f"`max_new_tokens` {max_new_tokens} plus the {prompt_len}-token prompt exceeds the model's context "
            f"of {context} tokens; use at most {max(context - prompt_len, 0)} new tokens or a shorter prompt"
        )
    ids_BxP = np.zeros((len(prompts), prompt_len), np.int32)
    mask_BxP = np.zeros((len(prompts), prompt_len), bool)
    for row, prompt in enumerate(prompts):
        ids_BxP[row, prompt_len - len(prompt) :] = prompt
        mask_BxP[row, prompt_len - len(prompt) :] = True
    vocab_size = model.config.vocab_size
    knobs = (
        np.float32(sampling.temperature),
        np.int32(min(sampling.top_k or vocab_size, vocab_size)),
        np.float32(1.0 if sampling.top_p is None else sampling.top_p),
    )
    args = (
        params,
        ids_BxP,
        mask_BxP,
        jax.random.key(seed),
        knobs,
        np.int32(-1 if eos_id is None else eos_id),
    )
    compiled, compile_seconds = _compiled_decode(args, model, max_new_tokens)
    compiled_at = time.perf_counter()
    tokens_BxN, steps, finite = jax.device_get(compiled(*args))
    finished = time.perf_counter()
    tokens_BxN = tokens_BxN[:, :steps]
    lengths_B = np.full(len(prompts), steps, np.int32)
    if eos_id is not None:
        is_eos_BxN = tokens_BxN == eos_id
        lengths_B = np.where(is_eos_BxN.any(axis=1), is_eos_BxN.argmax(axis=1) + 1, steps).astype(np.int32)
    memory = compiled.memory_analysis()
    program_bytes = None if memory is None else memory.argument_size_in_bytes + memory.temp_size_in_bytes
    return Generation(
        tokens_BxN, lengths_B, bool(finite), finished - compiled_at, compile_seconds, program_bytes
    )


_COMPILED: dict[Any, Any] = {}  # the decode programs compiled so far, by model, length and argument shapes
_MAX_COMPILED = 8


def _compiled_decode(args: tuple, model: Any, max_new_tokens: int) -> tuple[Any, float]:
    """The compiled :func:`_decode` for these arguments' shapes, dtypes and shardings, and the seconds
    compiling it took now (0 when an earlier call compiled it)."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple((leaf.shape, leaf.dtype, getattr(leaf, "sharding", None)) for leaf in leaves)
    key = (model, max_new_tokens, treedef, shapes)
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    started = time.perf_counter()
    compiled = _decode.lower(*args, model=model, max_new_tokens=max_new_tokens).compile()
    if len(_COMPILED) >= _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = compiled
    return compiled, time.perf_counter() - started


def sample_text(
    model: Any,
    params: Any,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    window: int | None = None,
) -> str:
    """``prompt`` plus a sampled continuation of up to ``max_new_tokens`` tokens, as text.

    ``window`` (default: the model's context) bounds the tokens the model sees at once; a longer
    continuation is generated in rounds, each conditioned on the last ``window // 2`` tokens so far.
    Pass the training ``seq_len`` so the model never sees positions it was not trained on.
    """
    window = min(window or model.config.max_positions, model.config.max_positions)
    sampling = Sampling(temperature=temperature, top_k=top_k)
    tokens_T = np.asarray(tokenizer.encode(prompt), np.int32)
    prompt_len, remaining, round_index = len(tokens_T), max_new_tokens, 0
    while remaining > 0:
        context_T = tokens_T[-max(window // 2, window - remaining) :]
        new_tokens = min(remaining, window - len(context_T))
        result = generate(
            model, params, [context_T], new_tokens, sampling, tokenizer.eos_id, seed + round_index
        )
        new_T = result.tokens[0, : result.lengths[0]]
        tokens_T = np.concatenate([tokens_T, new_T])
        if tokenizer.eos_id in new_T:
            break
        remaining, round_index = remaining - new_tokens, round_index + 1
    return prompt + tokenizer.decode(tokens_T[prompt_len:])
