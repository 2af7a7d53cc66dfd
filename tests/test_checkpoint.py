"""TrainState survives jit, lower, tree_map and an orbax checkpoint round trip, every field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmp
from jaxmp.checkpoint import Checkpointer, CheckpointError


def make_state(seed=0, loss_scale=None):
    params = {"w": jax.random.normal(jax.random.key(seed), (4, 3)), "b": jnp.arange(3.0)}
    optimizer = jaxmp.make_optimizer(learning_rate=1e-2, accum_steps=3)
    state = jaxmp.TrainState.create(
        params=params,
        optimizer=optimizer,
        loss_scale=loss_scale
        or jaxmp.DynamicLossScale(initial_scale=64.0, period=5, min_scale=0.5, hysteresis=2),
        rng=jax.random.key(seed + 7),
    )
    step = jaxmp.make_train_step(
        lambda p, b, r: (jnp.sum((b @ p["w"] + p["b"][None, :]) ** 2), {}), optimizer, "fp32"
    )
    state, _ = step(state, jnp.ones((2, 4)))  # mid-window: non-trivial accumulator
    return state


def leaves_as_numpy(state):
    state = state.replace(rng=jax.random.key_data(state.rng))
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def assert_states_equal(a, b):
    assert jax.tree.structure(a.replace(rng=0)) == jax.tree.structure(b.replace(rng=0))
    for x, y in zip(leaves_as_numpy(a), leaves_as_numpy(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_train_state_survives_jit_lower_and_tree_map():
    state = make_state()
    assert_states_equal(jax.jit(lambda s: s)(state), state)
    lowered = jax.jit(lambda s: s.replace(step=s.step + 1)).lower(state)
    assert len(jax.tree.leaves(lowered.args_info)) == len(jax.tree.leaves(state))  # every field an input
    stepped = lowered.compile()(state)
    assert int(stepped.step) == int(state.step) + 1
    assert_states_equal(stepped.replace(step=state.step), state)
    shapes = jax.tree.map(lambda x: x.shape, state.replace(rng=jax.random.key_data(state.rng)))
    assert shapes.params["w"] == (4, 3) and shapes.loss_scale.min_scale == ()


@pytest.mark.parametrize(
    "make_loss_scale",
    [lambda: None, lambda: jaxmp.StaticLossScale(8.0), jaxmp.NoOpLossScale],
    ids=["dynamic", "static", "noop"],
)
def test_checkpoint_round_trip_keeps_every_field(tmp_path, make_loss_scale):
    state = make_state(seed=1, loss_scale=make_loss_scale())
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2)
    checkpointer.save(1, state, {"data_position": 1, "policy": "fp32"})
    target = make_state(seed=5, loss_scale=make_loss_scale())  # same structure, other values
    restored, metadata = checkpointer.restore(target)
    assert metadata == {"data_position": 1, "policy": "fp32"}
    assert_states_equal(restored, state)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)


def test_checkpointer_keeps_the_newest(tmp_path):
    state = make_state()
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, state, {"step": step})
    assert checkpointer.all_steps() == [2, 3] and checkpointer.latest_step() == 3
    _, metadata = checkpointer.restore(state, step=2)
    assert metadata == {"step": 2}
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path / "empty").restore(state)


def test_restore_params_alone_in_another_dtype(tmp_path):
    state = make_state(seed=3)
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(4, state, {})
    target = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), state.params)
    params = checkpointer.restore_params(target)
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got, np.asarray(want).astype(jnp.bfloat16))
