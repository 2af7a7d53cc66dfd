"""``python -m jaxmp.train``: train a language model or fine-tune a classifier under a precision policy.

With no flags it trains the ``gpt2-tiny`` preset on tiny Shakespeare (shipped with the
package) with a byte-level tokenizer, reports validation loss, and prints a sample.
"""

from __future__ import annotations

import json

from jaxmp.cli import print_to_stderr, run_cli
from jaxmp.cli.train_flags import build_parser, config_from_args

__all__ = ["main"]


def _print_sample(result, params, config) -> None:
    """Prints ``config.sample_tokens`` generated from a newline, each seeing the last ``seq_len`` tokens."""
    from jaxmp.inference.decode import sample_text
    from jaxmp.models import for_decoding

    model, params = for_decoding(result.task.model, params)
    text = sample_text(
        model,
        params,
        result.task.tokenizer,
        prompt="\n",
        max_new_tokens=config.sample_tokens,
        window=config.seq_len,  # the context the model was trained on
    )
    print("--- sample ---")
    print(text.strip("\n"))
    print("--------------")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input, 1 when training stopped)."""
    return run_cli("python -m jaxmp.train", _train, argv)


def _train(argv: list[str] | None) -> int:
    parser = build_parser(description=__doc__.splitlines()[0])
    config = config_from_args(parser.parse_args(argv))
    from jaxmp import distributed  # heavy imports after --help and flag errors
    from jaxmp.training.loop import TrainingStopped, run
    from jaxmp.training.signals import Interrupted

    try:
        result = run(config, log=print_to_stderr)
    except TrainingStopped as error:
        print_to_stderr(f"{parser.prog}: {error}")
        return 1
    except Interrupted as error:
        print_to_stderr(f"{parser.prog}: {error}")
        return 128 + error.signum
    summary = result.summary
    params = result.host_params  # multi-host: a whole copy in every process (the export's, if any)
    if not distributed.is_primary():  # process 0 alone reports, exports and samples
        return 0 if result.interrupted_by is None else 128 + result.interrupted_by
    print(json.dumps({k: v for k, v in summary.items() if v is not None}, indent=2))
    print(f"run directory: {result.run_dir.path}")
    if result.interrupted_by is not None:
        return 128 + result.interrupted_by
    if result.task.tokenizer is not None and config.sample_tokens > 0:
        _print_sample(result, params, config)
    return 0
