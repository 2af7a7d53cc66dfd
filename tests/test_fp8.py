"""FP8 against float references: saturating quantisation, the fp8 dot, its gradients and amaxes,
current scaling, delayed scaling's amax history computed by hand, and the delayed-scaling state in
the train step (accumulation windows, skipped micro-steps, scanned layers, an fp16 loss scale, a
planted activation spike seen by ``diagnose``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import TINY_GPT2, equations

import jaxmp
from jaxmp.data.corpus import read_corpus
from jaxmp.diagnostics import diagnose
from jaxmp.fp8 import (
    E4M3,
    E5M2,
    DelayedScale,
    DelayedScaling,
    Recipe,
    current_scale,
    dequantize,
    fp8_dot,
    fp8_dot_general,
    fp8_max,
    quantize,
)
from jaxmp.losses import lm_loss


def reference_quantize(x, dtype, scale):
    """numpy/ml_dtypes: scale, saturate, round to the format, back to float32."""
    bound = float(ml_dtypes.finfo(dtype).max)
    scaled = np.clip(np.asarray(x, np.float32) * np.float32(scale), -bound, bound)
    return scaled.astype(dtype).astype(np.float32) / np.float32(scale)


def test_formats_and_saturation():
    assert (fp8_max(E4M3), fp8_max(E5M2)) == (448.0, 57344.0)
    x = jnp.array([1e6, -1e6, 500.0, 0.3, 0.0, -3e-9], jnp.float32)
    assert dequantize(quantize(x, E4M3, 1.0), 1.0).tolist()[:3] == [448.0, -448.0, 448.0]  # no NaN
    assert dequantize(quantize(x, E5M2, 1.0), 1.0).tolist()[:2] == [57344.0, -57344.0]  # no inf
    for dtype in (E4M3, E5M2):
        for scale in (1.0, 0.125, 37.5):
            ours = dequantize(quantize(x, dtype, scale), scale)  # equal but for the last division's rounding
            np.testing.assert_allclose(ours, reference_quantize(x, dtype, scale), rtol=2.5e-7, atol=0)


def test_current_scale_maps_amax_to_the_formats_maximum():
    x = jnp.array([[0.5, -3.0], [2.0, 1.0]])
    assert float(current_scale(x, E4M3)) == pytest.approx(448.0 / 3.0, rel=1e-7)
    assert float(current_scale(x, E5M2, margin=2)) == pytest.approx(57344.0 / 3.0 / 4.0, rel=1e-7)
    assert (
        float(current_scale(jnp.zeros(3), E4M3)) == 1.0
        and float(current_scale(jnp.array([jnp.inf]), E4M3)) == 1.0
    )
    assert float(jnp.max(jnp.abs(dequantize(quantize(x, E4M3, current_scale(x, E4M3)), 1.0)))) == 448.0


def test_fp8_dot_and_its_gradients_equal_the_float_reference():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, 16)) * 4.0
    w = jax.random.normal(kw, (16, 8)) * 0.1
    g = jax.random.normal(kg, (3, 5, 8)) * 1e-3
    x_scale, w_scale = current_scale(x, E4M3), current_scale(w, E4M3)
    g_scale = current_scale(g, E5M2)
    scales = jnp.stack([x_scale, w_scale, g_scale])
    out, vjp = jax.vjp(lambda x, w, probe: fp8_dot(x, w, scales, probe), x, w, jnp.zeros(3))
    dx, dw, amaxes = vjp(g)
    # the probe's gradient: each tensor's amax before scaling
    assert amaxes.tolist() == [float(jnp.abs(t).max()) for t in (x, w, g)]
    xq, wq = reference_quantize(x, E4M3, x_scale), reference_quantize(w, E4M3, w_scale)
    gq = reference_quantize(g, E5M2, g_scale)
    for ours, reference in ((out, xq @ wq), (dx, gq @ wq.T), (dw, xq.reshape(-1, 16).T @ gq.reshape(-1, 8))):
        # fp32 rounding of sums in another order: relative to the largest entry (some entries cancel)
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * float(np.abs(reference).max()))
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32
    exact = x @ w  # fp8 is close to, but not, the float32 product
    assert 0 < float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)) < 0.1


def test_delayed_scaling_follows_a_hand_computed_amax_history():
    state = DelayedScale.create(history=3)
    assert state.amax_history.tolist() == [0.0, 0.0, 0.0] and float(state.scale) == 1.0
    expected = []  # (history after the step, scale for the next step)
    for amax, history in [
        (2.0, [2, 0, 0]),
        (8.0, [8, 2, 0]),
        (1.0, [1, 8, 2]),
        (0.5, [0.5, 1, 8]),
        (0.25, [0.25, 0.5, 1]),
    ]:
        expected.append((history, 448.0 / max(history) / 2.0))
        state = state.update(jnp.float32(amax), fp8_max(E4M3), margin=1)
        assert (state.amax_history.tolist(), float(state.scale)) == expected[-1], amax
    unchanged = state.update(jnp.float32(jnp.nan), fp8_max(E4M3))  # a non-finite amax leaves it alone
    assert unchanged.amax_history.tolist() == state.amax_history.tolist() and float(unchanged.scale) == float(
        state.scale
    )
    leaves = jax.tree.leaves(state)
    assert [leaf.dtype for leaf in leaves] == [jnp.float32, jnp.float32]  # a checkpointable pytree
    with pytest.raises(ValueError, match="`history` must be >= 1"):
        DelayedScale.create(history=0)
    # a stack of dots (scanned layers: [L, 3]) is independent histories, element by element
    stacked = DelayedScale.create((2, 3), history=2).update(jnp.array([[1.0, 2, 4], [8, jnp.inf, 0]]), 448.0)
    assert stacked.amax_history[..., 0].tolist() == [[1, 2, 4], [8, 0, 0]]  # inf not recorded
    assert stacked.scale.tolist() == [[448.0, 224.0, 112.0], [56.0, 1.0, 1.0]]


def test_recipes_in_the_policy_grammar():
    assert [str(Recipe.parse(text)) for text in ("fp8", "FP8-delayed", "fp8-delayed-32", "fp8-current")] == [
        "fp8-delayed-16", "fp8-delayed-16", "fp8-delayed-32", "fp8-current",
    ]  # fmt: skip
    assert Recipe.parse("compute") is None
    policy = jaxmp.get_policy("fp8;.*mlp.*:matmul=fp8-current")
    assert policy.fp8_recipe("blocks_0/attn/query") == Recipe("delayed", 16)
    assert policy.fp8_recipe("blocks_0/mlp/fc_in") == Recipe("current")
    assert policy.fp8_recipe("lm_head") is None and policy.uses_delayed_fp8
    assert not jaxmp.get_policy("bf16;.*:matmul=fp8-current").uses_delayed_fp8
    for bad in ("fp8-delayed-0", "fp8-later"):
        with pytest.raises(ValueError, match="unknown matmul"):
            jaxmp.get_policy(f"bf16;.*mlp.*:matmul={bad}")


# --------------------------------------------------------------------------------------- in the policy


def test_the_policy_says_which_matmuls_run_in_fp8():
    policy = jaxmp.get_policy("fp8;.*fc_out:matmul=compute;.*norm1:matmul=fp8")
    assert str(policy) == (
        "params=float32,compute=bfloat16,output=float32,matmul=fp8-delayed-16;.*fc_out:matmul=compute;"
        ".*norm1:matmul=fp8-delayed-16"
    )
    assert jaxmp.get_policy(str(policy)) == policy
    matmuls = {path: policy.matmul_for(path) for path in (
        "blocks_0/attn/query", "blocks_0/mlp/fc_in", "blocks_0/mlp/fc_out", "token_embed", "lm_head",
        "lm_head/logits", "blocks_0/norm2", "blocks_0/norm1", "blocks_0/attn/softmax",
    )}  # fmt: skip
    assert matmuls == {
        "blocks_0/attn/query": "fp8-delayed-16",
        "blocks_0/mlp/fc_in": "fp8-delayed-16",
        "blocks_0/mlp/fc_out": "compute",  # override 1
        "token_embed": "compute",  # embeddings, heads, islands: out of fp8 by default
        "lm_head": "compute",
        "lm_head/logits": "compute",
        "blocks_0/norm2": "compute",
        "blocks_0/norm1": "fp8-delayed-16",  # an override may bring an island in
        "blocks_0/attn/softmax": "compute",
    }
    assert jaxmp.get_policy("bf16").matmul_for("blocks_0/attn/query") == "compute"
    for spec, named in (
        ("bf16;.*:matmul=fp16", "unknown matmul 'fp16'"),
        ("params=float32,matmul=fp8,m=fp8", "duplicate key"),
    ):
        with pytest.raises(ValueError, match=named):
            jaxmp.get_policy(spec)


CURRENT = "fp8-current"  # the fp8 preset with current scaling


def conversions(jaxpr, dtype) -> int:
    """How many ``convert_element_type`` to ``dtype`` the traced program holds (sub-jaxprs included)."""
    return sum(
        eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == dtype
        for eqn in equations(jaxpr)
    )


def tiny_gpt2(policy):
    return jaxmp.models.get_model("gpt2-tiny", policy, **TINY_GPT2)


def lm_step(policy, steps=10, **config):
    """A jitted step of the tiny GPT-2 under ``policy`` (its delayed fp8 scaling state included) and
    its first state; ``config`` overrides the model's (``scan_layers``, ``remat``)."""
    model = jaxmp.models.get_model("gpt2-tiny", policy, **TINY_GPT2, **config)
    params = jaxmp.models.init_params(tiny_gpt2("fp32"), jax.random.key(0), 16)
    if config.get("scan_layers"):
        params = jaxmp.models.stack_layer_params(params, TINY_GPT2["n_layers"])

    def loss_fn(params, batch, rng, fp8_variables=None):
        del rng
        logits = model.apply({"params": params, **(fp8_variables or {})}, batch["input_ids"]).logits
        return lm_loss(logits, batch["targets"]), {}

    optimizer = jaxmp.make_optimizer(learning_rate=3e-3, warmup_steps=5, total_steps=steps)
    state = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, fp8=jaxmp.models.init_fp8_scaling(model)
    )
    return jaxmp.make_train_step(loss_fn, optimizer, policy, cast_params=False), state


