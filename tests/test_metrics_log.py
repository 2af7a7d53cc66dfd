"""The metrics log: window math, metrics.jsonl records, TensorBoard event files read back (with the
purge a resumed run asks for), headless progress lines, optional Weights & Biases, and a CLI run's log."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import read_event_files, tensorboard_scalars

from jaxmp.errors import UsageError
from jaxmp.train import main
from jaxmp.training import metrics_log
from jaxmp.training.config import TrainConfig
from jaxmp.training.metrics_log import (
    TAGS,
    MetricsLog,
    Window,
    check_wandb,
    format_duration,
    open_metrics_log,
    progress_line,
    progress_style,
)
from jaxmp.training.run_dir import RunDir

# The last micro-step's metrics as the train step returns them (numpy scalars after device_get).
METRICS = {
    "loss_scale": np.float32(1024.0),
    "skipped_steps": np.int32(3),
    "grad_norm": np.float32(0.5),
    "learning_rate": np.float32(1e-3),
    "grad_zero_fraction": np.float32(0.25),
}
RECORD_KEYS = [
    "step",
    "loss",
    "loss_scale",
    "skipped_steps",
    "tokens_per_s",
    "grad_norm",
    "learning_rate",
    "grad_zero_fraction",
]


class Clock:
    """A ``time.perf_counter`` that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def new_run_dir(tmp_path: Path) -> RunDir:
    """A started run directory (its config.json marks it a jaxmp run, so it can be resumed)."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"identity": {"task": "lm"}}))
    return RunDir(path, resume=True, overwrite=False)


def write_window(log: MetricsLog, update: int, losses: list[float], evaluation: dict | None = None) -> dict:
    """Adds ``losses`` as micro-steps of 8 tokens, ends the window after ``update`` and writes its record."""
    for loss in losses:
        log.add(loss, 8)
    record = log.end_window(update, METRICS) | (evaluation or {})
    log.write(record)
    return record


def as_float32(value: float) -> float:
    """``value`` as an event file stores it (``simple_value`` is a float32)."""
    return float(np.float32(value))


def test_window_record_means_the_finite_losses_over_the_window(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics_log.time, "perf_counter", clock)
    window = Window([2.0, float("nan")])  # a resumed checkpoint's losses; nan: a skipped micro-step
    window.losses.append(4.0)
    window.tokens = 600
    clock.now += 2.0
    record = window.record(7, METRICS)
    assert list(record) == RECORD_KEYS
    assert record == {
        "step": 7,
        "loss": 3.0,
        "loss_scale": 1024.0,
        "skipped_steps": 3,
        "tokens_per_s": 300.0,
        "grad_norm": 0.5,
        "learning_rate": as_float32(1e-3),
        "grad_zero_fraction": 0.25,
    }
    assert all(type(value) in (int, float) for value in record.values())  # JSON-ready, no numpy scalars
    assert np.isnan(Window([float("nan")]).record(1, METRICS)["loss"])  # every micro-step skipped


def test_records_go_to_metrics_jsonl_and_stay_in_memory_for_the_summary(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics_log.time, "perf_counter", clock)
    run_dir = new_run_dir(tmp_path)
    log = MetricsLog(run_dir)
    log.add(2.0, 8)
    log.add(4.0, 8)
    clock.now += 4.0
    first = log.end_window(2, METRICS)
    assert (log.window.losses, log.window.tokens) == ([], 0)
    clock.now += 10.0  # evaluation: not training time
    first |= {"val_loss": 1.5, "val_accuracy": 0.5}
    log.write(first)
    clock.now += 1.0
    second = write_window(log, 4, [1.0])
    assert (first["tokens_per_s"], second["tokens_per_s"]) == (4.0, 8.0)
    lines = run_dir.metrics_path.read_text().splitlines()
    assert lines == [json.dumps(first), json.dumps(second)]
    assert log.last_record == second
    assert log.evaluation == {"val_loss": 1.5, "val_accuracy": 0.5}  # the newest evaluation, kept


def test_a_resumed_log_starts_from_the_run_directory_and_the_checkpoint_window(tmp_path):
    run_dir = new_run_dir(tmp_path)
    records = [
        {"step": 1, "loss": 3.0, "val_loss": 2.5},
        {"step": 2, "loss": 2.0, "val_loss": 2.25},
        {"step": 3, "loss": 1.0},
    ]
    run_dir.metrics_path.write_text("".join(json.dumps(record) + "\n" for record in records))
    config = TrainConfig(steps=6, resume=True, no_tensorboard=True)
    log = open_metrics_log(config, run_dir, start_update=3, window_losses=[5.0])
    assert log.last_record == records[-1]
    assert log.evaluation == {"val_loss": 2.25}  # from the newest record that evaluated
    assert write_window(log, 4, [7.0])["loss"] == 6.0  # the checkpoint's window losses count
    assert log.evaluation == {"val_loss": 2.25}
    log.close()


def test_tensorboard_event_files_hold_every_scalar_at_its_step(tmp_path):
    run_dir = new_run_dir(tmp_path)
    log = open_metrics_log(TrainConfig(steps=4), run_dir, start_update=0)
    records = [
        write_window(log, 2, [2.0, 3.0]),
        write_window(log, 4, [1.0], {"val_loss": 1.5, "val_accuracy": 0.75}),
    ]
    log.close()
    log.close()  # closing twice does nothing
    scalars = tensorboard_scalars(run_dir.tensorboard_dir)
    assert set(scalars) == {
        "train/loss",
        "val/loss",
        "val/accuracy",
        "train/loss_scale",
        "train/skipped_steps",
        "train/grad_norm",
        "train/grad_zero_fraction",
        "train/learning_rate",
        "train/tokens_per_s",
    }
    for key, tag in TAGS.items():
        assert scalars[tag] == [(r["step"], as_float32(r[key])) for r in records if key in r], tag
    assert scalars["val/loss"] == [(4, 1.5)]


def test_a_resumed_run_hides_the_points_logged_after_its_checkpoint(tmp_path):
    run_dir = new_run_dir(tmp_path)
    first = open_metrics_log(TrainConfig(steps=4), run_dir, start_update=0)
    for update in range(1, 5):
        write_window(first, update, [float(update)])
    first.close()
    run_dir.trim_metrics(2)  # resumed from the checkpoint after update 2: updates 3 and 4 come again
    resumed = open_metrics_log(TrainConfig(steps=4, resume=True), run_dir, start_update=2)
    assert resumed.last_record["step"] == 2
    for update in (3, 4):
        write_window(resumed, update, [10.0 + update])
    resumed.close()

    files = read_event_files(run_dir.tensorboard_dir)
    assert len(files) == 2  # a new event file per process start, read after the first
    losses = [
        (e.step, v.simple_value)
        for events in files
        for e in events
        for v in e.summary.value
        if v.tag == "train/loss"
    ]
    assert [point for point in losses if point[0] == 3] == [(3, 3.0), (3, 13.0)]  # both are on disk
    assert tensorboard_scalars(run_dir.tensorboard_dir)["train/loss"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 13.0),
        (4, 14.0),
    ]
    assert [r["loss"] for r in run_dir.records()] == [1.0, 2.0, 13.0, 14.0]


def test_no_tensorboard_writes_no_event_file(tmp_path):
    run_dir = new_run_dir(tmp_path)
    log = open_metrics_log(TrainConfig(steps=2, no_tensorboard=True), run_dir, start_update=0)
    write_window(log, 2, [1.0])
    log.close()
    assert not run_dir.tensorboard_dir.exists()
    assert len(run_dir.records()) == 1


def test_progress_line():
    record = {"step": 40, "loss": 2.31042, "skipped_steps": 0, "tokens_per_s": 5880.4}
    assert progress_line(record, 400, 112.3) == "step 40/400  loss 2.310  tok/s 5880  eta 1m52s"
    evaluated = record | {"val_loss": 1.9332, "val_accuracy": 0.9123, "skipped_steps": 2}
    assert progress_line(evaluated, 400, None) == (
        "step 40/400  loss 2.310  val loss 1.933  val acc 0.912  skipped 2  tok/s 5880"
    )
    assert [format_duration(s) for s in (0, 52.4, 60, 112, 3599.6, 7500)] == [
        "0s",
        "52s",
        "1m00s",
        "1m52s",
        "1h00m",
        "2h05m",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_lines_elsewhere_and_nothing_when_off():
    assert progress_style(True, Terminal()) == "bar"
    assert progress_style(True, io.StringIO()) == "lines"
    assert progress_style(False, Terminal()) is None


def test_headless_progress_prints_one_line_per_record_on_stderr(tmp_path, monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(metrics_log.time, "perf_counter", clock)
    config = TrainConfig(steps=8, resume=True, no_tensorboard=True)
    progress = progress_style(True)  # pytest's captured stderr is no terminal
    log = open_metrics_log(config, new_run_dir(tmp_path), start_update=2, progress=progress)
    clock.now += 20.0
    write_window(log, 4, [2.0])  # 8 tokens in 20 s; 2 updates in 20 s, 4 to go: 40 s
    clock.now += 10.0
    write_window(log, 6, [1.5], {"val_loss": 1.25})
    log.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "step 4/8  loss 2.000  skipped 3  tok/s 0  eta 40s",
        "step 6/8  loss 1.500  val loss 1.250  skipped 3  tok/s 1  eta 15s",
    ]


def test_no_progress_prints_nothing(tmp_path, capsys):
    config = TrainConfig(steps=2, no_tensorboard=True)
    log = open_metrics_log(config, new_run_dir(tmp_path), start_update=0, progress=progress_style(False))
    write_window(log, 2, [1.0])
    log.close()
    assert capsys.readouterr() == ("", "")


def test_wandb_without_the_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UsageError, match=r"^`wandb` needs the wandb package: pip install wandb$"):
        check_wandb()
    out = tmp_path / "run"
    assert main(["--wandb", "my-project", "--steps", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m jaxmp.train: error: --wandb needs the wandb package: pip install wandb"
    ]
    assert not out.exists()


class FakeWandb(types.ModuleType):
    """A stand-in ``wandb`` module that records ``init``, ``log`` and ``finish``."""

    def __init__(self, init_error: Exception | None = None):
        super().__init__("wandb")
        self.init_error = init_error
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        if self.init_error is not None:
            raise self.init_error
        return self

    def log(self, data, *, step):
        self.calls.append(("log", data, step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_the_config_every_record_by_step_and_a_finish(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    check_wandb()
    config = TrainConfig(steps=4, wandb="my-project", no_tensorboard=True)
    run_dir = new_run_dir(tmp_path)
    log = open_metrics_log(config, run_dir, start_update=0)
    first = write_window(log, 2, [2.0])
    second = write_window(log, 4, [1.0], {"val_loss": 1.5})
    log.close()
    log.close()
    tagged = [{TAGS[k]: v for k, v in record.items() if k in TAGS} for record in (first, second)]
    assert wandb.calls == [
        ("init", {"project": "my-project", "name": "run", "config": dataclasses.asdict(config)}),
        ("log", tagged[0], 2),
        ("log", tagged[1], 4),
        ("finish",),
    ]
    assert "val/loss" in tagged[1] and "val/loss" not in tagged[0]


def test_a_wandb_run_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    wandb = FakeWandb(init_error=RuntimeError("api_key not configured (no-tty)\ncall wandb.login()"))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    config = TrainConfig(steps=4, wandb="my-project")
    run_dir = new_run_dir(tmp_path)
    message = (
        r"^`wandb` my-project: could not start a Weights & Biases run: api_key not configured \(no-tty\)$"
    )
    with pytest.raises(UsageError, match=message):
        open_metrics_log(config, run_dir, start_update=0)


def test_tensorboardx_is_imported_without_torch():
    code = (
        "import sys\n"
        "from jaxmp.training.metrics_log import _import_tensorboardx\n"
        "_import_tensorboardx()\n"
        "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_importing_hf_without_torch_gives_no_advice_and_leaves_the_environment():
    code = (
        "import os, sys\n"
        "sys.modules['torch'] = None  # as transformers sees a machine without PyTorch\n"
        "import jaxmp.hf\n"
        "assert 'TRANSFORMERS_NO_ADVISORY_WARNINGS' not in os.environ\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "PyTorch was not found" not in done.stderr


def test_a_run_redirected_to_a_file_logs_progress_lines(tmp_path):
    out, log_path = tmp_path / "run", tmp_path / "log"
    args = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--sample-tokens", "0", "--log-every", "1",
            "--eval-every", "2", "--eval-batches", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    with log_path.open("w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "jaxmp.train", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=300,
        )
    text = log_path.read_text()
    assert done.returncode == 0, text
    progress = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[0] for line in progress] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert "val loss" in progress[1] and "eta" in progress[0]
    assert text.index("step 4/4") < text.index('"final_train_loss"')  # while it runs, before the summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_train_loss"] == records[-1]["loss"]
    assert summary["final_val_loss"] == records[-1]["val_loss"]
    scalars = tensorboard_scalars(out / "tensorboard")
    assert scalars["train/loss"] == [(r["step"], as_float32(r["loss"])) for r in records]
    assert scalars["val/loss"] == [(r["step"], as_float32(r["val_loss"])) for r in records if "val_loss" in r]
