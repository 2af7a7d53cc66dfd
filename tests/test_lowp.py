"""Tests for jaxmp.lowp: stochastic rounding, param updates for bf16/fp16 params, low-precision Adam moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmp import lowp

LOW_DTYPES = [jnp.bfloat16, jnp.float16]
ALL_KINDS = list(lowp.PARAM_UPDATE_KINDS)


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def neighbours(x, dtype):
    """The two values of ``dtype`` around fp32 ``x`` (as float64 numpy arrays)."""
    x = np.asarray(x, np.float32)
    nearest = x.astype(dtype)
    toward = np.where(nearest.astype(np.float32) <= x, np.inf, -np.inf).astype(dtype)
    other = np.nextafter(nearest, toward)
    lo = np.minimum(nearest, other).astype(np.float64)
    hi = np.maximum(nearest, other).astype(np.float64)
    return lo, hi


# ------------------------------------------------------------------------------------------------ rounding


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_stochastic_round_is_unbiased_and_returns_only_neighbours(dtype, jit):
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    base = np.array([1.0, -1.0, 3.0, 0.0123, -250.0, 1e-3, 3 * tiny], np.float64)
    lo, hi = neighbours(base, dtype)
    hi = np.where(hi == lo, np.nextafter(lo.astype(dtype), np.array(np.inf, dtype)).astype(np.float64), hi)
    fractions = np.array([0.5, 0.1, 0.77, 0.3, 0.9, 0.05, 0.6])
    x = (lo + fractions * (hi - lo)).astype(np.float32)
    lo, hi = neighbours(x, dtype)  # neighbours of the fp32 value actually rounded
    fraction = (x.astype(np.float64) - lo) / (hi - lo)
    assert np.all((fraction > 0.01) & (fraction < 0.99))
    num_samples = 20_000
    samples = jnp.broadcast_to(jnp.asarray(x), (num_samples, x.size))
    rounded = maybe_jit(lambda s, k: lowp.stochastic_round(s, dtype, k), jit)(samples, jax.random.key(0))
    assert rounded.dtype == dtype
    rounded = np.asarray(rounded.astype(jnp.float32), np.float64)
    assert np.all((rounded == lo) | (rounded == hi))
    # The count of round-ups is binomial(num_samples, fraction): allow 5 standard deviations.
    binomial_std = np.sqrt(fraction * (1 - fraction) / num_samples)
    np.testing.assert_array_less(np.abs((rounded == hi).mean(axis=0) - fraction), 5 * binomial_std)
    np.testing.assert_array_less(np.abs(rounded.mean(axis=0) - x) / (hi - lo), 5 * binomial_std)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_stochastic_round_keeps_representable_inf_nan_and_saturates(dtype):
    largest = float(jnp.finfo(dtype).max)
    exact = jnp.asarray([0.0, -0.0, 1.0, -2.5, largest, -largest], dtype).astype(jnp.float32)
    special = jnp.asarray([np.inf, -np.inf, np.nan], jnp.float32)
    beyond = jnp.asarray([largest * 1.001, -largest * 1.001], jnp.float32)
    values = jnp.concatenate([exact, special, beyond])
    rounded = jax.jit(jax.vmap(lambda key: lowp.stochastic_round(values, dtype, key)))(
        jax.random.split(jax.random.key(1), 64)
    )
    expected = jnp.concatenate([exact, special, jnp.asarray([largest, -largest], jnp.float32)])
    np.testing.assert_array_equal(rounded.astype(jnp.float32), jnp.broadcast_to(expected, rounded.shape))


def test_stochastic_round_float32_is_identity_and_other_dtypes_raise():
    x = jnp.asarray([1.0 + 2**-20, -3e-30], jnp.float32)
    np.testing.assert_array_equal(lowp.stochastic_round(x, jnp.float32, jax.random.key(0)), x)
    with pytest.raises(ValueError, match="int8"):
        lowp.stochastic_round(x, jnp.int8, jax.random.key(0))


# ------------------------------------------------------------------------------------------- param updates


def test_param_update_rejects_unknown_kind_and_lists_valid_ones():
    with pytest.raises(ValueError, match="nearest, stochastic, kahan"):
        lowp.param_update("round-up")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fp32_params_pass_through_unchanged(kind):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones((4,))}
    updates = jax.tree.map(lambda p: 1e-9 * (p + 0.5), params)
    tx = lowp.param_update(kind)
    state = tx.init(params)
    for _ in range(3):
        new_updates, state = tx.update(updates, state, params)
        jax.tree.map(np.testing.assert_array_equal, new_updates, updates)
    if kind == "kahan":
        assert jax.tree.leaves(state) == []


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_nearest_leaves_low_precision_updates_unchanged(dtype):
    params = {"w": jnp.ones((5,), dtype)}
    updates = {"w": jnp.full((5,), 1e-4, jnp.float32)}
    new_updates, _ = lowp.param_update("nearest").update(updates, None, params)
    np.testing.assert_array_equal(new_updates["w"], updates["w"])


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("kind", ["stochastic", "kahan"])
def test_apply_updates_lands_exactly_on_a_neighbour_of_p_plus_u(kind, dtype):
    keys = jax.random.split(jax.random.key(3), 3)
    params = {"w": (jax.random.normal(keys[0], (4096,)) * 3).astype(dtype)}
    relative = 10.0 ** jax.random.uniform(keys[1], (4096,), minval=-6, maxval=-0.5)
    updates = {
        "w": params["w"].astype(jnp.float32) * relative * jnp.sign(jax.random.normal(keys[2], (4096,)))
    }
    tx = lowp.param_update(kind)
    new_updates, _ = tx.update(updates, tx.init(params), params)
    exact_sum = params["w"].astype(jnp.float32) + new_updates["w"]
    new_params = optax.apply_updates(params, new_updates)
    assert new_params["w"].dtype == dtype
    # p + u' is already a value of `dtype` in fp32, so the final cast in apply_updates changes nothing ...
    np.testing.assert_array_equal(new_params["w"].astype(jnp.float32), exact_sum)
    # ... and that value is one of the two neighbours of the requested p + u.
    lo, hi = neighbours(params["w"].astype(jnp.float32) + updates["w"], dtype)
    landed = np.asarray(exact_sum, np.float64)
    assert np.all((landed == lo) | (landed == hi))


def run_update_stream(kind, dtype, start, step, num_steps, width=1024):
    """``num_steps`` constant updates of ``step`` through ``param_update(kind)`` and apply_updates, jitted."""
    tx = lowp.param_update(kind, seed=7)
    params = {"w": jnp.full((width,), start, dtype), "b": jnp.full((3,), start, jnp.float32)}
    updates = jax.tree.map(lambda p: jnp.full(p.shape, step, jnp.float32), params)

    def body(carry, _):
        params, state = carry
        new_updates, state = tx.update(updates, state, params)
        return (optax.apply_updates(params, new_updates), state), None

    run = jax.jit(lambda params, state: jax.lax.scan(body, (params, state), None, length=num_steps)[0][0])
    return run(params, tx.init(params))


STREAMS = [  # (dtype, start, step, num_steps): every step is far below half an ulp of the param
    (jnp.bfloat16, 1.0, 1e-4, 10_000),
    (jnp.bfloat16, 2.0, -1e-4, 10_000),
    (jnp.float16, 1.0, 1e-5, 10_000),
    (jnp.float16, 0.01, 1e-7, 10_000),
]


@pytest.mark.parametrize(("dtype", "start", "step", "num_steps"), STREAMS)
def test_kahan_recovers_updates_that_nearest_loses(dtype, start, step, num_steps):
    target = start + step * num_steps
    nearest = run_update_stream("nearest", dtype, start, step, num_steps)
    kahan = run_update_stream("kahan", dtype, start, step, num_steps)
    np.testing.assert_array_equal(nearest["w"].astype(jnp.float32), jnp.float32(jnp.asarray(start, dtype)))
    ulp = float(jnp.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(abs(target)))
    np.testing.assert_allclose(kahan["w"].astype(jnp.float32), target, atol=ulp, rtol=0)
    np.testing.assert_allclose(kahan["b"], target, rtol=1e-3)  # the fp32 leaf: plain fp32 sums


@pytest.mark.parametrize(("dtype", "start", "step", "num_steps"), STREAMS)
def test_stochastic_recovers_updates_in_expectation(dtype, start, step, num_steps):
    target = start + step * num_steps
    final = np.asarray(run_update_stream("stochastic", dtype, start, step, num_steps)["w"], np.float64)
    # Each element is a sum of independent unbiased roundings; the mean of 1024 elements must be near target.
    std_of_mean = final.std() / math.sqrt(final.size)
    assert final.std() > 0
    assert abs(final.mean() - target) < 5 * std_of_mean + 1e-3 * abs(target)
    assert len(np.unique(final)) > 1  # a deterministic implementation would not be stochastic rounding


# -------------------------------------------------------------------------------------------------- Adam


def run_adam(tx, grads_TxN):
    params = jnp.zeros(grads_TxN.shape[1:], jnp.float32)

    def body(state, grads):
        updates, state = tx.update(grads, state, params)
        return state, updates

    return jax.jit(lambda state: jax.lax.scan(body, state, grads_TxN)[1])(tx.init(params))


def normal_scale_grads(num_steps, width=256, spike_at=None):
    grads_TxN = (
        jax.random.normal(jax.random.key(11), (num_steps, width)) * (1 + jnp.arange(width)[None, :] / 64)
        + 0.3
    )
    if spike_at is not None:
        grads_TxN = grads_TxN.at[spike_at : spike_at + 10].multiply(30.0)
    return grads_TxN


def test_adam_with_fp32_moments_matches_optax():
    grads_TxN = normal_scale_grads(300)
    expected = run_adam(optax.scale_by_adam(), grads_TxN)
    actual = run_adam(lowp.scale_by_adam_lowp(), grads_TxN)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dtype", "tolerance"), [(jnp.bfloat16, 0.05), (jnp.float16, 0.01)])
def test_adam_with_low_precision_moments_tracks_fp32_even_after_a_spike(dtype, tolerance):
    # b2 = 0.999 moves nu by 0.1% a step, under half a bf16 ulp: round-to-nearest would freeze nu after the
    # spike (updates ~40% too small); stochastic rounding must keep it unbiased.
    grads_TxN = normal_scale_grads(1500, spike_at=200)
    expected = run_adam(optax.scale_by_adam(), grads_TxN)
    actual = run_adam(lowp.scale_by_adam_lowp(mu_dtype=dtype, nu_dtype=dtype), grads_TxN)
    relative_error = jnp.abs(actual - expected) / jnp.maximum(jnp.abs(expected), 1e-2)
    assert float(relative_error.mean()) < tolerance
    after_spike = float(jnp.abs(actual[700:]).mean() / jnp.abs(expected[700:]).mean())
    assert abs(after_spike - 1) < tolerance


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_adam_with_low_precision_moments_stays_bounded_for_tiny_gradients(dtype):
    num_steps, scales = 200, jnp.asarray([1e-6, 1e-8, 1e-10, 1e-20, 1e-30])
    grads_TxSxN = normal_scale_grads(num_steps, width=64)[:, None, :] * scales[None, :, None]
    sparse = jax.random.uniform(jax.random.key(5), grads_TxSxN.shape) < 0.3  # many steps with g = 0
    updates_TxSxN = run_adam(lowp.scale_by_adam_lowp(mu_dtype=dtype, nu_dtype=dtype), grads_TxSxN * sparse)
    assert bool(jnp.isfinite(updates_TxSxN).all())
    b1, b2 = 0.9, 0.999
    t = np.arange(1, num_steps + 1, dtype=np.float64)
    q = b1**2 / b2
    bound_T = (1 - b1) / (1 - b1**t) * np.sqrt((1 - q**t) / (1 - q) * (1 - b2**t) / (1 - b2))
    assert bound_T[0] == pytest.approx(1.0) and bound_T[-1] < 7.3
    np.testing.assert_array_less(jnp.abs(updates_TxSxN).max(axis=(1, 2)), bound_T * (1 + 1e-5))


def test_adam_rejects_unsupported_moment_dtype():
    with pytest.raises(ValueError, match="int8"):
        lowp.scale_by_adam_lowp(nu_dtype=jnp.int8)


# ------------------------------------------------------------------------------------------ state pytrees


def lowp_optimizer(kind, moment_dtype, accum_steps=2):
    """A pure-bf16 optimizer as jaxmp's make_optimizer builds it, with lowp pieces."""
    inner = optax.chain(
        optax.clip_by_global_norm(1.0),
        lowp.scale_by_adam_lowp(mu_dtype=moment_dtype, nu_dtype=moment_dtype),
        optax.add_decayed_weights(0.1),
        optax.scale(-1e-3),
        lowp.param_update(kind, seed=3),
    )
    return optax.MultiSteps(inner, every_k_schedule=accum_steps, should_skip_update_fn=optax.skip_not_finite)


