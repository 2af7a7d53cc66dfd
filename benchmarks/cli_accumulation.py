"""The train CLI with gradient accumulation, before and after it ran each window as one scanned call.

    python benchmarks/cli_accumulation.py [--before REF] [--accum-steps 4] [--steps 60] [--repeats 2]

Checks ``REF`` (default: the commit before window-at-once training) out into a temporary git
worktree and runs ``python -m jaxmp.train`` from it and from this checkout, alternately, with the
same flags (gpt2-tiny, fp32, batch 8 x 64, ``--accum-steps``). Reports each version's median
micro-step time from ``summary.json`` (compilation and evaluation left out) and the ratio, both
measured in the same run on the same machine, plus the final validation losses (equal up to
rounding: the same training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, markdown_table, median, report

BEFORE = "349b35d"  # the last commit whose train CLI called the step once per micro-step


def run_cli(source: Path, out: Path, accum_steps: int, steps: int) -> dict:
    command = [
        sys.executable, "-m", "jaxmp.train", "--policy", "fp32", "--accum-steps", str(accum_steps),
        "--steps", str(steps), "--batch-size", "8", "--eval-every", "0", "--save-every", "0",
        "--sample-tokens", "0", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(source)}
    subprocess.run(command, cwd=source, check=True, capture_output=True, env=env)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git ref of the per-micro-step CLI")
    parser.add_argument("--accum-steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=REPO, check=True
        )
        try:
            summaries: dict[str, list[dict]] = {"before": [], "after": []}
            for repeat in range(args.repeats):
                for name, source in (("before", worktree), ("after", REPO)):
                    out = Path(tmp) / f"{name}-{repeat}"
                    summaries[name].append(run_cli(source, out, args.accum_steps, args.steps))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=True)
    step_ms = {name: median([s["step_time_s"] for s in runs]) * 1e3 for name, runs in summaries.items()}
    rows = [
        (
            name,
            f"{step_ms[name]:.1f}",
            f"{step_ms['before'] / step_ms[name]:.2f}",
            f"{summaries[name][0]['final_val_loss']:.4f}",
        )
        for name in ("before", "after")
    ]
    results = {"args": vars(args), "step_ms": step_ms, "summaries": summaries}
    title = f"CLI step time, --accum-steps {args.accum_steps}: per-micro-step calls vs one scanned call"
    headers = ("version", "median micro-step ms", "speed-up vs before", "final val loss")
    report(title, markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
