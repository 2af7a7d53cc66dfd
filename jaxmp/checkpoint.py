"""Orbax checkpoints of the whole ``TrainState`` plus a small JSON of run metadata.

Orbax writes each step to a temporary directory and renames it when complete, so a
crash never leaves a half-written checkpoint where a good one was. Orbax does not
notice bytes changed afterwards (a bad disk, a bad copy): every save also records two
checksums per array in the metadata, and a restore recomputes and compares them, and
checks that params and optimizer state are finite, before handing the state back.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxmp.errors import UsageError
from jaxmp.scaling import all_finite
from jaxmp.train_step import TrainState, leaf_paths

__all__ = ["Checkpointer", "CheckpointError", "NonFiniteStateError"]


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
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    """uint32 [n_leaves, 2]: per leaf, the wrapping sum of its words and of word x (2 * index + 1).

    The second sum catches swapped or shifted elements; changing any one word changes both sums
    (the weights are odd, so a change of ±2^k never vanishes modulo 2^32). Computed where the
    arrays live, so a sharded state is summed without gathering it.
    """

    def leaf_sums(x):
        words = _as_words(x)
        weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
        return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])

    return jnp.stack([leaf_sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def _checksum_table(tree: Any) -> dict[str, list[int]]:
    """``{leaf path: [sum, weighted sum]}`` for every array leaf of ``tree``."""
    sums = np.asarray(jax.device_get(_checksums(jax.tree.leaves(tree))))
    return {path: [int(a), int(b)] for path, (a, b) in zip(leaf_paths(tree), sums, strict=True)}


def _verify(tree: Any, recorded: dict[str, list[int]] | None, prefix: str, where: str) -> None:
    """Raises ``CheckpointError`` naming the first leaf of ``tree`` whose checksum differs from ``recorded``."""
    if recorded is None:  # written before checksums existed: finiteness is the only check left
        return
    for path, sums in _checksum_table(tree).items():
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


def _silence_late_orbax_callbacks() -> None:
    """Drops the "Event loop is closed" errors that follow a failed orbax read.

    When a restore fails, orbax closes its asyncio loop while tensorstore reads are still
    pending; their completion callbacks then raise ``RuntimeError('Event loop is closed')`` as
    unraisable exceptions, printing a traceback after our one-line error. Only that error is
    dropped; every other unraisable exception still reaches the previous hook.
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
        if not bool(all_finite((state.params, state.opt_state))):
            raise NonFiniteStateError(
                f"the state at step {step} has non-finite params or optimizer state; it is not saved"
            )
        saveable = _to_saveable(state)
        metadata = {**metadata, "checksums": _checksum_table(saveable)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(saveable), metadata=ocp.args.JsonSave(metadata)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

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
        _verify(restored["state"], metadata.pop("checksums", None), "", self.describe(step))
        state = _from_saveable(restored["state"], target)
        self._check_finite((state.params, state.opt_state), step)
        return state, metadata

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
        _verify(params, dict(restored["metadata"]).get("checksums"), "params/", self.describe(step))
        self._check_finite(params, step)
        return jax.tree.map(lambda x, target: x.astype(target.dtype), params, target_params)

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
            _silence_late_orbax_callbacks()
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise CheckpointError(f"{self.describe(step)} cannot be read ({first_line})") from None

    def _check_finite(self, tree: Any, step: int) -> None:
        if not bool(all_finite(tree)):
            raise CheckpointError(f"{self.describe(step)} is damaged: it holds non-finite values")
