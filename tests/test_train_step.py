"""The mixed-precision train step: accumulation, dropped non-finite steps, dtypes, underflow."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmp
from jaxmp.train_step import leaf_paths


def init_mlp(rng, d_in=6, d_hidden=16, d_out=3):
    k1, k2 = jax.random.split(rng)
    return {
        "dense_in": {
            "kernel": jax.random.normal(k1, (d_in, d_hidden)) / np.sqrt(d_in),
            "bias": jnp.zeros(d_hidden),
        },
        "dense_out": {"kernel": jax.random.normal(k2, (d_hidden, d_out)) / 4.0, "bias": jnp.zeros(d_out)},
    }


def mlp_loss(params, batch, rng):
    """A user's plain function: mean squared error of a 2-layer MLP."""
    del rng
    h_BxH = jnp.tanh(batch["x"] @ params["dense_in"]["kernel"] + params["dense_in"]["bias"][None, :])
    y_BxO = h_BxH @ params["dense_out"]["kernel"] + params["dense_out"]["bias"][None, :]
    return jnp.mean((y_BxO.astype(jnp.float32) - batch["y"]) ** 2), {"hidden": h_BxH}


def make_batches(n, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": jnp.asarray(rng.normal(size=(batch_size, 6)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(batch_size, 3)), jnp.float32),
        }
        for _ in range(n)
    ]


def new_state(optimizer, loss_scale=None, seed=0):
    params = init_mlp(jax.random.key(seed))
    return jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=loss_scale, rng=jax.random.key(1)
    )


def step_fn(optimizer, policy, jit, loss_fn=mlp_loss):
    return jaxmp.make_train_step(lambda p, b, r: (loss_fn(p, b, r)[0], {}), optimizer, policy, jit=jit)


def copy_tree(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.mark.parametrize("jit", [False, True])
def test_accumulation_equals_one_step_on_the_concatenated_batch(jit):
    accum_steps, updates = 4, 3
    micro = make_batches(accum_steps * updates, batch_size=8)
    kwargs = dict(learning_rate=1e-2, clip_norm=0.5, weight_decay=0.1, warmup_steps=1, total_steps=10)

    accumulating = jaxmp.make_optimizer(accum_steps=accum_steps, **kwargs)
    state = new_state(accumulating)
    step = step_fn(accumulating, "fp32", jit)
    for batch in micro:
        state, _ = step(state, batch)

    single = jaxmp.make_optimizer(accum_steps=1, **kwargs)
    big_state = new_state(single)
    big_step = step_fn(single, "fp32", jit)
    for u in range(updates):
        chunk = micro[u * accum_steps : (u + 1) * accum_steps]
        big_state, _ = big_step(big_state, jax.tree.map(lambda *xs: jnp.concatenate(xs), *chunk))

    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), big_state.params, init_mlp(jax.random.key(0)))
    assert min(jax.tree.leaves(moved)) > 1e-3  # the comparison is not vacuous
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.params, big_state.params
    )


def poisoned(batch):
    return {"x": batch["x"].at[0, 0].set(jnp.inf), "y": batch["y"]}


@pytest.mark.parametrize("jit", [False, True])
def test_non_finite_micro_step_is_dropped_entirely(jit):
    optimizer = jaxmp.make_optimizer(learning_rate=1e-2, accum_steps=2)
    batches = make_batches(6, batch_size=4)
    step = step_fn(optimizer, "fp32", jit)

    state = new_state(optimizer, jaxmp.DynamicLossScale(initial_scale=2.0**10))
    state, _ = step(state, batches[0])  # mid-window: the accumulator holds a real gradient
    before = copy_tree((state.params, state.opt_state))
    assert np.abs(before[1].acc_grads["dense_in"]["kernel"]).max() > 0

    for bad in (poisoned(batches[1]), jax.tree.map(lambda x: x * jnp.nan, batches[1])):
        scale_before = float(state.loss_scale.loss_scale)
        skipped_before = int(state.skipped_steps)
        state, metrics = step(state, bad)
        assert not bool(metrics["grads_finite"])
        assert float(metrics["loss_scale"]) == scale_before / 2
        assert int(metrics["skipped_steps"]) == skipped_before + 1
        grads = jax.grad(lambda p, b=bad: mlp_loss(p, b, None)[0])(state.params)
        paths = leaf_paths(grads)
        first_bad = next(
            p for p, g in zip(paths, jax.tree.leaves(grads), strict=True) if not np.isfinite(g).all()
        )
        assert paths[int(metrics["nonfinite_leaf"])] == first_bad
        after = copy_tree((state.params, state.opt_state))
        jax.tree.map(np.testing.assert_array_equal, after, before)  # bitwise unchanged

    for batch in batches[1:]:
        state, metrics = step(state, batch)

    clean = new_state(optimizer, jaxmp.DynamicLossScale(initial_scale=2.0**10))
    for batch in batches:
        clean, clean_metrics = step(clean, batch)
    # power-of-two scales unscale exactly, so the dropped steps leave no trace at all
    np.testing.assert_array_equal(metrics["loss"], clean_metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, state.params, clean.params)
    assert int(state.skipped_steps) == 2 and int(clean.skipped_steps) == 0