def mixed_params():
    keys = jax.random.split(jax.random.key(2), 2)
    return {
        "dense": {"kernel": jax.random.normal(keys[0], (8, 16)).astype(jnp.bfloat16)},
        "blocks": (jax.random.normal(keys[1], (16,)).astype(jnp.bfloat16),),
        "norm_scale": jnp.ones((16,), jnp.float32),
    }


def grads_at(step, params):
    key = jax.random.fold_in(jax.random.key(9), step)
    return jax.tree.map(lambda p: 1e-2 * jax.random.normal(key, p.shape, jnp.float32), params)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_state_survives_jit_lower_and_tree_map(kind):
    tx = lowp_optimizer(kind, jnp.bfloat16)
    params = mixed_params()
    state = tx.init(params)
    lowered = jax.jit(lambda s: s).lower(state)
    assert len(jax.tree.leaves(lowered.args_info)) == len(jax.tree.leaves(state))
    for copy in (jax.jit(lambda s: s)(state), lowered.compile()(state), jax.tree.map(lambda x: x, state)):
        assert jax.tree.structure(copy) == jax.tree.structure(state)
        for original, copied in zip(jax.tree.leaves(state), jax.tree.leaves(copy), strict=True):
            assert copied.dtype == original.dtype
            np.testing.assert_array_equal(copied, original)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_resuming_from_saved_state_continues_bit_for_bit(kind):
    tx = lowp_optimizer(kind, jnp.bfloat16)

    def train_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    train_step = jax.jit(train_step)
    params = mixed_params()
    state = tx.init(params)
    for step in range(5):
        params, state = train_step(params, state, grads_at(step, params))
    saved = jax.tree.map(np.array, (params, state))  # what a checkpoint holds: the pytree's arrays
    trajectory = []
    for step in range(5, 10):
        params, state = train_step(params, state, grads_at(step, params))
        trajectory.append((params, state))
    params, state = jax.tree.map(jnp.asarray, saved)
    for step, (expected_params, expected_state) in zip(range(5, 10), trajectory, strict=True):
        params, state = train_step(params, state, grads_at(step, params))
        jax.tree.map(np.testing.assert_array_equal, (params, state), (expected_params, expected_state))
    assert not np.array_equal(saved[0]["dense"]["kernel"], params["dense"]["kernel"])  # training moved


