"""One policy string for any Flax model: per-module dtypes for Linen and NNX models jaxmp did not write.

jaxmp's own layers read the policy at their scope path. A model built from Flax's layers
(``nn.Dense``, ``nn.LayerNorm``, ``nn.MultiHeadDotProductAttention``, ``nnx.Linear``, ...) gets the
same rules from outside, without a change to its code:

* **params**: each floating param is cast to the compute dtype of the module that owns it, found
  by its path in the params tree (:func:`cast_params_per_module`); gradients still arrive w.r.t.
  the master params, in their dtype.
* **Linen** (:func:`linen_policy`): every module call is intercepted (``nn.intercept_methods``);
  its floating inputs are cast to the module's compute dtype and its floating outputs to the same
  (to the module's output dtype when an override names ``output``; the model's own outputs to
  the policy's output dtype, float32 by default). Flax's layers then compute in that dtype: with
  their ``dtype=None`` default they compute in the dtype of their inputs and params. Works under
  ``nn.scan``, ``nn.remat``, ``nn.vmap`` and for a module called more than once. Where the policy's
  ``matmul`` is fp8, Flax layers that take a ``dot_general`` (``nn.Dense``, ``nn.DenseGeneral``,
  ``nn.Einsum``) run :func:`jaxmp.fp8.fp8_dot_general` for that call (current scaling).
* **NNX** (:func:`nnx_with_policy`): a copy of the model whose layers' ``dtype`` attribute is set
  per path, which is what NNX layers compute in (they promote inputs and params to it).

A layer given an explicit ``dtype`` in the model's code keeps it for what it computes. Paths are
``/``-joined module names, as :meth:`jaxmp.Policy.for_module` expects: ``blocks_0/attn/query``
(Linen), ``blocks/0/attn/query`` (NNX). :func:`describe_policy` lists what each module gets and
why; :func:`check_overrides` refuses an override that matches no module.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
from flax import nnx

from jaxmp import fp8
from jaxmp.precision import Policy, dtype_name, get_policy

__all__ = [
    "cast_params_per_module",
    "linen_policy",
    "nnx_with_policy",
    "describe_policy",
    "check_overrides",
    "PolicyTable",
    "ModuleRow",
    "module_paths",
    "resolve_subpath",
    "model_forward",
    "leaf_path_of",
    "module_path_of",
    "is_jaxmp_model",
]

# How deep the current Linen call is inside intercepted module calls (0: the model itself).
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("jaxmp_module_policy_depth", default=0)
# While describe_policy traces a model: path -> kind of every module and sub-path resolved.
_SEEN: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "jaxmp_seen_paths", default=None
)


def resolve_subpath(policy: Policy, path: str, kind: str) -> jmp.Policy:
    """``policy.for_module(path)`` for a computation inside a module that is no module itself (jaxmp's
    attention softmax ``<attn>/softmax``, logits accumulator ``<head>/logits``): overrides and
    islands reach it by that path, and :func:`describe_policy` lists it as ``kind``."""
    seen = _SEEN.get()
    if seen is not None:
        seen.setdefault(path, kind)
    return policy.for_module(path)


def _is_float(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating array leaves cast to ``dtype`` (integers, bools, others unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, tree)


def _key_name(key: Any) -> str | None:
    """A key-path entry as a path component; None for an NNX variable's ``.value`` attribute."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_path_of(key_path: Sequence[Any]) -> str:
    """The ``/``-joined path of a leaf at ``key_path`` (from ``tree_flatten_with_path``), NNX's
    ``.value`` left out: ``blocks/0/attention/query/kernel``."""
    return "/".join(name for name in map(_key_name, key_path) if name is not None)


def module_path_of(key_path: Sequence[Any]) -> str:
    """The path of the module that owns the param at ``key_path`` (from ``tree_flatten_with_path``).

    The last component (the param's name) is dropped, and so is a leading ``params`` (the Linen
    collection, when the whole variables dict is passed) and NNX's ``.value``.
    """
    names = leaf_path_of(key_path).split("/")
    return "/".join(names[1:-1] if names[0] == "params" else names[:-1])


