"""KV-cache generation: exact against full recomputation and transformers, padding, sampling, CLI errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxmp
from jaxmp import hf, models
from jaxmp.checkpoint import Checkpointer
from jaxmp.generate import main
from jaxmp.inference.decode import Sampling, generate, init_cache, sample_logits, sample_text
from jaxmp.lowp import tree_bytes
from jaxmp.training.config import TrainConfig
from jaxmp.training.run_dir import RunDir

SHAPES = {
    "gpt2": ("gpt2-tiny", {}),
    "llama": ("llama-tiny", {"n_kv_heads": 2, "head_dim": 16}),
}
PROMPTS = [np.arange(3, 10), np.array([7, 1])]  # [B=2, P=7] left-padded; each test reuses these shapes


def tiny_model(family: str, policy: str = "fp32", **overrides):
    preset, extra = SHAPES[family]
    shape = {
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "d_ff": 128,
        "max_positions": 64,
        "initializer_range": 0.2,
    }
    return models.get_model(preset, policy, **{**shape, **extra, **overrides})


@functools.cache
def tiny_model_and_params(family: str):
    model = tiny_model(family)
    return model, models.init_params(model, jax.random.key(0), 8)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request):
    return tiny_model_and_params(request.param)


@functools.partial(jax.jit, static_argnames="model")
def _logits_at(model, params, ids_1xL, t):
    return model.apply({"params": params}, ids_1xL).logits[0, t]


def greedy_by_recomputation(model, params, prompt, max_new_tokens):
    """Greedy tokens with no cache: the whole sequence is re-run for every new token."""
    ids = np.zeros((1, 32), np.int32)  # causal: the zeros after position t never affect its logits
    ids[0, : len(prompt)] = prompt
    for t in range(len(prompt) - 1, len(prompt) + max_new_tokens - 1):
        ids[0, t + 1] = int(jnp.argmax(_logits_at(model, params, ids, t)))
    return ids[0, len(prompt) : len(prompt) + max_new_tokens]


def test_cached_greedy_equals_full_recomputation(tiny):
    model, params = tiny
    for prompt in PROMPTS:
        expected = greedy_by_recomputation(model, params, prompt, 10)
        np.testing.assert_array_equal(generate(model, params, [prompt], 10).tokens[0], expected)


def test_left_padded_batch_equals_each_prompt_alone(tiny):
    model, params = tiny
    batch = generate(model, params, PROMPTS, 10)
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(batch.tokens[row], generate(model, params, [prompt], 10).tokens[0])
    assert batch.tokens.shape == (2, 10) and batch.lengths.tolist() == [10, 10] and batch.finite


def _transformers_model(family: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = {"vocab_size": 96, "initializer_range": 0.2, "bos_token_id": None, "eos_token_id": None}
    if family == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **common,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_greedy_matches_transformers_generate(family, tmp_path):
    import torch

    reference = _transformers_model(family)
    reference.save_pretrained(tmp_path)
    model, params = hf.from_pretrained(tmp_path, "fp32")
    prompts = np.array([[5, 17, 3, 88, 41], [60, 2, 2, 9, 30]], np.int32)
    with torch.no_grad():
        expected = reference.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=12)
    ours = generate(model, params, list(prompts), 12)
    np.testing.assert_array_equal(ours.tokens, expected[:, prompts.shape[1] :].numpy())


def test_eos_ends_rows_and_the_loop():
    model, params = tiny_model_and_params("gpt2")
    greedy = generate(model, params, PROMPTS, 10).tokens
    eos = int(greedy[0, 2])
    ended = generate(model, params, PROMPTS, 10, eos_id=eos)
    for row in range(2):
        stop = list(greedy[row]).index(eos) + 1 if eos in greedy[row] else 10
        assert ended.lengths[row] == stop
        np.testing.assert_array_equal(ended.tokens[row, :stop], greedy[row, :stop])
        assert (ended.tokens[row, stop:] == eos).all()
    first_token_eos = generate(model, params, PROMPTS[:1], 10, eos_id=int(greedy[0, 0]))
    assert first_token_eos.tokens.shape == (1, 1) and first_token_eos.lengths.tolist() == [1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    model, params = tiny
    hot = Sampling(temperature=1.5, top_k=50, top_p=0.95)
    first, again, other = (generate(model, params, PROMPTS, 10, hot, seed=s).tokens for s in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    greedy = generate(model, params, PROMPTS, 10).tokens
    for nearly_greedy in (Sampling(1.0, top_k=1), Sampling(1.0, top_p=1e-6)):
        np.testing.assert_array_equal(
            generate(model, params, PROMPTS, 10, nearly_greedy, seed=3).tokens, greedy
        )


@pytest.mark.parametrize(
    "top_k, top_p, support", [(4, 1.0, {0, 1, 2, 3}), (2, 1.0, {0, 1}), (4, 0.9, {0, 1, 2}), (2, 0.9, {0, 1})]
)
def test_top_k_and_top_p_restrict_the_support(top_k, top_p, support):
    logits_BxV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))  # top_p 0.9: 0.5 + 0.3 < 0.9
    tokens_B = sample_logits(logits_BxV, jax.random.key(0), 1.0, top_k, top_p)
    assert set(np.asarray(tokens_B).tolist()) == support
    assert set(np.asarray(sample_logits(logits_BxV, jax.random.key(0), 0.0, top_k, top_p)).tolist()) == {0}


def test_bf16_params_halve_memory_cache_in_compute_dtype_logits_fp32():
    policy = jaxmp.get_policy("params=bfloat16,compute=bfloat16")
    _, fp32_params = tiny_model_and_params("llama")
    model, params = tiny_model("llama", policy), hf.cast_params(fp32_params, policy)
    assert tree_bytes(params) * 2 == tree_bytes(fp32_params)
    cache = init_cache(model, batch=2, length=16)
    assert {leaf.dtype for leaf in jax.tree.leaves(cache.layers) if leaf.ndim} == {jnp.dtype(jnp.bfloat16)}
    assert model.apply({"params": params}, jnp.ones((1, 4), jnp.int32)).logits.dtype == jnp.float32
    result = generate(model, params, PROMPTS, 10)
    assert result.finite and result.tokens.shape == (2, 10)


class _NumberTokenizer:
    """Ids are written as space-separated numbers, so a continuation's tokens can be counted."""

    name, vocab_size, eos_id = "numbers", 256, None

    def encode(self, text):
        return np.array([int(word) for word in text.split()], np.int32)

    def decode(self, ids):
        return "".join(f" {int(i)}" for i in ids)


