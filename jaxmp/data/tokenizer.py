"""Tokenizers: UTF-8 bytes, a Hugging Face ``tokenizers`` tokenizer, or a byte-level BPE trained on a corpus.

``load_tokenizer(spec)`` turns the ``--tokenizer`` flag into a :class:`Tokenizer`; every tokenizer has a
``name`` that identifies its mapping, so a packed token cache and a resumed run can check they match.
Bad input raises :class:`jaxmp.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import tokenizers

from jaxmp.data.cache import write_cache_file
from jaxmp.errors import DataError

if TYPE_CHECKING:
    from jaxmp.data.corpus import Corpus

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "load_transformers_tokenizer"]

EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")  # looked up when no config names one
_ENCODE_CHUNK_CHARS = 1 << 16  # long texts are encoded in chunks of about this size, split before a line
_CHUNK_BREAK = re.compile(r"\n(?=\S)")  # a newline followed by a non-space: no token spans it
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


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

    def to_transformers(self):
        """The same mapping as a ``transformers`` tokenizer: a byte-level BPE with no merges.

        GPT-2's byte-level pre-tokenizer writes each UTF-8 byte as one character and the vocabulary gives
        byte ``b``'s character id ``b``, so ``tokenizer(text)["input_ids"]`` equals ``encode(text)`` and
        ``tokenizer.decode`` inverts it.
        """
        vocab = {char: byte for byte, char in enumerate(_byte_level_chars())}
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        return _transformers_tokenizer(backend, eos_token=None)


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
        candidates = (eos_token,) if eos_token else EOS_TOKENS
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
        write_cache_file(Path(path), lambda file: file.write(self.backend.to_str().encode()))

    def to_transformers(self):
        """A ``transformers`` tokenizer whose ``tokenizer(text)["input_ids"]`` equals ``encode(text)``.

        A post-processor that adds special tokens (BERT's [CLS] and [SEP], Llama's BOS) is left out:
        ``encode`` never adds them, so a model trained on its ids has not seen them either.
        """
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())  # a copy; the run's stays as it is
        if backend.post_processor is not None and backend.post_processor.num_special_tokens_to_add(False):
            backend.post_processor = None
        eos_token = None if self.eos_id is None else backend.id_to_token(self.eos_id)
        return _transformers_tokenizer(backend, eos_token)


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
    eos_token = _configured_eos_token(path / "tokenizer_config.json")  # a broken config is named first
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.wrap(_tokenizer_from_file(path / "tokenizer.json"), eos_token)
    auto = load_transformers_tokenizer(path)
    return HFTokenizer.wrap(auto.backend_tokenizer, auto.eos_token)


def load_transformers_tokenizer(path: str | Path) -> Any:
    """The local Hugging Face tokenizer in directory ``path`` as a transformers fast tokenizer.

    Never downloads and never runs remote code. Used for language modelling (wrapped as an
    :class:`HFTokenizer`) and, as it is, for classification (pairs, padding, attention masks).

    Raises:
      DataError: ``path`` is not a directory, has no tokenizer files or a broken
        ``tokenizer_config.json``, cannot be loaded, or has no fast tokenizer.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(
            f"tokenizer {path} is not a directory; expected a local Hugging Face tokenizer directory"
        )
    _configured_eos_token(path / "tokenizer_config.json")  # a broken config is named first
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        # transformers 5 quietly builds an empty tokenizer from a directory without these
        raise DataError(f"directory {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer  # slow to import: loaded only when a directory needs it

    try:
        auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(
            f"cannot load a tokenizer from directory {path} ({str(error).splitlines()[0].rstrip(' :')}); "
            "expected a tokenizer.json, or vocabulary files and a tokenizer_config.json"
        ) from None
    if not auto.is_fast:
        raise DataError(f"tokenizer directory {path} has no fast tokenizer; add a tokenizer.json")
    return auto


def _configured_eos_token(config_file: Path) -> str | None:
    """The ``eos_token`` a ``tokenizer_config.json`` names (None without the file or the entry)."""
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"tokenizer config {config_file} is not valid JSON ({error}); fix or remove it"
        ) from None
    eos_token = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos_token, dict):  # an AddedToken serialized as {"content": ...}
        eos_token = eos_token.get("content")
    if eos_token is not None and not isinstance(eos_token, str):
        raise DataError(
            f"tokenizer config {config_file} has eos_token {eos_token!r}; expected a token string"
        )
    return eos_token


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
        write_cache_file(path, lambda file: file.write(trained.to_str().encode()))
    return HFTokenizer.wrap(_tokenizer_from_file(path))


def _train_bpe(vocab_size: int, corpus: Corpus) -> tokenizers.Tokenizer:
    """Trains a GPT-2-style byte-level BPE (deterministic for a given corpus)."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKENS[0]],
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


def _byte_level_chars() -> list[str]:
    """GPT-2's byte-to-character table: entry ``b`` is the character ``ByteLevel`` writes for byte ``b``."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    others = iter(range(256, 512))  # the remaining bytes, in order, become U+0100, U+0101, ...
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


def _transformers_tokenizer(backend: tokenizers.Tokenizer, eos_token: str | None):
    """Wraps ``backend`` in ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` writes it)."""
    from transformers import PreTrainedTokenizerFast  # slow to import; only exports need it

    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token)