# ------------------------------------------------------------------------------------------ bytes / param


BYTES_CASES = [  # (kind, moment dtype, bytes per param: params + mu + sqrt(nu) + param-update state)
    ("nearest", jnp.bfloat16, 2 + 2 + 2),
    ("stochastic", jnp.bfloat16, 2 + 2 + 2),
    ("kahan", jnp.bfloat16, 2 + 2 + 2 + 2),
    ("nearest", jnp.float32, 2 + 4 + 4),
    ("kahan", jnp.float32, 2 + 4 + 4 + 2),
]


@pytest.mark.parametrize(("kind", "moment_dtype", "expected"), BYTES_CASES)
def test_state_bytes_per_param_of_bf16_params(kind, moment_dtype, expected):
    params = {"kernel": jnp.zeros((256, 512), jnp.bfloat16), "bias": jnp.zeros((512,), jnp.bfloat16)}
    num_params = 256 * 512 + 512
    tx = optax.chain(
        lowp.scale_by_adam_lowp(mu_dtype=moment_dtype, nu_dtype=moment_dtype), lowp.param_update(kind)
    )
    state = tx.init(params)
    scalar_bytes = 64 / num_params  # step counts and PRNG keys
    bytes_per_param = lowp.state_bytes_per_param(params, state)
    assert expected <= bytes_per_param < expected + scalar_bytes
    assert bytes_per_param <= (8 if moment_dtype == jnp.bfloat16 else 12) + scalar_bytes
    # Shapes are enough: a full-size model can be sized without allocating it.
    assert lowp.state_bytes_per_param(params, jax.eval_shape(tx.init, params)) == bytes_per_param


def test_multisteps_fp32_accumulator_costs_four_bytes_per_param():
    params = {"kernel": jnp.zeros((256, 512), jnp.bfloat16)}
    inner = optax.chain(
        lowp.scale_by_adam_lowp(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16), lowp.param_update("kahan")
    )
    accumulating = optax.MultiSteps(inner, every_k_schedule=4, accumulator_dtype=jnp.float32)
    without = lowp.state_bytes_per_param(params, inner.init(params))
    with_accumulator = lowp.state_bytes_per_param(params, accumulating.init(params))
    assert with_accumulator - without == pytest.approx(4.0, abs=1e-3)
