"""Multi-host runs on ``jax.distributed``: every process runs the same program on its own devices.

After ``initialize``, ``jax.devices()`` lists the devices of every process, a mesh spans
them all, and XLA's collectives (NCCL on GPUs, ICI on TPUs, gloo on CPUs) move the data;
jaxmp adds no communication of its own. Each process feeds the batch rows of its own
devices (``sharding.process_rows``); only process 0 writes metrics and logs; orbax writes
checkpoints collectively, each process its own shards.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils

__all__ = ["initialize", "is_primary", "barrier", "to_host"]


def initialize(coordinator: str | None, num_processes: int = 1, process_id: int = 0) -> None:
    """Joins this process to a multi-host run; a single-process run (no ``coordinator``) does nothing.

    Must run before anything touches a JAX device.

    Args:
      coordinator: ``HOST:PORT`` where process 0 serves the coordination service (every
        process gives the same address); ``auto`` to let ``jax.distributed.initialize()``
        detect the cluster (SLURM, Open MPI, Cloud TPU, ...) and its process count and id;
        None for a single-process run.
      num_processes: processes in the run (with ``HOST:PORT``).
      process_id: this process's index in ``0 .. num_processes - 1`` (with ``HOST:PORT``).

    Raises:
      ValueError: on an ill-formed address or process numbers.
    """
    if coordinator is None:
        if (num_processes, process_id) != (1, 0):
            raise ValueError("`num_processes`/`process_id` need `coordinator` HOST:PORT (or auto)")
        return
    jax.config.update(
        "jax_cpu_collectives_implementation", "gloo"
    )  # CPU devices: collectives across processes
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"`coordinator` {coordinator!r}: write HOST:PORT of process 0, or auto")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"`process_id` {process_id} is not in 0 .. `num_processes` - 1 (`num_processes` {num_processes})"
        )
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """True in process 0, the one that writes metrics, logs and summaries."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called ``name`` (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """A whole copy of ``tree``'s global arrays in every process (a collective: every process calls it).

    In a single-process run the tree comes back as it is; each device is addressable already.
    """
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)
