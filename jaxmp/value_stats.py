"""Where the values of arrays fall relative to float16's range, computed on the device.

Thresholds (on ``|x|``, after multiplying by a loss scale): overflow ``> 65504`` (float16's
largest finite value; strictly, values below 65520 would still round to 65504), underflow
``0 < |x| < 2**-24`` (below float16's smallest subnormal), subnormal ``2**-24 <= |x| < 2**-14``.
Statistics of many arrays at once use segment reductions over their concatenation, so a
model's hundreds of tensors cost a handful of compiled operations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FP16_MAX",
    "FP16_SMALLEST_SUBNORMAL",
    "FP16_SMALLEST_NORMAL",
    "LOG2_BINS",
    "RangeStats",
    "range_stats",
    "segment_range_stats",
    "segment_errors",
    "log2_histogram",
    "concat",
    "segment_ids",
]

FP16_MAX = 65504.0  # largest finite float16
FP16_SMALLEST_SUBNORMAL = 2.0**-24  # smaller magnitudes are "underflow" here
FP16_SMALLEST_NORMAL = 2.0**-14  # below this float16 keeps fewer than 11 significant bits
LOG2_BINS = np.arange(-160, 140)  # histogram bin b holds values with floor(log2 |x|) == b


class RangeStats(NamedTuple):
    """How the values of an array would fare in float16 (counts are exact integers).

    Attributes:
      count: number of values.
      max_abs: largest ``|x|`` (NaNs ignored; ``inf`` if any value is infinite).
      overflow: values with ``|x| > 65504`` (infinities included).
      underflow: values with ``0 < |x| < 2**-24``: float16 has nothing nonzero to round them to.
      subnormal: values with ``2**-24 <= |x| < 2**-14``: float16 keeps them with reduced precision.
      zero: values exactly zero.
      nan: NaN values.
    """

    count: Any
    max_abs: Any
    overflow: Any
    underflow: Any
    subnormal: Any
    zero: Any
    nan: Any

    def merge(self, other: RangeStats) -> RangeStats:
        """Statistics of both arrays together (on the host)."""
        counts = {f: int(getattr(self, f)) + int(getattr(other, f)) for f in self._fields if f != "max_abs"}
        return RangeStats(max_abs=max(float(self.max_abs), float(other.max_abs)), **counts)

    def fractions(self) -> dict[str, float]:
        """``max_abs`` and each count divided by ``count``: ``overflow``, ``underflow``, ... ."""
        count = max(int(self.count), 1)
        fields = ("overflow", "underflow", "subnormal", "zero", "nan")
        return {"max_abs": float(self.max_abs), **{f: int(getattr(self, f)) / count for f in fields}}


def concat(arrays: Iterable[jax.Array]) -> jax.Array:
    """All values of ``arrays``, flattened and concatenated, as float32."""
    return jnp.concatenate([a.astype(jnp.float32).ravel() for a in arrays])


def segment_ids(arrays: list[jax.Array]) -> jax.Array:
    """int32 index of the array each value of ``concat(arrays)`` came from."""
    ends = np.cumsum([a.size for a in arrays])
    # The barrier keeps XLA from constant-folding a huge id array at compile time.
    positions = jax.lax.optimization_barrier(jnp.arange(int(ends[-1]), dtype=jnp.int32))
    return jnp.searchsorted(jnp.asarray(ends, jnp.int32), positions, side="right").astype(jnp.int32)


def segment_range_stats(arrays: list[jax.Array], scale: float | jax.Array = 1.0) -> RangeStats:
    """:class:`RangeStats` of each ``array * scale``, as ``[len(arrays)]`` arrays (jittable, float32).

    Args:
      arrays: float arrays of any shapes and dtypes.
      scale: multiplies every value first (a loss scale applied to a gradient).
    """
    abs_x = jnp.abs(concat(arrays)) * jnp.asarray(scale, jnp.float32)
    segments, num_segments = segment_ids(arrays), len(arrays)
    nan = jnp.isnan(abs_x)

    def count(mask):
        return jax.ops.segment_sum(mask.astype(jnp.int32), segments, num_segments, indices_are_sorted=True)

    return RangeStats(
        count=jnp.asarray([a.size for a in arrays], jnp.int32),
        max_abs=jax.ops.segment_max(
            jnp.where(nan, 0.0, abs_x), segments, num_segments, indices_are_sorted=True
        ),
        overflow=count(abs_x > FP16_MAX),
        underflow=count((abs_x > 0) & (abs_x < FP16_SMALLEST_SUBNORMAL)),
        subnormal=count((abs_x >= FP16_SMALLEST_SUBNORMAL) & (abs_x < FP16_SMALLEST_NORMAL)),
        zero=count(abs_x == 0),
        nan=count(nan),
    )


def range_stats(x: jax.Array, scale: float | jax.Array = 1.0) -> RangeStats:
    """:class:`RangeStats` of ``x * scale`` as scalars (jittable; see :func:`segment_range_stats`)."""
    return RangeStats(*(field[0] for field in segment_range_stats([x], scale)))


def log2_histogram(arrays: Iterable[jax.Array], scale: float | jax.Array = 1.0) -> jax.Array:
    """int32 counts over :data:`LOG2_BINS` of ``floor(log2 |x * scale|)`` for finite nonzero values."""
    x = concat(arrays) * jnp.asarray(scale, jnp.float32)
    _, exponent = jnp.frexp(x)  # x = m * 2**exponent, 0.5 <= |m| < 1
    index = jnp.clip(exponent - 1 - LOG2_BINS[0], 0, LOG2_BINS.size - 1)
    keep = ((x != 0) & jnp.isfinite(x)).astype(jnp.int32)
    return jnp.bincount(index, weights=keep, length=LOG2_BINS.size).astype(jnp.int32)


def segment_errors(policy: list[jax.Array], reference: list[jax.Array], scale: jax.Array) -> jax.Array:
    """float32 ``[n, 3]``: per array ``m = max |r|``, ``sum((p/scale - r)/m)^2`` and ``sum(r/m)^2``.

    Dividing by ``m`` keeps the float32 sums of squares from underflowing or overflowing.
    """
    segments, num_segments = segment_ids(reference), len(reference)
    reference_x, policy_x = concat(reference), concat(policy) / scale
    peak = jax.ops.segment_max(jnp.abs(reference_x), segments, num_segments, indices_are_sorted=True)
    peak = jnp.maximum(peak, jnp.finfo(jnp.float32).tiny)
    difference, normalised = (policy_x - reference_x) / peak[segments], reference_x / peak[segments]

    def total(x):
        return jax.ops.segment_sum(x * x, segments, num_segments, indices_are_sorted=True)

    return jnp.stack([peak, total(difference), total(normalised)], axis=1)
