"""``python -m jaxmp.predict``: classify every row of a file with a fine-tuned classifier under a policy.

    python -m jaxmp.predict --model RUN_DIR|HF_DIR --data texts.tsv --policy bf16 [--out preds.tsv|.jsonl]

``--data`` is read as ``jaxmp.train --task classify`` reads it (.tsv, .csv or .jsonl with a ``text`` or
``sentence`` column), a chunk of rows at a time, so a file larger than memory streams through; a
``label`` column, when there is one, is scored and the accuracy printed. A run's ``--seq-len``,
``--pad-multiple`` and ``--batch-size`` are the defaults, so the batches are those of the run's
evaluation (:mod:`jaxmp.inference.classify`). ``--out`` gets one line per row: its index, the predicted
label, the probability of each label (and the true label when the file has labels), as TSV or JSON
lines by its suffix, written atomically: nothing is left at ``--out`` unless every row was predicted.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import tqdm

from jaxmp.cli import UsageParser, check_output_file, run_cli
from jaxmp.data.classify import iter_rows
from jaxmp.errors import UsageError
from jaxmp.files import atomic_write
from jaxmp.inference.classify import Classifier, CompileTimes, Prediction, load_classifier, predict_rows
from jaxmp.training.metrics_log import progress_style

__all__ = ["main"]

_PROG = "python -m jaxmp.predict"
_OUT_SUFFIXES = (".tsv", ".jsonl")
_CHUNK_BATCHES = 128  # batches read and tokenized at once (--chunk-rows default: this many batches)
_PROGRESS_EVERY = 10_000  # rows between progress lines when stderr is not a terminal


def _build_parser() -> UsageParser:
    parser = UsageParser(prog=_PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a jaxmp.train classify run or a Hugging Face directory"
    )
    parser.add_argument(
        "--data", required=True, help=".tsv, .csv or .jsonl rows with a text (or sentence) column"
    )
    parser.add_argument("--policy", default="fp32", help="serving precision policy, e.g. bf16 or pure-bf16")
    parser.add_argument("--out", help="predictions file, .tsv or .jsonl (default: none, only the summary)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="rows per forward pass (default: the run's, else 32)",
    )
    parser.add_argument(
        "--seq-len", type=int, help="max tokens after truncation (default: the run's, else 128)"
    )
    parser.add_argument(
        "--pad-multiple",
        type=int,
        help="pad a batch to its longest row rounded up to this (default: the run's, else 16)",
    )
    parser.add_argument(
        "--chunk-rows", type=int, help=f"rows read at a time (default: {_CHUNK_BATCHES} batches)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines on stderr")
    return parser


def _check_out(out: str | None, overwrite: bool) -> None:
    if out is None:
        return
    if Path(out).suffix.lower() not in _OUT_SUFFIXES:
        raise UsageError(f"--out {out} has suffix {Path(out).suffix!r}; give a .tsv or .jsonl file name")
    if Path(out).is_file() and not overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it or choose a new file name")
    check_output_file(out, "--out")


def _line(prediction: Prediction, suffix: str) -> str:
    probabilities = [float(p) for p in prediction.probabilities]
    if suffix == ".jsonl":
        record = {"row": prediction.row, "prediction": prediction.label, "probabilities": probabilities}
        if prediction.true_label is not None:
            record["label"] = prediction.true_label
        return json.dumps(record) + "\n"
    fields = [
        prediction.row,
        prediction.label,
        *(f"{p:.9g}" for p in probabilities),
    ]  # 9 digits: exact float32
    if prediction.true_label is not None:
        fields.append(prediction.true_label)
    return "\t".join(map(str, fields)) + "\n"


def _header(classifier: Classifier, has_labels: bool) -> str:
    names = ["row", "prediction", *(f"p_{label}" for label in range(classifier.num_labels))]
    return "\t".join(names + (["label"] if has_labels else [])) + "\n"


class _Tally:
    """Rows seen and rows predicted right, with progress on stderr."""

    def __init__(self, show: bool):
        self.rows = self.labelled = self.correct = 0
        style = progress_style(show)
        self._bar = tqdm.tqdm(unit="row", leave=False) if style == "bar" else None
        self._lines = style == "lines"
        self._started = time.perf_counter()

    def add(self, prediction: Prediction) -> None:
        self.rows += 1
        if prediction.true_label is not None:
            self.labelled += 1
            self.correct += prediction.label == prediction.true_label
        if self._bar is not None:
            self._bar.update(1)
        elif self._lines and self.rows % _PROGRESS_EVERY == 0:
            rate = self.rows / (time.perf_counter() - self._started)
            print(f"rows {self.rows}  rows/s {rate:.0f} (compilation included)", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _write(predictions: Iterator[Prediction], classifier: Classifier, out: str | None, tally: _Tally) -> None:
    """Consumes ``predictions`` into ``tally`` and, when given, the ``out`` file (atomically)."""
    if out is None:
        for prediction in predictions:
            tally.add(prediction)
        return
    suffix = Path(out).suffix.lower()

    def write(file: BinaryIO) -> None:
        for prediction in predictions:
            if suffix == ".tsv" and tally.rows == 0:
                file.write(_header(classifier, prediction.true_label is not None).encode("utf-8"))
            tally.add(prediction)
            file.write(_line(prediction, suffix).encode("utf-8"))

    atomic_write(out, write)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input)."""
    return run_cli(_PROG, _predict_cli, argv)


def _predict_cli(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    _check_out(args.out, args.overwrite)
    next(iter_rows(args.data, require_labels=False))  # no text column, no rows: refused before loading
    classifier = load_classifier(args.model, args.policy)
    batch_size = classifier.batch_size if args.batch_size is None else args.batch_size
    compile_times = CompileTimes()
    predictions = predict_rows(
        classifier,
        iter_rows(args.data, num_labels=classifier.num_labels, require_labels=False),
        batch_size=batch_size,
        seq_len=args.seq_len,
        pad_multiple=args.pad_multiple,
        chunk_rows=_CHUNK_BATCHES * batch_size if args.chunk_rows is None else args.chunk_rows,
        compile_times=compile_times,
    )
    tally = _Tally(not args.no_progress)
    started = time.perf_counter()
    try:
        _write(predictions, classifier, args.out, tally)
    finally:
        tally.close()
    seconds = time.perf_counter() - started - compile_times.seconds
    _report(tally, classifier, seconds, compile_times, args.out)
    return 0


def _report(
    tally: _Tally, classifier: Classifier, seconds: float, compile_times: CompileTimes, out: str | None
):
    if tally.labelled:
        print(f"accuracy {tally.correct / tally.labelled:.6f} ({tally.correct}/{tally.labelled} rows)")
    print(
        f"{tally.rows} rows in {seconds:.2f} s: {tally.rows / seconds:.1f} sentences/s (compilation excluded) | "
        f"compile {compile_times.seconds:.2f} s for {len(compile_times.lengths)} batch lengths "
        f"{sorted(compile_times.lengths)} | policy {classifier.model.policy}"
    )
    if out:
        print(f"predictions: {out}")
