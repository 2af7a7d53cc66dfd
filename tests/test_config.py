"""``--config FILE``: reading a JSON or YAML file of ``TrainConfig`` fields, laying flags over it, a run's
own ``config.json`` read back (and reproduced exactly), and one line for every bad file."""

import dataclasses
import json
from pathlib import Path

import pytest

from jaxmp import compare, train
from jaxmp.cli.train_flags import build_parser, config_from_args
from jaxmp.errors import UsageError
from jaxmp.training.config import TrainConfig, merge_config, read_config_file
from jaxmp.training.run_dir import RunDir

TINY = ["--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", "--eval-batches", "1"]
TINY_VALUES = {"batch_size": 2, "seq_len": 16, "sample_tokens": 0, "eval_batches": 1}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def tree(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(record["step"], record["loss"]) for record in records]


def parse(*argv: str, config: Path | None = None) -> TrainConfig:
    return config_from_args(
        build_parser().parse_args([*argv, *(["--config", str(config)] if config else [])])
    )


# ------------------------------------------------------------------------------------------ reading


def test_json_and_yaml_files_give_the_same_typed_values(tmp_path):
    as_json = write(tmp_path / "run.json", json.dumps({"steps": 7, "lr": 1, "policy": "bf16", "data": None}))
    as_yaml = write(
        tmp_path / "run.yaml", "steps: 7\nlr: 1   # an int for a float field\npolicy: bf16\ndata:\n"
    )
    values = read_config_file(as_json)
    assert values == read_config_file(as_yaml) == read_config_file(str(as_yaml)) == {
        "steps": 7, "lr": 1.0, "policy": "bf16", "data": None,
    }  # fmt: skip
    assert type(values["lr"]) is float
    assert read_config_file(write(tmp_path / "short.yml", "tokenizer: bpe:512\nlr: 3.0e-4\n")) == {
        "tokenizer": "bpe:512",
        "lr": 3e-4,
    }


def test_a_runs_own_config_json_reads_back_as_its_config(tmp_path):
    config = TrainConfig(
        out=str(tmp_path / "run"), seed=3, lr=1e-3, overwrite=True, epochs=None, mesh="fsdp=2"
    )
    run_dir = RunDir(config.out, resume=False, overwrite=False)
    run_dir.lock()
    run_dir.start(config, {"task": "lm", "model": "gpt2-tiny", "tokenizer": "byte"})
    run_dir.release()
    values = read_config_file(run_dir.config_path)
    assert "identity" not in values and "resume" not in values and "overwrite" not in values
    assert merge_config(values, {}) == dataclasses.replace(config, overwrite=False)


# ------------------------------------------------------------------------------------------ merging


def test_flags_given_override_the_file_which_overrides_the_defaults(tmp_path):
    path = write(tmp_path / "run.yaml", "steps: 9\nseed: 4\npolicy: bf16\n")
    assert parse("--steps", "5", "--lr", "0.5", config=path) == TrainConfig(
        steps=5, seed=4, policy="bf16", lr=0.5
    )
    assert parse(config=path) == TrainConfig(steps=9, seed=4, policy="bf16")
    assert parse("--seed", "0", config=path).seed == 0  # a flag equal to the default still overrides
    assert parse() == TrainConfig()
    assert vars(build_parser().parse_args(["--seq-len", "8"])) == {"config": None, "seq_len": 8}


def test_steps_flag_drops_the_files_epochs_and_an_epochs_flag_wins_over_the_files_steps(tmp_path):
    path = write(tmp_path / "run.json", json.dumps({"task": "classify", "epochs": 3, "steps": 120}))
    assert parse(config=path) == TrainConfig(task="classify", epochs=3.0, steps=120)
    assert parse("--steps", "5", config=path) == TrainConfig(task="classify", steps=5, epochs=None)
    assert parse("--epochs", "0.5", config=path) == TrainConfig(task="classify", epochs=0.5, steps=120)
    assert merge_config({"epochs": 2.0}, {"steps": 5}) == TrainConfig(steps=5)
    assert "--steps also drops its epochs" in " ".join(build_parser().format_help().split())


# ------------------------------------------------------------------------------------------ bad files

