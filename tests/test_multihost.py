"""Two processes on 127.0.0.1 train like one: ``jax.distributed`` with gloo collectives on CPU.

Each process has 2 CPU devices and the mesh ``data=2,fsdp=2`` spans both processes, so batch
rows, FSDP all-gathers and reduce-scatters, the skip decision and the orbax checkpoints all
cross the process boundary. A single-process, single-device run of the same flags is the
reference; the three runs start together and the test always reaps them.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxmp import models
from jaxmp.checkpoint import Checkpointer

STEPS = 10
FLAGS = ["--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16", "--policy", "fp32",
         "--log-every", "1", "--eval-every", "5", "--eval-batches", "2", "--save-every", "5",
         "--sample-tokens", "0"]  # fmt: skip
TIMEOUT_S = 300  # for all three runs together; each also gives up on its own if a peer is lost


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], devices: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # the reference and the pair compile alike; a lower LLVM optimisation level halves compile time
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
    }
    command = [sys.executable, "-m", "jaxmp.train", *FLAGS, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_together(runs: list[tuple[list[str], int]]) -> list[tuple[int, str, str]]:
    """Starts every run, waits for all within ``TIMEOUT_S``, and kills and reaps whatever is left."""
    processes = [start(args, devices) for args, devices in runs]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outputs = [process.communicate(timeout=max(deadline - time.monotonic(), 1)) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs, strict=True)]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir: Path):
    model = models.get_model("gpt2-tiny", "fp32", vocab_size=256)
    target = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 16))
    return Checkpointer(run_dir / "checkpoints").restore_params(target)


def test_two_processes_train_like_one(tmp_path):
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    cluster = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--mesh", "data=2,fsdp=2"]
    results = run_together(
        [
            ([*cluster, "--process-id", "0", "--out", str(multi)], 2),
            ([*cluster, "--process-id", "1", "--out", str(multi)], 2),
            (["--out", str(single)], 1),
        ]
    )
    for status, _, err in results:
        assert status == 0, err[-3000:]
    (_, primary_out, _), (_, follower_out, _), _ = results
    assert "run directory" in primary_out and '"steps"' in primary_out  # process 0 alone reports
    assert "run directory" not in follower_out and '"steps"' not in follower_out  # (gloo prints to stdout)

    two, one = records(multi), records(single)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))  # written once
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in two if "val_loss" in r], [r["val_loss"] for r in one if "val_loss" in r], rtol=1e-5)  # fmt: skip
    assert Checkpointer(multi / "checkpoints").all_steps() == [5, 10]  # micro-steps: accum_steps is 1
    assert len(list((multi / "tensorboard").iterdir())) == 1  # one event file, process 0's
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        final_params(multi),
        final_params(single),
    )
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["skipped_steps"] == 0
