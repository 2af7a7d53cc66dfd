"""Batch classification (``jaxmp.predict``) of a fine-tuned run under several serving policies, side by side.

    python benchmarks/predict.py --run RUN_DIR [--data dev.tsv] [--repeats 3] [--json out.json]

``RUN_DIR`` is made by ``python -m jaxmp.train --task classify``. Each policy loads the run's float32
params and casts them once, or quantises them to 8 bits (``jaxmp.inference.load.serving_params``); a first pass over ``--data``
compiles one program per batch length and gives the accuracy, compared with the run's reported
``final_val_accuracy``. Then the passes are timed, policies interleaved (``a b c a b c ...``) so a
neighbour's load hits all of them alike: sentences/s is the rows over the median wall time of a whole
pass (reading, tokenizing, forward passes and copying the predictions back; compilation excluded, as
every shape is compiled by then). Batches use the run's ``seq_len``, ``pad_multiple`` and batch size.
Prints a markdown table; ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import interleaved_times, markdown_table, median, report

from jaxmp.data.classify import iter_rows
from jaxmp.inference.classify import Classifier, CompileTimes, load_classifier, predict_rows
from jaxmp.lowp import tree_bytes

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.tsv"
POLICIES = {
    "fp32": "fp32",
    "bf16 compute": "bf16",
    "pure bf16 (bf16 params)": "params=bfloat16,compute=bfloat16",
    "int8 weights, bf16 compute": "bf16,weights=int8",
    "fp8 weights, bf16 compute": "bf16,weights=fp8",
}


def predict_pass(
    classifier: Classifier, data: Path, compile_times: CompileTimes | None = None
) -> tuple[int, int]:
    """Predicts every row of ``data``; returns (rows, rows predicted right)."""
    rows = iter_rows(data, num_labels=classifier.num_labels)
    rows_seen = correct = 0
    for prediction in predict_rows(classifier, rows, compile_times=compile_times):
        rows_seen += 1
        correct += prediction.label == prediction.true_label
    return rows_seen, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a jaxmp.train --task classify run directory")
    parser.add_argument("--data", default=str(SST2_DEV), help="labelled rows (default: SST-2 dev)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per policy")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reported = json.loads((Path(args.run) / "summary.json").read_text())["final_val_accuracy"]
    classifiers, results = {}, {}
    for name, policy in POLICIES.items():
        classifier = load_classifier(args.run, policy)
        compile_times = CompileTimes()
        started = time.perf_counter()
        rows, correct = predict_pass(classifier, Path(args.data), compile_times)
        first_pass = time.perf_counter() - started
        classifiers[name] = classifier
        results[name] = {
            "policy": str(classifier.model.policy),
            "rows": rows,
            "accuracy": correct / rows,
            "compile_s": compile_times.seconds,
            "batch_lengths": sorted(compile_times.lengths),
            "first_pass_s": first_pass,
            "params_mib": tree_bytes(classifier.params) / 2**20,
        }
    times = interleaved_times(
        {name: lambda c=c: predict_pass(c, Path(args.data)) for name, c in classifiers.items()}, args.repeats
    )
    for name, result in results.items():
        result["wall_s"] = times[name]["wall"]
        result["sentences_per_s"] = result["rows"] / median(times[name]["wall"])
    table = markdown_table(
        ["policy", "accuracy", "= run's reported", "sentences/s", "compile s", "params MiB"],
        [
            [
                f"{name} (`{POLICIES[name]}`)",
                f"{r['accuracy']:.6f}",
                "yes" if r["accuracy"] == reported else f"no ({reported:.6f})",
                f"{r['sentences_per_s']:.0f}",
                f"{r['compile_s']:.1f}",
                f"{r['params_mib']:.1f}",
            ]
            for name, r in results.items()
        ],
    )
    title = f"jaxmp.predict on {Path(args.data).name} ({rows} rows; run reported final_val_accuracy {reported:.6f})"
    report(title, table, {"reported_accuracy": reported, "policies": results}, args.json)


if __name__ == "__main__":
    main()
