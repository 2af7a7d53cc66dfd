"""Orbax checkpoints of the whole ``TrainState`` plus a small JSON of run metadata.

Orbax writes each step to a temporary directory and renames it when complete, so a
crash never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxmp.train_step import TrainState

__all__ = ["Checkpointer"]


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
        """Writes ``state`` and JSON-serialisable ``metadata`` as checkpoint ``step``."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(_to_saveable(state)),
                metadata=ocp.args.JsonSave(metadata),
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
        """Restores checkpoint ``step`` (default: newest) into the structure and shardings of ``target``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(target))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract)),
                metadata=ocp.args.JsonRestore(),
            ),
        )
        return _from_saveable(restored["state"], target), dict(restored["metadata"])

    def restore_params(self, target_params: Any, step: int | None = None) -> Any:
        """Restores only the params (no optimizer needed), into the structure of ``target_params``.

        ``target_params`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves; values come back in
        the target's dtypes (e.g. cast once to bf16 for serving).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError("no checkpoint to restore")
        abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)}
        restore = ocp.args.PyTreeRestore(
            item=abstract, restore_args=_restore_args(abstract), partial_restore=True
        )
        restored = self._manager.restore(step, args=ocp.args.Composite(state=restore))
        return restored["state"]["params"]

    def close(self) -> None:
        self._manager.close()