def test_sample_text_continues_past_its_window():
    model, params = tiny_model_and_params("gpt2")
    prompt = "1 2 3 4 5 6 7 8"
    text = sample_text(model, params, _NumberTokenizer(), prompt, max_new_tokens=24, window=16)
    assert text.startswith(prompt + " ") and len(text.split()) == 8 + 24  # 3 rounds: 8 tokens in, 8 out
    assert text == sample_text(model, params, _NumberTokenizer(), prompt, max_new_tokens=24, window=16)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny GPT-2 (byte vocabulary) as Hugging Face directories: as is, with a weight beyond fp16's
    range, and with a final-norm scale (fp32) whose fp16 output overflows."""
    model, params = tiny_model_and_params("gpt2")
    dirs = [tmp_path_factory.mktemp(name) for name in ("gpt2", "gpt2_huge", "gpt2_hot")]
    flat = traverse_util.flatten_dict(params, sep="/")
    kernel, scale = "blocks_1/mlp/fc_in/kernel", "final_norm/scale"
    huge = traverse_util.unflatten_dict({**flat, kernel: flat[kernel].at[0, 0].set(1e5)}, sep="/")
    hot = traverse_util.unflatten_dict({**flat, scale: flat[scale] * 1e6}, sep="/")
    for directory, tree in zip(dirs, (params, huge, hot), strict=True):
        hf.save_pretrained(model, tree, directory)
    return dirs


def test_cli_prints_text_speed_and_bytes(hf_dirs, capsys):
    argv = ["--model", str(hf_dirs[0]), "--tokenizer", "byte", "--prompt", "Hello, ", "--prompt", "Hi"]
    assert main([*argv, "--max-new-tokens", "10"]) == 0  # the shapes of PROMPTS: compiled already
    out = capsys.readouterr().out
    assert "=== 'Hello, '\nHello, " in out and "=== 'Hi'\nHi" in out
    assert "20 new tokens" in out and "tokens/s" in out and "MiB + KV cache" in out


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--model", "/no/such/model", "--prompt", "Hi"], "neither a jaxmp run directory"),
        (["--model", "{good}", "--prompt", "Hi"], "has no tokenizer files"),
        (["--model", "{good}", "--tokenizer", "byte", "--prompt", ""], "empty prompt"),
        (
            ["--model", "{good}", "--tokenizer", "byte", "--prompt", "Hi", "--max-new-tokens", "63"],
            "exceeds the model's context of 64",
        ),
        (
            ["--model", "{good}", "--tokenizer", "byte", "--prompt", "Hi", "--max-new-tokens", "0"],
            "must be >= 1",
        ),
        (
            ["--model", "{good}", "--tokenizer", "byte", "--prompt", "Hi", "--max-new-tokens", "many"],
            "invalid int value",
        ),
        (
            ["--model", "{good}", "--tokenizer", "byte", "--prompt", "Hi", "--policy", "fp12"],
            "unknown policy 'fp12'",
        ),
        (
            ["--model", "{good}", "--tokenizer", "byte", "--prompt", "Hi", "--top-p", "1.5"],
            "must be in (0, 1]",
        ),
        (
            ["--model", "{huge}", "--tokenizer", "byte", "--prompt", "Hi", "--policy", "fp16"],
            "beyond float16's largest",
        ),
        (
            ["--model", "{huge}", "--tokenizer", "byte", "--prompt", "Hi", "--policy", "p=f16,c=f16"],
            "blocks_1/mlp/fc_in",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(hf_dirs, capsys, argv, problem):
    assert main([arg.format(good=hf_dirs[0], huge=hf_dirs[1]) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and problem in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_reports_non_finite_logits(hf_dirs, capsys):
    argv = ["--model", str(hf_dirs[2]), "--tokenizer", "byte", "--prompt", "Hello, ", "--prompt", "Hi"]
    assert main([*argv, "--max-new-tokens", "10", "--policy", "fp16"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite logits under policy params=float32,compute=float16" in err


def test_cli_generates_from_a_run_directory(tmp_path, capsys):
    config = TrainConfig(out=str(tmp_path / "run"), tokenizer="byte", model="gpt2-tiny")
    model = models.get_model("gpt2-tiny", vocab_size=256)
    params = models.init_params(model, jax.random.key(0), 8)
    RunDir(config.out, resume=False, overwrite=False).start(
        config, {"task": "lm", "model": "gpt2-tiny", "tokenizer": "byte"}
    )
    state = jaxmp.TrainState.create(
        params=params,
        optimizer=jaxmp.make_optimizer(learning_rate=1e-3),
        loss_scale=jaxmp.NoOpLossScale(),
        rng=jax.random.key(0),
    )
    Checkpointer(tmp_path / "run" / "checkpoints").save(1, state, {})
    assert main(["--model", config.out, "--prompt", "ab", "--max-new-tokens", "4"]) == 0
    expected = generate(model, params, [np.array([97, 98])], 4).tokens[0]
    assert capsys.readouterr().out.startswith(
        "=== 'ab'\nab" + bytes(expected.tolist()).decode("utf-8", "replace")
    )
