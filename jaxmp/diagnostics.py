"""What a precision policy does to one model's activations and gradients, layer by layer.

``diagnose(model, params, policy, batches)`` runs each batch forward and backward twice, in
float32 (the reference) and under the policy, and records for every module output
(``activation``), the gradient of the loss with respect to it (``activation_grad``) and every
parameter gradient (``param_grad``):

* how the float32 values would fare in float16 (:class:`jaxmp.value_stats.RangeStats`): max ``|x|`` and the
  fractions that overflow (``|x| > 65504``), underflow to zero (``0 < |x| < 2**-24``) or land
  in the subnormals (``2**-24 <= |x| < 2**-14``); gradients are multiplied by the loss scale
  first, as training would;
* the same counts for the policy's own values (scaled gradients, before unscaling);
* the relative error ``||policy - fp32|| / ||fp32||`` (gradients unscaled).

Both at loss scale 1 and at the scale the policy's loss scaling would settle on. It also
finds the largest power-of-two static loss scale whose gradients do not overflow, by running
the policy's backward pass at candidate scales.

Module outputs come from ``flax.linen.intercept_methods``: each ``__call__`` output gets a zero
perturbation added, and the gradient with respect to that perturbation is the gradient with
respect to the output. A module called twice is named ``path#1`` for its second call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmp import fp8, models, scaling
from jaxmp.fp8_report import Fp8Tensor, fp8_report
from jaxmp.losses import lm_loss_of
from jaxmp.module_policy import cast_params_per_module, is_jaxmp_model, leaf_path_of, model_forward
from jaxmp.precision import Policy, get_policy
from jaxmp.value_stats import (
    FP16_MAX,
    LOG2_BINS,
    RangeStats,
    concat,
    log2_histogram,
    range_stats,
    segment_errors,
    segment_range_stats,
)

__all__ = [
    "Measured",
    "Entry",
    "Histogram",
    "Diagnosis",
    "diagnose",
    "settled_loss_scale",
    "NEGLIGIBLE_RMS",
]

_MAX_LOG2_SCALE = 64  # the search for a loss scale stays within 2**-24 .. 2**64
_MIN_LOG2_SCALE = -24
# Entries whose fp32 RMS is below this fraction of their kind's RMS rank last among those at risk:
# rounding noise, such as the gradient of an attention key bias (exactly zero in exact arithmetic).
NEGLIGIBLE_RMS = 1e-4


def _flat(tree: Any) -> dict[str, jax.Array]:
    """``{path: leaf}``, paths ``/``-joined (an NNX variable's ``.value`` left out)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {leaf_path_of(path): leaf for path, leaf in leaves}


def _forward_recording(forward: Callable, loss_fn: Callable, params: Any, batch: dict, perturbations: dict):
    """The loss and every Linen module's floating output, each plus its entry of ``perturbations``.

    Outputs inside a lifted transform (``nn.scan``, ``nn.remat``) are not recorded: they cannot leave it.
    """
    outputs: dict[str, jax.Array] = {}
    calls: dict[str, int] = {}
    lifted = [0]  # how many lifted transforms the current call is inside

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name.startswith("<"):  # a lifted transform's wrapper
            lifted[0] += 1
            try:
                return next_fun(*args, **kwargs)
            finally:
                lifted[0] -= 1
        output = next_fun(*args, **kwargs)
        if lifted[0] or context.method_name != "__call__" or isinstance(context.module, nn.Dropout):
            return output
        path = "/".join(context.module.path) or "model"
        calls[path] = calls.get(path, 0) + 1
        name = path if calls[path] == 1 else f"{path}#{calls[path] - 1}"
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(output)
        leaves = [leaf for _, leaf in paths_and_leaves]
        floating = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating)]
        for i in floating:
            key = name if len(floating) == 1 else name + jax.tree_util.keystr(paths_and_leaves[i][0])
            leaves[i] = leaves[i] + perturbations[key] if key in perturbations else leaves[i]
            outputs[key] = leaves[i]
        return jax.tree.unflatten(treedef, leaves)

    with nn.intercept_methods(interceptor):
        out = forward(params, batch["input_ids"])
    return loss_fn(out, batch), outputs