BAD_FILES = [  # (file name, content, a piece of the one-line error)
    ("typo.json", '{"setps": 5}', "unknown key 'setps' (did you mean 'steps'?)"),
    ("dashes.yaml", "seq-len: 8\n", "unknown key 'seq-len' (did you mean 'seq_len'?)"),
    ("junk.yaml", "zzzzzz: 1\n", "unknown key 'zzzzzz' (keys are TrainConfig field names"),
    ("string.json", '{"steps": "5"}', "steps must be an integer, got '5'"),
    ("bool.yaml", "steps: true\n", "steps must be an integer, got True"),
    ("float.yaml", "steps: 5.0\n", "steps must be an integer, got 5.0"),
    ("null.yaml", "steps: null\n", "steps must be an integer, got None"),
    ("text_number.yaml", "lr: 1e-3\n", "lr must be a number, got '1e-3'; YAML reads an exponent"),
    ("number_for_text.yaml", "data: 5\n", "data must be a string or null, got 5"),
    ("flag.yaml", "overwrite: yes\nsample_tokens: no\n", "sample_tokens must be an integer, got False"),
    ("choice.yaml", "task: regress\n", "task must be one of lm, classify, got 'regress'"),
    ("invalid.json", '{"steps": 5,}', "invalid.json is not valid JSON (Expecting property name"),
    ("invalid.yaml", "steps: [5\n", "invalid.yaml is not valid YAML ("),
    ("list.yaml", "- steps\n- 5\n", "list.yaml holds a list, not a mapping"),
    ("scalar.json", "5", "scalar.json holds a int, not a mapping"),
    ("empty.yaml", "", "empty.yaml is empty"),
    ("config.toml", "steps = 5\n", "config.toml: give a .json, .yaml or .yml file"),
]


