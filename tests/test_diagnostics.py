"""Diagnostics: fp16 range fractions against NumPy, the recommended loss scale against real training
steps, the diagnose CLI's bad input, and the in-training signal that names a non-finite parameter."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmp
from jaxmp import diagnostics, models, value_stats
from jaxmp.data.lm import LMDataConfig, load_lm_dataset
from jaxmp.diagnose import main as diagnose_main
from jaxmp.losses import lm_loss
from jaxmp.train_step import leaf_paths
from jaxmp.training.config import TrainConfig
from jaxmp.training.loop import run

TINY = 2.0**-24  # fp16's smallest subnormal
NORMAL = 2.0**-14  # fp16's smallest normal


def straddling_values() -> np.ndarray:
    """float32 values on and either side of every threshold, both signs, plus specials and a spread."""
    edges = [TINY, NORMAL, 65504.0]
    around = [np.nextafter(np.float32(e), np.float32(direction)) for e in edges for direction in (0, np.inf)]
    specials = [0.0, -0.0, 2.0**-25, 2.0**-30, 65520.0, 1e30, np.inf, -np.inf, np.nan, 1.0]
    spread = np.random.default_rng(0).choice([-1, 1], 500) * 2.0 ** np.random.default_rng(1).uniform(
        -40, 20, 500
    )
    values = np.array([*edges, *around, *specials], np.float32)
    return np.concatenate([values, -values, spread.astype(np.float32)])


def numpy_fractions(x: np.ndarray, scale: float) -> dict[str, float]:
    v = np.abs(x.astype(np.float64) * scale)
    finite_or_inf = v[~np.isnan(v)]
    return {
        "max_abs": float(finite_or_inf.max()),
        "overflow": np.mean(v > 65504),
        "underflow": np.mean((v > 0) & (v < TINY)),
        "subnormal": np.mean((v >= TINY) & (v < NORMAL)),
        "zero": np.mean(v == 0),
        "nan": np.mean(np.isnan(v)),
    }


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.0**10])
def test_fractions_equal_numpy_on_values_straddling_the_thresholds(jit, scale):
    x = straddling_values()
    stats_fn = jax.jit(value_stats.range_stats) if jit else value_stats.range_stats
    fractions = value_stats.RangeStats(*jax.device_get(stats_fn(jnp.asarray(x), scale))).fractions()
    expected = numpy_fractions(x, scale)
    assert fractions.keys() == expected.keys()
    for key, value in expected.items():
        assert fractions[key] == pytest.approx(value, rel=1e-6), key
    assert expected["underflow"] > 0 and expected["subnormal"] > 0 and expected["overflow"] > 0


def test_stats_merge_and_histogram_match_numpy():
    x = straddling_values()
    halves = [
        value_stats.RangeStats(*jax.device_get(value_stats.range_stats(part))) for part in np.split(x, 2)
    ]
    whole = value_stats.RangeStats(*jax.device_get(value_stats.range_stats(x)))
    assert halves[0].merge(halves[1]).fractions() == whole.fractions()
    parts = np.split(x, [7, 50, 51])  # segments of different sizes, one of a single value
    segmented = jax.device_get(jax.jit(value_stats.segment_range_stats)([jnp.asarray(p) for p in parts], 4.0))
    for i, part in enumerate(parts):
        fractions = value_stats.RangeStats(*(field[i] for field in segmented)).fractions()
        assert fractions == pytest.approx(numpy_fractions(part, 4.0), rel=1e-6, nan_ok=True)

    counts = np.asarray(value_stats.log2_histogram([jnp.asarray(x[:300]), jnp.asarray(x[300:])]))
    kept = np.abs(x[np.isfinite(x) & (x != 0)]).astype(np.float64)
    expected = np.bincount(np.floor(np.log2(kept)).astype(int) - value_stats.LOG2_BINS[0], minlength=300)
    np.testing.assert_array_equal(counts, expected[: value_stats.LOG2_BINS.size])
    # fp16 values (subnormals included) land in their exact binade
    fp16 = jnp.asarray([TINY, 3 * TINY, NORMAL, 65504.0], jnp.float16)
    index = np.flatnonzero(np.asarray(value_stats.log2_histogram([fp16]))) + value_stats.LOG2_BINS[0]
    assert index.tolist() == [-24, -23, -14, 15]


@pytest.fixture(scope="module")
def small_gpt2():
    model = models.create_model(
        models.get_config("gpt2-tiny", n_layers=2, d_model=64, n_heads=2, d_ff=256), "fp32"
    )
    params = models.init_params(model, jax.random.key(0), 32)
    dataset = load_lm_dataset(LMDataConfig())
    return model, params, [dataset.batch(0, step, 4, 32) for step in range(2)]


def test_recommended_loss_scale_is_the_largest_that_trains_without_overflow(small_gpt2):
    model, params, batches = small_gpt2
    diagnosis = diagnostics.diagnose(model, params, "fp16", batches)
    recommended = diagnosis.recommended_loss_scale
    assert recommended is not None and np.log2(recommended).is_integer()
    assert diagnosis.loss_scale == min(2.0**15, recommended)  # where dynamic scaling settles

    # Checked by the training code path itself: the fp16 train step at a static scale.
    fp16_model = models.create_model(model.config, "fp16")
    optimizer = jaxmp.make_optimizer(learning_rate=1e-3)

    def loss_fn(params, batch, rng):
        return lm_loss(fp16_model.apply({"params": params}, batch["input_ids"]).logits, batch["targets"]), {}

    step = jaxmp.make_train_step(loss_fn, optimizer, "fp16", cast_params=False, donate=False)

    def finite_at(scale):
        state = jaxmp.TrainState.create(
            params=params, optimizer=optimizer, loss_scale=jaxmp.StaticLossScale(scale)
        )
        return [bool(step(state, batch)[1]["grads_finite"]) for batch in batches]

    assert all(finite_at(recommended))
    assert not all(finite_at(2 * recommended))

    entries = {(e.kind, e.name): e for e in diagnosis.entries}
    assert ("param_grad", "lm_head/kernel") not in entries  # tied to token_embed
    held_in = [
        ("activation", "blocks_0/attn/query", "float16"),
        ("activation", "model.logits", "float32"),  # fp32 islands stay fp32
        ("param_grad", "blocks_0/mlp/fc_in/kernel", "float16"),
        ("param_grad", "final_norm/scale", "float32"),
    ]
    assert [entries[kind, name].dtype for kind, name, _ in held_in] == [dtype for *_, dtype in held_in]
    kernel = entries[("param_grad", "blocks_0/mlp/fc_in/kernel")]
    # scaling moves gradient values out of fp16's underflow range and shrinks the error
    assert kernel.at_scale.reference.underflow <= kernel.at_one.reference.underflow
    assert kernel.at_scale.relative_error < kernel.at_one.relative_error
    assert len(diagnosis.at_risk(5)) == 5
    json.dumps(diagnosis.to_json())


def test_diagnose_bad_input_one_line_exit_2_nothing_overwritten(tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "diagnostics.json").write_text("{}")
    cases = [
        (["--model", "gpt5"], "gpt5"),
        (["--model", "bert-tiny"], "causal"),
        (["--policy", "params=float33"], "float33"),
        (["--loss-scale", "static:-1"], "static"),
        (["--seq-len", "4096"], "4096"),
        (["--out", str(existing)], "--overwrite"),
        (["--model", str(tmp_path)], "neither"),
    ]
    for argv, named in cases:
        out = tmp_path / "out"
        argv = argv if "--out" in argv else [*argv, "--out", str(out)]
        assert diagnose_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and named in err, err
        assert not out.exists()
    assert (existing / "diagnostics.json").read_text() == "{}"


def test_a_skipped_step_logs_the_first_non_finite_parameter(tmp_path):
    messages = []
    config = TrainConfig(
        policy="fp16",
        loss_scale="static:1e30",  # every fp16 gradient overflows
        steps=2,
        batch_size=2,
        seq_len=16,
        eval_batches=1,
        sample_tokens=0,
        log_every=1,
        max_consecutive_skips=0,
        out=str(tmp_path / "run"),
    )
    result = run(config, show_progress=False, log=messages.append)
    skips = [m for m in messages if "non-finite gradient" in m]
    assert [m.split(":")[0] for m in skips] == ["micro-step 0", "micro-step 1"]
    named = {re.search(r"\(first: (.+)\), skipped", m).group(1) for m in skips}

    # 1e30 overflows fp16 at the logits, so every gradient is non-finite: the first is the first leaf
    assert named == {leaf_paths(result.state.params)[0]}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 2]
    assert all(0.0 <= r["grad_zero_fraction"] <= 1.0 for r in records)
