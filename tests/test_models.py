"""Models and presets: shapes, parameter counts, masks, scan/remat, dropout and output dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmp import models

SMALL = {
    "gpt2-tiny": {
        "vocab_size": 64,
        "max_positions": 32,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 64,
    },
    "bert-tiny": {
        "vocab_size": 64,
        "max_positions": 32,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 64,
    },
    "llama-tiny": {
        "vocab_size": 64,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "head_dim": 8,
    },
}
FAMILIES = list(SMALL)


@functools.cache
def _small_model(name, overrides):
    model = models.get_model(name, "fp32", **{**SMALL[name], **dict(overrides)})
    return model, models.init_params(model, jax.random.key(0), 8)


def _small(name, **overrides):
    """A small fp32 model of preset ``name`` and its params (cached: params are immutable)."""
    return _small_model(name, tuple(sorted(overrides.items())))


def _jit_apply(model):
    return jax.jit(model.apply, static_argnames="deterministic")


def _ids(batch=2, length=10, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 64)


# (vocab_size, max_positions, d_model, n_layers, n_heads, d_ff) as published: GPT-2 small and medium
# (Radford et al. 2019, Hugging Face gpt2 / gpt2-medium), BERT-Tiny and BERT-Base uncased (Turc et al.
# 2019, Devlin et al. 2018), Llama-3.2-1B (Meta's config.json); the tiny presets are jaxmp's own.
PUBLISHED_SHAPES = {
    "gpt2-tiny": (256, 256, 256, 4, 4, 1024),
    "gpt2": (50257, 1024, 768, 12, 12, 3072),
    "gpt2-medium": (50257, 1024, 1024, 24, 16, 4096),
    "bert-tiny": (30522, 512, 128, 2, 2, 512),
    "bert-base": (30522, 512, 768, 12, 12, 3072),
    "llama-tiny": (256, 256, 256, 4, 4, 688),
    "llama-1b": (128256, 131072, 2048, 16, 32, 8192),
}


def test_presets_have_their_published_shapes():
    assert set(models.PRESETS) == set(PUBLISHED_SHAPES)
    for name, shape in PUBLISHED_SHAPES.items():
        config = models.get_config(name)
        got = (
            config.vocab_size,
            config.max_positions,
            config.d_model,
            config.n_layers,
            config.n_heads,
            config.d_ff,
        )
        assert got == shape, name
    llama = models.get_config("llama-1b")
    assert (llama.n_kv_heads, llama.head_dim, llama.rope_theta, llama.tie_embeddings) == (
        8,
        64,
        500000.0,
        True,
    )
    assert llama.rope_scaling is not None and models.get_config("llama-tiny").rope_scaling is None
    tiny = models.get_model("gpt2-tiny")
    shapes = jax.eval_shape(lambda: models.init_params(tiny, jax.random.key(0), 8))
    # embeddings (256 x 256, twice) + 4 blocks of 789,760 + the final norm; the head is tied
    assert models.count_params(shapes) == 2 * 256 * 256 + 4 * 789_760 + 2 * 256 == 3_290_624
    assert models.get_config("gpt2-tiny", vocab_size=50257).vocab_size == 50257


def test_bad_names_and_fields_are_value_errors():
    with pytest.raises(ValueError, match="unknown model 'gpt3'; valid models: gpt2-tiny, gpt2, gpt2-medium"):
        models.get_config("gpt3")
    with pytest.raises(ValueError, match="gpt2 has no field"):
        models.get_config("gpt2", n_kv_heads=2)
    with pytest.raises(ValueError, match="task 'classify' is not one of lm, none"):
        models.get_config("llama-tiny", task="classify")
    with pytest.raises(ValueError, match="not divisible"):
        models.get_config("gpt2", n_heads=5)


def _torch_count(make):
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters())


def test_full_size_parameter_counts_match_transformers():
    transformers = pytest.importorskip("transformers")

    def count(name, **overrides):
        model = models.get_model(name, **overrides)
        return models.count_params(jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 8)))

    assert count("gpt2") == 124_439_808
    medium = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16)
    assert count("gpt2-medium") == _torch_count(lambda: transformers.GPT2LMHeadModel(medium))
    base = transformers.BertConfig()
    assert count("bert-base", task="lm") == _torch_count(lambda: transformers.BertForMaskedLM(base))
    assert count("bert-base", task="none") == _torch_count(lambda: transformers.BertModel(base))
    llama = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    )
    assert count("llama-1b") == _torch_count(lambda: transformers.LlamaForCausalLM(llama)) == 1_235_814_400


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_causal_models_cannot_see_later_tokens(name):
    model, params = _small(name)
    ids = _ids()
    changed = ids.at[:, 6].set((ids[:, 6] + 1) % 64)
    apply = _jit_apply(model)
    before = apply({"params": params}, ids).logits
    after = apply({"params": params}, changed).logits
    np.testing.assert_array_equal(before[:, :6], after[:, :6])
    assert not np.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("name", FAMILIES)
def test_padding_contents_do_not_change_real_tokens(name):
    model, params = _small(name, task="none")
    ids = _ids()
    mask = jnp.array([[1] * 10, [1] * 7 + [0] * 3])
    other_padding = ids.at[1, 7:].set(3)
    apply = _jit_apply(model)
    first = apply({"params": params}, ids, attention_mask=mask).last_hidden_state
    second = apply({"params": params}, other_padding, attention_mask=mask).last_hidden_state
    np.testing.assert_allclose(first[1, :7], second[1, :7], atol=1e-6)
    np.testing.assert_array_equal(first[0], second[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_cutting_trailing_padding_columns_changes_no_real_token(name):
    """What classification batches cut to their longest row (``pad_multiple``) rely on."""
    model, params = _small(name, task="none")
    ids = _ids()
    mask = jnp.array([[1] * 6 + [0] * 4, [1] * 4 + [0] * 6])
    apply = _jit_apply(model)
    full = apply({"params": params}, ids, attention_mask=mask).last_hidden_state
    cut = apply({"params": params}, ids[:, :6], attention_mask=mask[:, :6]).last_hidden_state
    np.testing.assert_allclose(cut[0], full[0, :6], atol=1e-6)
    np.testing.assert_allclose(cut[1, :4], full[1, :4], atol=1e-6)


@pytest.mark.parametrize(("name", "jit"), [("gpt2-tiny", False), ("bert-tiny", True), ("llama-tiny", True)])
def test_scanned_and_rematerialised_layers_compute_the_same_function(name, jit):
    model, params = _small(name)
    ids, mask = _ids(), jnp.ones((2, 10), jnp.int32)
    expected = _jit_apply(model)({"params": params}, ids, mask).logits
    scanned = models.get_model(name, "fp32", **SMALL[name], scan_layers=True, remat=True)
    stacked = models.stack_layer_params(params, scanned.config.n_layers)
    assert jax.tree.structure(stacked) == jax.tree.structure(
        models.init_params(scanned, jax.random.key(0), 8)
    )
    apply = jax.jit(scanned.apply) if jit else scanned.apply
    np.testing.assert_allclose(apply({"params": stacked}, ids, mask).logits, expected, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, models.unstack_layer_params(stacked, 2), params)


def test_remat_and_scan_give_the_same_gradients():
    model, params = _small("gpt2-tiny")
    scanned = models.get_model("gpt2-tiny", "fp32", **SMALL["gpt2-tiny"], scan_layers=True, remat=True)
    ids = _ids()

    def loss(module, p):
        return jnp.mean(module.apply({"params": p}, ids).logits ** 2)

    grads = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    scanned_grads = jax.jit(jax.grad(lambda p: loss(scanned, p)))(models.stack_layer_params(params, 2))
    expected = models.stack_layer_params(grads, 2)
    for got, want in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    ("policy", "param_dtype", "logits_dtype"),
    [
        ("fp32", jnp.float32, jnp.float32),
        ("bf16", jnp.float32, jnp.float32),
        ("pure-bf16", jnp.bfloat16, jnp.float32),
        ("params=bfloat16,compute=bfloat16,output=bfloat16", jnp.bfloat16, jnp.bfloat16),
    ],
)
@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_come_in_the_output_dtype(name, policy, param_dtype, logits_dtype):
    model = models.get_model(name, policy, **SMALL[name])
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 8))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {np.dtype(param_dtype)}
    out = jax.eval_shape(lambda p: model.apply({"params": p}, _ids()), shapes)
    assert out.logits.dtype == logits_dtype and out.last_hidden_state.dtype == logits_dtype
    assert out.logits.shape == (2, 10, 64)


def test_bert_heads_and_token_types():
    model, params = _small("bert-tiny", task="classify", num_labels=3)
    ids = _ids()
    apply = _jit_apply(model)
    out = apply({"params": params}, ids, token_type_ids=jnp.zeros_like(ids))
    assert out.logits.shape == (2, 3) and out.pooler_output.shape == (2, 32)
    with_types = apply({"params": params}, ids, token_type_ids=jnp.ones_like(ids))
    assert not np.allclose(out.logits, with_types.logits)
    mlm = models.get_model("bert-tiny", **SMALL["bert-tiny"], task="lm")
    mlm_shapes = jax.eval_shape(lambda: models.init_params(mlm, jax.random.key(0), 8))
    assert jax.eval_shape(lambda p: mlm.apply({"params": p}, ids), mlm_shapes).logits.shape == (2, 10, 64)


def test_per_module_param_dtype_override():
    model = models.get_model(
        "llama-tiny", "params=bfloat16,compute=bfloat16;.*norm.*:params=float32", **SMALL["llama-tiny"]
    )
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 8))
    assert shapes["blocks_1"]["norm2"]["scale"].dtype == jnp.float32
    assert shapes["final_norm"]["scale"].dtype == jnp.float32
    assert shapes["blocks_1"]["mlp"]["gate"]["kernel"].dtype == jnp.bfloat16


def test_dropout_is_active_only_when_not_deterministic():
    model, params = _small("bert-tiny", n_layers=1, dropout_rate=0.5, attention_dropout_rate=0.5)
    ids = _ids()
    quiet = model.apply({"params": params}, ids).logits
    np.testing.assert_array_equal(quiet, model.apply({"params": params}, ids, deterministic=True).logits)
    noisy = model.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)}
    ).logits
    assert not np.allclose(quiet, noisy)


def test_bad_inputs_are_value_errors():
    model, params = _small("gpt2-tiny")
    with pytest.raises(ValueError, match="sequence length 40 exceeds max_positions 32"):
        model.apply({"params": params}, jnp.zeros((1, 40), jnp.int32))
    llama, llama_params = _small("llama-tiny")
    with pytest.raises(ValueError, match="no token types"):
        llama.apply({"params": llama_params}, _ids(), token_type_ids=jnp.zeros((2, 10), jnp.int32))


def test_is_causal_lm_names_the_models_that_generate():
    assert models.is_causal_lm(models.get_config("gpt2-tiny"))
    assert models.is_causal_lm(models.get_config("llama-tiny"))
    assert not models.is_causal_lm(models.get_config("bert-tiny"))
    assert not models.is_causal_lm(models.get_config("gpt2-tiny", task="none"))  # hidden states only