def cast_params_per_module(params: Any, policy: Policy | str, to: str = "compute") -> Any:
    """Casts each floating param to the ``compute`` (or ``param``) dtype of the module that owns it.

    Args:
      params: a Linen params tree (``variables["params"]`` or ``variables``) or an NNX ``State``.
      policy: the policy; each leaf's module path (:func:`module_path_of`) is resolved with
        :meth:`jaxmp.Policy.for_module`.
      to: ``"compute"`` (before the forward pass) or ``"param"`` (storing master params).

    Returns:
      The same tree, floating leaves cast; integer leaves unchanged.
    """
    policy = get_policy(policy)
    if to not in ("compute", "param"):
        raise ValueError(f"`to` must be 'compute' or 'param', got {to!r}")

    def cast(key_path, leaf):
        if not _is_float(leaf):
            return leaf
        module = policy.for_module(module_path_of(key_path))
        return leaf.astype(module.compute_dtype if to == "compute" else module.param_dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def _linen_path(module: nn.Module) -> str:
    return "/".join(module.path) if module.scope is not None else ""


def _takes_dot_general(module: nn.Module) -> bool:
    """A Flax layer whose matmul is its ``dot_general`` attribute, not set through ``dot_general_cls``."""
    return hasattr(module, "dot_general") and getattr(module, "dot_general_cls", None) is None


@contextlib.contextmanager
def _dot_general_swapped(module: nn.Module, dot_general: Callable) -> Iterator[None]:
    """``module.dot_general`` is ``dot_general`` within the block. Linen modules are frozen dataclasses
    and an interceptor gets the bound instance, not a way to rebuild it: setting the field on that
    instance for the one call (and restoring it) is the hook Flax leaves."""
    original = module.dot_general
    object.__setattr__(module, "dot_general", dot_general)
    try:
        yield
    finally:
        object.__setattr__(module, "dot_general", original)


@contextlib.contextmanager
def linen_policy(policy: Policy | str) -> Iterator[None]:
    """Within the block, every Linen module call follows ``policy`` at its path (see the module
    docstring). Apply it around ``model.apply``; params are cast by :func:`cast_params_per_module`.

    Example::

        with jaxmp.linen_policy("bf16;.*attention.*:compute=float32"):
            logits = model.apply({"params": jaxmp.cast_params_per_module(params, policy)}, ids)
    """
    policy = get_policy(policy)

    def intercept(next_fun, args, kwargs, context):
        depth = _DEPTH.get()
        if context.method_name.startswith("<"):  # a lifted transform's wrapper (nn.remat, nn.scan)
            return next_fun(*args, **kwargs)
        path = _linen_path(context.module)
        module = policy.for_module(path)
        args, kwargs = _cast_floats((args, kwargs), module.compute_dtype)
        fp8_layer = _takes_dot_general(context.module) and policy.fp8_recipe(path) is not None
        token = _DEPTH.set(depth + 1)
        try:
            with (
                _dot_general_swapped(context.module, fp8.fp8_dot_general)
                if fp8_layer
                else contextlib.nullcontext()
            ):
                outputs = next_fun(*args, **kwargs)
        finally:
            _DEPTH.reset(token)
        if depth == 0 or policy.sets_output(path):
            return _cast_floats(outputs, module.output_dtype)
        return _cast_floats(outputs, module.compute_dtype)

    with nn.intercept_methods(intercept):
        yield


def nnx_with_policy(model: nnx.Module, policy: Policy | str) -> nnx.Module:
    """A copy of ``model`` whose every layer with a ``dtype`` attribute computes in the compute dtype
    ``policy`` gives its path, and whose layers with a ``dot_general`` (``nnx.Linear``,
    ``nnx.LinearGeneral``, ...) run fp8 dots where the policy's ``matmul`` is an fp8 recipe
    (:func:`jaxmp.fp8.fp8_dot_general`). These dots scale each tensor by its own amax (current
    scaling) whatever the recipe: delayed scaling needs the scaling state that only jaxmp's own
    layers carry. Params are shared in value, not changed; cast them per
    module in the loss (``make_train_step(..., cast_params="per_module")``)."""
    policy = get_policy(policy)
    copy = nnx.clone(model)
    for path, module in nnx.iter_modules(copy):
        if hasattr(module, "dtype"):
            module.dtype = policy.for_module(_nnx_path(path)).compute_dtype
        if hasattr(module, "dot_general") and policy.fp8_recipe(_nnx_path(path)) is not None:
            module.dot_general = fp8.fp8_dot_general
    return copy


def _nnx_path(path: Sequence[Any]) -> str:
    return "/".join(str(part) for part in path)


def is_jaxmp_model(model: Any) -> bool:
    """Whether ``model`` is one of jaxmp's own models, whose layers read the policy themselves."""
    return isinstance(model, nn.Module) and isinstance(getattr(model, "policy", None), Policy)


def model_forward(model: nn.Module | nnx.Module, policy: Policy | str) -> Callable[..., Any]:
    """``forward(params, *args)``: ``model`` called on ``args`` under ``policy``, from master params.

    ``params`` are the model's master params (a Linen params tree, or an NNX ``State`` of its
    ``nnx.Param``s); the forward pass sees each cast to its module's compute dtype. jaxmp's models
    are rebuilt with ``policy`` (their layers cast themselves); a user's Linen model runs under
    :func:`linen_policy`; an NNX model's layers get their dtypes from :func:`nnx_with_policy`.
    Differentiable w.r.t. ``params``.
    """
    policy = get_policy(policy)
    if is_jaxmp_model(model):
        rebuilt = model.clone(policy=policy, parent=None)
        return lambda params, *args: rebuilt.apply({"params": params}, *args)
    if isinstance(model, nnx.Module):
        graphdef, _, rest = nnx.split(nnx_with_policy(model, policy), nnx.Param, ...)
        return lambda params, *args: nnx.merge(graphdef, cast_params_per_module(params, policy), rest)(*args)

    def forward(params, *args):
        with linen_policy(policy):
            return model.apply({"params": cast_params_per_module(params, policy)}, *args)

    return forward


# --------------------------------------------------------------------------------------- description


@dataclasses.dataclass(frozen=True)
class ModuleRow:
    """What one module gets. Dtypes are names (``float32``); ``matmul`` is ``compute`` or an fp8 recipe
    (``fp8-delayed-16``) for layers whose matmuls can run in fp8 (jaxmp's ``Dense``, Flax's
    ``nn.Dense``, NNX's ``Linear``...; see :meth:`jaxmp.Policy.matmul_for`), ``—`` for others; ``rule`` is ``base``,
    ``island`` or ``override N``; ``kind`` is the module's class name."""

    path: str
    kind: str
    params: str
    compute: str
    output: str
    rule: str
    matmul: str = "—"
    weights: str = "—"


@dataclasses.dataclass(frozen=True)
class PolicyTable:
    """:func:`describe_policy`'s result: one row per module, in call (or graph) order."""

    policy: str
    rows: tuple[ModuleRow, ...]

    def __str__(self) -> str:
        # the matmul and weights columns only when they say something
        matmul = any(row.matmul not in ("compute", "—") for row in self.rows)
        weights = any(row.weights not in ("param", "—") for row in self.rows)
        header = ("module", "type", "params", "compute", "output")
        header += ("matmul",) * matmul + ("weights",) * weights + ("rule",)
        cells = [header] + [
            ((row.path or "(model)"), row.kind, row.params, row.compute, row.output)
            + (row.matmul,) * matmul
            + (row.weights,) * weights
            + (row.rule,)
            for row in self.rows
        ]
        widths = [max(len(cell[i]) for cell in cells) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(cell_row, widths, strict=True)).rstrip()
                 for cell_row in cells]  # fmt: skip
        return "\n".join([f"policy {self.policy}", *lines])


