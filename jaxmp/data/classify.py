"""Classification data for fine-tuning (``task="classify"``): labelled text, tokenized to a fixed length.

Files are TSV (unquoted, GLUE style, e.g. SST-2's ``label<TAB>sentence``), CSV or JSONL, with a ``text``
or ``sentence`` column and an integer ``label`` column. Training batches are a pure function of
``(seed, step)``: the rows are reshuffled every epoch by a permutation keyed by ``(seed, epoch)``.
Evaluation batches go in file order; the last one is padded with weight-0 rows so that a weighted mean
counts every row exactly once. With ``pad_multiple`` a batch is cut to its longest row rounded up to a
multiple of it (short sentences padded to 64 tokens waste most of a step; a handful of lengths keeps
recompilation bounded). :func:`iter_rows` reads a file one row at a time, labels optional (prediction
streams files larger than memory); :func:`encode_texts` tokenizes rows as training does.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from jaxmp.data.tokenizer import load_transformers_tokenizer
from jaxmp.errors import DataError

TEXT_COLUMNS = ("text", "sentence")  # the first of these that a file has holds the text
LABEL_COLUMN = "label"
_SUFFIXES = ".tsv, .csv or .jsonl"
_INTEGER = re.compile(r"\s*[0-9]+\s*")
_MAX_LABELS = 2**31 - 1  # labels are int32, and so is num_labels (one more than the largest)
_CLASSIFY_STREAM = 0x434C  # "CL": mixed into the shuffle key so other data streams never share its draws


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationData:
    """Tokenized labelled rows, all padded or truncated to one length L.

    Attributes:
      input_ids: int32[N, L] token ids.
      attention_mask: int32[N, L], 1 on real tokens, 0 on padding.
      token_type_ids: int32[N, L] segment ids (all 0 for single sentences).
      labels: int32[N] class ids.
      pad_multiple: 0: every batch has length L. Else a batch's length is that of its longest row
        (the last column any row has a real token in) rounded up to a multiple of ``pad_multiple``,
        at most L: the columns cut are padding in every row, so masked models compute the same.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray
    pad_multiple: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_labels(self) -> int:
        """One more than the largest label."""
        return int(self.labels.max()) + 1

    def batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """Returns training batch ``step``: rows ``step * B ... step * B + B - 1`` of the shuffled stream.

        The stream is epoch 0's permutation of the rows, then epoch 1's, ...; epoch ``e``'s permutation
        depends only on ``(seed, e)``, so each epoch visits every row once and a batch may span two epochs.

        Returns:
          ``input_ids``, ``attention_mask``, ``token_type_ids`` int32[B, T] (``T <= L``, see
          ``pad_multiple``); ``labels`` int32[B]; ``weight`` float32[B] (all ones).
        """
        return self._rows(self._stream_rows(seed, step, batch_size), np.ones(batch_size, np.float32))

    def window(self, seed: int, first_step: int, count: int, batch_size: int) -> dict[str, np.ndarray]:
        """Training batches ``first_step .. first_step + count - 1`` stacked on a leading axis.

        Every batch of the window is cut to the same length, the longest :meth:`batch` would give
        for any of them (the extra columns are padding in every row), so each holds the tokens
        :meth:`batch` gives it. Leaves as :meth:`batch`'s with a leading ``[count]`` axis.
        """
        rows_NxB = [
            self._stream_rows(seed, step, batch_size) for step in range(first_step, first_step + count)
        ]
        length = max(self._length(self.attention_mask[rows_B]) for rows_B in rows_NxB)
        batches = [self._rows(rows_B, np.ones(batch_size, np.float32), length) for rows_B in rows_NxB]
        return {name: np.stack([batch[name] for batch in batches]) for name in batches[0]}

    def _stream_rows(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """int64[B]: the rows of training batch ``step`` (see :meth:`batch`)."""
        if seed < 0 or step < 0 or batch_size < 1:
            raise DataError(f"need seed, step >= 0 and batch_size >= 1, got {seed}, {step}, {batch_size}")
        epoch_B, offset_B = np.divmod(step * batch_size + np.arange(batch_size), len(self))
        rows_B = np.empty(batch_size, np.int64)
        for epoch in np.unique(epoch_B):
            in_epoch_B = epoch_B == epoch
            rows_B[in_epoch_B] = self._permutation(seed, int(epoch))[offset_B[in_epoch_B]]
        return rows_B

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Yields every row once, in order, ``batch_size`` at a time, as dicts like :meth:`batch`'s.

        The last batch is filled up with copies of its first row whose ``weight`` is 0, so every batch has
        shape [B, ...] and ``sum(weight * correct) / sum(weight)`` is the exact accuracy.
        """
        if batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size}")
        for start in range(0, len(self), batch_size):
            rows = np.arange(start, min(start + batch_size, len(self)))
            weight_B = np.zeros(batch_size, np.float32)
            weight_B[: len(rows)] = 1.0
            rows_B = np.concatenate([rows, np.full(batch_size - len(rows), start)])
            yield self._rows(rows_B, weight_B)

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = np.random.SeedSequence([_CLASSIFY_STREAM, seed, epoch])
        return np.random.Generator(np.random.Philox(key)).permutation(len(self))

    def _length(self, mask_BxL: np.ndarray) -> int:
        return padded_length(mask_BxL, self.pad_multiple)

    def _rows(
        self, rows_B: np.ndarray, weight_B: np.ndarray, length: int | None = None
    ) -> dict[str, np.ndarray]:
        mask_BxL = self.attention_mask[rows_B]
        length = self._length(mask_BxL) if length is None else length
        return {
            "input_ids": self.input_ids[rows_B, :length],
            "attention_mask": mask_BxL[:, :length],
            "token_type_ids": self.token_type_ids[rows_B, :length],
            "labels": self.labels[rows_B],
            "weight": weight_B,
        }


def load_classification_data(
    path: str | Path,
    tokenizer_dir: str | Path,
    max_length: int = 128,
    limit: int | None = None,
    num_labels: int | None = None,
    pad_multiple: int = 0,
) -> ClassificationData:
    """Reads labelled rows and tokenizes them with a local Hugging Face tokenizer.

    Args:
      path: a .tsv, .csv or .jsonl file with a ``text`` or ``sentence`` column and a ``label`` column.
      tokenizer_dir: a local tokenizer directory (``transformers.AutoTokenizer``; nothing is downloaded).
      max_length: L, the padded and truncated length, special tokens included.
      limit: read only the first ``limit`` rows.
      num_labels: when given, a label outside ``[0, num_labels)`` is an error.
      pad_multiple: see :class:`ClassificationData` (0: every batch has length ``max_length``).
    """
    texts, labels_N = read_labelled_rows(path, limit, num_labels)
    encoded = encode_texts(load_hf_tokenizer(tokenizer_dir), texts, max_length)
    return ClassificationData(**encoded, labels=labels_N, pad_multiple=pad_multiple)


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Tokenizes N texts as training does: special tokens added, truncated and padded to ``max_length``.

    Args:
      tokenizer: a ``transformers`` tokenizer (:func:`load_hf_tokenizer`).
      texts: the N texts.
      max_length: L, special tokens included.

    Returns:
      ``input_ids``, ``attention_mask`` (1 on real tokens) and ``token_type_ids``, each int32[N, L].
    """
    encoded = tokenizer(
        texts,
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_tensors="np",
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    names = ("input_ids", "attention_mask", "token_type_ids")
    return {name: encoded[name].astype(np.int32) for name in names}


def padded_length(mask_BxL: np.ndarray, pad_multiple: int) -> int:
    """The columns a batch keeps: its longest row rounded up to ``pad_multiple``, at most L (0: all of L).

    Args:
      mask_BxL: int32[B, L] attention mask, 1 on real tokens.
      pad_multiple: the bucket size (0: no cut).
    """
    length = mask_BxL.shape[1]
    if pad_multiple:
        longest = int(np.flatnonzero(mask_BxL.any(axis=0)).max(initial=0)) + 1
        length = min(length, -(-longest // pad_multiple) * pad_multiple)
    return length


def read_labelled_rows(
    path: str | Path, limit: int | None = None, num_labels: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Returns the texts (list of N str) and labels (int32[N]) of a .tsv, .csv or .jsonl file."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of rows, got {limit}")
    texts, labels = [], []
    for text, label in itertools.islice(iter_rows(path, num_labels), limit):
        texts.append(text)
        labels.append(label)
    return texts, np.array(labels, np.int32)


def iter_rows(
    path: str | Path, num_labels: int | None = None, require_labels: bool = True
) -> Iterator[tuple[str, int | None]]:
    """Yields ``(text, label)`` for each row of a .tsv, .csv or .jsonl file, reading one row at a time.

    The text column is the first of :data:`TEXT_COLUMNS` the header (JSONL: the first object) has. With
    ``require_labels=False`` a file without a ``label`` column is read too, every label None.

    Raises:
      DataError: an unsupported or missing file, no text (or label) column, a bad row or label, no rows;
        raised when the row is reached (the file's kind and columns are checked at the first row).
    """
    path = Path(path).expanduser()
    label = "a label column" if require_labels else "optionally a label column"
    valid = f"expected a {_SUFFIXES} file with a text (or sentence) column and {label}"
    readers = {".tsv": _tsv_rows, ".csv": _csv_rows, ".jsonl": _jsonl_rows}
    if path.suffix.lower() not in readers:
        raise DataError(f"classification file {path} has unsupported type {path.suffix!r}; {valid}")
    if not path.is_file():
        raise DataError(f"classification file {path} does not exist; {valid}")
    columns = None
    for line, row in readers[path.suffix.lower()](path):
        if columns is None:
            columns = _columns(path, list(row), valid, require_labels)
        text_column, has_labels = columns
        text = _field(path, line, row, text_column, str)
        if not has_labels:
            yield text, None
            continue
        yield text, _label(path, line, _field(path, line, row, LABEL_COLUMN, (str, int)), num_labels)
    if columns is None:
        raise DataError(f"classification file {path} has no rows; {valid}")


def _columns(path: Path, columns: list[str], valid: str, require_labels: bool) -> tuple[str, bool]:
    """The text column's name, and whether the file has labels."""
    found = [name for name in TEXT_COLUMNS if name in columns]
    if not found or (require_labels and LABEL_COLUMN not in columns):
        raise DataError(f"classification file {path} has columns {columns}; {valid}")
    return found[0], LABEL_COLUMN in columns


def _field(path: Path, line: int, row: dict, column: str, kinds: type | tuple[type, ...]) -> object:
    if column not in row:
        raise DataError(f"{path}:{line}: row has no {column!r} field (it has {list(row)})")
    value = row[column]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(f"{path}:{line}: {column} {value!r} has the wrong type")
    return value


def _label(path: Path, line: int, value: str | int, num_labels: int | None) -> int:
    if isinstance(value, str) and not _INTEGER.fullmatch(value):
        raise DataError(f"{path}:{line}: label {value!r} is not an integer; labels must be 0, 1, 2, ...")
    label = int(value)
    limit = _MAX_LABELS if num_labels is None else min(num_labels, _MAX_LABELS)
    if not 0 <= label < limit:
        raise DataError(f"{path}:{line}: label {label} is outside [0, {num_labels or limit})")
    return label


def _tsv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    return _delimited_rows(path, delimiter="\t", quoting=csv.QUOTE_NONE)


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    # strict: a quote left open is an error, rather than a field that runs to the end of the file
    return _delimited_rows(path, strict=True)


def _delimited_rows(path: Path, **dialect) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (line number, {column: value}) for every non-blank row after the header."""
    with _open_text(path) as file:
        reader = csv.reader(file, **dialect)
        try:
            header = next(reader, [])
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}"
                    )
                yield reader.line_num, dict(zip(header, row, strict=True))
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: cannot parse ({error}); expected UTF-8 {path.suffix[1:]}") from None
        except csv.Error as error:
            raise DataError(
                f"{path}:{reader.line_num}: cannot parse ({error}); expected {path.suffix[1:]} rows "
                "whose quoted fields are closed"
            ) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Yields (line number, object) for every non-blank line, each a JSON object."""
    with _open_text(path) as file:
        line = 0
        try:
            for line, text in enumerate(file, start=1):
                if not text.strip():
                    continue
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line}: expected a JSON object, found {type(row).__name__}")
                yield line, row
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: cannot parse ({error}); expected UTF-8 JSON lines") from None
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{line}: invalid JSON ({error.msg}); expected one object per line"
            ) from None


def _open_text(path: Path) -> TextIO:
    try:
        return path.open(encoding="utf-8", newline="")
    except OSError as error:
        raise DataError(f"cannot read classification file {path}: {error.strerror or error}") from None


def load_hf_tokenizer(tokenizer_dir: str | Path):
    """The local Hugging Face tokenizer of ``tokenizer_dir`` (see ``load_transformers_tokenizer``), set
    to pad with its eos token when it has no pad token."""
    tokenizer = load_transformers_tokenizer(tokenizer_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError(f"tokenizer {tokenizer_dir} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