def shakespeare_batches(count, size=16, length=32):
    text = np.frombuffer("".join(read_corpus(None).documents())[:100_000].encode(), np.uint8).astype(np.int32)
    rng = np.random.default_rng(0)
    for _ in range(count):
        windows = np.stack([text[s : s + length + 1] for s in rng.integers(0, len(text) - length - 1, size)])
        yield {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}


def test_fp8_matmuls_are_where_the_policy_puts_them():
    step, state = lm_step("fp8;.*fc_out:matmul=compute")
    jaxpr = jax.make_jaxpr(step)(state, next(shakespeare_batches(1))).jaxpr
    dense = TINY_GPT2["n_layers"] * 6  # query, key, value, out, fc_in, fc_out per block
    fp8_dense = dense - TINY_GPT2["n_layers"]  # fc_out stays in bf16
    assert conversions(jaxpr, E4M3) == 2 * fp8_dense  # both operands of every fp8 forward dot
    assert conversions(jaxpr, E5M2) == fp8_dense  # every fp8 dot's output gradient
    step, state = lm_step("bf16")
    assert conversions(jax.make_jaxpr(step)(state, next(shakespeare_batches(1))).jaxpr, E4M3) == 0


def test_the_fp8_preset_trains_like_bf16():
    losses = {}
    for policy in ("bf16", "fp8", CURRENT):
        step, state = lm_step(policy, steps=120)
        for batch in shakespeare_batches(120):
            state, metrics = step(state, batch)
        losses[policy] = float(metrics["loss"])
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert losses["bf16"] < 3.5  # it learned (ln 256 = 5.5 at the start)
    for fp8_policy in ("fp8", CURRENT):  # delayed and current scaling
        assert abs(losses[fp8_policy] / losses["bf16"] - 1) < 0.03, losses