def _row(policy: Policy, path: str, kind: str, fp8_capable: bool) -> ModuleRow:
    module, rule = policy.resolve(path)
    output = module.output_dtype if (path == "" or policy.sets_output(path)) else module.compute_dtype
    return ModuleRow(
        path,
        kind,
        dtype_name(module.param_dtype),
        dtype_name(module.compute_dtype),
        dtype_name(output),
        rule,
        policy.matmul_for(path) if fp8_capable else "—",
        policy.weights_for(path) if fp8_capable or kind in ("Embed", "LogitsHead") else "—",
    )


def _linen_modules(model: nn.Module, example_args: Sequence[Any]) -> list[tuple[str, str]]:
    """``(path, class name)`` of every module ``model.init`` calls, first call first (traced, not run)."""
    return _trace_linen(model, example_args)[0]


def _trace_linen(model: nn.Module, example_args: Sequence[Any]) -> tuple[list[tuple[str, str]], set[str]]:
    """:func:`_linen_modules`, and the paths of the layers that take a ``dot_general``."""
    seen: dict[str, str] = {}
    takes_dot_general: set[str] = set()

    def record(next_fun, args, kwargs, context):
        if not context.method_name.startswith("<"):
            path = _linen_path(context.module)
            seen.setdefault(path, type(context.module).__name__)
            if _takes_dot_general(context.module):
                takes_dot_general.add(path)
        return next_fun(*args, **kwargs)

    token = _SEEN.set(seen)
    try:
        with nn.intercept_methods(record):
            jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args))
    finally:
        _SEEN.reset(token)
    return list(seen.items()), takes_dot_general


