"""Exact resume under fire: ``jaxmp.train`` killed again and again, each time resumed, ends bit for bit
where an uninterrupted run ends.

For each combination of ``--save-every`` / ``--log-every`` / ``--accum-steps`` a chain of processes
trains one run: each is killed (SIGKILL, SIGTERM or SIGINT, in a seeded random order) at a seeded
random moment — a given number of new ``metrics.jsonl`` records into its segment, a delay after
that, or while a checkpoint is being written — and the next one resumes it. The chain's logged
records (all but the wall-clock ``tokens_per_s``), the TensorBoard points it shows (likewise),
``summary.json`` (all but its timings) and final checkpoint (every leaf's checksums and the params
themselves) must equal the uninterrupted run's.
"""

import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from helpers import run_params, tensorboard_scalars

from jaxmp.checkpoint import Checkpointer

COMBOS = [  # (save_every, log_every, accum_steps, steps, policy, kills)
    (1, 3, 1, 40, "fp32", 7),  # a checkpoint every update: signals keep landing on save boundaries
    (6, 10, 1, 40, "fp32", 7),  # periodic saves in the middle of a logging window
    # accumulation: kills between the micro-steps of an update, with the delayed fp8 scaling state
    # (amax histories, and the window's amaxes so far) in every checkpoint
    (3, 2, 4, 16, "fp8", 7),
]
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
TIMINGS = ("tokens_per_s", "wall_seconds", "step_time_s")


def command(
    corpus: Path,
    model_dir: Path,
    out: Path,
    save_every: int,
    log_every: int,
    accum: int,
    steps: int,
    policy: str,
) -> list[str]:
    return [
        sys.executable, "-m", "jaxmp.train", "--data", str(corpus), "--policy", policy, "--out", str(out),
        "--init", str(model_dir),
        "--steps", str(steps), "--batch-size", "2", "--seq-len", "16", "--accum-steps", str(accum),
        "--save-every", str(save_every), "--log-every", str(log_every), "--eval-every", "6",
        "--eval-batches", "1", "--sample-tokens", "0", "--warmup-steps", "2",
    ]  # fmt: skip


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def writing_checkpoint(out: Path) -> bool:
    """True while orbax writes a checkpoint (its temporary directory exists)."""
    folder = out / "checkpoints"
    return folder.is_dir() and any("tmp" in name for name in os.listdir(folder))


def kill_at_random_moment(process: subprocess.Popen, out: Path, rng: random.Random) -> int | None:
    """Waits for a moment drawn from ``rng``, then sends a signal drawn from it; returns the signal,
    or None when the process ended first.

    Moments: a delay after the start (imports, compilation, restoring), a delay after the segment's
    first change to ``metrics.jsonl`` (training), or while a checkpoint is being written.
    """
    trigger = rng.choice(("startup", "training", "training", "checkpoint_write"))
    # SIGINT while Python still imports jax raises KeyboardInterrupt inside XLA's initialisation,
    # which is jax's business, not jaxmp's: startup kills are SIGKILL or SIGTERM.
    signum = rng.choice(SIGNALS[:2] if trigger == "startup" else SIGNALS)
    delay = rng.uniform(0.0, 3.0) if trigger == "startup" else rng.uniform(0.0, 0.5)
    metrics = out / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns if metrics.exists() else None
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if trigger == "startup" or (trigger == "checkpoint_write" and writing_checkpoint(out)):
            break
        if trigger == "training" and metrics.exists() and metrics.stat().st_mtime_ns != stamp:
            break
        time.sleep(0.005)
    time.sleep(delay if trigger != "checkpoint_write" else 0.0)
    if process.poll() is not None:
        return None
    process.send_signal(signum)
    process.wait(timeout=120)
    return signum


def finished(out: Path) -> bool:
    path = out / "summary.json"
    return path.exists() and json.loads(path.read_text())["interrupted"] is False


def comparable_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in TIMINGS} for record in records]


def comparable_scalars(out: Path) -> dict:
    """The TensorBoard points the run directory shows (all but tokens/s), after resumes' purges."""
    scalars = tensorboard_scalars(out / "tensorboard")
    return {tag: points for tag, points in scalars.items() if tag != "train/tokens_per_s"}


def comparable_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in TIMINGS}


def chain_env(cache: Path) -> dict:
    """Subprocess environment with a compilation cache of the chain's own, so restarts skip
    recompiling and chains running side by side never write one cache entry at once."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_chain(tmp_path: Path, env: dict, model_dir: Path, combo: tuple) -> list[int]:
    """Trains ``combo``'s run straight and as a chain of killed and resumed processes; checks that
    both end equal and returns the signals delivered."""
    save_every, log_every, accum, steps, policy, kills = combo
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer. " * 200)
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    args = (save_every, log_every, accum, steps, policy)
    done = subprocess.run(
        command(corpus, model_dir, straight, *args), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr

    rng = random.Random(f"{combo}")
    delivered = []
    while len(delivered) < kills and not finished(chain):
        resume = ["--resume"] if (chain / "config.json").exists() else []
        process = subprocess.Popen(
            [*command(corpus, model_dir, chain, *args), *resume],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            signum = kill_at_random_moment(process, chain, rng)
        finally:
            process.kill()
            stderr = process.communicate()[1].decode()
        if signum is None:  # the run ended before the moment came
            assert process.returncode == 0, stderr
            continue
        delivered.append(signum)
        # Handled, SIGINT/SIGTERM end the process with 128 + signum, after saving a checkpoint or
        # before training started; during imports the signal's default action ends it; after the
        # last step the run may just finish.
        assert process.returncode in (0, 128 + signum, -signum), stderr
        if process.returncode == 128 + signum:
            assert "Traceback" not in stderr, stderr
            assert "checkpoint saved" in stderr or "before training started" in stderr, stderr
    if not finished(chain):
        resume = ["--resume"] if (chain / "config.json").exists() else []
        done = subprocess.run(
            [*command(corpus, model_dir, chain, *args), *resume], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr

    assert comparable_records(chain) == comparable_records(straight)
    assert comparable_scalars(chain) == comparable_scalars(straight)
    assert comparable_summary(chain) == comparable_summary(straight)
    assert Checkpointer(chain / "checkpoints").latest_step() == steps * accum
    ours = Checkpointer(chain / "checkpoints").read_metadata()
    theirs = Checkpointer(straight / "checkpoints").read_metadata()
    assert ours["checksums"] == theirs["checksums"]  # every leaf of the state: params, moments, scale, rng
    assert any(path.startswith("fp8/dots/") for path in ours["checksums"]) == (policy == "fp8")
    jax.tree.map(np.testing.assert_array_equal, run_params(chain), run_params(straight))
    return delivered


def test_twenty_kills_then_resumes_end_bitwise_equal(tmp_path, tiny_lm_dir):
    folders = [tmp_path / f"combo{index}" for index in range(len(COMBOS))]
    for folder in folders:
        (folder / "jax_cache").mkdir(parents=True)
    # The chains are independent: they run side by side (each process mostly waits on imports and disk).
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(COMBOS)) as pool:
        chains = [
            pool.submit(run_chain, folder, chain_env(folder / "jax_cache"), tiny_lm_dir, combo)
            for folder, combo in zip(folders, COMBOS, strict=True)
        ]
        delivered = [signum for chain in chains for signum in chain.result()]
    assert len(delivered) >= 20, f"only {len(delivered)} kills landed before the runs ended"
    assert set(delivered) == set(SIGNALS)