def test_fp8_dot_general_is_a_drop_in_with_fp8_operands_and_gradients():
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = (jax.random.normal(kx, (4, 16)) * 3.0).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (16, 8)) * 0.2
    g = jax.random.normal(kg, (4, 8)) * 1e-2
    numbers = (((1,), (0,)), ((), ()))
    out, vjp = jax.vjp(lambda x, w: fp8_dot_general(x, w, numbers), x, w)
    dx, dw = vjp(g.astype(jnp.bfloat16))
    xq = reference_quantize(x.astype(np.float32), E4M3, current_scale(x, E4M3))
    wq = reference_quantize(w, E4M3, current_scale(w, E4M3))
    gq = reference_quantize(
        g.astype(jnp.bfloat16).astype(np.float32), E5M2, current_scale(g.astype(jnp.bfloat16), E5M2)
    )
    assert out.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(
        out.astype(np.float32), (xq @ wq).astype(jnp.bfloat16).astype(np.float32), rtol=1e-2
    )
    np.testing.assert_allclose(dw, xq.T @ gq, rtol=1e-5, atol=1e-6 * float(np.abs(xq.T @ gq).max()))
    np.testing.assert_allclose(
        dx.astype(np.float32), gq @ wq.T, rtol=1e-2, atol=1e-2 * float(np.abs(gq @ wq.T).max())
    )


