"""Losses, always computed in fp32 whatever dtype the logits arrive in."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["lm_loss", "lm_loss_of", "classification_loss"]


def lm_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in nats, fp32.

    Args:
      logits_BxLxV: logits in any float dtype (cast to fp32 here).
      targets_BxL: int target ids.
      mask_BxL: optional 0/1 weights; the mean is over weighted positions.

    Returns:
      fp32 scalar.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)  # fp32 island: the loss
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    if mask_BxL is None:
        return losses_BxL.mean()
    mask_BxL = mask_BxL.astype(jnp.float32)
    return (losses_BxL * mask_BxL).sum() / jnp.maximum(mask_BxL.sum(), 1.0)


def lm_loss_of(outputs: Any, batch: dict) -> jax.Array:
    """:func:`lm_loss` of a model's ``outputs`` (logits, or an object with ``.logits``) against
    ``batch["targets"]``: the default loss of ``diagnose`` and ``compare_policies``."""
    return lm_loss(getattr(outputs, "logits", outputs), batch["targets"])


def classification_loss(
    logits_BxC: jax.Array, labels_B: jax.Array, weight_B: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy (fp32) and the counts behind accuracy.

    Args:
      logits_BxC: class logits in any float dtype.
      labels_B: int class ids.
      weight_B: optional 0/1 row weights (padding rows of an eval batch have 0).

    Returns:
      ``(loss, {"correct": fp32 scalar, "count": fp32 scalar})``.
    """
    logits_BxC = logits_BxC.astype(jnp.float32)  # fp32 island: the loss
    weight_B = jnp.ones(labels_B.shape, jnp.float32) if weight_B is None else weight_B.astype(jnp.float32)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    count = weight_B.sum()
    correct = ((jnp.argmax(logits_BxC, axis=-1) == labels_B) * weight_B).sum()
    return (losses_B * weight_B).sum() / jnp.maximum(count, 1.0), {"correct": correct, "count": count}
