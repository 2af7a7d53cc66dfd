"""Layers: dtypes read per module from the policy, fp32 islands, attention paths, rotary embeddings."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmp import get_policy, models
from jaxmp.models import layers

F32, BF16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, custom_jvp, remat ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


def _dots(jaxpr):
    """``[(lhs dtype, rhs dtype, rhs shape, preferred dtype)]`` of every dot_general in ``jaxpr``."""
    return [
        (
            np.dtype(e.invars[0].aval.dtype),
            np.dtype(e.invars[1].aval.dtype),
            e.invars[1].aval.shape,
            e.params["preferred_element_type"],
        )
        for e in _equations(jaxpr)
        if e.primitive.name == "dot_general"
    ]


class _Parent(nn.Module):
    """Holds one layer as a named child: a root module's scope path is empty, a child's is its name."""

    make_layer: Callable[[], nn.Module]

    @nn.compact
    def __call__(self, *args):
        return self.make_layer()(*args)


def _wrap(layer_cls, *fields, name, **named_fields):
    """The layer ``layer_cls(*fields, **named_fields)`` at scope path ``name``."""
    return _Parent(functools.partial(layer_cls, *fields, name=name, **named_fields))


def _run(module, *args, jit):
    """``(params of the wrapped layer, output)``."""
    variables = module.init(jax.random.key(0), *args)
    apply = jax.jit(module.apply) if jit else module.apply
    return next(iter(variables["params"].values())), apply(variables, *args)


def _jaxpr(module, *args):
    variables = module.init(jax.random.key(0), *args)
    return jax.make_jaxpr(lambda v: module.apply(v, *args))(variables).jaxpr


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dense_stores_in_param_dtype_and_computes_in_compute_dtype(jit):
    dense = _wrap(layers.Dense, get_policy("bf16"), 8, name="fc_in")
    x = jnp.ones((2, 3, 4), jnp.float32)
    params, y = _run(dense, x, jit=jit)
    assert params["kernel"].dtype == F32 and params["bias"].dtype == F32
    assert y.dtype == BF16 and y.shape == (2, 3, 8)
    [(lhs, rhs, _, preferred)] = _dots(_jaxpr(dense, x))
    assert (lhs, rhs, np.dtype(preferred)) == (BF16, BF16, F32)


def test_embed_never_casts_integer_ids_to_float():
    embed = layers.Embed(get_policy("pure-bf16"), 10, 4)
    ids = jnp.array([[1, 2, 9]], jnp.int32)
    variables = embed.init(jax.random.key(0), ids)
    y = embed.apply(variables, ids)
    assert variables["params"]["embedding"].dtype == BF16 and y.dtype == BF16
    jaxpr = jax.make_jaxpr(embed.apply)(variables, ids).jaxpr
    ids_var = jaxpr.invars[-1]
    casts = [
        e for e in _equations(jaxpr) if e.primitive.name == "convert_element_type" and ids_var in e.invars
    ]
    assert all(not jnp.issubdtype(e.params["new_dtype"], jnp.floating) for e in casts)


@pytest.mark.parametrize("norm_cls", [layers.LayerNorm, layers.RMSNorm])
@pytest.mark.parametrize(
    ("policy", "statistics_dtype"), [("bf16", F32), ("bf16;.*norm.*:compute=bfloat16", BF16)]
)
def test_norm_statistics_are_an_fp32_island_unless_overridden(norm_cls, policy, statistics_dtype):
    norm = _wrap(norm_cls, get_policy(policy), name="final_norm")
    x = jax.random.normal(jax.random.key(1), (2, 5, 16), jnp.float32).astype(jnp.bfloat16) * 3 + 1
    params, y = _run(norm, x, jit=True)
    assert y.dtype == BF16  # a norm hands back its input's dtype
    rsqrts = {
        np.dtype(e.outvars[0].aval.dtype) for e in _equations(_jaxpr(norm, x)) if e.primitive.name == "rsqrt"
    }
    assert rsqrts == {statistics_dtype}
    x32 = np.asarray(x, np.float32)
    centred = x32 - x32.mean(-1, keepdims=True) if norm_cls is layers.LayerNorm else x32
    expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.02, rtol=0.01)


def _reference_attention(q, k, v, mask):
    """numpy attention with key/value heads repeated for grouped queries; mask ``[B, 1, L, S]``."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshk->blhk", probs, v)