def test_nnx_layers_run_fp8_dots_where_the_policy_says():
    from flax import nnx
    from user_models import NnxLM

    def step_jaxpr(policy):
        model = jaxmp.nnx_with_policy(NnxLM(vocab=256, rngs=nnx.Rngs(0)), policy)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss_fn(params, batch, rng):
            del rng
            return lm_loss(nnx.merge(graphdef, params)(batch["input_ids"]), batch["targets"]), {}

        optimizer = jaxmp.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)
        state = jaxmp.TrainState.create(params=params, optimizer=optimizer)
        step = jaxmp.make_train_step(loss_fn, optimizer, policy, cast_params="per_module", jit=False)
        return jax.make_jaxpr(step)(state, next(shakespeare_batches(1, size=2, length=8))).jaxpr

    layers = NnxLM.num_blocks * 6  # q, k, v, out, up, down per block; the head stays out of fp8
    jaxpr = step_jaxpr("fp8")
    assert (conversions(jaxpr, E4M3), conversions(jaxpr, E5M2)) == (2 * layers, layers)
    jaxpr = step_jaxpr("fp8;.*mlp.*:matmul=compute")
    assert (conversions(jaxpr, E4M3), conversions(jaxpr, E5M2)) == (2 * (layers - 4), layers - 4)
    assert conversions(step_jaxpr("bf16"), E4M3) == 0


# ------------------------------------------------------------------- delayed scaling in the train step


class TwoDense(nn.Module):
    """``down(relu(up(x)))`` with jaxmp's fp8-capable dense layers."""

    policy: jaxmp.Policy

    @nn.compact
    def __call__(self, x):
        hidden = jaxmp.models.layers.Dense(self.policy, features=16, name="up")(x)
        return jaxmp.models.layers.Dense(self.policy, features=4, name="down")(jax.nn.relu(hidden))


FP32_FP8 = "params=float32,compute=float32,matmul=fp8"  # fp32 compute: x's amax is exactly |x|'s


def two_dense(policy=FP32_FP8, accum_steps=4, loss_scale=None):
    """The model's delayed-scaling step (micro-steps scanned), first state and its loss's amax probe."""
    model = TwoDense(jaxmp.get_policy(policy))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8)))

    def loss_fn(params, batch, rng, fp8_variables):
        del rng
        out = model.apply({"params": params, **fp8_variables}, batch["x"])
        return jnp.mean((out.astype(jnp.float32) - batch["y"]) ** 2) * batch["poison"], {}

    optimizer = jaxmp.make_optimizer(learning_rate=1e-2, accum_steps=accum_steps, warmup_steps=0)
    state = jaxmp.TrainState.create(
        params=variables["params"],
        optimizer=optimizer,
        loss_scale=loss_scale,
        fp8=DelayedScaling.create(variables["fp8_scaling"]),
    )
    step = jaxmp.make_train_step(
        loss_fn, optimizer, policy, cast_params=False, scan_micro_steps=True, donate=False
    )

    def amaxes(state, batch):
        """This micro-step's amaxes on its own: the gradient of the (scaled) loss w.r.t. a zero probe."""

        def scaled_loss(probe):
            return state.loss_scale.scale(loss_fn(state.params, batch, None, state.fp8.variables(probe))[0])

        return jax.grad(scaled_loss)(state.fp8.amax_probe())

    return step, state, amaxes


def micro_batches(factors, poison=()):
    """One micro-batch per factor: the same inputs times the factor; ``poison``: micro-steps whose loss
    is multiplied by inf (their gradients are not finite)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    return [
        {"x": x * f, "y": y, "poison": np.float32(np.inf if i in poison else 1.0)}
        for i, f in enumerate(factors)
    ]


def stacked(batches):
    return jax.tree.map(lambda *leaves: np.stack(leaves), *batches)


def newest(state):
    """Each dot's newest history entry, ``{layer: [x, w, grad]}``."""
    return {name: dot["dot"].amax_history[..., 0].tolist() for name, dot in state.fp8.dots.items()}


