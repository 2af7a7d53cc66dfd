"""FP8 building blocks against float references: saturating quantisation, the fp8 dot and its
gradients, current scaling, and delayed scaling's amax history computed by hand."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import TINY_GPT2, equations

import jaxmp
from jaxmp.data.corpus import read_corpus
from jaxmp.fp8 import (
    E4M3,
    E5M2,
    DelayedScale,
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
    out, vjp = jax.vjp(lambda x, w: fp8_dot(x, w, x_scale, w_scale, g_scale), x, w)
    dx, dw = vjp(g)
    xq, wq = reference_quantize(x, E4M3, x_scale), reference_quantize(w, E4M3, w_scale)
    gq = reference_quantize(g, E5M2, g_scale)
    for ours, reference in ((out, xq @ wq), (dx, gq @ wq.T), (dw, xq.reshape(-1, 16).T @ gq.reshape(-1, 8))):
        # fp32 rounding of sums in another order: relative to the largest entry (some entries cancel)
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * float(np.abs(reference).max()))
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32
    exact = x @ w  # fp8 is close to, but not, the float32 product
    assert 0 < float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)) < 0.1


def test_delayed_scaling_follows_a_hand_computed_amax_history():
    state = DelayedScale.create(history=3, margin=1)
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
        state = state.update(jnp.float32(amax), E4M3)
        assert (state.amax_history.tolist(), float(state.scale)) == expected[-1], amax
    unchanged = state.update(jnp.float32(jnp.nan), E4M3)  # a non-finite step leaves the state alone
    assert unchanged.amax_history.tolist() == state.amax_history.tolist() and float(unchanged.scale) == float(
        state.scale
    )
    leaves = jax.tree.leaves(state)
    assert [leaf.dtype for leaf in leaves] == [jnp.float32, jnp.float32, jnp.int32]  # a checkpointable pytree
    with pytest.raises(ValueError, match="`history` must be >= 1"):
        DelayedScale.create(history=0)


# --------------------------------------------------------------------------------------- in the policy


def test_the_policy_says_which_matmuls_run_in_fp8():
    policy = jaxmp.get_policy("fp8;.*fc_out:matmul=compute;.*norm1:matmul=fp8")
    assert str(policy) == (
        "params=float32,compute=bfloat16,output=float32,matmul=fp8;.*fc_out:matmul=compute;.*norm1:matmul=fp8"
    )
    assert jaxmp.get_policy(str(policy)) == policy
    matmuls = {path: policy.matmul_for(path) for path in (
        "blocks_0/attn/query", "blocks_0/mlp/fc_in", "blocks_0/mlp/fc_out", "token_embed", "lm_head",
        "lm_head/logits", "blocks_0/norm2", "blocks_0/norm1", "blocks_0/attn/softmax",
    )}  # fmt: skip
    assert matmuls == {
        "blocks_0/attn/query": "fp8",
        "blocks_0/mlp/fc_in": "fp8",
        "blocks_0/mlp/fc_out": "compute",  # override 1
        "token_embed": "compute",  # embeddings, heads, islands: out of fp8 by default
        "lm_head": "compute",
        "lm_head/logits": "compute",
        "blocks_0/norm2": "compute",
        "blocks_0/norm1": "fp8",  # an override may bring an island in
        "blocks_0/attn/softmax": "compute",
    }
    assert jaxmp.get_policy("bf16").matmul_for("blocks_0/attn/query") == "compute"
    for spec, named in (
        ("bf16;.*:matmul=fp16", "unknown matmul 'fp16'"),
        ("params=float32,matmul=fp8,m=fp8", "duplicate key"),
    ):
        with pytest.raises(ValueError, match=named):
            jaxmp.get_policy(spec)


def conversions(jaxpr, dtype) -> int:
    """How many ``convert_element_type`` to ``dtype`` the traced program holds (sub-jaxprs included)."""
    return sum(
        eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == dtype
        for eqn in equations(jaxpr)
    )


def tiny_gpt2(policy):
    return jaxmp.models.get_model("gpt2-tiny", policy, **TINY_GPT2)


def lm_step(policy, steps=10):
    model = tiny_gpt2(policy)
    params = jaxmp.models.init_params(tiny_gpt2("fp32"), jax.random.key(0), 16)

    def loss_fn(params, batch, rng):
        del rng
        return lm_loss(model.apply({"params": params}, batch["input_ids"]).logits, batch["targets"]), {}

    optimizer = jaxmp.make_optimizer(learning_rate=3e-3, warmup_steps=5, total_steps=steps)
    state = jaxmp.TrainState.create(params=params, optimizer=optimizer)
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
    for policy in ("bf16", "fp8"):
        step, state = lm_step(policy, steps=120)
        for batch in shakespeare_batches(120):
            state, metrics = step(state, batch)
        losses[policy] = float(metrics["loss"])
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert losses["bf16"] < 3.5  # it learned (ln 256 = 5.5 at the start)
    assert abs(losses["fp8"] / losses["bf16"] - 1) < 0.03, losses


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
