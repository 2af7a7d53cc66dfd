"""``jaxmp.train`` never loses or corrupts a run: damaged checkpoints and changed settings are refused
with one line, finished runs keep their records, non-finite states are never saved, and a full disk
is named as such while the last checkpoint stays resumable."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import run_params
from test_checkpoint import make_state
from test_run_dir import tree

from jaxmp.checkpoint import Checkpointer, NonFiniteStateError
from jaxmp.train import main

ARGS = ["--policy", "fp32", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
        "--sample-tokens", "0", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_lm_dir):
    """Flags for a small corpus and the tiny model (checkpoints of about 0.5 MB)."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("Now is the winter of our discontent made glorious summer. " * 200)
    return ["--data", str(path), "--init", str(tiny_lm_dir)]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, data):
    """A run of 6 updates whose process 'died' after its checkpoint at update 4 (the newer one removed)."""
    out = tmp_path_factory.mktemp("runs") / "interrupted"
    assert main([*ARGS, *data, "--steps", "6", "--save-every", "2", "--keep-checkpoints", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    shutil.rmtree(out / "checkpoints" / "6")
    (out / "summary.json").unlink()
    return out


def resume(data, out, *extra):
    return main([*ARGS, *data, "--steps", "6", "--save-every", "2", "--keep-checkpoints", "3",
                 "--out", str(out), "--resume", *extra])  # fmt: skip


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def array_files(step_dir: Path) -> list[str]:
    return sorted(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


def flip_bytes(step_dir: Path) -> None:
    """Flips bytes in the largest array file, where the weights and Adam moments are."""
    path = array_files(step_dir)[-1]
    content = bytearray(Path(path).read_bytes())
    for offset in range(len(content) // 3, len(content) // 3 + 64, 8):
        content[offset] ^= 0x40
    Path(path).write_bytes(bytes(content))


def truncate_arrays(step_dir: Path) -> None:
    for path in array_files(step_dir):
        os.truncate(path, os.path.getsize(path) // 2)


def garbage_manifest(step_dir: Path) -> None:
    for path in glob.glob(f"{step_dir}/state/**/manifest.ocdbt", recursive=True):
        Path(path).write_bytes(b"garbage" * 16)


DAMAGES = {
    "flipped bytes": (flip_bytes, "damaged"),
    "truncated arrays": (truncate_arrays, "cannot be read"),
    "garbage manifest": (garbage_manifest, "cannot be read"),
    "no _METADATA": (lambda step: (step / "state" / "_METADATA").unlink(), "cannot be read"),
    "no state/": (lambda step: shutil.rmtree(step / "state"), "cannot be read"),
    "no metadata/": (lambda step: shutil.rmtree(step / "metadata"), "cannot be read"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_checkpoint_is_refused_naming_the_older_one(tmp_path, data, interrupted_run, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    damage_step, named = DAMAGES[damage]
    damage_step(out / "checkpoints" / "4")
    before = tree(out)
    assert resume(data, out) == 2
    err = one_line(capsys)
    assert named in err and "checkpoints/4" in err and "resume from micro-step 2" in err, err
    assert tree(out) == before


def test_other_run_directory_damage_is_one_line(tmp_path, data, interrupted_run, capsys):
    for name, damage in {
        "config.json": lambda out: (out / "config.json").write_text('{"identity"'),
        "metrics.jsonl": lambda out: (out / "metrics.jsonl").write_text(
            '{"step": 1}\n\x00garbage\n{"step": 3}\n'
        ),
    }.items():
        out = tmp_path / name
        shutil.copytree(interrupted_run, out)
        damage(out)
        before = tree(out)
        assert resume(data, out) == 2
        assert name in one_line(capsys)
        assert tree(out) == before


def test_a_torn_last_metrics_line_resumes_exactly(tmp_path, data, interrupted_run):
    straight = tmp_path / "straight"
    assert main([*ARGS, *data, "--steps", "6", "--save-every", "2", "--out", str(straight)]) == 0
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 7, "lo')  # the process died while appending
    assert resume(data, out) == 0
    without_timing = [
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
        for run in (out, straight)
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert without_timing[:6] == without_timing[6:]
    jax.tree.map(np.testing.assert_array_equal, run_params(out), run_params(straight))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--seed", "1"], "seed: 0 -> 1"),
        (["--batch-size", "4"], "batch_size: 2 -> 4"),
        (["--accum-steps", "2"], "accum_steps: 1 -> 2"),
        (["--moment-dtype", "bfloat16"], "moment_dtype: float32 -> bfloat16"),
        (["--policy", "pure-bf16"], "policy: fp32 -> pure-bf16"),
        (["--steps", "3"], "steps: 6 -> 3"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, data, interrupted_run, flags, named, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    before = tree(out)
    assert resume(data, out, *flags) == 2
    assert named in one_line(capsys)
    assert tree(out) == before


def test_resuming_a_finished_run_changes_nothing(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main([*ARGS, *data, "--steps", "3", "--save-every", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert "final_val_loss" in json.loads((out / "summary.json").read_text())
    before = tree(out)
    assert main([*ARGS, *data, "--steps", "3", "--save-every", "2", "--out", str(out), "--resume"]) == 2
    assert "already finished its 3 steps" in one_line(capsys)
    assert tree(out) == before


def test_hyper_parameters_must_be_finite(tmp_path, data, capsys):
    out = tmp_path / "run"
    for flags, named in [
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--loss-scale", "static:1e39"], "static:1e39"),
        (["--clip-norm", "-1"], "--clip-norm"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--seed", "99999999999999999999999"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--eval-batches", "0"], "--eval-batches"),
        (["--sample-tokens", "20", "--seq-len", "1"], "--seq-len"),
    ]:
        assert main([*ARGS, *data, "--steps", "2", "--out", str(out), *flags]) == 2, flags
        assert named in one_line(capsys)
        assert not out.exists()


def test_a_non_finite_state_is_never_saved(tmp_path):
    state = make_state()
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    bad = state.replace(params=jax.tree.map(lambda x: x.at[0].set(np.inf), state.params))
    with pytest.raises(NonFiniteStateError, match="not saved"):
        checkpointer.save(1, bad, {})
    assert checkpointer.latest_step() is None


def test_second_writer_of_a_running_run_is_refused(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = [*ARGS, *data, "--steps", "100000", "--eval-every", "0", "--save-every", "0",
            "--out", str(out)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen([sys.executable, "-m", "jaxmp.train", *args], env=env, stderr=subprocess.DEVNULL)
    try:
        while not (out / "metrics.jsonl").exists() and first.poll() is None:
            time.sleep(0.05)
        before = (out / "config.json").read_bytes()
        assert main([*args, "--resume"]) == 2
        assert f"in use by another process (pid {first.pid})" in one_line(capsys)
        assert (out / "config.json").read_bytes() == before
    finally:
        first.kill()
        first.wait()


@pytest.fixture
def small_disk(tmp_path):
    """A 768 KiB tmpfs: room for one checkpoint of the tiny model (about 0.5 MiB) but not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=768k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_named_and_the_last_checkpoint_resumes_exactly(tmp_path, small_disk, data, capsys):
    flags = [*ARGS, *data, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "1"]
    assert main([*flags, "--out", str(tmp_path / "straight")]) == 0
    out = small_disk / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    full = subprocess.run(
        [sys.executable, "-m", "jaxmp.train", *flags, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert full.returncode == 1, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert "the disk is full" in last and "checkpoints/2, is kept" in last, full.stderr
    # nothing from orbax's failed write tasks buries that line
    assert "Traceback" not in full.stderr and "never retrieved" not in full.stderr, full.stderr
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)  # space freed
    assert main([*flags, "--out", str(out), "--resume"]) == 0
    jax.tree.map(np.testing.assert_array_equal, run_params(out), run_params(tmp_path / "straight"))
