"""Language-model data: corpora, tokenizers, packed token caches and resumable batches.

Data flows one way, and every step is a pure function of its inputs::

    corpus (text files, or the built-in tiny Shakespeare) ─► tokenizer ─► packed tokens (cached .npy, mmap)
        ├─► train split (first 1 - val_fraction) ─► batch(seed, step, batch_size, seq_len)
        └─► val split   (last val_fraction)      ─► val_batches(batch_size, seq_len, max_batches)

A training batch depends only on ``(seed, step)``, so a resumed run sees exactly the batches it would have
seen. Bad input raises :class:`DataError`, a ``ValueError`` whose one-line message names the problem and
what would be valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.resources
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import tokenizers

BUILTIN_CORPUS = "tinyshakespeare"
_BUILTIN_RESOURCE = "tinyshakespeare.txt.gz"
_PACK_FORMAT = 1  # bump when the packed layout changes, so stale caches are never read
_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")  # looked up when no config names one
_ENCODE_CHUNK_CHARS = 1 << 16  # long texts are encoded in chunks of about this size, split before a line
_CHUNK_BREAK = re.compile(r"\n(?=\S)")  # a newline followed by a non-space: no token spans it
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
_LM_STREAM = 0x4C4D  # "LM": mixed into the batch RNG key so other data streams never share its draws


class DataError(ValueError):
    """Bad data input: a missing, empty or unreadable corpus, an unknown tokenizer, a split too short."""


# ---------------------------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the rest of jaxmp needs from a tokenizer.

    Attributes:
      name: a stable identity (same mapping ⇔ same name), recorded in a run to check resumes.
      vocab_size: one more than the largest id ``encode`` can return.
      eos_id: the end-of-document id appended after every document when packing, or None.
    """

    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray:
        """Returns int32[T] token ids of ``text``, without special tokens."""

    def decode(self, ids: np.ndarray) -> str:
        """Returns the text of int[T] ``ids``; undecodable bytes become U+FFFD."""


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, no special tokens."""

    name: str = "byte"  # identity for resume checks
    vocab_size: int = 256  # one id per byte value
    eos_id: int | None = None  # every id is a byte, so none is free for end-of-document

    def encode(self, text: str) -> np.ndarray:
        """Returns int32[T], the UTF-8 bytes of ``text``."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        """Returns the text of int[T] byte ids; ids outside 0..255 and bad UTF-8 become U+FFFD."""
        ids_T = np.asarray(ids).reshape(-1)
        bytes_T = np.where((ids_T >= 0) & (ids_T < 256), ids_T, 0xFF).astype(np.uint8)  # 0xFF is never UTF-8
        return bytes_T.tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True, eq=False)
class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer``: a tokenizer.json, a tokenizer directory or a trained BPE.

    The name is a hash of the tokenizer's full serialization, so it is the same however it was loaded.
    """

    backend: tokenizers.Tokenizer
    name: str
    vocab_size: int
    eos_id: int | None

    @classmethod
    def wrap(cls, backend: tokenizers.Tokenizer, eos_token: str | None = None) -> HFTokenizer:
        """Wraps ``backend``; ``eos_token`` (else the first of the usual names in the vocab) is the eos.

        Padding and truncation that a tokenizer.json may carry are switched off in ``backend`` (they would
        pad or cut a corpus), before its serialization is hashed into the name.
        """
        backend.no_padding()
        backend.no_truncation()
        candidates = (eos_token,) if eos_token else _EOS_TOKENS
        eos_ids = [backend.token_to_id(token) for token in candidates]
        return cls(
            backend=backend,
            name="hf:" + hashlib.sha256(backend.to_str().encode()).hexdigest()[:16],
            vocab_size=max(backend.get_vocab(with_added_tokens=True).values()) + 1,
            eos_id=next((i for i in eos_ids if i is not None), None),
        )

    def encode(self, text: str) -> np.ndarray:
        """Returns int32[T] ids of ``text``, no special tokens added; encoded in line-aligned chunks."""
        encodings = self.backend.encode_batch(list(_chunks(text)), add_special_tokens=False)
        return np.array([i for encoding in encodings for i in encoding.ids], np.int32)

    def decode(self, ids: np.ndarray) -> str:
        """Returns the text of int[T] ``ids``, special tokens included."""
        return self.backend.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        """Writes the tokenizer as a tokenizer.json file (atomically) that ``load_tokenizer`` reads back."""
        _atomic_write(Path(path), lambda file: file.write(self.backend.to_str().encode()))