@pytest.mark.parametrize("jit", [False, True])
def test_scanned_window_equals_one_call_per_micro_step(jit):
    accum_steps = 4
    batches = make_batches(2 * accum_steps, batch_size=4)
    batches[5] = poisoned(batches[5])  # a dropped micro-step inside the second window
    optimizer = jaxmp.make_optimizer(learning_rate=1e-2, accum_steps=accum_steps, clip_norm=1.0)
    loss_fn = lambda p, b, r: (mlp_loss(p, b, r)[0], {})  # noqa: E731

    per_call = new_state(optimizer, jaxmp.DynamicLossScale(initial_scale=2.0**10))
    step = jaxmp.make_train_step(loss_fn, optimizer, "fp32", jit=jit)
    losses = []
    for batch in batches:
        per_call, metrics = step(per_call, batch)
        losses.append(float(metrics["loss"]))

    scanned = new_state(optimizer, jaxmp.DynamicLossScale(initial_scale=2.0**10))
    window_step = jaxmp.make_train_step(loss_fn, optimizer, "fp32", jit=jit, scan_micro_steps=True)
    scanned_losses, finite = [], []
    for w in range(2):
        window = batches[w * accum_steps : (w + 1) * accum_steps]
        scanned, metrics = window_step(scanned, jax.tree.map(lambda *xs: jnp.stack(xs), *window))
        assert metrics["loss"].shape == (accum_steps,)
        scanned_losses += metrics["loss"].tolist()
        finite += metrics["grads_finite"].tolist()

    assert finite == [True] * 5 + [False] + [True] * 2
    np.testing.assert_allclose(scanned_losses, losses, rtol=1e-6)
    assert int(scanned.step) == int(per_call.step) == 8 and int(scanned.skipped_steps) == 1
    assert float(scanned.loss_scale.loss_scale) == float(per_call.loss_scale.loss_scale) == 2.0**9
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        (scanned.params, scanned.opt_state),
        (per_call.params, per_call.opt_state),
    )


def test_bf16_computes_in_bf16_while_params_and_grads_stay_fp32():
    optimizer = jaxmp.make_optimizer(learning_rate=1e-2, accum_steps=2)
    state = new_state(optimizer)
    step = jaxmp.make_train_step(mlp_loss, optimizer, "bf16", jit=False)
    batch = make_batches(1, 4)[0]
    jaxpr = jax.make_jaxpr(step)(state, batch)

    def equations(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from equations(sub)

    dots = [eqn for eqn in equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
    assert len(dots) == 2 + 3  # forward: 2; backward: dW_out, dh, dW_in
    for dot in dots:
        assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16, jnp.bfloat16]
    new, metrics = step(state, batch)
    assert metrics["aux"]["hidden"].dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new.params))
    grads = jax.grad(lambda p: mlp_loss(jaxmp.get_policy("bf16").cast_to_compute(p), batch, None)[0])(
        state.params
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
    mu = optax.tree.get(new.opt_state, "mu")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((mu, new.opt_state.acc_grads)))


def tiny_gradient_loss(params, batch, rng):
    """Gradients of ~1e-8 w.r.t. ``w``: below fp16's smallest subnormal (6e-8)."""
    del rng
    return jnp.sum(batch["x"] * params["w"]) * jnp.asarray(1e-4, params["w"].dtype), {}