def _probe(forward: Callable, loss_fn: Callable, params: Any, batch: dict, scale: jax.Array):
    """``(outputs, output_grads, param_grads)`` of ``scale * loss``, each a flat ``{name: array}``."""
    shapes = jax.eval_shape(lambda p: _forward_recording(forward, loss_fn, p, batch, {})[1], params)
    zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}

    def scaled_loss(params, perturbations):
        loss, outputs = _forward_recording(forward, loss_fn, params, batch, perturbations)
        return loss.astype(jnp.float32) * scale, outputs

    (param_grads, output_grads), outputs = jax.grad(scaled_loss, argnums=(0, 1), has_aux=True)(params, zeros)
    return outputs, output_grads, _flat(param_grads)


_KINDS = ("activation", "activation_grad", "param_grad")


@jax.jit
def _compare(reference: tuple, policy: tuple, scale: jax.Array):
    """Per kind ``(reference stats, policy stats, error terms)`` over sorted names, and histograms."""
    compared = {}
    for kind, reference_values, policy_values in zip(_KINDS, reference, policy, strict=True):
        names = sorted(reference_values)
        if not names:  # an NNX model has no intercepted module outputs
            continue
        refs, values = [reference_values[n] for n in names], [policy_values[n] for n in names]
        value_scale = jnp.float32(1.0) if kind == "activation" else scale
        compared[kind] = (
            segment_range_stats(refs, value_scale),
            segment_range_stats(values),
            segment_errors(values, refs, value_scale),
        )
    histograms = (log2_histogram(policy[2].values()), log2_histogram(reference[2].values(), scale))
    return compared, histograms


@jax.jit
def _gradient_stats(output_grads: dict, param_grads: dict) -> RangeStats:
    return range_stats(concat([*output_grads.values(), *param_grads.values()]))


@dataclasses.dataclass(frozen=True)
class Measured:
    """One entry at one loss scale.

    Attributes:
      reference: :class:`RangeStats` of the fp32 values (gradients times the loss scale).
      policy: :class:`RangeStats` of the policy's values (gradients scaled, before unscaling).
      relative_error: ``||policy - fp32|| / ||fp32||`` over all batches (gradients unscaled).
      reference_rms: root mean square of the fp32 values (gradients unscaled).
    """

    reference: RangeStats
    policy: RangeStats
    relative_error: float
    reference_rms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference.fractions(),
            "policy": self.policy.fractions(),
            "relative_error": self.relative_error,
            "reference_rms": self.reference_rms,
        }