@pytest.mark.parametrize(("name", "content", "problem"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_raise_one_line_naming_the_file_and_problem(tmp_path, name, content, problem):
    path = write(tmp_path / name, content)
    with pytest.raises(UsageError) as error:
        read_config_file(path)
    message = str(error.value)
    assert message.startswith(f"config file {path}") and problem in message and "\n" not in message


def test_missing_directory_and_undecodable_files_are_named(tmp_path):
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "binary.json").write_bytes(b'{"steps": \xff}')
    for name, problem in [
        ("missing.yaml", "No such file or directory"),
        ("dir.json", "Is a directory"),
        ("binary.json", "is not UTF-8 text (bad byte at offset 10)"),
    ]:
        with pytest.raises(UsageError) as error:
            read_config_file(tmp_path / name)
        assert str(error.value).startswith(f"config file {tmp_path / name}") and problem in str(error.value)


@pytest.mark.parametrize("verb", [train, compare], ids=["train", "compare"])
def test_bad_config_on_the_command_line_is_one_line_exit_2_and_writes_nothing(
    tmp_path, monkeypatch, capsys, verb
):
    monkeypatch.chdir(tmp_path)  # a default run directory would appear here
    for name, content, _ in BAD_FILES:
        write(tmp_path / name, content)
    before = tree(tmp_path)
    cases = [(name, problem) for name, _, problem in BAD_FILES] + [("missing.json", "No such file")]
    for name, problem in cases:
        tiny = TINY if verb is train else [a for a in TINY if a not in ("--sample-tokens", "0")]
        status = verb.main(["--config", name, *tiny, "--steps", "2", "--out", "out"])
        err = capsys.readouterr().err
        assert status == 2, name
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and problem in err, (name, err)
    assert tree(tmp_path) == before and not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def tiny(tmp_path_factory, tiny_lm_dir) -> dict:
    """Settings of a run that takes seconds: the tiny GPT-2 of ``tiny_lm_dir`` on a short corpus."""
    corpus = write(tmp_path_factory.mktemp("corpus") / "corpus.txt", "To be, or not to be, that is it. " * 80)
    return TINY_VALUES | {"init": str(tiny_lm_dir), "data": str(corpus)}


def test_a_run_started_from_another_runs_config_json_reproduces_its_losses_exactly(tmp_path, tiny):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--init", tiny["init"], "--data", tiny["data"], "--log-every", "1", "--seed", "7"]
    assert train.main([*common, *TINY, "--steps", "4", "--out", str(first)]) == 0
    assert train.main(["--config", str(first / "config.json"), "--out", str(second)]) == 0
    assert len(losses(first)) == 4 and losses(second) == losses(first)
    first_config = json.loads((first / "config.json").read_text())
    second_config = json.loads((second / "config.json").read_text())
    assert second_config == first_config | {"out": str(second)}
    # without --out the file's out is the first run's directory, which is not started over
    assert train.main(["--config", str(first / "config.json")]) == 2


def test_a_yaml_config_trains_and_steps_on_top_of_it_override(tmp_path, tiny):
    settings = "".join(f"{key}: {value}\n" for key, value in tiny.items())
    config = write(tmp_path / "tiny.yaml", settings + "steps: 50\nlog_every: 1\nlr: 1.0e-3\n")
    run = tmp_path / "run"
    assert train.main(["--config", str(config), "--steps", "2", "--out", str(run)]) == 0
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["steps"] == 2 and recorded["lr"] == 1e-3
    assert {key: recorded[key] for key in tiny} == tiny
    assert [step for step, _ in losses(run)] == [1, 2]


def test_compare_takes_a_runs_config_but_not_its_policy_or_out(tmp_path, tiny, capsys):
    run, report = tmp_path / "run", tmp_path / "report"
    config = write(tmp_path / "run.json", json.dumps(tiny | {"policy": "bf16", "out": str(run)}))
    argv = ["--config", str(config), "--steps", "2", "--policies", "fp32", "--out", str(report)]
    assert compare.main(argv) == 0
    recorded = json.loads((report / "fp32" / "config.json").read_text())
    assert recorded["policy"] == "fp32" and recorded["steps"] == 2 and recorded["seq_len"] == 16
    assert not run.exists()


# ------------------------------------------------------------------------------------- TrainConfig.check


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "`steps` must be >= 1, got 0"),
        ({"eval_batches": 0}, "`eval_batches` must be >= 1, got 0"),
        ({"save_every": -1}, "`save_every` must be >= 0, got -1"),
        ({"lr": float("nan")}, "`lr` must be a finite number > 0, got nan"),
        ({"seed": -1}, "`seed` must be in 0..9223372036854775807, got -1"),
        ({"seq_len": 1}, "`sample_tokens` generates with a context of `seq_len` tokens"),
        ({"loss_scale": "static:0"}, "`loss_scale`: bad static loss scale 'static:0'"),
        ({"policy": "params=float64"}, "`policy`: unknown dtype 'float64'"),
        ({"eval_data": "dev.tsv"}, "`eval_data` applies to `task` classify only, and this run's task is lm"),
        ({"epochs": 2.0}, "`epochs` applies to `task` classify only"),
        ({"task": "classify", "tokenizer": "bpe:300"}, "`tokenizer` applies to `task` lm only"),
        ({"task": "classify", "eval_batches": 3}, "`eval_batches` applies to `task` lm only"),
        ({"task": "classify", "max_rows": 0}, "`max_rows` must be >= 1, got 0"),
    ],
)
def test_check_names_the_field_in_backticks(fields, message):
    with pytest.raises(UsageError) as error:
        TrainConfig(**fields).check()
    assert str(error.value).startswith(message), str(error.value)


def test_check_accepts_each_tasks_own_fields_and_parses_the_policy_once():
    TrainConfig(tokenizer="bpe:300", eval_batches=3).check()
    TrainConfig(task="classify", eval_data="dev.tsv", max_rows=10, epochs=1.5, pad_multiple=8).check()
    config = TrainConfig(policy="params=float32,compute=float16")
    assert config.precision_policy is config.precision_policy and config.precision_policy.uses_float16
    assert type(config.initial_loss_scale()).__name__ == "DynamicLossScale"


def test_the_cli_shows_backticked_arguments_as_flags():
    from jaxmp.cli import as_flags

    assert (
        as_flags("`max_new_tokens` 9 plus a 3-token prompt; `seq_len`")
        == "--max-new-tokens 9 plus a 3-token prompt; --seq-len"
    )
    assert as_flags("keep `Foo` and ``code``") == "keep `Foo` and ``code``"  # only argument names