def load_tokenizer(spec: str, corpus: Corpus | None = None, cache_dir: str | Path | None = None) -> Tokenizer:
    """Returns the tokenizer that ``spec`` names.

    Args:
      spec: ``"byte"``; ``"bpe:N"`` (a byte-level BPE of N tokens trained on ``corpus`` and cached in
        ``cache_dir`` as ``bpe{N}-{corpus hash}.json``); a ``tokenizer.json`` file; or a local Hugging
        Face tokenizer directory (read by ``tokenizers``, or by ``transformers.AutoTokenizer`` when it has
        no tokenizer.json; never downloaded, never remote code).
      corpus: the corpus to train ``bpe:N`` on.
      cache_dir: where a trained BPE is cached.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        return _bpe_tokenizer(_bpe_size(spec), corpus, cache_dir)
    path = Path(spec).expanduser()
    if path.is_file():
        return HFTokenizer.wrap(_tokenizer_from_file(path))
    if path.is_dir():
        return _tokenizer_from_dir(path)
    raise DataError(
        f"tokenizer {spec!r} is not 'byte', 'bpe:N', a tokenizer.json file or a Hugging Face tokenizer directory"
    )


def _tokenizer_from_file(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for bad JSON
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read tokenizer file {path} ({problem}); expected a tokenizer.json") from None


def _tokenizer_from_dir(path: Path) -> HFTokenizer:
    if (path / "tokenizer.json").is_file():
        config_file = path / "tokenizer_config.json"
        eos_token = json.loads(config_file.read_text()).get("eos_token") if config_file.is_file() else None
        if isinstance(eos_token, dict):  # an AddedToken serialized as {"content": ...}
            eos_token = eos_token.get("content")
        return HFTokenizer.wrap(_tokenizer_from_file(path / "tokenizer.json"), eos_token)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        # transformers 5 quietly builds an empty tokenizer from a directory without these
        raise DataError(f"directory {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer  # slow to import: only directories without tokenizer.json need it

    try:
        auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(
            f"cannot load a tokenizer from directory {path} ({str(error).splitlines()[0].rstrip(' :')}); "
            "expected a tokenizer.json, or vocabulary files and a tokenizer_config.json"
        ) from None
    if not auto.is_fast:
        raise DataError(f"tokenizer directory {path} has no fast tokenizer; add a tokenizer.json")
    return HFTokenizer.wrap(auto.backend_tokenizer, auto.eos_token)


def _bpe_size(spec: str) -> int:
    size = spec.removeprefix("bpe:")
    if not size.isascii() or not size.isdigit() or int(size) < 257:
        raise DataError(f"tokenizer {spec!r}: expected bpe:N with N >= 257 (256 bytes + end-of-text)")
    return int(size)


def _bpe_tokenizer(vocab_size: int, corpus: Corpus | None, cache_dir: str | Path | None) -> HFTokenizer:
    if corpus is None or cache_dir is None:
        raise DataError(f"tokenizer 'bpe:{vocab_size}' is trained on the corpus: pass corpus and cache_dir")
    path = Path(cache_dir).expanduser() / f"bpe{vocab_size}-{corpus.sha256[:16]}.json"
    if not path.is_file():
        trained = _train_bpe(vocab_size, corpus)
        _atomic_write(path, lambda file: file.write(trained.to_str().encode()))
    return HFTokenizer.wrap(_tokenizer_from_file(path))


def _train_bpe(vocab_size: int, corpus: Corpus) -> tokenizers.Tokenizer:
    """Trains a GPT-2-style byte-level BPE (deterministic for a given corpus)."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_EOS_TOKENS[0]],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((chunk for doc in corpus.documents() for chunk in _chunks(doc)), trainer)
    return backend


def _chunks(text: str) -> Iterator[str]:
    """Splits ``text`` into pieces of about _ENCODE_CHUNK_CHARS, each ending before a line's first token."""
    start = 0
    while start < len(text):
        match = _CHUNK_BREAK.search(text, start + _ENCODE_CHUNK_CHARS)
        end = match.end() if match else len(text)
        yield text[start:end]
        start = end


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
        _atomic_write(path, lambda file: np.save(file, tokens_N.astype(dtype)))
    return np.load(path, mmap_mode="r")


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Writes ``path`` through a temporary file in the same directory and ``os.replace``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise DataError(f"cannot write cache file {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)


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
