"""The default CLI run, end to end: ``python -m jaxmp.train --policy P`` (gpt2-tiny, 32 x 64, 400 steps).

    python benchmarks/cli_run.py [--policies bf16] [--steps 400] [--json cli_run.json]

Runs the CLI in a subprocess per policy (one after another, into a temporary run directory) and
reports its wall time, the CPU time it used, and the median micro-step time from ``summary.json``
(compilation and evaluation left out). ``--steps`` shortens the run for a quick look.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, markdown_table, report


def run_cli(policy: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "jaxmp.train", "--policy", policy, "--out", str(out)]
        if steps != 400:
            command += ["--steps", str(steps)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary = json.loads((out / "summary.json").read_text())
    return {
        "command": " ".join(["python", *command[1:]]).replace(str(out), "RUN_DIR"),
        "policy": policy,
        "steps": steps,
        "wall_seconds": wall,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "step_time_s": summary["step_time_s"],
        "train_wall_seconds": summary["wall_seconds"],
        "final_val_loss": summary.get("final_val_loss"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="bf16", help="comma-separated policies")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = [run_cli(policy, args.steps) for policy in args.policies.split(",")]
    rows = [
        (
            f"`{r['command']}`",
            f"{r['wall_seconds']:.0f}",
            f"{r['cpu_seconds']:.0f}",
            f"{r['step_time_s'] * 1e3:.0f}",
            f"{r['final_val_loss']:.3f}" if r["final_val_loss"] is not None else "-",
        )
        for r in results
    ]
    headers = ("command", "wall s", "CPU s", "median step ms", "final val loss")
    report("Default CLI run", markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
