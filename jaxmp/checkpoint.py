"""Orbax checkpoints of the whole ``TrainState`` plus a small JSON of run metadata.

Orbax writes each step to a temporary directory and renames it when complete, so a
crash never leaves a half-written checkpoint where a good one was. Orbax does not
notice bytes changed afterwards (a bad disk, a bad copy): every save also records two
checksums per array in the metadata, and a restore recomputes and compares them, and
checks that params and optimizer state are finite, before handing the state back.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from jaxmp.errors import UsageError, first_line
from jaxmp.scaling import all_finite
from jaxmp.train_step import TrainState, leaf_paths

__all__ = ["Checkpointer", "CheckpointError", "NonFiniteStateError"]


_FREE_SPACE_HEADROOM = 256 * 1024  # bytes beyond the arrays: orbax's metadata, manifests and JSON


class CheckpointError(UsageError):
    """A checkpoint that cannot be restored: damaged, incomplete, or of another structure."""


class NonFiniteStateError(ValueError):
    """A state with non-finite params or optimizer state, which is never saved as a checkpoint."""


def _as_words(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as a flat uint32 vector (one word per element, narrow types zero-extended)."""
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).ravel()


@jax.jit
def _inspect(tree: Any, checked: Any) -> tuple[jax.Array, jax.Array]:
    """Checksums of every leaf of ``tree`` and the finiteness of ``checked``, in one program.

    Returns:
      uint32 [n_leaves, 2]: per leaf, the wrapping sum of its words and of word x (2 * index + 1);
      and a bool scalar, True when every floating-point leaf of ``checked`` is finite. The second
      sum catches swapped or shifted elements; changing any one word changes both sums (the weights
      are odd, so a change of ±2^k never vanishes modulo 2^32). Computed where the arrays live, so a
      sharded state is summed without gathering it, and as one program: on XLA:CPU, many small
      programs with collectives in flight at once can deadlock a multi-device run.
    """

    def leaf_sums(x):
        words = _as_words(x)
        weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
        return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])

    leaves = jax.tree.leaves(tree)
    sums = jnp.stack([leaf_sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)
    return sums, all_finite(checked)


def _report(tree: Any, checked: Any) -> tuple[dict[str, list[int]], bool]:
    """``({leaf path: [sum, weighted sum]}`` for every leaf of ``tree``, whether ``checked`` is finite)."""
    sums, finite = jax.device_get(_inspect(tree, checked))
    table = {path: [int(a), int(b)] for path, (a, b) in zip(leaf_paths(tree), np.asarray(sums), strict=True)}
    return table, bool(finite)


def _verify(
    table: dict[str, list[int]], recorded: dict[str, list[int]] | None, prefix: str, where: str
) -> None:
    """Raises ``CheckpointError`` naming the first leaf whose checksum in ``table`` differs from ``recorded``."""
    if recorded is None:  # written before checksums existed: finiteness is the only check left
        return
    for path, sums in table.items():
        expected = recorded.get(prefix + path)
        if expected is not None and expected != sums:
            raise CheckpointError(
                f"{where} is damaged: {prefix + path} does not match the checksum saved with it"
            )


def _to_saveable(state: TrainState) -> TrainState:
    """Typed PRNG keys are stored as their raw uint32 key data."""
    if jax.dtypes.issubdtype(state.rng.dtype, jax.dtypes.prng_key):
        return state.replace(rng=jax.random.key_data(state.rng))
    return state


def _from_saveable(restored: TrainState, target: TrainState) -> TrainState:
    if jax.dtypes.issubdtype(target.rng.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(target.rng)
        return restored.replace(rng=jax.random.wrap_key_data(restored.rng, impl=impl))
    return restored


def _silence_failed_orbax_tasks() -> None:
    """Drops the echoes of a failed orbax read or write, which would bury its one-line error.

    When a save or restore fails, orbax closes its asyncio loop while tensorstore operations are
    still pending: their completion callbacks raise ``RuntimeError('Event loop is closed')`` as
    unraisable exceptions, and each failed write task is logged again by asyncio ("Task exception
    was never retrieved") with a full traceback when it is collected. Only those two are dropped;
    every other unraisable exception and asyncio record still goes through.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in record.getMessage()
    )


def _restore_args(abstract: Any) -> Any:
    """Restore each leaf as the target's shape, dtype and sharding (single device when unsharded)."""
    return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
    """Saves and restores ``TrainState`` + metadata under ``directory`` (keeps the last ``keep``).

    Args:
      directory: where step folders go (created if missing).
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(os.fspath(os.path.abspath(directory)), options=options)

    def save(self, step: int, state: TrainState, metadata: dict[str, Any]) -> None:
        """Writes ``state`` and JSON-serialisable ``metadata`` (plus checksums) as checkpoint ``step``.

        Raises:
          NonFiniteStateError: ``state`` has non-finite params or optimizer state (nothing is written).
          OSError: the write failed (e.g. the disk is full); the checkpoints already there are kept.
        """
        saveable = _to_saveable(state)
        table, finite = _report(saveable, (saveable.params, saveable.opt_state))
        if not finite:
            raise NonFiniteStateError(
                f"the state at step {step} has non-finite params or optimizer state; it is not saved"
            )
        metadata = {**metadata, "checksums": table}
        self._check_free_space(step, saveable)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(saveable), metadata=ocp.args.JsonSave(metadata)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except (OSError, ValueError):
            _silence_failed_orbax_tasks()
            raise

    def _check_free_space(self, step: int, saveable: Any) -> None:
        """Raises ``OSError(ENOSPC)`` before writing when the disk has no room for this process's part
        of the checkpoint: a clean error instead of a write that fails half way."""
        needed = sum(
            shard.data.nbytes
            for leaf in jax.tree.leaves(saveable)
            for shard in leaf.addressable_shards
            if shard.replica_id == 0
        )
        free = shutil.disk_usage(self._manager.directory).free
        if free < needed + _FREE_SPACE_HEADROOM:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device: checkpoint {step} needs {needed / 2**20:.1f} MiB, "
                f"{free / 2**20:.1f} MiB free",
                str(self._manager.directory),
            )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restores checkpoint ``step`` (default: newest) into the structure and shardings of ``target``.

        Returns the state and the metadata saved with it (without the checksums).

        Raises:
          CheckpointError: the checkpoint is missing, unreadable, of another structure, fails its
            checksums, or holds non-finite params or optimizer state.
        """
        step = self._step_to_restore(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(target))
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract)),
            metadata=ocp.args.JsonRestore(),
        )
        restored = self._read(step, args)
        metadata = dict(restored["metadata"])
        saved = restored["state"]
        table, finite = _report(saved, (saved.params, saved.opt_state))
        _verify(table, metadata.pop("checksums", None), "", self.describe(step))
        self._check_finite(finite, step)
        return _from_saveable(saved, target), metadata

    def restore_params(self, target_params: Any, step: int | None = None) -> Any:
        """Restores only the params (no optimizer needed), into the structure of ``target_params``.

        ``target_params`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves; values come back in
        the target's dtypes (e.g. cast once to bf16 for serving).
        """
        step = self._step_to_restore(step)
        abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)}
        # Read the saved dtypes (dtype=None) so the checksums apply, then cast to the target's.
        as_saved = jax.tree.map(lambda args: dataclasses.replace(args, dtype=None), _restore_args(abstract))
        restore = ocp.args.PyTreeRestore(item=abstract, restore_args=as_saved, partial_restore=True)
        restored = self._read(step, ocp.args.Composite(state=restore, metadata=ocp.args.JsonRestore()))
        params = restored["state"]["params"]
        table, finite = _report(params, params)
        _verify(table, dict(restored["metadata"]).get("checksums"), "params/", self.describe(step))
        self._check_finite(finite, step)
        return jax.tree.map(lambda x, target: x.astype(target.dtype), params, target_params)

    def param_shapes(self, step: int | None = None) -> dict[str, tuple[int, ...]]:
        """The shape of each param saved in checkpoint ``step`` (default: newest), by ``/``-joined path
        (``classifier/bias``), read from orbax's metadata without reading any array."""
        step = self._step_to_restore(step)
        try:
            tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.step_dir(step) / "state")).tree
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise CheckpointError(f"{self.describe(step)} cannot be read ({first_line(error)})") from None
        flat = traverse_util.flatten_dict(tree["params"], sep="/")
        return {path: tuple(leaf.shape) for path, leaf in flat.items()}

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The metadata saved with checkpoint ``step`` (default: newest), its ``checksums`` included:
        ``{leaf path: [sum, weighted sum]}`` over the whole state, as written by ``save``."""
        step = self._step_to_restore(step)
        return dict(self._read(step, ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"])

    def step_dir(self, step: int) -> Path:
        """The directory of checkpoint ``step``."""
        return Path(self._manager.directory) / str(step)

    def describe(self, step: int) -> str:
        """How messages name checkpoint ``step``."""
        return f"checkpoint {self.step_dir(step)}"

    def _step_to_restore(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to restore in {self._manager.directory}")
        return step

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        """``manager.restore`` with orbax's and tensorstore's many failure types turned into one line."""
        try:
            return self._manager.restore(step, args=args)
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:
            # Orbax documents no exception types: a truncated array surfaces from tensorstore as a
            # ValueError, a missing _METADATA as FileNotFoundError, a garbage manifest as KeyError or
            # TypeError. All of them mean the same to a user: this checkpoint cannot be read.
            _silence_failed_orbax_tasks()
            raise CheckpointError(f"{self.describe(step)} cannot be read ({first_line(error)})") from None

    def _check_finite(self, finite: bool, step: int) -> None:
        if not finite:
            raise CheckpointError(f"{self.describe(step)} is damaged: it holds non-finite values")