def test_an_accumulation_window_records_the_max_over_its_micro_steps():
    step, state, amaxes = two_dense(accum_steps=4)
    batches = micro_batches([1.0, 3.0, 2.0, 0.5])
    each = [amaxes(state, batch) for batch in batches]  # params do not move inside a window
    window_max = jax.tree.map(lambda *a: np.max(np.stack(a), axis=0), *each)

    partial, _ = step(state, stacked(batches[:3]))  # the window is still open: no history moved yet
    assert all(v == [0.0] * 3 for v in newest(partial).values())
    np.testing.assert_array_equal(
        partial.fp8.window_amax["up"]["dot"], np.max([e["up"]["dot"] for e in each[:3]], 0)
    )

    closed, metrics = step(state, stacked(batches))
    assert bool(metrics["grads_finite"].all())
    for layer in ("up", "down"):
        np.testing.assert_array_equal(newest(closed)[layer], window_max[layer]["dot"])
        np.testing.assert_array_equal(closed.fp8.dots[layer]["dot"].amax_history[..., 1:], 0.0)
        np.testing.assert_allclose(
            closed.fp8.dots[layer]["dot"].scale,
            np.array([448.0, 448.0, 57344.0]) / window_max[layer]["dot"],
            rtol=1e-6,
        )
        np.testing.assert_array_equal(
            closed.fp8.window_amax[layer]["dot"], 0.0
        )  # the next window starts empty
    # x's amax is the input's, known without the model: the largest factor's micro-batch
    assert newest(closed)["up"][0] == float(np.abs(batches[1]["x"]).max())
    # the scales the window used were the ones before it; the last micro-step's metrics show the new ones
    np.testing.assert_array_equal(metrics["fp8_scales"][-1], closed.fp8.scales())
    assert closed.fp8.dot_names() == ["down", "up"]


def test_a_skipped_micro_step_keeps_its_finite_amaxes_and_does_not_close_the_window():
    step, state, amaxes = two_dense(accum_steps=4)
    batches = micro_batches([1.0, 1.0, 5.0, 1.0, 1.0], poison={2})  # micro-step 2: a spike, then inf loss
    after_four, metrics = step(state, stacked(batches[:4]))
    assert metrics["grads_finite"].tolist() == [True, True, False, True]
    assert all(v == [0.0] * 3 for v in newest(after_four).values())  # 3 finite micro-steps: still open
    spike = amaxes(state, batches[2])
    window = jax.tree.map(np.asarray, after_four.fp8.window_amax)
    # its finite amaxes count: the spiked input, ...
    assert window["up"]["dot"][0] == spike["up"]["dot"][0] == float(np.abs(batches[2]["x"]).max())
    # ... the gradient reaching `up` (finite: `down`'s E5M2 quantiser saturated the inf) ...
    assert np.isfinite(spike["up"]["dot"][2]) and window["up"]["dot"][2] == spike["up"]["dot"][2]
    # ... but `down`'s output gradient amax, inf, is dropped: the window keeps the finite steps' max
    assert not np.isfinite(spike["down"]["dot"][2])
    finite = [amaxes(state, b)["down"]["dot"][2] for i, b in enumerate(batches[:4]) if i != 2]
    assert window["down"]["dot"][2] == max(finite)
    closed, metrics = step(after_four, stacked(batches[4:]))  # the 4th finite micro-step closes it
    assert newest(closed)["up"][0] == window["up"]["dot"][0] and np.isfinite(closed.fp8.scales()).all()


def test_an_fp16_loss_scale_scales_the_recorded_gradient_amax():
    batches = micro_batches([1.0])
    recorded = {}
    for scale in (1.0, 2.0**10):
        step, state, _ = two_dense(
            "params=float32,compute=float16,matmul=fp8",
            accum_steps=1,
            loss_scale=jaxmp.StaticLossScale(scale),
        )
        recorded[scale] = newest(step(state, stacked(batches))[0])["down"]
    assert recorded[1.0][:2] == recorded[2.0**10][:2]  # x and w: the same tensors
    # the gradient the E5M2 quantiser sees is the scaled one (float16 rounding apart)
    assert recorded[2.0**10][2] == pytest.approx(2.0**10 * recorded[1.0][2], rel=2e-3)


def test_delayed_scaling_with_pure_bf16_master_weights_records_the_stored_weights():
    step, state, _ = two_dense("pure-bf16;.*:matmul=fp8", accum_steps=1)
    kernel = np.asarray(state.params["up"]["kernel"].astype(jnp.float32))
    assert state.params["up"]["kernel"].dtype == jnp.bfloat16
    trained, metrics = step(state, stacked(micro_batches([1.0])))
    assert bool(metrics["grads_finite"].all()) and trained.params["up"]["kernel"].dtype == jnp.bfloat16
    assert newest(trained)["up"][1] == float(np.abs(kernel).max())  # w's amax: the bf16 weights as stored


