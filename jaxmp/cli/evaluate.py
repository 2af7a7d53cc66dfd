"""``python -m jaxmp.evaluate``: perplexity of a text under several precision policies, compared with float32.

    python -m jaxmp.evaluate --model RUN_DIR|HF_DIR --data FILE --policies fp32 bf16 fp16 [--json OUT]
    python -m jaxmp.evaluate --model RUN_DIR --policies fp32 "bf16,weights=int8" "bf16,kv=int8"

The text is cut into non-overlapping windows of ``--seq-len`` tokens (each token predicted from
the ones before it in its window, as a run's validation loss is); the mean negative
log-likelihood is computed in float32 from the model's float32 logits
(:mod:`jaxmp.inference.perplexity`). Without ``--data`` a run directory is evaluated on its own
validation split. ``--policies`` takes the policy list of every command (:mod:`jaxmp.cli.policy_list`),
without loss scales: evaluation runs no backward pass; serving keys (``weights=int8``, ``kv=fp8``) are
welcome. Each policy also continues ``--prompts`` prompts greedily (the first half of a window each,
continued to its end): the table shows the share of tokens equal to float32's and the decoding
speed, and "params MiB" the bytes of the weights as stored (8-bit weights with their scales).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmp.cli import UsageParser, check_output_file, run_cli
from jaxmp.cli.policy_list import POLICY_LIST_HELP, parse_policy_list
from jaxmp.data.corpus import read_corpus
from jaxmp.data.lm import LMDataConfig, load_lm_dataset
from jaxmp.errors import UsageError
from jaxmp.files import write_text_atomically
from jaxmp.inference.load import LoadedModel, load_model
from jaxmp.inference.perplexity import evaluate_policies, markdown_table

__all__ = ["main"]

_PROG = "python -m jaxmp.evaluate"


def _policies(entries: list[str]) -> list[str]:
    """The policies of ``--policies``, which names no loss scale."""
    parsed = parse_policy_list(entries)
    for entry in parsed:
        if entry.loss_scale is not None:
            raise UsageError(
                f"--policies entry {entry.name!r} names a loss scale, which evaluation does not use; "
                f"give {entry.policy}"
            )
    return [entry.policy for entry in parsed]


def _read_text(data: str | None) -> str | None:
    """The text of ``--data`` (None when not given), with the checks ``jaxmp.train`` makes of a corpus."""
    if data is None:
        return None
    if not Path(data).is_file():
        raise UsageError(f"--data {data} is not a file; give a UTF-8 text file")
    return "".join(read_corpus(data).documents())  # DataError: empty, unreadable or not UTF-8


def _tokens(loaded: LoadedModel, model_dir: str, text: str | None, max_tokens: int | None) -> np.ndarray:
    if text is not None:
        tokens_N = loaded.tokenizer.encode(text)
    elif loaded.run_config is not None:
        run = loaded.run_config
        data_config = LMDataConfig(
            data=run.data, tokenizer=run.tokenizer, cache_dir=str(Path(model_dir) / "cache")
        )
        tokens_N = load_lm_dataset(data_config).val_tokens
    else:
        raise UsageError(
            "--data FILE is required for a Hugging Face model (a run defaults to its validation split)"
        )
    tokens_N = np.asarray(tokens_N[:max_tokens], np.int32)
    if len(tokens_N) < 2:
        raise UsageError(f"the text has {len(tokens_N)} token(s); perplexity needs at least 2")
    return tokens_N


def _build_parser() -> UsageParser:
    parser = UsageParser(prog=_PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a jaxmp run directory or a Hugging Face directory")
    parser.add_argument("--data", help="UTF-8 text file (default for a run: its validation split)")
    parser.add_argument(
        "--policies", nargs="+", default=["fp32", "bf16", "fp16"], help=POLICY_LIST_HELP.split(", POLICY@")[0]
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer spec (default: the run's, or the Hugging Face directory's)"
    )
    parser.add_argument(
        "--seq-len", type=int, help="window length (default: the run's seq_len, else the context)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")
    parser.add_argument(
        "--prompts", type=int, default=8, help="prompts continued greedily per policy (0: perplexity only)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def _check_sizes(seq_len: int | None, batch_size: int, max_tokens: int | None, prompts: int) -> None:
    """Raises ``UsageError`` for sizes no model could take (the context is checked once it is loaded)."""
    if prompts < 0:
        raise UsageError(f"--prompts must be >= 0, got {prompts}")
    if seq_len is not None and seq_len < 1:
        raise UsageError(f"--seq-len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be >= 2 (perplexity needs at least 2 tokens), got {max_tokens}")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input)."""
    return run_cli(_PROG, _evaluate_cli, argv)


def _evaluate_cli(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    policies = _policies(args.policies)
    _check_sizes(args.seq_len, args.batch_size, args.max_tokens, args.prompts)
    if args.json:
        check_output_file(args.json, "--json")
    text = _read_text(args.data)
    loaded = load_model(args.model, "fp32", args.tokenizer)
    context = loaded.model.config.max_positions
    seq_len = args.seq_len or (loaded.run_config.seq_len if loaded.run_config else min(context, 1024))
    if seq_len > context:
        raise UsageError(f"--seq-len must be in 1..{context} (the model's context), got {seq_len}")
    tokens_N = _tokens(loaded, args.model, text, args.max_tokens)
    results = evaluate_policies(loaded, policies, tokens_N, seq_len, args.batch_size, args.prompts)
    print(markdown_table(results))
    if args.json:
        record = {
            "model": args.model,
            "seq_len": seq_len,
            "results": [dataclasses.asdict(r) for r in results],
        }
        write_text_atomically(Path(args.json), json.dumps(record, indent=2) + "\n")
    return 0
