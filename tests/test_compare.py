"""``python -m jaxmp.compare``: the --policies grammar, bad input, and a tiny end-to-end comparison."""

import json

import numpy as np
import pytest
from matplotlib import image

from jaxmp import compare
from jaxmp.cli.policy_list import parse_policy_list
from jaxmp.diagnose import main as diagnose_main
from jaxmp.errors import UsageError
from jaxmp.training import compare as training_compare
from jaxmp.training.compare import Variant

TINY = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2"]


def test_policy_list_grammar():
    entries = parse_policy_list(
        [
            "fp32,bf16",
            "fp16-noscale",
            "fp16@static:1024",
            "params=float32,compute=float16",
            "bf16;.*norm.*:c=f32",
        ]
    )
    assert [(e.name, e.policy, e.loss_scale) for e in entries] == [
        ("fp32", "fp32", None),
        ("bf16", "bf16", None),
        ("fp16-noscale", "fp16", "none"),
        ("fp16@static:1024", "fp16", "static:1024"),
        ("params=float32,compute=float16", "params=float32,compute=float16", None),
        ("bf16;.*norm.*:c=f32", "bf16;.*norm.*:c=f32", None),
    ]
    assert len({Variant(e.name, e.policy, "auto").slug for e in entries}) == len(entries)
    for entries, named in (
        ([], "empty"),
        ([""], "empty"),
        (["fp32,"], "empty"),
        (["fp32", "fp64"], "fp64"),
        (["fp16@static:-1"], "static"),
        (["fp32", "fp32"], "twice"),
        (["a=b"], "'a'"),
    ):
        with pytest.raises(UsageError, match=named):
            parse_policy_list(entries)


def test_ratios_are_against_the_fp32_row():
    rows = [
        {
            "policy": "params=float32,compute=bfloat16,output=float32",
            "final_val_loss": 3.3,
            "step_time_s": 0.5,
        },
        {
            "policy": "params=float32,compute=float32,output=float32",
            "final_val_loss": 3.0,
            "step_time_s": 1.0,
        },
    ]
    training_compare._add_ratios(rows)
    assert rows[0]["val_loss_ratio"] == pytest.approx(1.1) and rows[0]["step_time_ratio"] == 0.5
    training_compare._add_ratios(rows[:1])
    assert rows[0]["val_loss_ratio"] is None


def status_of(argv: list[str]) -> int:
    """The exit status of ``python -m jaxmp.compare ARGV`` (argparse's own errors exit)."""
    try:
        return compare.main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_bad_input_one_line_exit_2_nothing_overwritten(tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    cases = [
        (["--policies", "fp32", "fp64"], "fp64"),
        (["--policies", ""], "empty"),
        (["--policies"], "--policies"),
        (["--model", "gpt5"], "gpt5"),
        (["--policy", "bf16"], "unrecognized arguments: --policy bf16"),  # no abbreviation of --policies
        (["--resume"], "unrecognized arguments: --resume"),
        (["--steps", "0"], "--steps"),
    ]
    for argv, named in cases:
        assert status_of([*TINY, *argv, "--out", str(report), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and named in err, (argv, err)
    assert compare.main([*TINY, "--policies", "fp32", "--out", str(report)]) == 2  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in report.iterdir()] == ["report.json"]
    assert (report / "report.json").read_text() == "{}"


def test_compare_end_to_end_report_plots_and_zero_gradients(tmp_path, capsys):
    out = tmp_path / "report"
    # --overwrite of a directory that does not exist yet is a fresh start (it once removed the
    # checkpoints folder the run had just made)
    argv = [
        *TINY,
        "--log-every",
        "1",
        "--policies",
        "fp16",
        "fp16-noscale",
        "fp8",
        "--out",
        str(out),
        "--overwrite",
    ]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| fp16 | auto |" in printed and "| fp16-noscale | none |" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 6 and "policy" not in report["config"]
    rows = {row["name"]: row for row in report["policies"]}
    assert list(rows) == ["fp16", "fp16-noscale", "fp8"]
    for row in rows.values():
        summary = json.loads((out / row["run_dir"] / "summary.json").read_text())
        assert row["status"] == "ok" and row["policy"] == summary["policy"]
        for key in (
            "final_val_loss",
            "step_time_s",
            "state_bytes_per_param",
            "skipped_steps",
            "final_loss_scale",
        ):
            assert row[key] == summary[key], key
        assert row["tokens_per_s"] == pytest.approx(4 * 32 / summary["step_time_s"])
        assert row["val_loss_ratio"] is None  # no fp32 run to compare with
        memory = row["compiled_memory"]
        assert set(memory) == {"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes"}
        assert memory["argument_bytes"] > 4 * 3_000_000  # at least the fp32 params
        assert 0.0 < row["grad_zero_fraction"] < 1.0
    assert rows["fp16"]["final_loss_scale"] == 2.0**15 and rows["fp16-noscale"]["final_loss_scale"] == 1.0

    # Without loss scaling, fp16 gradients underflow to zero; dynamic scaling keeps them.
    scaled, unscaled = rows["fp16"]["grad_zero_fraction"], rows["fp16-noscale"]["grad_zero_fraction"]
    print(f"zero-gradient fraction: fp16 dynamic {scaled:.4%}, fp16 no scaling {unscaled:.4%}")
    assert unscaled > scaled + 1e-5
    assert rows["fp16-noscale"]["grad_zero_fraction_last"] > rows["fp16"]["grad_zero_fraction_last"]

    # the delayed fp8 run logs every fp8 dot's scales of x, w and the gradient at each record
    records = [json.loads(line) for line in (out / "fp8" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["fp8_scale"]) == 6 * 4 for r in records)  # 6 dots x 4 blocks
    assert all(len(scales) == 3 and min(scales) > 1 for scales in records[-1]["fp8_scale"].values())
    assert "fp8_scale" not in json.loads((out / "fp16" / "metrics.jsonl").read_text().splitlines()[0])
    for name in ("loss.png", "loss_scale.png", "amax.png"):
        pixels = image.imread(out / name)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 800
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # more than a blank canvas
    markdown = (out / "report.md").read_text()
    assert (
        "| fp16-noscale | none |" in markdown
        and "](loss.png)" in markdown
        and "](loss_scale.png)" in markdown
        and "](amax.png)" in markdown
    )

    # a run of the comparison can be diagnosed (the run-directory path of jaxmp.diagnose), fp8 tensors too
    diagnosis = out / "diagnosis"
    small = ["--batches", "1", "--batch-size", "2", "--seq-len", "16", "--policy", "fp8"]
    assert diagnose_main(["--model", str(out / "fp8"), *small, "--out", str(diagnosis)]) == 0
    written = json.loads((diagnosis / "diagnostics.json").read_text())
    assert written["recommended_loss_scale"] >= 1 and written["at_risk"]
    assert len(written["fp8"]) == 3 * 6 * 4 and all(t["saturated"] == 0 for t in written["fp8"])  # current
    printed = capsys.readouterr().out
    fp8_rows = [line for line in printed.splitlines() if "| float8_e" in line]
    assert "| fp8 dot | tensor | format |" in printed and len(fp8_rows) == 12  # --top
    assert image.imread(diagnosis / "grad_hist.png").shape[0] > 300
