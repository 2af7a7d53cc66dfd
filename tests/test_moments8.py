"""Tests for jaxmp.moments8: block-wise 8-bit Adam moments, and how the optimizer chooses each param's storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmp
from jaxmp import lowp, moments8, optim, sharding
from jaxmp.checkpoint import Checkpointer

FP8_MAX = 448.0
# Jitted: eager dispatch of the quantiser's few dozen small ops costs seconds on a loaded CPU.
quantize = jax.jit(moments8.quantize, static_argnames=("kind", "signed"))
dequantize = jax.jit(moments8.dequantize)


def spread_values(shape, seed=0):
    """Normal values times log-normal magnitudes: blocks with a wide range, as Adam moments have."""
    normal, magnitude = jax.random.normal(jax.random.key(seed), (2, *shape))
    return normal * jnp.exp(2.0 * magnitude)


def per_value_scale(moment, shape):
    """Each value's block scale, in ``shape``."""
    size = int(np.prod(shape))
    return jnp.repeat(moment.scale, moments8.BLOCK_SIZE)[:size].reshape(shape)


@pytest.mark.parametrize(("signed", "code_max"), [(True, 127.0), (False, 255.0)])
def test_int8_round_trip_is_within_one_step_of_each_blocks_absmax(signed, code_max):
    x = spread_values((37, 29))  # 1073 values: 5 blocks, the last one padded
    x = x if signed else jnp.abs(x)
    moment = quantize(x, "int8", jax.random.key(1), signed=signed)
    assert moment.codes.shape == x.shape and moment.codes.dtype == (jnp.int8 if signed else jnp.uint8)
    assert moment.scale.shape == (5,) and moment.scale.dtype == jnp.float32
    blocks = jnp.pad(jnp.abs(x).reshape(-1), (0, 5 * 256 - x.size)).reshape(5, 256)
    np.testing.assert_array_equal(moment.scale, blocks.max(axis=1))
    # Stochastic rounding picks one of the two codes around x: off by less than one step, absmax / code_max.
    error = jnp.abs(dequantize(moment) - x)
    assert bool(jnp.all(error <= per_value_scale(moment, x.shape) / code_max * (1 + 1e-6)))


def test_fp8_round_trip_is_within_one_e4m3_step():
    x = spread_values((40, 64))
    moment = quantize(x, "fp8", jax.random.key(1))
    assert moment.codes.dtype == jnp.float8_e4m3fn
    # e4m3 has 3 mantissa bits: a step of at most |x| / 8, and 2^-9 of the code range among subnormals.
    bound = jnp.maximum(jnp.abs(x) / 8, per_value_scale(moment, x.shape) * 2.0**-9 / FP8_MAX)
    assert bool(jnp.all(jnp.abs(dequantize(moment) - x) <= bound * (1 + 1e-6)))


@pytest.mark.parametrize("kind", moments8.KINDS)
def test_stochastic_requantisation_is_unbiased(kind):
    x = jnp.linspace(-1.0, 1.0, 256) ** 3  # one block, absmax 1, values between the codes
    trials = 4000
    keys = jax.random.split(jax.random.key(0), trials)
    mean = jax.jit(jax.vmap(lambda key: moments8.dequantize(quantize(x, kind, key))))(keys).mean(axis=0)
    # Each trial errs by less than one step (1/127 for int8, |x|/8 for fp8); the mean's error is below
    # step / (2 sqrt(trials)) per standard deviation. Allow 5 of them.
    step = 1 / 127 if kind == "int8" else jnp.maximum(jnp.abs(x) / 8, 2.0**-9 / FP8_MAX)
    assert bool(jnp.all(jnp.abs(mean - x) <= 5 * step / (2 * np.sqrt(trials)) + 1e-7))


@pytest.mark.parametrize("kind", moments8.KINDS)
def test_all_zero_block_and_one_huge_value(kind):
    x = jnp.zeros((3, 256)).at[1, 7].set(3e38).at[1, 8].set(1.0)  # block 0 and 2 all zero
    moment = quantize(x, kind, jax.random.key(0))
    np.testing.assert_array_equal(moment.scale, np.asarray([0.0, 3e38, 0.0], np.float32))
    restored = dequantize(moment)
    assert bool(jnp.all(jnp.isfinite(restored)))
    assert float(restored[1, 7]) == pytest.approx(3e38, rel=1e-6)  # the absmax is a code: exact up to fp32
    np.testing.assert_array_equal(restored[0], 0.0)
    np.testing.assert_array_equal(restored[2], 0.0)


def tiny_params():
    """A 4096-value matrix and a 4096-value embedding (8-bit when asked), a small matrix and a bias (fp32)."""
    return {
        "dense": {"kernel": jnp.full((64, 64), 0.1), "bias": jnp.zeros((64,))},
        "token_embed": {"embedding": jnp.full((128, 32), 0.1)},
        "small": {"kernel": jnp.full((16, 16), 0.1)},
    }


