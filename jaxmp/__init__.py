"""jaxmp: mixed-precision training and inference of language models in JAX/Flax."""

import importlib

from jaxmp import lowp, models, sharding
from jaxmp.module_policy import (
    cast_params_per_module,
    check_overrides,
    describe_policy,
    linen_policy,
    nnx_with_policy,
)
from jaxmp.optim import make_optimizer, make_schedule
from jaxmp.precision import Policy, auto_policy, get_policy
from jaxmp.scaling import (
    DynamicLossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    default_loss_scale,
    make_loss_scale,
)
from jaxmp.train_step import TrainState, make_eval_step, make_train_step

__version__ = "0.1.0"

# Imported on first use: ``hf`` pulls in transformers, ``inference`` and ``training`` orbax and the
# tokenizers. The command lines (``jaxmp.cli`` and the ``python -m jaxmp.<verb>`` modules) are never
# imported from here.
_LAZY_MODULES = ("data", "hf", "inference", "training")


def __getattr__(name: str):
    """Imports the lazy submodules on first access (``jaxmp.hf``, ``jaxmp.training``, ...)."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f"jaxmp.{name}")
    raise AttributeError(f"module 'jaxmp' has no attribute {name!r}")


__all__ = [
    "data",
    "hf",
    "inference",
    "training",
    "lowp",
    "models",
    "sharding",
    "Policy",
    "get_policy",
    "auto_policy",
    "DynamicLossScale",
    "NoOpLossScale",
    "StaticLossScale",
    "all_finite",
    "default_loss_scale",
    "make_loss_scale",
    "make_optimizer",
    "make_schedule",
    "TrainState",
    "make_train_step",
    "make_eval_step",
    "linen_policy",
    "nnx_with_policy",
    "cast_params_per_module",
    "describe_policy",
    "check_overrides",
]