@dataclasses.dataclass(frozen=True)
class Entry:
    """A module output, the gradient with respect to it, or a parameter's gradient.

    Attributes:
      name: module path (``blocks_0/attn/query``) or parameter path (``blocks_0/attn/query/kernel``).
      kind: ``activation``, ``activation_grad`` or ``param_grad``.
      dtype: what the policy holds the value in (``float16``, ...); for a parameter gradient, the
        compute dtype of the module that owns the parameter, which the gradient passes through.
      at_one: measured at loss scale 1.
      at_scale: measured at :attr:`Diagnosis.loss_scale` (equal to ``at_one`` for activations).
    """

    name: str
    kind: str
    dtype: str
    at_one: Measured
    at_scale: Measured


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Parameter gradients binned by ``floor(log2 |g|)`` over :data:`LOG2_BINS`, at one loss scale.

    Attributes:
      scale: the loss scale the gradients were taken at (values are scaled, not unscaled).
      policy: int64[len(LOG2_BINS)] counts of the policy's finite nonzero gradient values.
      reference: int64[len(LOG2_BINS)] counts of the fp32 gradients times ``scale``.
      policy_zeros: policy gradient values that are exactly zero.
      reference_zeros: fp32 gradient values that are exactly zero.
    """

    scale: float
    policy: np.ndarray
    reference: np.ndarray
    policy_zeros: int
    reference_zeros: int


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` found.

    Attributes:
      policy: the policy string.
      loss_scale_spec: ``auto``, ``none``, ``dynamic`` or ``static:N``.
      loss_scale: the scale that loss scaling settles on for these batches (see :func:`settled_loss_scale`).
      recommended_loss_scale: the largest power of two whose gradients do not overflow; None if
        none in ``2**-24 .. 2**64`` works (e.g. the forward pass already overflows).
      entries: every activation, activation gradient and parameter gradient.
      histograms: parameter-gradient histograms at loss scale 1 and at ``loss_scale`` (at
        ``recommended_loss_scale`` instead when ``loss_scale`` is 1, to show what scaling would do).
      uses_float16: whether the policy stores or computes anything in float16.
      fp8: per fp8 dot and tensor, the fractions that saturate and underflow at their scales, at
        ``loss_scale`` (:mod:`jaxmp.fp8_report`); empty when no dot is fp8.
    """

    policy: str
    loss_scale_spec: str
    loss_scale: float
    recommended_loss_scale: float | None
    entries: list[Entry]
    histograms: tuple[Histogram, Histogram]
    uses_float16: bool
    fp8: list[Fp8Tensor] = dataclasses.field(default_factory=list)

    def at_risk(self, top: int = 10) -> list[Entry]:
        """The ``top`` entries most hurt by the policy.

        With float16 in the policy: the largest fraction of values float16 loses at the settled
        loss scale (overflow plus underflow, counted only for values the policy holds in
        float16), then the subnormal fraction, then the relative error. Otherwise (bf16, fp32):
        the largest relative error. Negligible entries (see :data:`NEGLIGIBLE_RMS`) come last.
        """
        kind_rms = {}
        for kind in {entry.kind for entry in self.entries}:
            of_kind = [entry.at_one for entry in self.entries if entry.kind == kind]
            squares = sum(m.reference_rms**2 * int(m.reference.count) for m in of_kind)
            kind_rms[kind] = math.sqrt(squares / max(sum(int(m.reference.count) for m in of_kind), 1))

        def risk(entry: Entry) -> tuple[float, ...]:
            significant = entry.at_one.reference_rms >= NEGLIGIBLE_RMS * kind_rms[entry.kind]
            error = entry.at_scale.relative_error
            error = math.inf if math.isnan(error) else error
            if not self.uses_float16:
                return (significant, error)
            if entry.dtype != "float16":
                return (significant, 0.0, 0.0, error)
            fractions = entry.at_scale.reference.fractions()
            return (
                significant,
                fractions["overflow"] + fractions["underflow"],
                fractions["subnormal"],
                error,
            )

        return sorted(self.entries, key=risk, reverse=True)[:top]

    def to_json(self, top: int = 10) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "loss_scale_spec": self.loss_scale_spec,
            "loss_scale": self.loss_scale,
            "recommended_loss_scale": self.recommended_loss_scale,
            "at_risk": [f"{e.kind}:{e.name}" for e in self.at_risk(top)],
            "entries": [
                {
                    "name": e.name,
                    "kind": e.kind,
                    "dtype": e.dtype,
                    "at_one": e.at_one.to_json(),
                    "at_scale": e.at_scale.to_json(),
                }
                for e in self.entries
            ],
            "histograms": [
                {
                    "scale": h.scale,
                    "log2_bins": LOG2_BINS.tolist(),
                    "policy": h.policy.tolist(),
                    "reference": h.reference.tolist(),
                    "policy_zeros": h.policy_zeros,
                    "reference_zeros": h.reference_zeros,
                }
                for h in self.histograms
            ],
            "fp8": [tensor.to_json() for tensor in self.fp8],
        }


def settled_loss_scale(loss_scale: scaling.LossScale, recommended: float | None) -> float:
    """The scale ``loss_scale`` uses once it has met these gradients.

    None: 1. Static: its value. Dynamic: its initial scale divided by ``factor`` until it is at
    most ``recommended`` (or reaches ``min_scale``), as its back-off on overflow would.
    """
    if isinstance(loss_scale, scaling.DynamicLossScale):
        scale, floor = float(loss_scale.loss_scale), float(loss_scale.min_scale)
        while scale > floor and (recommended is None or scale > recommended):
            scale = max(scale / float(loss_scale.factor), floor)
        return scale
    return float(loss_scale.loss_scale)


