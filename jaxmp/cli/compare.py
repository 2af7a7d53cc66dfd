"""``python -m jaxmp.compare``: the same training under several precision policies, side by side.

    python -m jaxmp.compare --policies fp32 bf16 fp16 fp16-noscale pure-bf16 --steps 100 --out runs/compare

Every flag but ``--policies`` is ``jaxmp.train``'s and applies to every run (:mod:`jaxmp.training.compare`).
``--out`` is the report directory: policy ``NAME`` trains into ``--out/NAME``. ``--policies`` takes the
policy list of every command (:mod:`jaxmp.cli.policy_list`); an entry without a loss scale trains with
``--loss-scale``.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from jaxmp.cli import print_to_stderr, run_cli
from jaxmp.cli.policy_list import POLICY_LIST_HELP, parse_policy_list
from jaxmp.cli.train_flags import build_parser, config_from_args
from jaxmp.training.compare import Variant, compare, markdown_table

__all__ = ["main"]

_PROG = "python -m jaxmp.compare"
DEFAULT_POLICIES = ("fp32", "bf16", "fp16", "fp16-noscale", "pure-bf16")
# Flags of jaxmp.train that a comparison does not offer: it sets each run's policy, starts fresh runs,
# and reports rather than samples or exports.
_NOT_OFFERED = ("policy", "resume", "export_hf", "sample_tokens")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input)."""
    return run_cli(_PROG, _compare_cli, argv)


def _compare_cli(argv: list[str] | None) -> int:
    parser = build_parser(_PROG, __doc__.splitlines()[0], leave_out=_NOT_OFFERED)
    parser.epilog = (
        "--out is the report directory (default runs/compare-<time>); policy NAME trains into --out/NAME. "
        "A --config file describes one run: its policy, out, sample_tokens and export_hf are ignored."
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_POLICIES),
        help=POLICY_LIST_HELP,
    )
    args = parser.parse_args(argv)
    config = config_from_args(args, ignored_file_keys=("policy", "out", "sample_tokens", "export_hf"))
    now = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(config.out or f"runs/compare-{now}")
    variants = [
        Variant(entry.name, entry.policy, entry.loss_scale or config.loss_scale)
        for entry in parse_policy_list(args.policies)
    ]
    rows = compare(dataclasses.replace(config, sample_tokens=0), variants, out, log=print_to_stderr)
    print(markdown_table(rows))
    print(f"report: {out / 'report.md'}")
    return 0
