"""Bad input to every command line: one line on stderr naming the problem, exit status 2, no traceback,
and every file and directory involved byte-for-byte as it was.

Each verb has one list of :class:`Case`; a case's argv names workspace paths as ``{name}`` (built once by
:func:`workspace`, see ``_FIXTURES``). To add a case, append it to its verb's list (and, if it needs
one, add its fixture to ``_FIXTURES``). Most cases run in-process through ``main(argv)``; a few run as
``python -m jaxmp.<verb>`` to catch what is printed outside ``main`` (warnings, tracebacks).
"""

import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import pytest
import torch

from jaxmp import compare, diagnose, evaluate, generate, hf, models, predict, train
from jaxmp.cli import run_cli


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` (``{name}`` is the workspace path ``name``) and a substring of its error."""

    name: str
    argv: tuple[str, ...]
    problem: str


def case(name: str, problem: str, *argv: str) -> Case:
    return Case(name, argv, problem)


# ----------------------------------------------------------------------------------------------- fixtures

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)


def _model_dir(root: Path, name: str, **changes: Callable[[Path], None]) -> None:
    """``root/name``: a copy of the tiny Hugging Face GPT-2 ``root/good`` after ``changes``."""
    shutil.copytree(root / "good", root / name)
    for change in changes.values():
        change(root / name)


def _weights(content: bytes) -> Callable[[Path], None]:
    return lambda directory: _write(directory / "model.safetensors", content)


def _torch_weights(state: object, cut: int | None = None) -> Callable[[Path], None]:
    """Replaces model.safetensors by a pytorch_model.bin of ``state`` (its first ``cut`` bytes)."""

    def change(directory: Path) -> None:
        (directory / "model.safetensors").unlink()
        torch.save(state, directory / "pytorch_model.bin")
        if cut is not None:
            _write(directory / "pytorch_model.bin", (directory / "pytorch_model.bin").read_bytes()[:cut])

    return change


def _config(**fields: object) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        _write(directory / "config.json", json.dumps({**config, **fields}))

    return change


class _Unpicklable:
    """What ``torch.load(weights_only=True)`` refuses: a pickle that would call a function."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _build_workspace(root: Path) -> None:
    model = models.get_model(
        "gpt2-tiny", vocab_size=256, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_positions=64
    )
    hf.save_pretrained(model, models.init_params(model, jax.random.key(0), 8), root / "good")
    weights = (root / "good" / "model.safetensors").read_bytes()
    broken_tokenizer = {
        "tokenizer.json": "{}",  # never read: the config is read first
        "tokenizer_config.json": '{"eos_token": ',
    }
    _model_dir(root, "truncated", weights=_weights(weights[: len(weights) // 2]))
    _model_dir(root, "corrupt", weights=_weights(weights[:8] + b"\xff" * 64 + weights[72:]))
    _model_dir(root, "garbage", weights=_weights(b"these are not weights\n" * 20))
    _model_dir(root, "empty_weights", weights=_weights(b""))
    _model_dir(root, "bin_pickle", weights=_torch_weights({"wte.weight": _Unpicklable()}))
    _model_dir(root, "bin_list", weights=_torch_weights([torch.zeros(2)]))
    _model_dir(root, "bin_truncated", weights=_torch_weights({"wte.weight": torch.zeros(64)}, cut=100))
    _model_dir(root, "unknown_type", config=_config(model_type="mamba9"))
    _model_dir(
        root, "auto_map", config=_config(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    )
    _model_dir(root, "config_not_json", config=lambda d: _write(d / "config.json", "{not json"))
    _model_dir(
        root,
        "broken_tokenizer_model",
        tokenizer=lambda d: [_write(d / name, text) for name, text in broken_tokenizer.items()],
    )
    for name, text in broken_tokenizer.items():
        _write(root / "broken_tokenizer" / name, text)
    _write(root / "broken_config_only" / "vocab.json", "{}")
    _write(root / "broken_config_only" / "tokenizer_config.json", "{broken")
    _write(root / "text.txt", TEXT)
    _write(root / "binary.bin", bytes(range(256)) * 4)
    _write(root / "labels.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n")
    _write(root / "label_beyond_int32.tsv", "sentence\tlabel\ngood film\t99999999999\n")
    _write(root / "label_beyond_int32.jsonl", '{"text": "good film", "label": 4294967296}\n')
    _write(root / "open_quote.csv", 'label,text\n1,"good film\n0,bad film\n')
    _write(root / "a_file", "not a directory\n")
    (root / "a_directory").mkdir()
    _write(root / "existing_report" / "report.json", "{}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    _build_workspace(root)
    return root


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: a file's bytes, None for a directory."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def _argv(case: Case, root: Path) -> list[str]:
    paths = {path.name: str(path) for path in root.iterdir()} | {"out": str(root / "out")}
    return [re.sub(r"\{([\w.]+)\}", lambda match: paths[match.group(1)], arg) for arg in case.argv]


# ------------------------------------------------------------------------------------------------ cases

_TINY_TRAIN = ("--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1")
_TRAIN = (*_TINY_TRAIN, "--sample-tokens", "0", "--data", "{text.txt}", "--out", "{out}")
_TINY_CLASSIFY = (
    "--steps",
    "1",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--data",
    "{labels.tsv}",
    "--out",
    "{out}",
)
_CLASSIFY = (*_TINY_CLASSIFY, "--task", "classify", "--init", "{good}", "--eval-data", "{labels.tsv}")
TRAIN_CASES = [
    case("flag", "--steps", *_TRAIN, "--steps", "many"),
    case("binary_data", "not UTF-8", *_TRAIN, "--data", "{binary.bin}"),
    case("init_truncated", "damaged or not a safetensors file", *_TRAIN, "--init", "{truncated}"),
    case("init_corrupt", "damaged or not a safetensors file", *_TRAIN, "--init", "{corrupt}"),
    case("init_garbage", "damaged or not a safetensors file", *_TRAIN, "--init", "{garbage}"),
    case("init_empty", "damaged or not a safetensors file", *_TRAIN, "--init", "{empty_weights}"),
    case("init_bin_pickle", "never unpickles", *_TRAIN, "--init", "{bin_pickle}"),
    case("init_bin_list", "holds a list", *_TRAIN, "--init", "{bin_list}"),
    case("init_bin_truncated", "not a PyTorch checkpoint", *_TRAIN, "--init", "{bin_truncated}"),
    case("init_unknown_type", "model_type 'mamba9' is not supported", *_TRAIN, "--init", "{unknown_type}"),
    case("init_auto_map", "auto_map", *_TRAIN, "--init", "{auto_map}"),
    case("init_config_not_json", "not valid JSON", *_TRAIN, "--init", "{config_not_json}"),
    case("tokenizer_config", "tokenizer_config.json is not valid JSON", *_TRAIN, "--tokenizer", "{broken_tokenizer}"),
    case("tokenizer_config_only", "tokenizer_config.json is not valid JSON", *_TRAIN, "--tokenizer", "{broken_config_only}"),
    case("tsv_label_beyond_int32", "label 99999999999 is outside", *_CLASSIFY, "--data", "{label_beyond_int32.tsv}"),
    case("jsonl_label_beyond_int32", "label 4294967296 is outside", *_CLASSIFY, "--data", "{label_beyond_int32.jsonl}"),
    case("csv_open_quote", "quoted fields are closed", *_CLASSIFY, "--data", "{open_quote.csv}"),
    case("override_matches_nothing", "'.*atn.*' matches no module", *_TRAIN, "--policy", "bf16;.*atn.*:c=f32"),
    case("eval_data_with_lm", "--eval-data applies to --task classify only", *_TRAIN, "--eval-data", "{labels.tsv}"),
    case("max_rows_with_lm", "--max-rows applies to --task classify only", *_TRAIN, "--max-rows", "4"),
    case("tokenizer_with_classify", "--tokenizer applies to --task lm only", *_CLASSIFY, "--tokenizer", "bpe:300"),
    case("eval_batches_with_classify", "--eval-batches applies to --task lm only", *_CLASSIFY, "--eval-batches", "2"),
]  # fmt: skip

_GENERATE = ("--model", "{good}", "--tokenizer", "byte", "--max-new-tokens", "2")
GENERATE_CASES = [
    case("flag", "--max-new-tokens", *_GENERATE, "--prompt", "Hi", "--max-new-tokens", "many"),
    case("prompt_not_utf8", "not valid UTF-8", *_GENERATE, "--prompt", "Hi \udcff\udcfe"),
    case("model_truncated", "damaged or not a safetensors file", *_GENERATE, "--prompt", "Hi", "--model", "{truncated}"),
    case("model_bin_pickle", "never unpickles", *_GENERATE, "--prompt", "Hi", "--model", "{bin_pickle}"),
    case("model_bin_list", "holds a list", *_GENERATE, "--prompt", "Hi", "--model", "{bin_list}"),
    case("model_unknown_type", "'mamba9' is not supported", *_GENERATE, "--prompt", "Hi", "--model", "{unknown_type}"),
    case("model_auto_map", "auto_map", *_GENERATE, "--prompt", "Hi", "--model", "{auto_map}"),
    case("tokenizer_config", "is not valid JSON", *_GENERATE, "--prompt", "Hi", "--tokenizer", "{broken_tokenizer}"),
    case("model_tokenizer_config", "is not valid JSON", "--model", "{broken_tokenizer_model}", "--prompt", "Hi"),
]  # fmt: skip

_EVALUATE = ("--model", "{good}", "--tokenizer", "byte", "--data", "{text.txt}", "--policies", "fp32")
EVALUATE_CASES = [
    case("flag", "--batch-size", *_EVALUATE, "--batch-size", "many"),
    case("seq_len_0", "--seq-len must be >= 1", *_EVALUATE, "--seq-len", "0"),
    case("seq_len_beyond_context", "--seq-len must be in 1..64", *_EVALUATE, "--seq-len", "65"),
    case("max_tokens_negative", "--max-tokens must be >= 2", *_EVALUATE, "--max-tokens", "-5"),
    case("batch_size_0", "--batch-size must be >= 1", *_EVALUATE, "--batch-size", "0"),
    case("binary_data", "not UTF-8", *_EVALUATE, "--data", "{binary.bin}"),
    case("json_directory", "--json", *_EVALUATE, "--json", "{a_directory}"),
    # checked before the model is loaded: the damaged model is never read
    case("json_before_work", "is a directory", *_EVALUATE, "--json", "{a_directory}", "--model", "{truncated}"),
    case("json_read_only", "is not writable", *_EVALUATE, "--json", "/proc/jaxmp-test/ppl.json"),
    case("model_truncated", "damaged or not a safetensors file", *_EVALUATE, "--model", "{truncated}"),
    case("model_unknown_type", "'mamba9' is not supported", *_EVALUATE, "--model", "{unknown_type}"),
    case("policy_with_loss_scale", "names a loss scale", *_EVALUATE, "--policies", "fp32", "fp16@static:128"),
    case("policy_listed_twice", "lists a policy twice", *_EVALUATE, "--policies", "fp32", "fp32,bf16"),
]  # fmt: skip

_DIAGNOSE = ("--batches", "1", "--batch-size", "2", "--seq-len", "16", "--out", "{out}")
DIAGNOSE_CASES = [
    case("flag", "--batches", *_DIAGNOSE, "--batches", "many"),
    case("model_truncated", "damaged or not a safetensors file", *_DIAGNOSE, "--model", "{truncated}"),
    case("model_bin_pickle", "never unpickles", *_DIAGNOSE, "--model", "{bin_pickle}"),
    case("model_config_not_json", "not valid JSON", *_DIAGNOSE, "--model", "{config_not_json}"),
    case("binary_data", "not UTF-8", *_DIAGNOSE, "--data", "{binary.bin}"),
    case("batches_before_model", "--batches", *_DIAGNOSE, "--batches", "0", "--model", "{truncated}"),
    case("out_is_a_file", "is a file", *_DIAGNOSE, "--out", "{a_file}"),
]  # fmt: skip

_COMPARE = (*_TINY_TRAIN, "--data", "{text.txt}", "--out", "{out}")
COMPARE_CASES = [
    case("flag", "--steps", *_COMPARE, "--steps", "many"),
    case("unknown_policy", "fp64", *_COMPARE, "--policies", "fp32", "fp64"),
    case("steps_0", "--steps", *_COMPARE, "--policies", "fp32", "--steps", "0"),
    case("out_is_a_file", "is a file", *_COMPARE, "--policies", "fp32", "--out", "{a_file}"),
    case("report_exists", "--overwrite", *_COMPARE, "--policies", "fp32", "--out", "{existing_report}"),
    case("binary_data", "not UTF-8", *_COMPARE, "--policies", "fp32", "bf16", "--data", "{binary.bin}"),
    case("truncated_init", "truncated", *_COMPARE, "--policies", "fp32", "--init", "{truncated}"),
    case("sample_tokens_not_offered", "unrecognized arguments: --sample-tokens", *_COMPARE, "--sample-tokens", "5"),
    case("policy_not_offered", "unrecognized arguments: --policy bf16", *_COMPARE, "--policy", "bf16"),
]  # fmt: skip

_PREDICT = ("--model", "{good}", "--data", "{labels.tsv}")
PREDICT_CASES = [
    case("model_missing", "is not a directory", *_PREDICT, "--model", "{out}"),
    case("model_is_an_lm", "causal language model without a classification head", *_PREDICT),
    case("model_truncated", "damaged or not a safetensors file", *_PREDICT, "--model", "{truncated}"),
    case("model_bin_pickle", "never unpickles", *_PREDICT, "--model", "{bin_pickle}"),
    case("unknown_policy", "unknown policy 'fp64'", *_PREDICT, "--policy", "fp64"),
    case("data_not_rows", "unsupported type '.txt'", *_PREDICT, "--data", "{text.txt}"),
    case("csv_open_quote", "quoted fields are closed", *_PREDICT, "--data", "{open_quote.csv}"),
    case("label_beyond_int32", "label 99999999999 is outside", *_PREDICT, "--data", "{label_beyond_int32.tsv}"),
    case("out_exists", "--overwrite", *_PREDICT, "--out", "{labels.tsv}"),
    case("out_suffix", "give a .tsv or .jsonl file name", *_PREDICT, "--out", "{a_file}"),
]  # fmt: skip

VERBS = {
    "train": (train.main, TRAIN_CASES),
    "generate": (generate.main, GENERATE_CASES),
    "evaluate": (evaluate.main, EVALUATE_CASES),
    "diagnose": (diagnose.main, DIAGNOSE_CASES),
    "compare": (compare.main, COMPARE_CASES),
    "predict": (predict.main, PREDICT_CASES),
}


def _assert_one_line(status: int, err: str, problem: str, context: object) -> None:
    assert status == 2, (context, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.endswith("\n"), (context, err)
    assert problem in err, (context, problem, err)


@pytest.mark.parametrize(
    "verb, bad", [(verb, bad) for verb, (_, cases) in VERBS.items() for bad in cases], ids=lambda x: getattr(x, "name", x)
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_changes_nothing(workspace, capsys, verb, bad):
    main, _ = VERBS[verb]
    before = _tree(workspace)
    status = main(_argv(bad, workspace))
    captured = capsys.readouterr()
    _assert_one_line(status, captured.err, bad.problem, (verb, bad.name))
    assert captured.out == ""
    assert _tree(workspace) == before, f"{verb} {bad.name} changed the workspace"


SUBPROCESS_CASES = [
    ("generate", case("prompt_not_utf8", "not valid UTF-8", *_GENERATE, "--prompt", "Hi \udcff")),
    ("train", TRAIN_CASES[0]),
    ("evaluate", EVALUATE_CASES[-1]),
    ("diagnose", DIAGNOSE_CASES[1]),
]


@pytest.mark.parametrize("verb, bad", SUBPROCESS_CASES, ids=lambda x: getattr(x, "name", x))
def test_bad_input_from_the_command_line_prints_nothing_else(workspace, verb, bad):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    # argv as bytes: a lone surrogate stands for a byte that is not UTF-8, as Python decodes argv
    argv = [arg.encode("utf-8", "surrogateescape") for arg in _argv(bad, workspace)]
    before = _tree(workspace)
    result = subprocess.run(
        [sys.executable, "-m", f"jaxmp.{verb}", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    _assert_one_line(result.returncode, result.stderr, bad.problem, (verb, bad.name))
    assert result.stdout == "" and _tree(workspace) == before


def test_import_is_light_and_generate_runs_without_a_warning():
    code = "import sys, jaxmp; print(sorted({'transformers', 'orbax'} & set(sys.modules)), jaxmp.hf.__name__)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout == "[] jaxmp.hf\n"
    help_run = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "jaxmp.generate", "--help"],
        capture_output=True,
        text=True,
    )
    assert help_run.returncode == 0 and help_run.stderr == "" and "--prompt" in help_run.stdout


def _raise(error: BaseException) -> Callable[[list[str]], int]:
    def body(argv: list[str]) -> int:
        raise error

    return body


@pytest.mark.parametrize(
    "error, problem",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl"), "disk full"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/secret.txt"), "/data/secret.txt: Permission"),
        (json.JSONDecodeError("Expecting value", "{", 1), "invalid JSON"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8"),
    ],
)  # fmt: skip
def test_run_cli_turns_library_errors_into_one_line(capsys, error, problem):
    assert run_cli("prog", _raise(error), []) == 2
    err = capsys.readouterr().err
    assert err.startswith("prog: error: ") and err.count("\n") == 1 and problem in err, err


@pytest.mark.parametrize(
    "error", [OSError(errno.EIO, "Input/output error"), ZeroDivisionError(), KeyError("x")]
)
def test_run_cli_lets_bugs_raise(error):
    with pytest.raises(type(error)):
        run_cli("prog", _raise(error), [])
