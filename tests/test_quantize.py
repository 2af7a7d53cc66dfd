"""8-bit serving: the weights= and kv= policy keys against float references of the same quantisation."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from jaxmp import models, quantize
from jaxmp.errors import UsageError
from jaxmp.inference.decode import init_cache
from jaxmp.inference.load import LoadedModel
from jaxmp.inference.perplexity import evaluate_policies
from jaxmp.lowp import tree_bytes
from jaxmp.precision import get_policy
from jaxmp.training.config import TrainConfig


def test_int8_round_trip_is_within_half_a_step_per_column():
    w_KxF = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    w_KxF[:, 3] = 0.0  # an all-zero column: scale 1, values 0, no division by zero
    w_KxF[7, 4] = 1e4  # one huge value sets its column's step
    q_KxF, scale_F = quantize.quantize(w_KxF, "int8", axis=0)
    assert q_KxF.dtype == jnp.int8 and scale_F.shape == (5,) and scale_F.dtype == jnp.float32
    step_F = np.abs(w_KxF).max(axis=0) / 127
    np.testing.assert_allclose(scale_F, np.where(step_F > 0, step_F, 1.0), rtol=1e-7)
    error = np.abs(np.asarray(quantize.dequantize(q_KxF, scale_F, axis=0)) - w_KxF)
    assert np.all(error <= np.asarray(scale_F) / 2 * (1 + 1e-6))
    assert np.all(np.asarray(q_KxF[:, 3]) == 0) and int(q_KxF[7, 4]) == 127


def test_fp8_round_trip_is_e4m3_rounding_of_the_scaled_values():
    w_KxF = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    q_KxF, scale_F = quantize.quantize(w_KxF, "fp8", axis=0)
    scale_F = np.abs(w_KxF).max(axis=0) / 448
    expected = (w_KxF / scale_F).astype(ml_dtypes.float8_e4m3fn)  # round to nearest E4M3
    np.testing.assert_array_equal(np.asarray(q_KxF).view(np.uint8), expected.view(np.uint8))
    normal = np.abs(w_KxF / scale_F) >= 2.0**-6  # E4M3 normals: 3 mantissa bits, error <= 2^-4 relative
    error = np.abs(np.asarray(quantize.dequantize(q_KxF, scale_F, axis=0)) - w_KxF)
    assert np.all(error[normal] <= np.abs(w_KxF[normal]) * 2.0**-4 * (1 + 1e-6))


def _dequantized(served):
    """A float32 params tree holding exactly the values an 8-bit served tree stands for."""
    flat = traverse_util.flatten_dict(served, sep="/")
    floats = {}
    for path, leaf in flat.items():
        if path.endswith("_scale"):
            continue
        if quantize.format_of(leaf.dtype):
            axis = 1 if path.endswith("embedding") else 0
            leaf = quantize.dequantize(leaf, flat[f"{path}_scale"], axis)
        floats[path] = jnp.asarray(leaf, jnp.float32)
    return traverse_util.unflatten_dict(floats, sep="/")


@pytest.fixture(scope="module")
def gpt2():
    model = models.get_model("gpt2-tiny", vocab_size=256, n_layers=2)
    return model, models.init_params(model, jax.random.key(0), 1)


@pytest.mark.parametrize(
    "spec, formats",
    [
        ("fp32,weights=int8", {"int8", "float32"}),
        ("fp32,weights=fp8;.*embed.*:weights=fp8", {"float8_e4m3fn", "float32"}),
    ],
)
def test_served_logits_equal_the_float_model_with_the_same_quantised_weights(gpt2, spec, formats):
    model, params = gpt2
    policy = get_policy(spec)
    served = quantize.quantize_params(params, policy)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(served)} == formats
    flat = traverse_util.flatten_dict(served, sep="/")
    assert flat["blocks_0/mlp/fc_in/kernel_scale"].shape == (model.config.d_ff,)
    assert flat["token_embed/embedding"].dtype == (jnp.float32 if "embed" not in spec else jnp.float8_e4m3fn)
    assert flat["blocks_0/attn/query/bias"].dtype == jnp.float32 and "final_norm/scale" in flat
    ids_BxL = np.random.default_rng(0).integers(0, 256, (2, 16))
    logits = models.create_model(model.config, policy).apply({"params": served}, ids_BxL).logits
    reference = model.apply({"params": _dequantized(served)}, ids_BxL).logits
    np.testing.assert_allclose(logits, reference, atol=2e-5)  # (x @ q) * s == x @ (q * s) up to fp32 sums
    assert float(jnp.max(jnp.abs(logits - model.apply({"params": params}, ids_BxL).logits))) > 1e-4


def test_untied_llama_head_and_init_under_an_int8_policy():
    policy = get_policy("bf16,weights=int8;lm_head:weights=int8")
    model = models.get_model(
        "llama-tiny", policy, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64
    )
    params = models.init_params(model, jax.random.key(0), 1)  # initialised directly in 8 bits
    flat = traverse_util.flatten_dict(params, sep="/")
    assert flat["lm_head/kernel"].dtype == jnp.int8 and flat["token_embed/embedding"].dtype == jnp.float32
    assert flat["blocks_0/mlp/gate/kernel"].dtype == jnp.int8
    ids_BxL = np.arange(12).reshape(2, 6)
    float_model = models.get_model(
        "llama-tiny", "bf16", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64
    )
    logits = model.apply({"params": params}, ids_BxL).logits
    reference = float_model.apply({"params": _dequantized(params)}, ids_BxL).logits
    np.testing.assert_allclose(logits, reference, atol=2e-2)  # bf16 activations, same weights


def test_stored_bytes_of_int8_gpt2_are_a_quarter_of_fp32():
    model = models.get_model("gpt2")  # 124M: shapes only
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 1))
    fp32 = tree_bytes(params)
    every = jax.eval_shape(
        lambda p: quantize.quantize_params(p, "fp32,weights=int8;.*embed.*:weights=int8"), params
    )
    default = jax.eval_shape(lambda p: quantize.quantize_params(p, "fp32,weights=int8"), params)
    assert tree_bytes(every) / fp32 <= 0.27  # scales, biases and norms included
    embeddings = sum(
        leaf.size * 4 for path, leaf in traverse_util.flatten_dict(params, sep="/").items() if "embed" in path
    )
    blocks = fp32 - embeddings
    assert tree_bytes(default) - embeddings <= 0.27 * blocks  # embeddings stay fp32 by default


def test_int8_kv_cache_holds_the_quantised_keys_and_values(gpt2):
    model, params = gpt2
    ids_BxL = np.random.default_rng(2).integers(0, 256, (2, 8))
    int8_model = models.create_model(model.config, "fp32,kv=int8")
    float_cache = model.apply({"params": params}, ids_BxL, cache=init_cache(model, 2, 12)).cache
    int8_cache = int8_model.apply({"params": params}, ids_BxL, cache=init_cache(int8_model, 2, 12)).cache
    assert all(layer.key.dtype == layer.value.dtype == jnp.int8 for layer in int8_cache.layers)
    # Layer 0's keys and values come from the embeddings alone: the int8 cache holds them quantised.
    exact, stored = float_cache.layers[0], int8_cache.layers[0]
    assert stored.key_scale.shape == (2, 12, model.config.n_heads)
    for name in ("key", "value"):
        q, scale = quantize.quantize(getattr(exact, name)[:, :8], "int8", axis=-1)
        np.testing.assert_array_equal(getattr(stored, name)[:, :8], q)
        np.testing.assert_allclose(getattr(stored, f"{name}_scale")[:, :8], scale, rtol=1e-6)
    keys, _ = stored.read(jnp.float32)
    assert np.all(np.abs(keys[:, :8] - exact.key[:, :8]) <= stored.key_scale[:, :8, :, None] / 2 * 1.001)


def test_evaluate_runs_kv_policies_through_the_cache_and_compares_greedy_tokens(gpt2):
    model, params = gpt2
    text = np.random.default_rng(3).integers(0, 256, 120)
    loaded = LoadedModel(model, params, tokenizer=None)
    fp32, kv8 = evaluate_policies(loaded, ["fp32", "fp32,kv=fp8"], text, seq_len=24, batch_size=5, prompts=3)
    assert fp32.greedy_agreement == 1.0 and fp32.decode_tokens_per_s > 0 and kv8.decode_tokens_per_s > 0
    assert kv8.ratio != 1.0 and abs(kv8.ratio - 1) < 0.02  # the cache's rounding reached the loss
    assert 0.5 < kv8.greedy_agreement <= 1.0 and kv8.param_bytes == fp32.param_bytes


def test_training_refuses_serving_keys():
    with pytest.raises(UsageError, match="sets kv and weights, which say how a trained model is served"):
        TrainConfig(policy="bf16,weights=int8;.*attn:kv=fp8").check()


def test_policy_grammar_of_the_serving_keys():
    policy = get_policy("bf16,weights=int8,kv=fp8;blocks_1/.*:w=param,kv=bf16;lm_head:weights=fp8")
    assert (
        policy.weights_for("blocks_0/mlp/fc_in") == "int8"
        and policy.weights_for("blocks_1/attn/key") == "param"
    )
    assert policy.weights_for("token_embed") == "param" and policy.weights_for("lm_head") == "fp8"
    assert (
        policy.kv_dtype("blocks_0/attn") == jnp.float8_e4m3fn
        and policy.kv_dtype("blocks_1/attn") == jnp.bfloat16
    )
    assert get_policy(str(policy)) == policy and get_policy("fp16").kv_dtype("blocks_0/attn") == jnp.float16
    for spec, problem in [
        (
            "fp32,weights=int4",
            "unknown weights 'int4' in policy 'fp32,weights=int4'; valid: param, int8, fp8",
        ),
        ("fp32,kv=int4", "unknown kv 'int4'"),
        ("fp32,kv=int8,kv=fp8", "duplicate key 'kv'"),
    ]:
        with pytest.raises(ValueError, match=problem):
            get_policy(spec)


def test_int8_matmul_is_the_exact_integer_product_of_both_quantised_operands():
    rng = np.random.default_rng(4)
    x_BxLxK, w_KxF = (
        rng.standard_normal((2, 3, 40)).astype(np.float32),
        rng.standard_normal((40, 6)).astype(np.float32),
    )
    x_scale = np.abs(x_BxLxK).max(-1, keepdims=True) / 127
    w_scale = np.abs(w_KxF).max(0) / 127
    x_q, w_q = np.round(x_BxLxK / x_scale).astype(np.int64), np.round(w_KxF / w_scale).astype(np.int64)
    expected = (x_q @ w_q) * x_scale * w_scale  # integer sums, then both scales
    q, scale = quantize.quantize(w_KxF, "int8", axis=0)
    np.testing.assert_allclose(quantize.int8_matmul(x_BxLxK, q, scale), expected, rtol=1e-6)
    np.testing.assert_allclose(
        quantize.int8_matmul(x_BxLxK, w_KxF, None), expected, rtol=1e-6
    )  # float kernel
    exact = x_BxLxK @ w_KxF
    assert float(np.max(np.abs(expected - exact))) < 0.02 * float(np.max(np.abs(exact)))


def test_policy_cli_shows_the_weight_format_and_stored_bytes(capsys):
    from jaxmp.policy import main

    assert main(["--model", "gpt2-tiny", "--policy", "fp32,weights=int8;.*embed.*:weights=int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["module", "type", "params", "compute", "output", "weights", "rule"]
    assert any(
        line.split()[:2] == ["blocks_0/mlp/fc_in", "Dense"] and line.split()[5] == "int8" for line in lines
    )
    stored, ratio = lines[-1], float(lines[-1].split(", ")[1].split("x")[0])
    assert stored.startswith("params as stored:") and 0.25 < ratio <= 0.27
