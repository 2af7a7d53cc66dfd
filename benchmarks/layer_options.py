"""Scanned and rematerialised layers: compile time and XLA's compiled memory of the train step.

    python benchmarks/layer_options.py [--models gpt2,gpt2-medium] [--shape 8x1024] [--policy bf16]
        [--json layer_options.json]

For each model, the same ``make_train_step`` with the blocks as separate modules (default), one
``nn.scan``-ned block (``scan_layers``: one traced and compiled block whatever the depth), with
each block rematerialised in the backward pass (``remat``), and with both. Lowered on shapes
only, as in ``memory.py``: nothing full-size is allocated.
"""

from __future__ import annotations

import argparse

from common import markdown_table, report
from memory import GIB, measure

VARIANTS = {
    "separate blocks": {},
    "scan_layers": {"scan_layers": True},
    "remat": {"remat": True},
    "scan_layers + remat": {"scan_layers": True, "remat": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,gpt2-medium", help="comma-separated presets")
    parser.add_argument("--shape", default="8x1024", help="BATCHxSEQ")
    parser.add_argument("--policy", default="bf16")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    batch_size, seq_len = (int(n) for n in args.shape.split("x"))
    results = [
        {"variant": name, **measure(preset, args.policy, batch_size, seq_len, **options)}
        for preset in args.models.split(",")
        for name, options in VARIANTS.items()
    ]
    rows = [
        (
            f"{r['model']} {r['batch_size']}x{r['seq_len']}",
            r["variant"],
            f"{r['compile_seconds']:.1f}",
            f"{r['temp_bytes'] / GIB:.2f}",
            f"{(r['argument_bytes'] + r['temp_bytes']) / GIB:.2f}",
        )
        for r in results
    ]
    headers = ("model", "layers", "compile s", "temp GiB", "arguments + temp GiB")
    title = f"Scanned and rematerialised layers (`{args.policy}`)"
    report(title, markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