@pytest.mark.parametrize("softmax_dtype", [F32, BF16])
def test_both_attention_paths_match_a_reference_with_grouped_queries(softmax_dtype):
    key = jax.random.key(2)
    q, k, v = (
        jax.random.normal(jax.random.fold_in(key, i), (2, 6, heads, 8)) for i, heads in enumerate((4, 2, 2))
    )
    mask = layers.make_attention_mask(jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]), 6, causal=True)
    assert mask.shape == (2, 1, 6, 6)
    expected = _reference_attention(*(np.asarray(a, np.float64) for a in (q, k, v)), np.asarray(mask))
    explicit = jax.jit(layers._attend_softmax, static_argnums=(4, 5, 6))(
        q, k, v, mask, softmax_dtype, None, True
    )
    tolerance = 1e-5 if softmax_dtype == F32 else 2e-2
    np.testing.assert_allclose(np.asarray(explicit), expected, atol=tolerance)
    fused = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=mask)
    np.testing.assert_allclose(np.asarray(fused), expected, atol=1e-5)


@pytest.mark.parametrize(("policy", "softmax_dtype"), [("bf16", F32), ("bf16;.*softmax:compute=bf16", BF16)])
def test_attention_softmax_dtype_comes_from_the_softmax_path(policy, softmax_dtype):
    attention = _wrap(layers.Attention, get_policy(policy), n_heads=4, n_kv_heads=2, head_dim=8, name="attn")
    x = jnp.ones((1, 5, 16), jnp.float32)
    _, y = _run(attention, x, None, jit=False)
    assert y.dtype == BF16
    exps = {
        np.dtype(e.outvars[0].aval.dtype)
        for e in _equations(_jaxpr(attention, x, None))
        if e.primitive.name == "exp"
    }
    assert exps == {softmax_dtype}


def test_attention_dropout_needs_a_dropout_rng_and_changes_outputs():
    attention = layers.Attention(get_policy("fp32"), n_heads=2, n_kv_heads=2, head_dim=4, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(3), (1, 6, 8))
    variables = attention.init(jax.random.key(0), x, None)
    deterministic = attention.apply(variables, x, None)
    dropped = attention.apply(variables, x, None, False, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(dropped, deterministic)


def test_rotary_frequencies_match_transformers_llama3_scaling():
    transformers = pytest.importorskip("transformers")
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    scaling = layers.RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192
    )
    hf_config = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    expected, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = layers.rope_inverse_frequencies(64, 500000.0, scaling)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)


def test_rotary_rotates_pairs_of_halves_by_position():
    x = jnp.ones((1, 3, 1, 4), jnp.float32)
    inv_freq = np.array([1.0, 0.5])
    rotated = np.asarray(layers.apply_rotary(x, inv_freq))[0, :, 0]
    angles = np.arange(3)[:, None] * inv_freq[None, :]
    expected = np.concatenate([np.cos(angles) - np.sin(angles), np.cos(angles) + np.sin(angles)], axis=-1)
    np.testing.assert_allclose(rotated, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("policy", "output_dtype"), [("bf16", F32), ("bf16;lm_head:compute=bfloat16,output=bfloat16", BF16)]
)
def test_logits_keep_the_fp32_accumulator(policy, output_dtype):
    head = _wrap(layers.LogitsHead, get_policy(policy), 7, name="lm_head")
    x = jax.random.normal(jax.random.key(5), (2, 3, 16)).astype(jnp.bfloat16)
    params, logits = _run(head, x, jit=True)
    assert logits.dtype == output_dtype
    kernel = np.asarray(params["kernel"].astype(jnp.bfloat16), np.float32)
    expected = np.asarray(x, np.float32) @ kernel
    tolerance = 1e-6 if output_dtype == F32 else 1e-2
    np.testing.assert_allclose(np.asarray(logits, np.float32), expected, atol=tolerance, rtol=tolerance)


def test_policy_override_changes_matmul_dtypes_per_module():
    """``.*attn.*:compute=float32`` puts every attention matmul in fp32 and leaves the MLP in bf16."""
    d_model, d_ff, vocab = 32, 96, 48
    model = models.get_model(
        "gpt2-tiny",
        "params=float32,compute=bfloat16;.*attn.*:compute=float32",
        vocab_size=vocab,
        d_model=d_model,
        d_ff=d_ff,
        n_layers=2,
        max_positions=16,
    )
    params = models.init_params(model, jax.random.key(0), 8)
    ids = jnp.zeros((2, 8), jnp.int32)
    dots = _dots(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids).logits)(params).jaxpr)
    mlp = [(lhs, rhs) for lhs, rhs, shape, _ in dots if shape in ((d_model, d_ff), (d_ff, d_model))]
    attention = [(lhs, rhs) for lhs, rhs, shape, _ in dots if shape == (d_model, d_model) or len(shape) >= 4]
    head = [(lhs, rhs) for lhs, rhs, shape, _ in dots if shape == (vocab, d_model)]
    assert len(mlp) == 4 and set(mlp) == {(BF16, BF16)}
    assert len(attention) == 2 * (4 + 2) and set(attention) == {(F32, F32)}  # q, k, v, out, scores, probs @ v
    assert set(head) == {(BF16, BF16)}
    assert all(np.dtype(preferred) == F32 for lhs, *_, preferred in dots if lhs == BF16)