@pytest.mark.parametrize("jit", [False, True])
def test_fp16_underflow_without_scaling_is_recovered_by_dynamic_scaling(jit):
    optimizer = jaxmp.make_optimizer(learning_rate=1e-3, weight_decay=0.0, clip_norm=None)
    batch = {"x": jnp.full((8,), 1e-4, jnp.float32)}
    params = {"w": jnp.ones((8,), jnp.float32)}
    results = {}
    for name, loss_scale in [("none", jaxmp.NoOpLossScale()), ("dynamic", jaxmp.DynamicLossScale())]:
        fresh = jax.tree.map(jnp.copy, params)  # the jitted step donates its input state
        state = jaxmp.TrainState.create(params=fresh, optimizer=optimizer, loss_scale=loss_scale)
        step = jaxmp.make_train_step(tiny_gradient_loss, optimizer, "fp16", jit=jit)
        new, metrics = step(state, batch)
        results[name] = (float(metrics["grad_zero_fraction"]), float(np.abs(new.params["w"] - 1).max()))
    assert results["none"] == (1.0, 0.0)  # every gradient underflowed: no learning at all
    assert results["dynamic"][0] == 0.0 and results["dynamic"][1] > 1e-4
    # the recovered gradient is the true one: fp32 reference
    fp32_grad = jax.grad(lambda p: tiny_gradient_loss(p, batch, None)[0])(params)["w"]
    state = jaxmp.TrainState.create(params=params, optimizer=optimizer, loss_scale=jaxmp.DynamicLossScale())
    scaled = jax.grad(
        lambda p: state.loss_scale.scale(
            tiny_gradient_loss(jaxmp.get_policy("fp16").cast_to_compute(p), batch, None)[0]
        )
    )(params)
    np.testing.assert_allclose(state.loss_scale.unscale(scaled)["w"], fp32_grad, rtol=1e-3)


@pytest.mark.parametrize("jit", [False, True])
def test_metrics_and_eval_step(jit):
    optimizer = jaxmp.make_optimizer(learning_rate=2e-2, warmup_steps=2, total_steps=20)
    state = new_state(optimizer)
    step = step_fn(optimizer, "bf16", jit)
    batches = make_batches(10, 16)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 10
    assert set(metrics) >= {
        "loss",
        "grad_norm",
        "loss_scale",
        "grads_finite",
        "skipped_steps",
        "learning_rate",
    }
    assert metrics["loss"].dtype == jnp.float32 and float(metrics["grad_norm"]) > 0
    expected_lr = jaxmp.make_schedule(2e-2, 2, 20)(9)
    np.testing.assert_allclose(float(metrics["learning_rate"]), expected_lr, rtol=1e-6)
    eval_step = jaxmp.make_eval_step(mlp_loss, "bf16", jit=jit)
    loss, aux = eval_step(state.params, batches[0])
    assert loss.dtype == jnp.float32 and aux["hidden"].dtype == jnp.bfloat16
    fp32_loss, _ = jaxmp.make_eval_step(mlp_loss, "fp32", jit=jit)(state.params, batches[0])
    np.testing.assert_allclose(loss, fp32_loss, rtol=2e-2)  # bf16 tolerance
    assert losses[-1] < losses[0]


def test_cast_params_false_leaves_params_to_the_model():
    optimizer = jaxmp.make_optimizer()
    seen = {}

    def loss_fn(params, batch, rng):
        seen["dtype"] = params["dense_in"]["kernel"].dtype
        return mlp_loss(params, batch, rng)

    state = new_state(optimizer)
    jaxmp.make_train_step(loss_fn, optimizer, "bf16", cast_params=False, jit=False)(
        state, make_batches(1, 2)[0]
    )
    assert seen["dtype"] == jnp.float32


def test_accum_steps_below_one_is_refused():
    with pytest.raises(ValueError, match="accum_steps"):
        jaxmp.make_optimizer(accum_steps=0)


@pytest.mark.parametrize("jit", [False, True])
def test_gradient_checks_count_zeros_and_find_the_first_non_finite_leaf(jit):
    from jaxmp.train_step import _gradient_checks

    checks = jax.jit(_gradient_checks) if jit else _gradient_checks
    rng = np.random.default_rng(0)
    leaves = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    leaves[0][0, :3] = 0.0
    leaves[2][1, 1] = 0.0
    finite, first, zeros = checks({"a": leaves[0], "b": leaves[1], "c": leaves[2]})
    assert bool(finite) and int(first) == -1
    assert float(zeros) == pytest.approx(4 / 36)
    for bad in (np.inf, -np.inf, np.nan):
        broken = [leaf.copy() for leaf in leaves]
        broken[1][2, 3] = bad
        broken[2][0, 0] = bad
        finite, first, zeros = checks({"a": broken[0], "b": broken[1], "c": broken[2]})
        assert not bool(finite) and int(first) == 1
        assert float(zeros) == pytest.approx(3 / 36)  # the non-finite leaves count no zeros
