"""Data-parallel and FSDP training over a device mesh, on JAX's own SPMD partitioner.

A mesh has two axes, ``data`` and ``fsdp``. The batch's leading dimension is split over
both (each device sees ``batch_size / (data * fsdp)`` rows). Every floating-point state
array of rank >= 1 (params, Adam moments and their 8-bit codes, the MultiSteps accumulator) is split over
``fsdp`` along its largest dimension that ``fsdp`` divides, and replicated over ``data``;
an array none of whose dimensions ``fsdp`` divides stays whole on every device and is
reported. Counters, loss-scale state and PRNG keys are replicated.

``jax.jit`` with these shardings as ``in_shardings``/``out_shardings`` lets XLA insert the
collectives: params are all-gathered (after the cast to the compute dtype) before the
forward pass, gradients are summed over the batch's devices into each device's shard, and
whole-tree reductions (the finiteness check behind loss scaling and step skipping, the
global norm behind clipping) are all-reduced, so every device takes one decision::

    mesh = make_mesh("data=4,fsdp=2")
    plan = plan_state_sharding(state, mesh)
    state = shard_state(state, plan.shardings)
    step = make_sharded_train_step(loss_fn, tx, policy, mesh, plan.shardings)
    rows = process_rows(mesh, batch_size)  # the rows of each global batch this process feeds
    local_batch = jax.tree.map(lambda x: x[rows], global_batch)
    state, metrics = step(state, shard_batch(local_batch, mesh))
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmp.precision import Policy
from jaxmp.train_step import CastParams, LossFn, TrainState, leaf_paths, make_train_step

__all__ = [
    "MESH_AXES",
    "parse_mesh_spec",
    "make_mesh",
    "describe_mesh",
    "batch_sharding",
    "check_batch_size",
    "process_rows",
    "shard_batch",
    "fsdp_partition",
    "ShardingPlan",
    "plan_state_sharding",
    "shard_state",
    "make_sharded_train_step",
]

MESH_AXES = ("data", "fsdp")


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """Axis sizes from ``"data=4,fsdp=2"``; an omitted ``data`` takes the devices left over.

    Args:
      spec: comma-separated ``axis=size`` pairs over ``data`` and ``fsdp``; None or "" puts
        every device on ``data``. ``fsdp=2`` on 8 devices means ``data=4,fsdp=2``.
      num_devices: devices the mesh must cover exactly.

    Returns:
      ``{"data": d, "fsdp": f}`` with ``d * f == num_devices``.

    Raises:
      ValueError: on bad syntax, an unknown axis, or sizes that do not cover the devices.
    """
    sizes: dict[str, int] = {}
    for item in (spec or "").replace(" ", "").split(","):
        if not item:
            continue
        name, _, size = item.partition("=")
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; valid axes: {', '.join(MESH_AXES)}")
        if name in sizes or not size.isdigit() or int(size) < 1:
            raise ValueError(f"bad mesh {spec!r}; write each axis once as axis=size >= 1, e.g. data=4,fsdp=2")
        sizes[name] = int(size)
    sizes.setdefault("fsdp", 1)
    if "data" not in sizes:
        if num_devices % sizes["fsdp"]:
            raise ValueError(f"mesh {spec!r}: fsdp={sizes['fsdp']} does not divide the {num_devices} devices")
        sizes["data"] = num_devices // sizes["fsdp"]
    if sizes["data"] * sizes["fsdp"] != num_devices:
        raise ValueError(
            f"mesh data={sizes['data']},fsdp={sizes['fsdp']} needs {sizes['data'] * sizes['fsdp']} devices; "
            f"there are {num_devices}"
        )
    return {name: sizes[name] for name in MESH_AXES}


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: every device of every process).

    The axes are ``AxisType.Auto``: shardings are propagated by XLA, not checked by JAX's
    explicit-sharding types (``jax.make_mesh`` defaults to explicit axes in this JAX).
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices
    )


def describe_mesh(mesh: Mesh) -> str:
    """``"data=4,fsdp=2"``: the spec that rebuilds ``mesh``'s shape."""
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """The batch dimension split over ``data`` x ``fsdp``; other dimensions whole.

    ``stacked``: micro-batches stacked on a new leading axis (``[n, batch, ...]``, one accumulation
    window), which stays whole; the batch dimension is then the second.
    """
    return NamedSharding(mesh, PartitionSpec(None, MESH_AXES) if stacked else PartitionSpec(MESH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ValueError unless the ``data`` x ``fsdp`` devices divide ``batch_size``."""
    ways = math.prod(mesh.shape.values())
    if batch_size % ways:
        raise ValueError(
            f"batch size {batch_size} does not split over the {ways} devices of mesh {describe_mesh(mesh)} "
            f"(data x fsdp); use a multiple of {ways}"
        )


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a ``batch_size``-row global batch that this process's devices hold.

    Every row goes to exactly one device; with ``make_mesh``'s device order a process's
    devices hold one contiguous block of rows (all of them in a single-process run).

    Raises:
      ValueError: if ``batch_size`` does not split over the mesh.
    """
    check_batch_size(batch_size, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    blocks = sorted({index[0].indices(batch_size)[:2] for index in index_map.values()})
    if any(stop != start for (_, stop), (start, _) in itertools.pairwise(blocks)):
        raise ValueError(f"this process's devices hold rows {blocks} of the batch: not one block")
    return slice(blocks[0][0], blocks[-1][1])


def shard_batch(local_batch: Any, mesh: Mesh, *, stacked: bool = False) -> Any:
    """Global batch arrays from each process's rows (``local_batch``, e.g. ``batch[process_rows(...)]``).

    Args:
      local_batch: a pytree of host arrays ``[rows, ...]``: this process's rows, in order.
      mesh: the training mesh.
      stacked: ``local_batch`` leaves are ``[n, rows, ...]``: a window of ``n`` micro-batches.

    Returns:
      The same pytree of ``jax.Array``s of shape ``[rows * processes, ...]`` (``[n, rows * processes,
      ...]`` when stacked) sharded by ``batch_sharding(mesh, stacked=stacked)``; every process must
      call this with its own rows.
    """
    sharding = batch_sharding(mesh, stacked=stacked)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def fsdp_partition(shape: Sequence[int], fsdp: int) -> PartitionSpec:
    """Shards the largest dimension that ``fsdp`` divides on ``fsdp``; ``P()`` (replicated) if none does."""
    divisible = [(size, -dim) for dim, size in enumerate(shape) if size % fsdp == 0 and size >= fsdp]
    if fsdp == 1 or not divisible:
        return PartitionSpec()
    dim = -max(divisible)[1]  # the largest; the first of equals
    return PartitionSpec(*(None,) * dim, "fsdp")


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where each state array lives.

    Attributes:
      shardings: a ``NamedSharding`` per leaf, in the structure of the state.
      replicated: ``"path [shape]"`` of the floating-point arrays none of whose
        dimensions ``fsdp`` divides: every device holds the whole array.
    """

    shardings: Any
    replicated: tuple[str, ...]


def _is_sharded_dtype(dtype: Any) -> bool:
    """Floating-point arrays, and the int8/uint8 codes of 8-bit Adam moments (``jaxmp.moments8``), which keep
    their parameter's shape and so split exactly like it."""
    return jnp.issubdtype(dtype, jnp.floating) or dtype in (jnp.int8, jnp.uint8)


def plan_state_sharding(state: TrainState, mesh: Mesh) -> ShardingPlan:
    """FSDP shardings for ``state`` (arrays or ``jax.ShapeDtypeStruct`` leaves); its scalars and fp8
    scaling state are replicated."""
    fsdp = mesh.shape["fsdp"]
    replicated = []

    def leaf_sharding(path: str, leaf: Any) -> NamedSharding:
        # fp8 scaling state (a few floats per dot) stays whole: every device reads all of it.
        if path.startswith("fp8/") or not (_is_sharded_dtype(leaf.dtype) and leaf.ndim >= 1):
            return NamedSharding(mesh, PartitionSpec())
        spec = fsdp_partition(leaf.shape, fsdp)
        if fsdp > 1 and spec == PartitionSpec():
            replicated.append(f"{path} {list(leaf.shape)}")
        return NamedSharding(mesh, spec)

    leaves, treedef = jax.tree.flatten(state)
    shardings = [leaf_sharding(path, leaf) for path, leaf in zip(leaf_paths(state), leaves, strict=True)]
    return ShardingPlan(jax.tree.unflatten(treedef, shardings), tuple(replicated))


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
    """One global array from a value every process holds in full; each process places its own shards."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = _place(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state: TrainState, shardings: Any) -> TrainState:
    """Places a state that every process holds in full (e.g. fresh from ``TrainState.create``) on the mesh."""
    return jax.tree.map(_place, state, shardings)


def make_sharded_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    policy: Policy | str,
    mesh: Mesh,
    state_shardings: Any,
    *,
    cast_params: CastParams = True,
    cast_batch: bool = True,
    donate: bool = True,
    scan_micro_steps: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """``make_train_step``'s step, jitted once with explicit in/out shardings over ``mesh``.

    ``loss_fn`` sees whole (all-gathered) params and its devices' rows of the batch; the
    state keeps ``state_shardings`` (``plan_state_sharding(...).shardings``) and the
    metrics come back replicated. Arguments otherwise as in ``make_train_step``.

    Returns:
      ``step(state, batch) -> (state, metrics)``; ``batch`` from ``shard_batch`` (host
      arrays also work in a single-process run).
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def gathered_loss(params, batch, rng, *fp8_variables):
        params = jax.lax.with_sharding_constraint(params, replicated)  # FSDP: all-gather before use
        return loss_fn(params, batch, rng, *fp8_variables)

    step = make_train_step(
        gathered_loss,
        optimizer,
        policy,
        cast_params=cast_params,
        cast_batch=cast_batch,
        jit=False,
        scan_micro_steps=scan_micro_steps,
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding(mesh, stacked=scan_micro_steps)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )
