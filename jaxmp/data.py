"""Language-model data: corpora, packed token caches and resumable batches (tokenizers: ``jaxmp.tokenizer``).

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
import gzip
import hashlib
import importlib.resources
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jaxmp.errors import DataError
from jaxmp.files import atomic_write
from jaxmp.tokenizer import Tokenizer, load_tokenizer

BUILTIN_CORPUS = "tinyshakespeare"
_BUILTIN_RESOURCE = "tinyshakespeare.txt.gz"
_PACK_FORMAT = 1  # bump when the packed layout changes, so stale caches are never read
_LM_STREAM = 0x4C4D  # "LM": mixed into the batch RNG key so other data streams never share its draws


# ------------------------------------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A text corpus, identified by the hash of its content.

    Attributes:
      source: what the user named: a path, or ``"tinyshakespeare"`` for the built-in corpus.
      files: the UTF-8 text files in reading order; empty for the built-in corpus.
      sha256: hex digest over every document's byte length and bytes, in order.
    """

    source: str
    files: tuple[Path, ...]
    sha256: str

    def documents(self) -> Iterator[str]:
        """Yields the text of each document (file), in order."""
        if not self.files:
            yield _builtin_bytes().decode("utf-8")
        for path in self.files:
            yield _read_utf8(path)


def read_corpus(path: str | Path | None = None) -> Corpus:
    """Returns the corpus at ``path``: a UTF-8 text file, or a directory whose *.txt files are read in
    sorted order; ``None`` is the built-in tiny Shakespeare (1,115,394 bytes, public domain)."""
    if path is None:
        return Corpus(BUILTIN_CORPUS, (), _content_hash([_builtin_bytes()])[0])
    path = Path(path).expanduser()
    valid = "expected a UTF-8 text file or a directory of *.txt files"
    if not path.exists():
        raise DataError(f"corpus {path} does not exist; {valid}")
    if path.is_dir():
        files = tuple(sorted(path.glob("*.txt")))
        if not files:
            raise DataError(f"corpus directory {path} has no *.txt files; {valid}")
    elif path.is_file():
        files = (path,)
    else:
        raise DataError(f"corpus {path} is not a regular file or directory; {valid}")
    sha256, num_bytes = _content_hash(_read_utf8(file).encode("utf-8") for file in files)
    if num_bytes == 0:
        raise DataError(f"corpus {path} is empty; {valid} with some text in it")
    return Corpus(str(path), files, sha256)


def _content_hash(contents: Iterable[bytes]) -> tuple[str, int]:
    """Returns the sha256 hex digest over each content's length and bytes, and the total byte count."""
    digest, num_bytes = hashlib.sha256(), 0
    for content in contents:  # one document in memory at a time
        digest.update(len(content).to_bytes(8, "little") + content)
        num_bytes += len(content)
    return digest.hexdigest(), num_bytes


def _builtin_bytes() -> bytes:
    resource = importlib.resources.files("jaxmp.corpus") / _BUILTIN_RESOURCE
    return gzip.decompress(resource.read_bytes())


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise DataError(f"cannot read corpus file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"corpus file {path} is not UTF-8 text (bad byte at offset {error.start})") from None


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
        _write_cache_file(path, lambda file: np.save(file, tokens_N.astype(dtype)))
    return np.load(path, mmap_mode="r")


def _write_cache_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    try:
        atomic_write(path, write)
    except OSError as error:
        raise DataError(f"cannot write cache file {path}: {error.strerror or error}") from None


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
