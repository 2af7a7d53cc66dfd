"""Perplexity under several policies: exact windowing, fp32 reference, table, JSON and CLI errors."""

import json

import jax
import numpy as np
import pytest

import jaxmp
from jaxmp import hf, models
from jaxmp.checkpoint import Checkpointer
from jaxmp.evaluate import main
from jaxmp.inference.load import load_model
from jaxmp.inference.perplexity import evaluate_policies, markdown_table, perplexity
from jaxmp.training.config import TrainConfig
from jaxmp.training.run_dir import RunDir

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3


@pytest.fixture(scope="module")
def tiny():
    model = models.get_model(
        "llama-tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
    )
    return model, models.init_params(model, jax.random.key(0), 8)


def test_perplexity_scores_every_token_once_in_its_window(tiny):
    model, params = tiny
    tokens_N = np.random.default_rng(0).integers(0, 256, 23)
    nll, count = perplexity(model, params, tokens_N, seq_len=8, batch_size=2)  # 3 windows, one padded batch
    log_probs_of = jax.jit(
        lambda ids_1xL: jax.nn.log_softmax(model.apply({"params": params}, ids_1xL).logits[0])
    )
    expected = []
    for start in range(0, 22, 8):
        window_L = tokens_N[start : start + 9]
        log_probs = log_probs_of(
            np.pad(window_L[:-1], (0, 9 - len(window_L)))[None]
        )  # causal: padding is harmless
        expected += [-float(log_probs[i, t]) for i, t in enumerate(window_L[1:])]
    assert count == 22 and nll == pytest.approx(np.mean(expected), rel=1e-5)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny):
    directory = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(*tiny, directory)
    return directory


def test_policies_are_compared_with_fp32(hf_dir, tiny):
    loaded = load_model(hf_dir, "fp32", tokenizer="byte")
    tokens_N = loaded.tokenizer.encode(TEXT)
    results = evaluate_policies(loaded, ["bf16", "fp32", "pure-bf16"], tokens_N, seq_len=32, batch_size=4)
    bf16, fp32, pure = results
    assert fp32.ratio == 1.0 and fp32.perplexity == pytest.approx(np.exp(fp32.nll))
    assert fp32.nll == pytest.approx(perplexity(*tiny, tokens_N, 32, 4)[0], rel=1e-6)
    assert bf16.ratio == pytest.approx(bf16.perplexity / fp32.perplexity) and abs(bf16.ratio - 1) < 0.01
    assert pure.param_bytes * 2 == fp32.param_bytes == bf16.param_bytes
    table = markdown_table(results)
    assert table.count("\n") == 4 and "| `params=bfloat16,compute=bfloat16,output=float32` |" in table


def test_cli_writes_table_and_json(hf_dir, tmp_path, capsys):
    data, out = tmp_path / "text.txt", tmp_path / "ppl.json"
    data.write_text(TEXT)
    argv = ["--model", str(hf_dir), "--tokenizer", "byte", "--data", str(data), "--seq-len", "32"]
    assert main([*argv, "--policies", "fp32,bf16", "--json", str(out), "--prompts", "2"]) == 0
    header = "| policy | params MiB | tokens | NLL | perplexity | vs fp32 | seconds | greedy = fp32 | decode tok/s |"
    assert capsys.readouterr().out.startswith(header)
    record = json.loads(out.read_text())
    assert record["seq_len"] == 32 and [r["ratio"] for r in record["results"]][0] == 1.0
    assert record["results"][0]["greedy_agreement"] == 1.0
    assert (
        main([*argv, "--policies", "params=bfloat16,compute=bfloat16", "fp32", "--prompts", "0"]) == 0
    )  # one grammar: compare's
    assert capsys.readouterr().out.count("\n") == 4


def test_cli_evaluates_a_run_on_its_validation_split(tmp_path, capsys):
    config = TrainConfig(out=str(tmp_path / "run"), model="gpt2-tiny", tokenizer="byte", seq_len=32)
    model = models.get_model("gpt2-tiny", vocab_size=256)
    RunDir(config.out, resume=False, overwrite=False).start(
        config, {"task": "lm", "model": "gpt2-tiny", "tokenizer": "byte"}
    )
    params = models.init_params(model, jax.random.key(0), 8)
    state = jaxmp.TrainState.create(
        params=params,
        optimizer=jaxmp.make_optimizer(),
        loss_scale=jaxmp.NoOpLossScale(),
        rng=jax.random.key(0),
    )
    Checkpointer(tmp_path / "run" / "checkpoints").save(1, state, {})
    assert main(["--model", config.out, "--policies", "fp32", "--max-tokens", "1000", "--prompts", "0"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert "| 999 |" in row and "| 1.00000 |" in row  # seq_len 32 from the run's config


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["--model", "{hf}", "--tokenizer", "byte"], "--data FILE is required"),
        (["--model", "{hf}", "--tokenizer", "byte", "--data", "/no/such.txt"], "is not a file"),
        (["--model", "{hf}", "--tokenizer", "byte", "--data", "{text}", "--policies", "fp32,fp4"], "'fp4'"),
        (
            ["--model", "{hf}", "--tokenizer", "byte", "--data", "{text}", "--seq-len", "5000"],
            "--seq-len must be",
        ),
        (["--model", "/no/such/dir", "--data", "{text}"], "neither a jaxmp run directory"),
        (
            ["--model", "{huge}", "--tokenizer", "byte", "--data", "{text}", "--policies", "fp32,fp16"],
            "weight lm_head/kernel reaches",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(hf_dir, tiny, tmp_path, capsys, argv, problem):
    model, params = tiny
    huge = tmp_path / "huge"
    hf.save_pretrained(model, {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * 1e7}}, huge)
    (tmp_path / "text.txt").write_text(TEXT)
    paths = {"hf": hf_dir, "huge": huge, "text": tmp_path / "text.txt"}
    assert main([arg.format(**paths) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and problem in captured.err and "Traceback" not in captured.err
    assert captured.out == ""