class _Runner:
    """Runs the fp32 and the policy model's forward and backward passes over the batches."""

    def __init__(self, model: Any, params: Any, policy: Policy, batches: list[dict], loss_fn: Callable):
        self.scanned = is_jaxmp_model(model) and model.config.scan_layers
        if is_jaxmp_model(model):
            # Intercepted outputs cannot leave nn.scan or nn.remat: run the same params layer by layer.
            config = dataclasses.replace(model.config, remat=False, scan_layers=False)
            if model.config.scan_layers:
                params = models.unstack_layer_params(params, config.n_layers)
            model = models.create_model(config, "fp32")
        self.model = model
        forward32, forward_p = model_forward(model, "fp32"), model_forward(model, policy)
        self.forward_p = forward_p
        self.probe32 = jax.jit(lambda params, batch, scale: _probe(forward32, loss_fn, params, batch, scale))
        self.probe_p = jax.jit(lambda params, batch, scale: _probe(forward_p, loss_fn, params, batch, scale))
        self.params32 = cast_params_per_module(params, "fp32", to="param")
        self.params_p = cast_params_per_module(params, policy, to="param")
        self.batches = batches
        self.policy = policy
        self.uses_float16 = policy.uses_float16

    def fp8(
        self, loss_fn: Callable, scaling: fp8.DelayedScaling | None, loss_scale: float
    ) -> list[Fp8Tensor]:
        """The policy's fp8 tensors at ``loss_scale``, quantised with a run's delayed ``scaling`` (the
        forward pass uses those scales too, so each layer sees what training fed it) or, without,
        with their own amaxes."""
        if scaling is None:
            return fp8_report(
                self.forward_p, self.params_p, self.policy, self.batches, loss_fn, loss_scale=loss_scale
            )
        if not is_jaxmp_model(self.model):
            raise ValueError("`fp8_scaling` is the state of jaxmp's own layers; this model has none")
        if self.scanned:
            n_layers = self.model.config.n_layers
            scaling = jax.tree.map(
                lambda tree: models.unstack_layer_params(tree, n_layers),
                scaling,
                is_leaf=lambda node: isinstance(node, dict),
            )
        model_p = self.model.clone(policy=self.policy, parent=None)

        def forward(params, input_ids):
            return model_p.apply({"params": params, **scaling.variables(scaling.amax_probe())}, input_ids)

        scales = dict(zip(scaling.dot_names(), np.asarray(scaling.scales()), strict=True))
        return fp8_report(
            forward, self.params_p, self.policy, self.batches, loss_fn, scales=scales, loss_scale=loss_scale
        )

    def gradient_stats(self, scale: float) -> RangeStats:
        """:class:`RangeStats` of all the policy's (scaled) gradients at ``scale``, over every batch."""
        merged = None
        for batch in self.batches:
            _, output_grads, param_grads = self.probe_p(self.params_p, batch, np.float32(scale))
            stats = RangeStats(*jax.device_get(_gradient_stats(output_grads, param_grads)))
            merged = stats if merged is None else merged.merge(stats)
        return merged

    def overflows(self, scale: float) -> bool:
        """Whether a policy gradient is non-finite at ``scale`` (or, without float16, exceeds 65504)."""
        stats = self.gradient_stats(scale)
        return bool(stats.nan) or bool(stats.max_abs == math.inf if self.uses_float16 else stats.overflow)

    def dtypes(self) -> dict[str, str]:
        """``{"kind:name": dtype name}``: what the policy holds each value in (see :class:`Entry`)."""
        shapes = jax.eval_shape(self.probe_p, self.params_p, self.batches[0], np.float32(1.0))
        dtypes = {}
        for kind, values in zip(_KINDS, shapes, strict=True):
            for name, value in values.items():
                module = self.policy.for_module(name.rsplit("/", 1)[0])
                dtypes[f"{kind}:{name}"] = np.dtype(
                    module.compute_dtype if kind == "param_grad" else value.dtype
                ).name
        return dtypes

    def measure(self, scale: float) -> tuple[dict[str, tuple], Histogram]:
        """``{"kind:name": (reference stats, policy stats, float64 [sum (p-r)^2, sum r^2])}`` and histograms."""
        merged: dict[str, tuple] = {}
        counts = np.zeros((2, LOG2_BINS.size), np.int64)
        for batch in self.batches:
            reference = self.probe32(self.params32, batch, np.float32(1.0))
            policy = self.probe_p(self.params_p, batch, np.float32(scale))
            compared, histograms = jax.device_get(_compare(reference, policy, np.float32(scale)))
            counts += np.asarray(histograms, np.int64)
            for kind, values in zip(_KINDS, reference, strict=True):
                if kind not in compared:
                    continue
                ref_stats, policy_stats, errors = compared[kind]
                for i, name in enumerate(sorted(values)):
                    m, error, norm = np.asarray(errors[i], np.float64)  # float64: m**2 cannot underflow
                    entry = (
                        RangeStats(*(f[i] for f in ref_stats)),
                        RangeStats(*(f[i] for f in policy_stats)),
                    )
                    sums = m**2 * np.array([error, norm])
                    if f"{kind}:{name}" in merged:
                        old_ref, old_policy, old_sums = merged[f"{kind}:{name}"]
                        entry, sums = (old_ref.merge(entry[0]), old_policy.merge(entry[1])), sums + old_sums
                    merged[f"{kind}:{name}"] = (*entry, sums)
        grads = [stats for key, stats in merged.items() if key.startswith("param_grad:")]
        histogram = Histogram(
            scale=scale,
            policy=counts[0],
            reference=counts[1],
            policy_zeros=sum(int(policy_stats.zero) for _, policy_stats, _ in grads),
            reference_zeros=sum(int(ref_stats.zero) for ref_stats, _, _ in grads),
        )
        return merged, histogram


