"""Language-model data: packed token caches and resumable batches (corpora: ``jaxmp.data.corpus``).

Data flows one way, and every step is a pure function of its inputs::

    corpus (text files, or the built-in tiny Shakespeare) ─► tokenizer ─► packed tokens (cached .npy, mmap)
        ├─► train split (first 1 - val_fraction) ─► batch(seed, step, batch_size, seq_len)
        └─► val split   (last val_fraction)      ─► val_batches(batch_size, seq_len, max_batches)

A training batch depends only on ``(seed, step)``, so a resumed run sees exactly the batches it would have
seen. Bad input raises :class:`DataError`, a ``ValueError`` whose one-line message names the problem and
what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxmp.data.cache import write_cache_file
from jaxmp.data.corpus import Corpus, read_corpus
from jaxmp.data.tokenizer import Tokenizer, load_tokenizer
from jaxmp.errors import DataError

_PACK_FORMAT = 1  # bump when the packed layout changes, so stale caches are never read
_LM_STREAM = 0x4C4D  # "LM": mixed into the batch RNG key so other data streams never share its draws


# ------------------------------------------------------------------------------------------------- packing


def pack_tokens(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | Path) -> np.ndarray:
    """Tokenizes ``corpus`` once into ``cache_dir/tokens-{key}.npy`` and memory-maps it.

    The key hashes the corpus content, the tokenizer's name and eos id, so a changed file or tokenizer gets
    a new cache. An eos token (when the tokenizer has one) follows every document.

    Returns:
      uint16[N] (when the vocabulary fits) or int32[N], a read-only ``np.memmap``.
    """
    key_text = f"{_PACK_FORMAT}|{corpus.sha256}|{tokenizer.name}|{tokenizer.eos_id}"
    path = Path(cache_dir).expanduser() / f"tokens-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.npy"
    if not path.is_file():
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
        eos_T = np.array([] if tokenizer.eos_id is None else [tokenizer.eos_id], np.int32)
        tokens_N = np.concatenate(
            [np.concatenate([tokenizer.encode(doc), eos_T]) for doc in corpus.documents()]
        )
        if tokens_N.size == 0:
            raise DataError(f"corpus {corpus.source} has no tokens under tokenizer {tokenizer.name}")
        write_cache_file(path, lambda file: np.save(file, tokens_N.astype(dtype)))
    return np.load(path, mmap_mode="r")


# ------------------------------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class LMDataConfig:
    """Where language-model data comes from."""

    data: str | None = None  # a text file or directory of *.txt files; None = built-in tiny Shakespeare
    tokenizer: str = "byte"  # "byte", "bpe:N", a tokenizer.json file or a Hugging Face tokenizer directory
    cache_dir: str = "~/.cache/jaxmp"  # packed tokens and trained BPEs; a run puts this beside itself
    val_fraction: float = 0.1  # the last fraction of tokens, held out for validation


@dataclasses.dataclass(frozen=True, eq=False)
class LMDataset:
    """Packed tokens: the first part trains, the last ``num_val`` tokens validate.

    Attributes:
      tokens: uint16[N] or int32[N], every token of the corpus (usually a read-only memmap).
      num_val: how many tokens at the end are held out for validation.
      tokenizer: the tokenizer that produced ``tokens``.
    """

    tokens: np.ndarray
    num_val: int
    tokenizer: Tokenizer

    @property
    def train_tokens(self) -> np.ndarray:
        """The training split, uint16 or int32[N - num_val]."""
        return self.tokens[: len(self.tokens) - self.num_val]

    @property
    def val_tokens(self) -> np.ndarray:
        """The validation split, uint16 or int32[num_val]."""
        return self.tokens[len(self.tokens) - self.num_val :]

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """Returns training batch ``step``: random windows drawn by Philox keyed by ``(seed, step)`` alone.

        Returns:
          ``input_ids`` int32[B, L] and ``targets`` int32[B, L], the next token after each input.
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        train_N = self.train_tokens
        if len(train_N) < seq_len + 1:
            raise DataError(
                f"training split has {len(train_N)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter sequence length or a larger corpus"
            )
        if seed < 0 or step < 0:
            raise DataError(f"seed and step must be non-negative, got seed={seed}, step={step}")
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([_LM_STREAM, seed, step])))
        starts_B = rng.integers(0, len(train_N) - seq_len, size=batch_size)
        return _windows(train_N, starts_B, seq_len)

    def val_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Returns an iterator over the validation split's fixed, non-overlapping windows, in order.

        Only full batches are yielded, at most ``max_batches``; each is a dict like :meth:`batch`'s.
        """
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        val_N = self.val_tokens
        num_batches = (len(val_N) - 1) // seq_len // batch_size
        if num_batches == 0:
            raise DataError(
                f"validation split has {len(val_N)} tokens, fewer than batch_size * seq_len + 1 = "
                f"{batch_size * seq_len + 1}; use a smaller batch or sequence, a larger corpus or val_fraction"
            )
        if max_batches is not None:
            num_batches = min(num_batches, max_batches)
        window_starts = np.arange(num_batches * batch_size).reshape(num_batches, batch_size) * seq_len
        return (_windows(val_N, starts_B, seq_len) for starts_B in window_starts)


def load_lm_dataset(config: LMDataConfig) -> LMDataset:
    """Reads, tokenizes (or loads from cache) and splits the corpus that ``config`` names."""
    if not 0 <= config.val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    corpus = read_corpus(config.data)
    tokenizer = load_tokenizer(config.tokenizer, corpus, config.cache_dir)
    tokens_N = pack_tokens(corpus, tokenizer, config.cache_dir)
    return LMDataset(tokens_N, int(len(tokens_N) * config.val_fraction), tokenizer)


def _windows(tokens_N: np.ndarray, starts_B: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    window_BxL1 = np.asarray(tokens_N[starts_B[:, None] + np.arange(seq_len + 1)], np.int32)
    return {
        "input_ids": np.ascontiguousarray(window_BxL1[:, :-1]),
        "targets": np.ascontiguousarray(window_BxL1[:, 1:]),
    }


def _check_positive(**sizes: int) -> None:
    for name, size in sizes.items():
        if size < 1:
            raise DataError(f"{name} must be a positive integer, got {size}")
