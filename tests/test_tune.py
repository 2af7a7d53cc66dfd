"""Adaptive precision: the search over units (hand-computed), the policy string it writes (resolved
again), a planted fragile module that must stay out of float16, and the CLI's outputs and bad input."""

import json
import math

import jax
import numpy as np
import pytest
from test_fp8 import shakespeare_batches

import jaxmp
from jaxmp import models
from jaxmp.module_policy import module_paths
from jaxmp.policy_search import Option, check_assignment, choose, policy_string, units_of
from jaxmp.training.config import TrainConfig
from jaxmp.training.tune import tune
from jaxmp.tune import main as tune_main


def test_the_greedy_knapsack_takes_the_best_saving_per_loss_within_the_budget():
    options = [
        Option("a", "bfloat16", 0.010, 10.0),  # 1000 per unit of loss
        Option("a", "float16", 0.002, 10.0),  # 5000: a's better option
        Option("b", "bfloat16", 0.004, 4.0),  # 1000
        Option("c", "bfloat16", -1e-6, 1.0),  # within noise: free
        Option("d", "bfloat16", 0.0, -5.0),  # costs more than it saves: never
        Option("e", "float16", 0.0, 50.0, overflow=0.01),  # breaks float16's range: never
        Option("f", "bfloat16", math.inf, 99.0),  # breaks: never
        Option("g", "float16", -1e-6, 1.0),  # free but small ...
        Option("g", "bfloat16", 1e-4, 8.0),  # ... and where the budget allows, the larger saving
    ]
    assert choose(options, budget=0.005) == {"g": "bfloat16", "c": "bfloat16", "a": "float16"}  # b: no room
    assert choose(options, budget=0.0062) == {
        "g": "bfloat16",
        "c": "bfloat16",
        "a": "float16",
        "b": "bfloat16",
    }
    assert choose(options, budget=0.0) == {"g": "float16", "c": "bfloat16"}


def test_the_policy_string_matches_exactly_the_chosen_units_and_keeps_the_islands():
    model = models.get_model("gpt2-tiny", "fp32")
    paths = [path for path, _ in module_paths(model, jax.numpy.zeros((1, 8), jax.numpy.int32))]
    units = units_of(paths, 2)
    assert "blocks_0/attn" in units and "blocks_0/norm1" not in units and "final_norm" not in units
    assignment = {"blocks_0/mlp": "bf16", "blocks_2/mlp": "bf16", "blocks_1/attn": "fp16", "lm_head": "bf16"}
    spec = policy_string(assignment, paths)
    assert spec == (
        "fp32;(?:blocks_1/attn/softmax|lm_head/logits):compute=float32;"
        "(?:blocks_(?:0|2)/mlp|lm_head)(?:/.*)?:compute=bfloat16;blocks_1/attn(?:/.*)?:compute=float16"
    )
    check_assignment(spec, assignment, paths)  # every module resolves to its unit's choice, islands fp32
    policy = jaxmp.get_policy(spec)
    assert policy.for_module("blocks_1/attn/query").compute_dtype == np.float16
    assert policy.for_module("blocks_1/mlp/fc_in").compute_dtype == np.float32
    assert policy.for_module("blocks_1/attn/softmax").compute_dtype == np.float32
    TrainConfig(policy=spec).check()  # jaxmp.train takes it as is
    with pytest.raises(ValueError, match="gives blocks_3/mlp float32, not the chosen float16"):
        check_assignment(spec, {**assignment, "blocks_3/mlp": "fp16"}, paths)
    # the fp8 candidate: bf16 compute with fp8 matmuls (current scaling) for the unit's dense layers
    with_fp8 = {"blocks_0/mlp": "fp8", "blocks_1/attn": "bf16"}
    spec = policy_string(with_fp8, paths)
    assert spec.endswith(";blocks_0/mlp(?:/.*)?:compute=bfloat16,matmul=fp8-current")
    check_assignment(spec, with_fp8, paths)
    assert jaxmp.get_policy(spec).fp8_recipe("blocks_0/mlp/fc_in") is not None
    assert jaxmp.get_policy(spec).fp8_recipe("blocks_1/attn/query") is None


def test_a_fragile_module_stays_out_of_float16_and_the_tuned_policy_trains_without_skips():
    config = dict(vocab_size=256, n_layers=4, d_model=32, n_heads=2, d_ff=64, max_positions=64)
    model = models.get_model("gpt2-tiny", "fp32", **config)
    params = models.init_params(model, jax.random.key(0), 32)
    fc_in = params["blocks_2"]["mlp"]["fc_in"]
    fc_in["kernel"] = fc_in["kernel"] * 1e6  # block 2's MLP activations reach ~1e5: beyond float16's 65504
    batches = list(shakespeare_batches(22, size=4, length=32))
    result = tune(
        model, params, batches[:20], batches[20:], candidates=("fp32", "fp16"), objective="memory",
        budget=0.01, steps=20,
    )  # fmt: skip
    fragile = next(o for o in result.options if o.unit == "blocks_2/mlp")
    assert fragile.overflow > 0.1 and "blocks_2/mlp" not in result.assignment
    lowered_mlps = [
        unit for unit in ("blocks_0/mlp", "blocks_1/mlp", "blocks_3/mlp") if unit in result.assignment
    ]
    assert len(lowered_mlps) >= 2, result.assignment  # most of the others do go to float16
    assert set(result.assignment.values()) == {"float16"}
    assert result.verified.skipped_steps <= 2 and result.loss_scale.startswith("static:")
    assert result.verified_increase <= result.budget and result.policy.startswith("fp32;")
    policy = jaxmp.get_policy(result.policy)
    assert policy.for_module("blocks_2/mlp/fc_in").compute_dtype == np.float32
    for unit in lowered_mlps:
        assert policy.for_module(f"{unit}/fc_in").compute_dtype == np.float16


def test_tune_cli_writes_its_report_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "tune"
    small = ["--depth", "1", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--val-batches", "1",
             "--out", str(out)]  # fmt: skip
    assert tune_main(["--candidates", "fp32,bf16", "--objective", "memory", *small]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "tune.json").read_text())
    assert f"policy: {record['policy']}" in printed and "verified" in printed
    assert record["objective"] == "memory" and len(record["options"]) == len(record["units"])
    check_assignment(record["policy"], record["assignment"], record["units"])
    assert "| unit | candidate |" in (out / "report.md").read_text()
    assert all((out / name).stat().st_size > 10_000 for name in ("sensitivity.png", "loss.png"))

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short to hold out a validation batch")
    for argv, named in [
        (["--candidates", "fp32,fp9"], "unknown dtype 'fp9'"),
        (["--candidates", "fp32"], "names no dtype below float32"),
        (["--budget", "0"], "--budget must be > 0"),
        (["--budget=-1%"], "--budget must be > 0"),
        (["--budget", "half"], "--budget 'half' is not a number"),
        (["--data", str(tiny)], "validation split has"),
        ([], "exists; choose another --out or pass --overwrite"),  # the report above
    ]:
        where = out if not argv else tmp_path / "refused"
        assert tune_main([*argv, *small[:-1], str(where)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err
        assert argv == [] or not where.exists()