def _recommend(runner: _Runner) -> float | None:
    """The largest power of two ``2**k`` whose gradients do not overflow (``2**(k+1)``'s do)."""
    peak = float(runner.gradient_stats(1.0).max_abs)
    k = math.floor(math.log2(FP16_MAX / peak)) if 0 < peak < math.inf else _MAX_LOG2_SCALE
    k = min(max(k, _MIN_LOG2_SCALE), _MAX_LOG2_SCALE)
    while k > _MIN_LOG2_SCALE and runner.overflows(2.0**k):
        k -= 1
    if runner.overflows(2.0**k):
        return None
    while k < _MAX_LOG2_SCALE and not runner.overflows(2.0 ** (k + 1)):
        k += 1
    return 2.0**k


def _measured(result: tuple[RangeStats, RangeStats, np.ndarray]) -> Measured:
    ref, policy_stats, (error_sq, reference_sq) = result
    if not np.isfinite(error_sq):
        relative = math.nan
    elif reference_sq > 0:
        relative = math.sqrt(error_sq / reference_sq)
    else:
        relative = 0.0 if error_sq == 0 else math.inf
    return Measured(ref, policy_stats, relative, math.sqrt(reference_sq / max(int(ref.count), 1)))


def diagnose(
    model: Any,
    params: Any,
    policy: Policy | str,
    batches: list[dict],
    *,
    loss_fn: Callable[[Any, dict], jax.Array] = lm_loss_of,
    loss_scale: str = "auto",
    fp8_scaling: fp8.DelayedScaling | None = None,
) -> Diagnosis:
    """Compares ``policy`` against float32 on ``batches`` (see the module docstring).

    Args:
      model: a jaxmp model (only its ``config`` is used; with ``scan_layers`` or ``remat`` it runs
        unscanned and without remat: same numerics, but overrides naming ``blocks/...`` then do not
        match ``blocks_{i}/...``), or any Flax model: a Linen module (the policy applied per module,
        :mod:`jaxmp.module_policy`; outputs inside ``nn.scan``/``nn.remat`` are not recorded) or an
        NNX module (parameter gradients only: NNX calls cannot be intercepted). It is called as
        ``model(batch["input_ids"])``.
      params: its params (Linen params tree or NNX ``State`` of ``nnx.Param``), ideally float32
        masters (they are cast to each policy's param dtypes).
      policy: the policy to diagnose.
      batches: dicts with ``input_ids`` (and whatever ``loss_fn`` reads), all of one shape.
      loss_fn: ``loss_fn(outputs, batch) -> scalar loss``; default: next-token cross-entropy
        against ``batch["targets"]``.
      loss_scale: ``auto``, ``none``, ``dynamic`` or ``static:N``, as ``loss_scale`` in training.
      fp8_scaling: a run's delayed fp8 scales (``TrainState.fp8``) to quantise with; None: each
        fp8 tensor's own amax (current scaling).

    Returns:
      A :class:`Diagnosis`.
    """
    policy = get_policy(policy)
    runner = _Runner(model, params, policy, batches, loss_fn)
    recommended = _recommend(runner)
    settled = settled_loss_scale(scaling.make_loss_scale(loss_scale, policy), recommended)
    at_one, histogram_one = runner.measure(1.0)
    at_scale, histogram_scale = runner.measure(settled) if settled != 1.0 else (at_one, histogram_one)
    if settled == 1.0 and recommended not in (None, 1.0):
        histogram_scale = runner.measure(recommended)[1]
    dtypes, entries = runner.dtypes(), []
    for key in at_one:
        kind, name = key.split(":", 1)
        entries.append(Entry(name, kind, dtypes[key], _measured(at_one[key]), _measured(at_scale[key])))
    return Diagnosis(
        policy=str(policy),
        loss_scale_spec=loss_scale,
        loss_scale=settled,
        recommended_loss_scale=recommended,
        entries=entries,
        histograms=(histogram_one, histogram_scale),
        uses_float16=runner.uses_float16,
        fp8=runner.fp8(loss_fn, fp8_scaling, settled),
    )
