"""Text corpora: a UTF-8 file, a directory of *.txt files, or the built-in tiny Shakespeare, each
identified by the hash of its content (so caches built from it know when it changed)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.resources
from collections.abc import Iterable, Iterator
from pathlib import Path

from jaxmp.errors import DataError

__all__ = ["BUILTIN_CORPUS", "Corpus", "read_corpus"]

BUILTIN_CORPUS = "tinyshakespeare"
_BUILTIN_RESOURCE = "tinyshakespeare.txt.gz"


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
    resource = importlib.resources.files("jaxmp.data") / _BUILTIN_RESOURCE
    return gzip.decompress(resource.read_bytes())


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise DataError(f"cannot read corpus file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"corpus file {path} is not UTF-8 text (bad byte at offset {error.start})") from None
