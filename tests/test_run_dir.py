"""``RunDir``: only a jaxmp run is resumed or overwritten, one owner at a time, records read safely."""

import json
import subprocess
import sys

import pytest

from jaxmp.errors import UsageError
from jaxmp.training.config import TrainConfig
from jaxmp.training.run_dir import RunDir

IDENTITY = {"task": "lm", "model": "gpt2-tiny", "tokenizer": "byte"}


def tree(path):
    """Every file below ``path`` with its bytes: a directory's full contents, to compare."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def make_run(path):
    run_dir = RunDir(path, resume=False, overwrite=False)
    run_dir.lock()
    run_dir.start(TrainConfig(out=str(path)), IDENTITY)
    run_dir.append_metrics({"step": 1, "loss": 2.0})
    run_dir.write_summary({"interrupted": False})
    run_dir.release()
    return path


@pytest.fixture
def foreign(tmp_path):
    """A user's directory that happens to hold files with run-like names."""
    path = tmp_path / "mine"
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "mine.txt").write_text("precious")
    (path / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    (path / "summary.json").write_text("{}")
    return path


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_a_directory_that_is_not_a_run_is_never_touched(foreign, flags):
    before = tree(foreign)
    with pytest.raises(UsageError, match="holds no jaxmp run|holds no run"):
        RunDir(foreign, resume=flags.get("resume", False), overwrite=flags.get("overwrite", False))
    assert tree(foreign) == before


def test_a_config_json_jaxmp_did_not_write_is_not_a_run(tmp_path):
    (tmp_path / "config.json").write_text('{"model": "mine"}')
    with pytest.raises(UsageError, match="holds no jaxmp run"):
        RunDir(tmp_path, resume=False, overwrite=True)


def test_overwrite_replaces_only_the_runs_outputs(tmp_path):
    path = make_run(tmp_path / "run")
    (path / "notes.txt").write_text("mine")
    run_dir = RunDir(path, resume=False, overwrite=True)
    run_dir.lock()
    run_dir.start(TrainConfig(out=str(path), seed=3), IDENTITY)
    assert not run_dir.metrics_path.exists() and not (path / "summary.json").exists()
    assert json.loads(run_dir.config_path.read_text())["seed"] == 3
    assert (path / "notes.txt").read_text() == "mine"


def test_existing_run_needs_resume_or_overwrite_and_resume_keeps_config(tmp_path):
    path = make_run(tmp_path / "run")
    with pytest.raises(UsageError, match="`resume` to continue it or `overwrite`"):
        RunDir(path, resume=False, overwrite=False)
    with pytest.raises(UsageError, match="contradict"):
        RunDir(path, resume=True, overwrite=True)
    config = (path / "config.json").read_bytes()
    run_dir = RunDir(path, resume=True, overwrite=False)
    assert run_dir.saved_identity() == IDENTITY and run_dir.finished()
    run_dir.lock()
    run_dir.start(TrainConfig(out=str(path), seed=3), IDENTITY)
    assert (path / "config.json").read_bytes() == config


def test_damaged_config_json_is_refused_on_resume(tmp_path):
    path = make_run(tmp_path / "run")
    (path / "config.json").write_text('{"identity": ')
    with pytest.raises(UsageError, match="config.json is damaged"):
        RunDir(path, resume=True, overwrite=False)


def test_leftovers_of_a_killed_start_do_not_make_a_directory_foreign(tmp_path):
    path = tmp_path / "run"
    (path / "cache").mkdir(parents=True)
    (path / ".lock").write_text("12345\n")
    RunDir(path, resume=False, overwrite=False).lock()


def test_second_owner_is_refused_and_the_lock_dies_with_its_process(tmp_path):
    path = tmp_path / "run"
    first = RunDir(path, resume=False, overwrite=False)
    first.lock()
    with pytest.raises(UsageError, match=r"in use by another process \(pid \d+\)"):
        RunDir(path, resume=False, overwrite=False).lock()
    first.release()
    # A process that dies holding the lock (no cleanup at all) leaves no stale lock behind.
    code = f"from jaxmp.training.run_dir import RunDir; import os; RunDir({str(path)!r}, resume=False, overwrite=False).lock(); os._exit(9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    RunDir(path, resume=False, overwrite=False).lock()


def test_abandon_leaves_the_directory_as_it_was(tmp_path):
    fresh = tmp_path / "fresh"
    run_dir = RunDir(fresh, resume=False, overwrite=False)
    run_dir.lock()
    (run_dir.cache_dir / "tokens.npy").parent.mkdir()
    (run_dir.cache_dir / "tokens.npy").write_bytes(b"x")
    run_dir.abandon()
    assert not fresh.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = RunDir(empty, resume=False, overwrite=False)
    run_dir.lock()
    run_dir.cache_dir.mkdir()
    run_dir.abandon()
    assert empty.is_dir() and list(empty.iterdir()) == []

    path = make_run(tmp_path / "run")
    before = tree(path)
    run_dir = RunDir(path, resume=True, overwrite=False)
    run_dir.lock()
    run_dir.abandon()
    assert tree(path) == before


def test_records_drop_a_torn_last_line_and_refuse_a_damaged_middle(tmp_path):
    path = make_run(tmp_path / "run")
    run_dir = RunDir(path, resume=True, overwrite=False)
    run_dir.append_metrics({"step": 2, "loss": 1.5})
    with run_dir.metrics_path.open("a") as metrics:
        metrics.write('{"step": 3, "lo')  # the process died while appending
    assert [r["step"] for r in run_dir.records()] == [1, 2]
    run_dir.trim_metrics(1)
    assert run_dir.metrics_path.read_text() == '{"step": 1, "loss": 2.0}\n'

    run_dir.metrics_path.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl:2 is not a JSON record"):
        run_dir.records()


def test_finished_reads_the_summary(tmp_path):
    path = make_run(tmp_path / "run")
    run_dir = RunDir(path, resume=True, overwrite=False)
    assert run_dir.finished()
    run_dir.write_summary({"interrupted": True})
    assert not run_dir.finished()
    (path / "summary.json").write_text("{")
    assert not run_dir.finished()


def test_default_run_directory_names_model_and_policy():
    from jaxmp.training.config import default_run_dir

    assert str(default_run_dir(TrainConfig(policy="bf16"), "now")) == "runs/gpt2-tiny-bf16-now"
    named = default_run_dir(TrainConfig(init="/models/bert", policy="bf16;.*norm.*:compute=float32"), "t")
    assert str(named) == "runs/bert-bf16_._norm._compute_float32-t"
