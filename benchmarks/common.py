"""Shared pieces of the benchmark scripts: the machine's description, interleaved timing, LM train steps.

Every script compares its candidates inside one process and interleaves their repetitions
(``a b c a b c ...``), so a neighbour's load on a shared machine hits all of them alike; the
figure reported is the median. Compilation is timed separately and never counted in a step.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxmp
from jaxmp import models
from jaxmp.losses import lm_loss

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers")
CPU_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
REPO = Path(__file__).resolve().parent.parent


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = [flag for flag in CPU_FLAGS if flag in value.split()]
            break
    return model, flags


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where and how a figure was measured: command, date, machine, package versions."""
    cpu, flags = _cpu_model_and_flags()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit or None,
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_threads_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "backend": jax.default_backend(),
        "devices": [device.device_kind for device in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
        "packages": {package: _version(package) for package in PACKAGES},
    }


def interleaved_times(
    candidates: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each candidate, run ``repeats`` times round-robin; each call must block.

    Returns ``{name: {"wall": [...], "cpu": [...]}}``: wall-clock seconds, and CPU seconds of this
    process (all threads), which a neighbour's load on a shared machine disturbs far less.
    """
    times = {name: {"wall": [], "cpu": []} for name in candidates}
    for _ in range(repeats):
        for name, run_once in candidates.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run_once()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def median(values: Sequence[float]) -> float:
    return float(np.median(values))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, table: str, results: dict[str, Any], json_path: str | None) -> None:
    """Prints the table and the environment; writes ``{"environment", "results"}`` to ``json_path``."""
    env = environment()
    print(f"## {title}\n\n{table}\n")
    flags = " ".join(env["cpu_flags"])
    print(
        f"{env['date']} · {env['cpu']} ({env['cpu_threads_available']} threads; {flags})"
        f" · load {env['load_average_1min']:.1f} · "
        + " ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    )
    if json_path:
        Path(json_path).write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
        print(f"wrote {json_path}")


def random_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, jax.Array]:
    """Uniformly random ``input_ids`` and ``targets`` (int32 ``[B, L]``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(2, batch_size, seq_len), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids[0]), "targets": jnp.asarray(ids[1])}


@dataclasses.dataclass
class LMStep:
    """One jaxmp LM train step, compiled, with its state and a fixed batch.

    Attributes:
      model: the Flax module.
      loss_fn: ``(params, batch, rng) -> (loss, aux)``.
      optimizer: the optax chain of ``jaxmp.make_optimizer``.
      state: the current :class:`jaxmp.TrainState` (donated and replaced by ``run_once``).
      batch: the batch every step sees.
      compiled: the compiled step.
      compile_seconds: tracing + lowering + compilation.
    """

    model: Any
    loss_fn: Callable
    optimizer: Any
    state: Any
    batch: dict[str, jax.Array]
    compiled: Callable
    compile_seconds: float

    @property
    def tokens(self) -> int:
        """Tokens per call (one micro-step, or a whole window with ``scan_micro_steps``)."""
        return int(self.batch["input_ids"].size)

    def run_once(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))


def lm_loss_fn(model) -> Callable:
    """``loss_fn(params, batch, rng[, fp8_variables])`` of a causal LM, as ``jaxmp.training.tasks``
    builds it (no dropout)."""

    def loss_fn(params, batch, rng, fp8_variables=None):
        del rng
        logits = model.apply({"params": params, **(fp8_variables or {})}, batch["input_ids"]).logits
        return lm_loss(logits, batch["targets"]), {}

    return loss_fn


def lm_train_step(
    preset: str,
    policy: str,
    batch_size: int,
    seq_len: int,
    *,
    accum_steps: int = 1,
    loss_scale: str = "auto",
    warm_up: bool = True,
    scan_micro_steps: bool = False,
    moment_dtype: str = "float32",
) -> LMStep:
    """A compiled ``jaxmp.make_train_step`` for ``preset`` under ``policy``, built as the CLI builds it.

    With ``scan_micro_steps`` one call runs a whole window of ``accum_steps`` micro-batches;
    ``moment_dtype`` is the optimizer's Adam moment storage (``jaxmp.make_optimizer``).
    """
    model = models.get_model(preset, policy)
    params = models.init_params(model, jax.random.key(0), seq_len)
    optimizer = jaxmp.make_optimizer(learning_rate=1e-4, accum_steps=accum_steps, moment_dtype=moment_dtype)
    parsed = jaxmp.get_policy(policy)
    state = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=jaxmp.make_loss_scale(loss_scale, parsed)
    )
    loss_fn = lm_loss_fn(model)
    step = jaxmp.make_train_step(
        loss_fn, optimizer, parsed, cast_params=False, scan_micro_steps=scan_micro_steps
    )
    batch = random_batch(model.config.vocab_size, batch_size, seq_len)
    if scan_micro_steps:
        batch = jax.tree.map(lambda x: jnp.stack([x] * accum_steps), batch)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    lm = LMStep(model, loss_fn, optimizer, state, batch, compiled, time.perf_counter() - start)
    if warm_up:
        lm.run_once()
    return lm


def print_run_losses(
    results: Sequence[dict[str, Any]], reference: float, ratio_header: str = "ratio"
) -> None:
    """Prints one row per training run's ``summary.json`` (with ``run``, its name): final validation loss,
    its ratio to ``reference``, train-state bytes per parameter and wall time."""
    print(
        f"\n| run | final val loss | {ratio_header} | state bytes/param | wall s |\n| --- | --- | --- | --- | --- |"
    )
    for result in results:
        print(
            f"| {result['run']} | {result['final_val_loss']:.4f} | {result['final_val_loss'] / reference:.4f} "
            f"| {result['state_bytes_per_param']:.2f} | {result['wall_seconds']:.0f} |"
        )
