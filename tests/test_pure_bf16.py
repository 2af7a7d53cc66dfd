"""``--policy pure-bf16`` end to end: bytes per parameter, low-precision state, exact resume."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmp.checkpoint import Checkpointer
from jaxmp.training.config import TrainConfig
from jaxmp.training.loop import run


def logged_losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_config(tmp_path, model_dir, **changes) -> TrainConfig:
    """A few steps of the tiny GPT-2 at ``model_dir`` (the dtypes do not depend on the model's size)."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("Now is the winter of our discontent made glorious summer. " * 200)
    fields = dict(
        data=str(corpus),
        init=str(model_dir),
        policy="pure-bf16",
        steps=6,
        batch_size=2,
        seq_len=16,
        eval_batches=1,
        log_every=1,
        eval_every=0,
        sample_tokens=0,
        out=str(tmp_path / "run"),
    )
    return TrainConfig(**(fields | changes))


@pytest.mark.parametrize(
    "param_update, moment_dtype, at_most",
    [("kahan", "bfloat16", 8.0), ("stochastic", "bfloat16", 8.0), ("kahan", "float32", 12.0)],
)
def test_bytes_per_param_from_the_real_state(tmp_path, tiny_lm_dir, param_update, moment_dtype, at_most):
    result = run(
        tiny_config(tmp_path, tiny_lm_dir, param_update=param_update, moment_dtype=moment_dtype, steps=2)
    )
    state = result.state
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state.params))
    floats = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.size > 2]  # not counts or keys
    moment = jnp.bfloat16 if moment_dtype == "bfloat16" else jnp.float32
    assert {leaf.dtype for leaf in floats} <= {np.dtype(moment), np.dtype(jnp.int16)}
    n_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    scalars = 128  # step counts and PRNG keys: bytes for the whole state, not per parameter
    assert result.summary["state_bytes_per_param"] <= at_most + scalars / n_params
    assert np.isfinite(result.summary["final_train_loss"])


def test_pure_bf16_stochastic_resumes_exactly(tmp_path, tiny_lm_dir):
    config = tiny_config(
        tmp_path, tiny_lm_dir, param_update="stochastic", moment_dtype="bfloat16", save_every=3
    )
    straight = run(config)
    final = jax.tree.map(np.asarray, straight.state.params)
    losses = logged_losses(tmp_path / "run")
    # as if killed after the mid-run checkpoint: drop the final one and what was logged after
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    resumed = run(dataclasses.replace(config, resume=True))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed.state.params), final)
    assert logged_losses(tmp_path / "run") == losses and len(losses) == 6
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 6
