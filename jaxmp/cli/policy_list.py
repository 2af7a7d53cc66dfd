"""The one grammar for a list of policies on a command line (``--policies`` of compare and evaluate).

Entries are separate arguments (``--policies fp32 bf16 "params=float32,compute=float16"``; quote
those with ``;`` for the shell). Each entry is

* a preset or policy string: ``bf16``, ``params=float32,compute=float16``, ``bf16;.*attn.*:compute=float32``;
* a comma-separated list of presets: ``fp32,bf16,fp16`` (an entry without ``=``);
* ``POLICY@LOSS_SCALE``, trained with that loss scale: ``fp16@static:1024``;
* ``NAME-noscale``, short for ``NAME@none``: ``fp16-noscale`` is fp16 without loss scaling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxmp.errors import UsageError
from jaxmp.precision import get_policy
from jaxmp.scaling import make_loss_scale

__all__ = ["PolicyEntry", "parse_policy_list", "POLICY_LIST_HELP"]

POLICY_LIST_HELP = (
    "space-separated policies: presets (a comma list of them works too), policy strings, "
    "POLICY@LOSS_SCALE, NAME-noscale"
)


@dataclasses.dataclass(frozen=True)
class PolicyEntry:
    """One entry of a policy list.

    Attributes:
      name: the entry as listed (``fp16-noscale``).
      policy: the policy string (``fp16``).
      loss_scale: the loss scale the entry names (``none``); None when it names none.
    """

    name: str
    policy: str
    loss_scale: str | None


def parse_policy_list(entries: Sequence[str], flag: str = "--policies") -> list[PolicyEntry]:
    """Parses and checks the entries of a policy list (see the module docstring).

    Raises:
      UsageError: naming ``flag``: an empty list or entry, an unknown policy or loss scale, or an
        entry listed twice.
    """
    names = [
        part.strip() for entry in entries for part in (entry.split(",") if "=" not in entry else [entry])
    ]
    if not names or not all(names):
        raise UsageError(f"{flag} has an empty entry; list policies such as fp32 bf16 fp16 fp16-noscale")
    parsed = []
    for name in names:
        policy, at, loss_scale = name.rpartition("@") if "@" in name else (name, "", None)
        if not at and policy.endswith("-noscale"):
            policy, loss_scale = policy.removesuffix("-noscale"), "none"
        try:
            resolved = get_policy(policy)
            if loss_scale is not None:
                make_loss_scale(loss_scale, resolved)
        except ValueError as error:
            raise UsageError(f"{flag} entry {name!r}: {error}") from None
        parsed.append(PolicyEntry(name, policy, loss_scale))
    if len(set(names)) < len(names):
        raise UsageError(f"{flag} lists a policy twice: {' '.join(names)}")
    return parsed
