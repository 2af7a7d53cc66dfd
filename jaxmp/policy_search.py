"""The cheapest per-unit precision assignment within a loss budget, written as one policy string.

A *unit* is a module path prefix (``blocks_2/mlp``: the module and everything under it) whose
compute dtype the search may lower. :func:`choose` picks, for each unit, float32 or one candidate
dtype; :func:`policy_string` writes the choice as a policy whose overrides match exactly the chosen
units, and :func:`check_assignment` resolves it again to prove it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

from jaxmp.precision import FP32_ISLANDS, dtype_name, get_policy, parse_dtype

__all__ = ["Option", "choose", "policy_string", "check_assignment", "units_of", "candidate_name", "FP8"]

# The fp8 candidate: bf16 compute with fp8 matmuls, scaled per tensor at every call (current
# scaling: it needs no train state, so any model and any training loop can verify it).
FP8 = "fp8"
_ASSIGNMENTS = {FP8: "compute=bfloat16,matmul=fp8-current"}


def candidate_name(text: str) -> str:
    """The canonical name of a candidate: a dtype name (``bf16`` -> ``bfloat16``) or ``fp8``;
    ``ValueError`` for anything else."""
    return FP8 if text.strip().lower() == FP8 else dtype_name(parse_dtype(text))


@dataclasses.dataclass(frozen=True)
class Option:
    """Lowering one unit to one dtype.

    Attributes:
      unit: the module path prefix, e.g. ``blocks_2/mlp``.
      dtype: the candidate: a compute dtype's name (``bfloat16``, ``float16``) or ``fp8`` (bf16
        compute, fp8 matmuls).
      loss_increase: predicted validation loss increase (float32 as reference; inf: it breaks).
      saving: what the objective gains (seconds or bytes per step); > 0 to be worth choosing.
      overflow: fraction of the unit's float32 activations beyond the dtype's range (float16:
        65504); any makes the option unusable, whatever the loss says.
    """

    unit: str
    dtype: str
    loss_increase: float
    saving: float
    overflow: float = 0.0


def units_of(module_paths: Sequence[str], depth: int) -> list[str]:
    """The distinct ``depth``-component prefixes of ``module_paths`` that are not fp32 islands (norms,
    softmax, logits stay float32 whatever the search says), in first-seen order."""
    units: dict[str, None] = {}
    for path in module_paths:
        if not path:
            continue
        unit = "/".join(path.split("/")[:depth])
        if not FP32_ISLANDS.fullmatch(unit):
            units.setdefault(unit, None)
    return list(units)


def choose(options: Sequence[Option], budget: float) -> dict[str, str]:
    """``{unit: dtype}`` for the units to lower; the others stay float32.

    A multiple-choice knapsack (at most one candidate per unit, predicted loss increases summed within
    ``budget``; an increase below zero is noise and counts as zero), solved greedily by moves: from
    every unit's current choice (float32: no cost, no saving) to one of its options that saves more,
    take the move with the most saving per unit of *added* loss increase that still fits (a move that
    adds none goes first, largest saving first), and repeat until no move fits. Moving a unit again
    lets it trade a cheap small saving for a larger one when the budget allows. With a few dozen units
    and increases that are small and roughly additive, this is what an exact solver would give up to
    the noise of the measurements themselves; the verification run that follows is the real check.
    """
    usable = [o for o in options if o.saving > 0 and math.isfinite(o.loss_increase) and o.overflow == 0]
    chosen: dict[str, Option] = {}
    left = budget
    while True:
        best, best_key = None, None
        for option in usable:
            current = chosen.get(option.unit)
            saved, spent = (current.saving, max(current.loss_increase, 0.0)) if current else (0.0, 0.0)
            gain, cost = option.saving - saved, max(option.loss_increase, 0.0) - spent
            if gain <= 0 or cost > left:
                continue
            key = (math.inf if cost <= 0 else gain / cost, gain)
            if best_key is None or key > best_key:
                best, best_key = option, key
        if best is None:
            return {unit: option.dtype for unit, option in chosen.items()}
        current = chosen.get(best.unit)
        left -= max(best.loss_increase, 0.0) - (max(current.loss_increase, 0.0) if current else 0.0)
        chosen[best.unit] = best


def _alternation(units: Sequence[str]) -> str:
    """A regex matching exactly ``units``: units differing only in one number share one pattern
    (``blocks_0/mlp``, ``blocks_2/mlp`` -> ``blocks_(?:0|2)/mlp``)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for unit in units:
        pieces = re.split(r"(\d+)", unit)
        if len(pieces) == 3:  # exactly one number
            groups.setdefault((pieces[0], pieces[2]), []).append(pieces[1])
        else:
            groups.setdefault((unit,), [])
    parts = []
    for key, numbers in groups.items():
        if len(key) == 1:
            parts.append(re.escape(key[0]))
        else:
            numbers = sorted(numbers, key=int)
            numbers_re = numbers[0] if len(numbers) == 1 else f"(?:{'|'.join(numbers)})"
            parts.append(f"{re.escape(key[0])}{numbers_re}{re.escape(key[1])}")
    return parts[0] if len(parts) == 1 else f"(?:{'|'.join(parts)})"


def _under(path: str, unit: str) -> bool:
    return path == unit or path.startswith(unit + "/")


def policy_string(assignment: Mapping[str, str], module_paths: Sequence[str], base: str = "fp32") -> str:
    """``base`` plus one override per lowered dtype whose pattern matches exactly its units and
    everything under them: ``fp32;(?:blocks_(?:0|1)/mlp|lm_head)(?:/.*)?:compute=bfloat16``.

    An override replaces the fp32 island of a path it matches, so the fp32 islands among
    ``module_paths`` under a lowered unit (``blocks_0/attn/softmax``) come first, kept in float32.
    """
    by_dtype: dict[str, list[str]] = {}
    for unit, dtype in assignment.items():
        by_dtype.setdefault(candidate_name(dtype), []).append(unit)
    islands = [p for p in module_paths if FP32_ISLANDS.fullmatch(p) and any(_under(p, u) for u in assignment)]
    overrides = [f"{_alternation(islands)}:compute=float32"] if islands else []
    overrides += [
        f"{_alternation(units)}(?:/.*)?:{_ASSIGNMENTS.get(dtype, f'compute={dtype}')}"
        for dtype, units in sorted(by_dtype.items())
    ]
    return ";".join([base, *overrides])


def check_assignment(spec: str, assignment: Mapping[str, str], module_paths: Sequence[str]) -> None:
    """Raises ``ValueError`` unless ``spec`` gives every module in ``module_paths`` the compute dtype
    ``assignment`` chose for its unit, and float32 to the rest and to every fp32 island."""
    policy = get_policy(spec)
    for path in module_paths:
        unit = next((u for u in assignment if _under(path, u)), None)
        lowered = unit is not None and not FP32_ISLANDS.fullmatch(path)
        wanted = candidate_name(assignment[unit]) if lowered else "float32"
        got = dtype_name(policy.for_module(path).compute_dtype)
        if policy.fp8_recipe(path) is not None:
            got = FP8 if got == "bfloat16" else f"{got} with fp8 matmuls"
        if got != wanted:
            raise ValueError(f"policy {spec!r} gives {path} {got}, not the chosen {wanted}")