def _nnx_modules(model: nnx.Module) -> list[tuple[str, str]]:
    return [(_nnx_path(path), type(module).__name__) for path, module in nnx.iter_modules(model)]


def module_paths(model: nn.Module | nnx.Module, *example_args: Any) -> list[tuple[str, str]]:
    """``(path, class name)`` of every module of ``model`` (Linen: those a call with ``example_args``
    reaches; NNX: the module graph)."""
    if isinstance(model, nnx.Module):
        return _nnx_modules(model)
    if not example_args:
        raise ValueError(
            "a Linen model needs example arguments (e.g. a batch of token ids) to find its modules"
        )
    return _linen_modules(model, example_args)


def describe_policy(model: nn.Module | nnx.Module, policy: Policy | str, *example_args: Any) -> PolicyTable:
    """One row per module of ``model``: its path, params / compute / output dtype under ``policy``
    and the rule that decided them. ``print`` it for a table.

    Args:
      model: a Linen module (jaxmp's or a user's) or an NNX module.
      policy: the policy.
      example_args: for a Linen model, arguments of one call (traced with ``jax.eval_shape``,
        nothing is computed); unused for NNX.

    Raises:
      ValueError: an override that matches no module (see :func:`check_overrides`).
    """
    policy = get_policy(policy)
    # The layers whose matmuls can run in fp8: jaxmp's Dense; Flax's layers that take a dot_general.
    if isinstance(model, nnx.Module):
        modules = _nnx_modules(model)
        fp8_paths = {
            _nnx_path(path) for path, module in nnx.iter_modules(model) if hasattr(module, "dot_general")
        }
    else:
        if not example_args:
            module_paths(model)  # raises: a Linen model needs example arguments
        modules, fp8_paths = _trace_linen(model, example_args)
        if is_jaxmp_model(model):
            fp8_paths = {path for path, kind in modules if kind == "Dense"}
    check_overrides(policy, [path for path, _ in modules])
    return PolicyTable(
        str(policy), tuple(_row(policy, path, kind, path in fp8_paths) for path, kind in modules)
    )


def check_overrides(policy: Policy | str, paths: Sequence[str]) -> None:
    """Raises ``ValueError`` for the first override whose pattern matches none of ``paths``, naming
    the pattern and the closest real paths: a typo in a pattern must never be a silent no-op."""
    policy = get_policy(policy)
    for number, (pattern, _) in enumerate(policy.overrides, start=1):
        if not any(re.fullmatch(pattern, path) for path in paths):
            closest = difflib.get_close_matches(pattern, list(paths), n=3, cutoff=0.0)
            raise ValueError(
                f"override {number} pattern {pattern!r} matches no module of the model; "
                f"closest module paths: {', '.join(closest) or '(none)'}"
            )