def test_delayed_scaling_under_scanned_rematerialised_layers_equals_the_layer_by_layer_model():
    runs = {}
    for config in ({}, {"scan_layers": True, "remat": True}):
        step, state = lm_step(FP32_FP8, **config)  # fp32 compute: only float32 reassociation differs
        losses = []
        for batch in shakespeare_batches(2, size=4, length=16):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        runs[bool(config)] = (
            losses,
            dict(zip(state.fp8.dot_names(), np.asarray(state.fp8.scales()), strict=True)),
        )
    (losses, scales), (scanned_losses, scanned_scales) = runs[False], runs[True]
    np.testing.assert_allclose(scanned_losses, losses, rtol=1e-6)
    assert sorted(scanned_scales) == sorted(scales) and len(scales) == 6 * TINY_GPT2["n_layers"]
    for name, value in scales.items():
        assert (value != 1.0).all(), name  # every history has recorded
        np.testing.assert_allclose(scanned_scales[name], value, rtol=1e-5, err_msg=name)


def test_a_planted_spike_saturates_delayed_scaling_for_one_step_and_current_scaling_not_at_all():
    step, state = lm_step("fp8")
    batches = list(shakespeare_batches(3, size=4, length=16))
    for batch in batches[:2]:
        state, _ = step(state, batch)
    model = tiny_gpt2("fp8")
    spiked = jax.tree.map(lambda x: x, state.params)
    fc_in = spiked["blocks_1"]["mlp"]["fc_in"]
    fc_in["bias"] = fc_in["bias"] + 30.0  # gelu passes it on: fc_out's input jumps ~30x, nothing before it

    def saturated(params, scaling):
        report = diagnose(model, params, "fp8", batches[2:], fp8_scaling=scaling).fp8
        assert len(report) == 3 * 6 * TINY_GPT2["n_layers"]  # x, w, grad of every fp8 dot
        return {f"{t.dot}:{t.tensor}": t.saturated for t in report}

    before = saturated(spiked, state.fp8)
    assert before["blocks_1/mlp/fc_out:x"] > 0.9, before  # scales from before the spike: it clips
    # elsewhere a batch unlike the history's clips a rare value at most
    assert max(v for k, v in before.items() if k != "blocks_1/mlp/fc_out:x") < 0.01, before
    assert all(value == 0 for value in saturated(spiked, None).values())  # current scaling adapts at once
    state, _ = step(state.replace(params=spiked), batches[2])  # one step records the spike's amax
    assert all(value == 0 for value in saturated(state.params, state.fp8).values())


def test_a_users_linen_layers_run_fp8_dots_where_the_policy_says():
    from user_models import TinyLM

    model = TinyLM(vocab=256)
    ids = jnp.zeros((2, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]

    def loss_fn(params, batch, rng):
        del rng
        return lm_loss(model.apply({"params": params}, batch["input_ids"]), batch["targets"]), {}

    def step_jaxpr(policy):
        optimizer = jaxmp.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)
        state = jaxmp.TrainState.create(params=params, optimizer=optimizer)
        step = jaxmp.make_train_step(loss_fn, optimizer, policy, cast_params="per_module", jit=False)
        return jax.make_jaxpr(step)(state, {"input_ids": ids, "targets": ids}).jaxpr

    dots = 2 * 6  # per block: the attention's query, key, value, out (DenseGeneral); mlp up, down (Dense)
    jaxpr = step_jaxpr("fp8-current")
    assert (conversions(jaxpr, E4M3), conversions(jaxpr, E5M2)) == (2 * dots, dots)  # lm_head stays out
    jaxpr = step_jaxpr("fp8-current;.*mlp.*:matmul=compute")
    assert (conversions(jaxpr, E4M3), conversions(jaxpr, E5M2)) == (2 * (dots - 4), dots - 4)
    assert conversions(step_jaxpr("bf16"), E4M3) == 0
    rows = {row.path: row.matmul for row in jaxmp.describe_policy(model, "fp8-current", ids).rows}
    assert rows["blocks_0/mlp/up"] == rows["blocks_1/attention/query"] == "fp8-current"
    assert rows["lm_head"] == "compute" and rows["embed"] == "—" and rows["blocks_0/LayerNorm_0"] == "—"
    assert "matmul" in str(jaxmp.describe_policy(model, "fp8-current", ids)).splitlines()[1]