def test_moment_storages_protect_small_tensors_and_follow_the_policy():
    params = tiny_params()
    expected = {
        "dense": {"kernel": "int8", "bias": "float32"},
        "token_embed": {"embedding": "int8"},
        "small": {"kernel": "float32"},
    }
    assert optim.moment_storages(params, "int8") == expected
    policy = jaxmp.get_policy("fp32;.*embed.*:moments=float32")
    assert (
        str(jaxmp.get_policy(str(policy)))
        == str(policy)
        == "params=float32,compute=float32,output=float32;.*embed.*:moments=float32"
    )
    assert policy.moments_for("token_embed") == "float32" and policy.moments_for("dense") is None
    expected["token_embed"]["embedding"] = "float32"
    assert optim.moment_storages(params, "int8", policy) == expected
    base = jaxmp.get_policy("params=float32,compute=bfloat16,moments=fp8;.*embed.*:moments=float32")
    assert jaxmp.get_policy(str(base)) == base and base.moments == "fp8"
    expected["dense"]["kernel"] = "fp8"
    assert optim.moment_storages(params, "float32", base) == expected
    with pytest.raises(ValueError, match="unknown moments"):
        jaxmp.get_policy("params=float32,moments=int4")


def test_bytes_per_param_counted_by_hand():
    params = tiny_params()
    opt_state = jaxmp.make_optimizer(moment_dtype="int8", clip_norm=None).init(params)
    num_params = 4096 + 64 + 4096 + 256
    params_bytes = 4 * num_params
    # Two 4096-value int8 tensors: a 1-byte code per value for each moment, one fp32 scale per 256-value
    # block (16 blocks) for each moment.
    quantized = 2 * 2 * (4096 + 16 * 4)
    fp32_moments = 2 * 4 * (64 + 256)  # the bias and the small matrix, two fp32 moments each
    # Scalars: the chain's count, learning rate, weight decay and schedule count; Adam's count and PRNG key.
    scalars = 4 + 4 + 4 + 4 + 4 + 8
    assert lowp.tree_bytes(opt_state) == quantized + fp32_moments + scalars
    expected = (params_bytes + quantized + fp32_moments + scalars) / num_params
    assert lowp.state_bytes_per_param(params, opt_state) == pytest.approx(expected, rel=1e-12)


def make_state(moment_dtype="int8"):
    params = tiny_params()
    optimizer = jaxmp.make_optimizer(learning_rate=1e-2, moment_dtype=moment_dtype)
    state = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=jaxmp.NoOpLossScale(), rng=jax.random.key(0)
    )
    return state, optimizer


def tiny_loss(p, batch, rng):
    del rng
    hidden = jnp.tanh(batch @ p["dense"]["kernel"] + p["dense"]["bias"][None, :])
    return jnp.mean((hidden @ p["token_embed"]["embedding"][:64, :16] @ p["small"]["kernel"][:, :1]) ** 2), {}


@pytest.fixture(scope="module")
def stepped_int8():
    """A jitted train step with int8 moments, a state one step in (moments non-zero), and the batches."""
    state, optimizer = make_state()
    step = jax.jit(jaxmp.make_train_step(tiny_loss, optimizer, "fp32"))
    batches = jax.random.normal(jax.random.key(1), (2, 8, 64))
    state, _ = step(state, batches[0])
    assert isinstance(state.opt_state.inner_state[1], moments8.ScaleByAdamMixedState)  # after clipping
    return state, step, batches


def array_leaves(tree):
    """The leaves of a state or any pytree, PRNG keys as their raw data."""
    if isinstance(tree, jaxmp.TrainState):
        tree = tree.replace(rng=jax.random.key_data(tree.rng))
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(array_leaves(a), array_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def test_non_finite_gradients_skip_the_step_and_keep_the_state_bitwise(stepped_int8):
    state, step, batches = stepped_int8
    for bad in (jnp.inf, jnp.nan):
        stepped, metrics = step(state, batches[1].at[0, 0].set(bad))
        assert not bool(metrics["grads_finite"])
        assert int(stepped.skipped_steps) == int(state.skipped_steps) + 1
        assert_bitwise_equal(stepped.params, state.params)
        assert_bitwise_equal(stepped.opt_state, state.opt_state)


def test_resume_from_a_checkpoint_is_bitwise_exact(tmp_path, stepped_int8):
    state, step, batches = stepped_int8
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=1)
    checkpointer.save(1, state, {})
    restored, _ = checkpointer.restore(make_state()[0])  # same structure, fresh values
    assert_bitwise_equal(restored, state)
    assert_bitwise_equal(step(restored, batches[1])[0], step(state, batches[1])[0])


def test_fsdp_plan_splits_codes_like_their_params():
    # An abstract 2 x 4 mesh: the plan needs only the axis sizes, no devices.
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"))
    state = jax.eval_shape(lambda: make_state()[0])
    shardings = sharding.plan_state_sharding(state, mesh).shardings
    adam = shardings.opt_state.inner_state[1]
    for moment in (adam.mu, adam.nu_sqrt):
        for name in ("dense", "token_embed"):
            (param_sharding,) = jax.tree.leaves(
                shardings.params[name]["kernel" if name == "dense" else "embedding"]
            )
            quantized = moment[name]["kernel" if name == "dense" else "embedding"]
            assert quantized.codes.spec == param_sharding.spec == jax.sharding.PartitionSpec("fsdp")
            assert quantized.scale.spec == jax.sharding.PartitionSpec("fsdp")  # 16 blocks: 4 per device
