"""A run's device side: the mesh, the sharded ``TrainState`` and its jitted step, and batches fed
by every process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxmp import models, optim, sharding
from jaxmp.errors import UsageError
from jaxmp.train_step import TrainState
from jaxmp.training.config import TrainConfig
from jaxmp.training.tasks import Task

__all__ = ["make_mesh", "feed_by_processes", "make_state"]


def make_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    """The mesh over every device of every process; the batch must split over its data x fsdp axes."""
    try:
        mesh = sharding.make_mesh(config.mesh)
    except ValueError as error:
        raise UsageError(f"`mesh`: {error}") from None
    try:
        sharding.check_batch_size(config.batch_size, mesh)
    except ValueError as error:
        raise UsageError(f"`batch_size`: {error}") from None
    return mesh


def feed_by_processes(task: Task, mesh: jax.sharding.Mesh, batch_size: int) -> Task:
    """``task`` whose windows are global arrays, each process feeding its own devices' rows."""
    rows = sharding.process_rows(mesh, batch_size)
    host_window = task.window

    def window(first: int, count: int) -> Any:
        local = jax.tree.map(lambda x: x[:, rows], host_window(first, count))
        return sharding.shard_batch(local, mesh, stacked=True)

    return dataclasses.replace(task, window=window)


def make_state(
    config: TrainConfig, task: Task, mesh: jax.sharding.Mesh, log: Callable
) -> tuple[TrainState, Callable]:
    optimizer = optim.make_optimizer(
        learning_rate=config.lr,
        accum_steps=config.accum_steps,
        clip_norm=config.clip_norm,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        total_steps=config.steps,
        param_update=config.param_update,
        moment_dtype=config.moment_dtype,
        policy=config.precision_policy,
        seed=config.seed,
    )
    state = TrainState.create(
        params=task.params,
        optimizer=optimizer,
        loss_scale=config.initial_loss_scale(),
        rng=jax.random.key(config.seed),
        fp8=models.init_fp8_scaling(task.model),
    )
    plan = sharding.plan_state_sharding(state, mesh)
    if plan.replicated:
        log(
            f"mesh {sharding.describe_mesh(mesh)}: {len(plan.replicated)} arrays stay whole on every device "
            f"(no dimension divisible by fsdp): {', '.join(plan.replicated)}"
        )
    step = sharding.make_sharded_train_step(
        task.loss_fn,
        optimizer,
        config.precision_policy,
        mesh,
        plan.shardings,
        cast_params=False,
        scan_micro_steps=True,
    )
    return sharding.shard_state(state, plan.shardings), step
