"""Precision policies: one string says what dtype every tensor is stored and computed in.

Grammar (a superset of jmp's)::

    SPEC     := BASE (';' OVERRIDE)*
    BASE     := (PRESET | KEY '=' DTYPE) (',' KEY '=' DTYPE)*
    OVERRIDE := PATTERN ':' KEY '=' DTYPE (',' KEY '=' DTYPE)*
    KEY      := params | p | compute | c | output | o | matmul | m | weights | w | kv | moments
    DTYPE    := float32 | f32 | fp32 | full | bfloat16 | bf16 | float16 | f16 | fp16 | half
                (matmul: compute | fp8 | fp8-current | fp8-delayed[-HISTORY] | int8;
                 weights: param | int8 | fp8;  kv: compute | int8 | fp8 | a float DTYPE;
                 moments: float32 | bfloat16 | int8 | fp8, and their float aliases)
    PRESET   := fp32 | bf16 | fp16 | pure-bf16 | fp8 | fp8-current | auto

Differences from ``jmp.get_policy``:

* ``output`` defaults to **float32** when omitted (jmp makes it follow ``compute``).
  Losses and model outputs stay fp32 unless a user asks otherwise.
* ``half`` always means float16 (jmp picks bfloat16 on TPU).
* Per-module overrides: ``PATTERN`` is a regular expression matched (``re.fullmatch``)
  against a module path such as ``blocks_0/attn/softmax``; the first matching
  override wins, and keys it leaves out keep the base policy's value.
* fp32 islands: when no user override matches, paths that name a normalisation
  (``norm`` anywhere, in any case: ``LayerNorm_0``), an attention softmax (last part ``softmax``) or the final
  logits (last part ``logits``) compute in float32. A user override for such a path
  replaces the island, e.g. ``bf16;.*softmax:compute=bf16``.
* ``matmul=fp8`` runs a module's dense matmuls with fp8 operands (E4M3 forward, E5M2 gradients,
  :mod:`jaxmp.fp8`), accumulating in float32, scaled by a recipe: ``fp8`` is ``fp8-delayed-16``
  (scales from a 16-update amax history, kept in the train state), ``fp8-current`` scales each
  tensor by its own amax (:class:`jaxmp.fp8.Recipe`). The islands, embeddings and output heads stay
  out of fp8 unless an override names their ``matmul``. The ``fp8`` preset is bf16 with fp8 matmuls
  (delayed scaling); ``fp8-current`` the same with current scaling.
* Serving keys (:mod:`jaxmp.quantize`): ``weights=int8`` or ``weights=fp8`` stores a module's dense
  kernels in 8 bits with one float32 scale per output channel (quantised once, when a model is
  loaded for inference); ``param`` (the default) keeps its param dtype. ``kv=int8|fp8`` stores an
  attention layer's KV cache in 8 bits with a float32 scale per token and head, ``kv=bfloat16`` (or
  another float dtype) in that dtype; ``compute`` (the default) in the layer's compute dtype. As for
  fp8 matmuls, the islands, embeddings and output heads keep their weights unless an override names
  them (``int8;.*embed.*:weights=int8``). Training refuses both keys: they describe how a trained
  model is served. ``matmul=int8`` (serving too) runs a module's dense matmuls as int8 x int8 dots
  with int32 accumulation: the activations are quantised per row (token) by their own absmax, the
  kernel per output channel (stored so with ``weights=int8``). A preset may be followed by more
  keys: ``bf16,weights=int8,matmul=int8,kv=int8``.
* ``moments`` is the storage of Adam's moments for the params a module owns (``int8``/``fp8``:
  block-wise quantised, :mod:`jaxmp.moments8`), replacing the optimizer's ``moment_dtype`` for
  them, e.g. ``bf16;.*embed.*:moments=float32`` or, for every module, ``bf16;.*:moments=int8``.
  Vectors (norms, biases) and tensors under 4096 values keep float32 moments even when 8-bit is
  named (:func:`jaxmp.optim.moment_storages`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import jmp
import numpy as np

from jaxmp import hardware
from jaxmp.fp8 import Recipe

__all__ = [
    "Policy",
    "get_policy",
    "auto_policy",
    "parse_dtype",
    "dtype_name",
    "FP32_ISLANDS",
    "FP8_EXCLUDED",
    "WEIGHT_FORMATS",
]

_DTYPE_NAMES: Mapping[str, Any] = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "fp32": jnp.float32,
    "full": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "f16": jnp.float16,
    "fp16": jnp.float16,
    "half": jnp.float16,
}
_KEYS: Mapping[str, str] = {
    "params": "param_dtype",
    "p": "param_dtype",
    "compute": "compute_dtype",
    "c": "compute_dtype",
    "output": "output_dtype",
    "o": "output_dtype",
    "matmul": "matmul",
    "m": "matmul",
    "weights": "weights",
    "w": "weights",
    "kv": "kv",
    "moments": "moments",
}
_CANONICAL_KEY = {
    "param_dtype": "params",
    "compute_dtype": "compute",
    "output_dtype": "output",
    "matmul": "matmul",
    "weights": "weights",
    "kv": "kv",
    "moments": "moments",
}
_FIELDS = ("param_dtype", "compute_dtype", "output_dtype")  # the dtypes, as jmp.Policy holds them
_MODE_FIELDS = ("matmul", "weights", "kv")  # string-valued keys; each has a default that means "as before"
_MODE_DEFAULTS = {"matmul": "compute", "weights": "param", "kv": "compute"}
_ALL_FIELDS = (*_FIELDS, *_MODE_FIELDS, "moments")
WEIGHT_FORMATS = ("param", "int8", "fp8")
MOMENT_STORAGES = ("float32", "bfloat16", "int8", "fp8")  # values of the ``moments`` key
# Module paths that compute in float32 unless a user override matches them first.
FP32_ISLANDS = re.compile(r"(?i:.*norm.*)|(.*/)?softmax|(.*/)?logits")  # Flax names norms LayerNorm_0
# Module paths whose matmuls stay out of fp8, and whose weights out of 8-bit storage, unless a user
# override asks: the islands, embeddings and the output heads.
FP8_EXCLUDED = re.compile(
    FP32_ISLANDS.pattern + r"|(?i:.*embed.*)|(.*/)?(lm_head|head|classifier|pooler)(/.*)?"
)

_PRESETS: Mapping[str, str] = {
    "fp32": "params=float32,compute=float32,output=float32",
    "bf16": "params=float32,compute=bfloat16,output=float32",
    "fp16": "params=float32,compute=float16,output=float32",
    "pure-bf16": "params=bfloat16,compute=bfloat16,output=float32",
    "fp8": "params=float32,compute=bfloat16,output=float32,matmul=fp8",
    "fp8-current": "params=float32,compute=bfloat16,output=float32,matmul=fp8-current",
}


def _jmp_policy(param_dtype, compute_dtype, output_dtype) -> jmp.Policy:
    # jmp keys its printing tables by jnp scalar types, not numpy dtypes.
    return jmp.Policy(*(jnp.dtype(d).type for d in (param_dtype, compute_dtype, output_dtype)))


def parse_dtype(name: str) -> np.dtype:
    """Returns the numpy dtype for a dtype name of the grammar; ``ValueError`` if unknown."""
    try:
        return np.dtype(_DTYPE_NAMES[name.strip().lower()])
    except KeyError:
        valid = ", ".join(_DTYPE_NAMES)
        raise ValueError(f"unknown dtype {name!r}; valid dtypes: {valid}") from None


def dtype_name(dtype: Any) -> str:
    """Canonical grammar name of a dtype (``float32``, ``bfloat16`` or ``float16``)."""
    return np.dtype(dtype).name


def _parse_mode(field: str, value: str, *, where: str) -> str:
    """The canonical value of a string-valued key: ``matmul`` (``compute`` or an fp8 recipe such as
    ``fp8-delayed-16``), ``weights`` (``WEIGHT_FORMATS``) or ``kv`` (``compute``, ``int8``, ``fp8`` or a
    float dtype's canonical name)."""
    name = value.strip().lower()
    if field == "matmul" and name == "int8":
        return name
    if field == "matmul":
        try:
            recipe = Recipe.parse(name)
        except ValueError:
            raise ValueError(f"unknown matmul {value!r} in {where}; valid: {Recipe.GRAMMAR}, int8") from None
        return "compute" if recipe is None else str(recipe)
    if field == "weights" and name in WEIGHT_FORMATS:
        return name
    if field == "kv" and name in ("compute", "int8", "fp8"):
        return name
    if field == "kv" and name in _DTYPE_NAMES:
        return dtype_name(parse_dtype(name))
    valid = WEIGHT_FORMATS if field == "weights" else ("compute", "int8", "fp8", *_DTYPE_NAMES)
    raise ValueError(f"unknown {field} {value!r} in {where}; valid: {', '.join(valid)}")


def _parse_assignments(text: str, *, where: str) -> dict[str, Any]:
    """Parses ``key=dtype,key=dtype`` into ``{field: value}``: a numpy dtype for params/compute/output,
    a canonical string for the string-valued keys (:func:`_parse_mode`)."""
    if not text.strip():
        raise ValueError(f"empty {where}; expected key=dtype pairs with keys {', '.join(_KEYS)}")
    assignments: dict[str, Any] = {}
    for token in text.split(","):
        if "=" not in token:
            raise ValueError(f"{token.strip()!r} in {where} is not key=dtype; valid keys: {', '.join(_KEYS)}")
        key, value = (part.strip() for part in token.split("=", 1))
        field = _KEYS.get(key.lower())
        if field is None:
            raise ValueError(f"unknown key {key!r} in {where}; valid keys: {', '.join(_KEYS)}")
        if field in assignments:
            raise ValueError(
                f"duplicate key {key!r} in {where}; give each of {', '.join(_CANONICAL_KEY.values())} once"
            )
        if field in _MODE_FIELDS:
            assignments[field] = _parse_mode(field, value, where=where)
        elif field == "moments":
            assignments[field] = _parse_moments(value, where=where)
        else:
            assignments[field] = parse_dtype(value)
    return assignments


def _parse_moments(value: str, *, where: str) -> str:
    """Canonical name (one of ``MOMENT_STORAGES``) of a ``moments`` value."""
    name = value.strip().lower()
    if name not in MOMENT_STORAGES:
        try:
            name = dtype_name(parse_dtype(name))
        except ValueError:
            name = ""
    if name not in MOMENT_STORAGES:
        raise ValueError(f"unknown moments {value!r} in {where}; valid: {', '.join(MOMENT_STORAGES)}")
    return name


@dataclasses.dataclass(frozen=True)
class Policy:
    """An immutable mixed-precision policy with per-module overrides.

    Attributes:
      param_dtype: storage dtype of master parameters (numpy dtype).
      compute_dtype: dtype of activations and matmul inputs.
      output_dtype: dtype of model outputs and losses.
      matmul: how matmuls run: ``compute`` (in the compute dtype) or an fp8 recipe such as
        ``fp8-delayed-16`` or ``fp8-current`` (:class:`jaxmp.fp8.Recipe`).
      weights: how a served model stores dense kernels: ``param`` (the param dtype), ``int8`` or ``fp8``.
      kv: how a served model stores its KV cache: ``compute`` (the attention layer's compute dtype),
        ``int8``, ``fp8`` or a float dtype name.
      moments: storage of Adam's moments (one of ``MOMENT_STORAGES``); None leaves it to the optimizer's
        ``moment_dtype``.
      overrides: ``((pattern, ((field, dtype), ...)), ...)`` in priority order.
    """

    param_dtype: np.dtype = np.dtype(np.float32)
    compute_dtype: np.dtype = np.dtype(np.float32)
    output_dtype: np.dtype = np.dtype(np.float32)
    matmul: str = "compute"
    weights: str = "param"
    kv: str = "compute"
    moments: str | None = None
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    @property
    def base(self) -> jmp.Policy:
        """The policy without overrides, as a ``jmp.Policy``."""
        return _jmp_policy(self.param_dtype, self.compute_dtype, self.output_dtype)

    def for_module(self, path: str) -> jmp.Policy:
        """The ``jmp.Policy`` for the module at ``path`` (e.g. ``"blocks_0/attn/softmax"``)."""
        return self.resolve(path)[0]

    def resolve(self, path: str) -> tuple[jmp.Policy, str]:
        """The ``jmp.Policy`` for the module at ``path`` and the rule that decided it: ``"override N"``
        (the N-th override as written, from 1; the first that matches wins), ``"island"`` (an fp32
        island: compute in float32) or ``"base"``."""
        fields = {name: getattr(self, name) for name in _FIELDS}
        number, assignments = self._override_for(path)
        if number:
            fields.update((field, value) for field, value in assignments.items() if field in _FIELDS)
            return _jmp_policy(**fields), f"override {number}"
        if FP32_ISLANDS.fullmatch(path):
            fields["compute_dtype"] = np.dtype(np.float32)
            return _jmp_policy(**fields), "island"
        return _jmp_policy(**fields), "base"

    def _override_for(self, path: str) -> tuple[int, dict[str, Any]]:
        """The number (from 1) and assignments of the first override matching ``path``; ``(0, {})``
        when none does."""
        for number, (pattern, assignments) in enumerate(self.overrides, start=1):
            if re.fullmatch(pattern, path):
                return number, dict(assignments)
        return 0, {}

    def _mode_for(self, field: str, path: str) -> str:
        """A string-valued key for the module at ``path``: the first matching override's value if it
        names one, else the default for islands, embeddings and output heads (``FP8_EXCLUDED``), else
        the base policy's."""
        named = self._override_for(path)[1].get(field)
        if named is not None:
            return named
        return _MODE_DEFAULTS[field] if FP8_EXCLUDED.fullmatch(path) else getattr(self, field)

    def matmul_for(self, path: str) -> str:
        """How the matmuls of the module at ``path`` run: ``compute`` or an fp8 recipe such as
        ``fp8-delayed-16`` (islands, embeddings and heads: ``compute`` unless an override names them)."""
        return self._mode_for("matmul", path)

    def weights_for(self, path: str) -> str:
        """How the module at ``path`` stores its kernel when served: ``param``, ``int8`` or ``fp8``
        (islands, embeddings and heads: ``param`` unless an override names them)."""
        return self._mode_for("weights", path)

    def kv_dtype(self, path: str) -> np.dtype:
        """Storage dtype of the KV cache of the attention layer at ``path``: its compute dtype for
        ``kv=compute``, ``int8``, ``float8_e4m3fn`` or the named float dtype."""
        kv = self._mode_for("kv", path)
        if kv == "compute":
            return np.dtype(self.for_module(path).compute_dtype)
        return np.dtype({"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}.get(kv, kv))

    @property
    def serving_only(self) -> tuple[str, ...]:
        """The serving keys this policy sets anywhere (``weights``, ``kv``, ``matmul=int8``); training
        refuses them."""
        rules = [tuple((f, getattr(self, f)) for f in _MODE_FIELDS), *(rule for _, rule in self.overrides)]
        named = {
            f"{field}={value}" if field == "matmul" else field
            for rule in rules
            for field, value in rule
            if (field in ("weights", "kv") and value != _MODE_DEFAULTS[field])
            or (field, value) == ("matmul", "int8")
        }
        return tuple(sorted(named))

    def moments_for(self, path: str) -> str | None:
        """Storage of Adam's moments for the params of the module at ``path`` (e.g. ``token_embed``): the
        first matching override's ``moments`` if it names one, else the base's (None: not set)."""
        return self._override_for(path)[1].get("moments", self.moments)

    def fp8_recipe(self, path: str) -> Recipe | None:
        """The fp8 recipe of the module at ``path``'s matmuls; None when they do not run in fp8."""
        matmul = self.matmul_for(path)
        return None if matmul == "int8" else Recipe.parse(matmul)

    @property
    def uses_delayed_fp8(self) -> bool:
        """Whether the base or any override names a delayed-scaling fp8 recipe (the model then has
        scaling state to keep in the train state)."""
        named = [
            self.matmul,
            *(value for _, rule in self.overrides for field, value in rule if field == "matmul"),
        ]
        return any(value.startswith("fp8-delayed") for value in named)

    def sets_output(self, path: str) -> bool:
        """Whether the override that decides ``path`` (if any) names its ``output`` dtype."""
        return "output_dtype" in self._override_for(path)[1]

    @property
    def compute_dtypes(self) -> frozenset[np.dtype]:
        """Every compute dtype this policy can use (base and overrides)."""
        found = {self.compute_dtype}
        for _, assignments in self.overrides:
            found.update(dtype for field, dtype in assignments if field == "compute_dtype")
        return frozenset(found)

    @property
    def uses_float16(self) -> bool:
        """Whether any module stores its params or computes in float16 (base or override): the policy
        then needs loss scaling, and float16's range bounds what its weights and activations may reach."""
        dtypes = {self.compute_dtype, self.param_dtype}
        for _, assignments in self.overrides:
            dtypes.update(dtype for field, dtype in assignments if field in ("compute_dtype", "param_dtype"))
        return np.dtype(np.float16) in dtypes

    def cast_to_param(self, tree):
        """Casts floating-point leaves to ``param_dtype``; integer leaves are left alone."""
        return self.base.cast_to_param(tree)

    def cast_to_compute(self, tree):
        """Casts floating-point leaves to ``compute_dtype``; integer leaves are left alone."""
        return self.base.cast_to_compute(tree)

    def cast_to_output(self, tree):
        """Casts floating-point leaves to ``output_dtype``; integer leaves are left alone."""
        return self.base.cast_to_output(tree)

    def __str__(self) -> str:
        base = ",".join(f"{_CANONICAL_KEY[f]}={dtype_name(getattr(self, f))}" for f in _FIELDS)
        base += "".join(
            f",{f}={getattr(self, f)}" for f in _MODE_FIELDS if getattr(self, f) != _MODE_DEFAULTS[f]
        )
        if self.moments is not None:
            base += f",moments={self.moments}"
        parts = [base]
        for pattern, assignments in self.overrides:
            body = ",".join(
                f"{_CANONICAL_KEY[f]}={d if f in (*_MODE_FIELDS, 'moments') else dtype_name(d)}"
                for f, d in assignments
            )
            parts.append(f"{pattern}:{body}")
        return ";".join(parts)


def _parse_override(text: str) -> tuple[str, tuple[tuple[str, np.dtype], ...]]:
    if ":" not in text:
        raise ValueError(
            f"override {text.strip()!r} has no ':'; write PATTERN:key=dtype, e.g. .*norm.*:compute=float32"
        )
    # The pattern may itself contain ':' (e.g. '(?:...)'), the assignments never do.
    pattern, body = text.rsplit(":", 1)
    pattern = pattern.strip()
    if not pattern:
        raise ValueError(f"override {text.strip()!r} has an empty pattern; write PATTERN:key=dtype")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"bad regular expression {pattern!r} in override ({error}); write a valid Python regex"
        ) from None
    assignments = _parse_assignments(body, where=f"override {text.strip()!r}")
    ordered = tuple((field, assignments[field]) for field in _ALL_FIELDS if field in assignments)
    return pattern, ordered


def _parse_base(text: str) -> dict[str, Any]:
    """The base policy's fields: a preset or key=dtype pairs, a preset optionally followed by more
    pairs that replace the preset's (``bf16,weights=int8``)."""
    text = text.strip()
    head, _, extra = text.partition(",")
    if "=" not in head:
        preset = head.strip().lower()
        if preset == "auto":
            preset = auto_policy()[0]
        if preset not in _PRESETS:
            valid = ", ".join([*_PRESETS, "auto"])
            raise ValueError(
                f"unknown policy {head.strip()!r}; use a preset ({valid}) or key=dtype pairs such as "
                "params=float32,compute=bfloat16"
            )
        fields = _parse_assignments(_PRESETS[preset], where="preset")
        if extra.strip():
            fields.update(_parse_assignments(extra, where=f"policy {text!r}"))
        return fields
    fields = _parse_assignments(text, where="policy")
    fields.setdefault("param_dtype", np.dtype(np.float32))
    fields.setdefault("compute_dtype", fields["param_dtype"])
    fields.setdefault("output_dtype", np.dtype(np.float32))
    return fields


def get_policy(spec: str | Policy) -> Policy:
    """Parses a policy string (see the module docstring); returns a ``Policy`` as is.

    Raises:
      ValueError: naming the offending token and what would be valid.
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty policy; use a preset (fp32, bf16, fp16, pure-bf16, auto) or key=dtype pairs")
    base, *override_texts = spec.split(";")
    fields = _parse_base(base)
    overrides = tuple(_parse_override(text) for text in override_texts)
    return Policy(**fields, overrides=overrides)


def auto_policy(devices: list | None = None) -> tuple[str, str]:
    """Chooses a preset for the hardware; returns ``(preset, reason)``.

    bf16 where it is fast (TPU, NVIDIA compute capability >= 8.0, CPUs with AMX-BF16),
    fp16 (with dynamic loss scaling) on older NVIDIA GPUs, fp32 otherwise. A CPU with
    AVX512-BF16 but no AMX gets fp32: XLA's bf16 dots run slower than its fp32 dots
    there (81 against 134 GFLOP/s, BENCHMARKS.md), so bf16 would cost time and precision.
    """
    device = (devices or jax.devices())[0]
    if device.platform == "tpu":
        return "bf16", f"{device.device_kind} is a TPU: bfloat16 is native"
    if device.platform == "gpu":
        capability = getattr(device, "compute_capability", None)
        if capability is not None and float(capability) >= 8.0:
            return (
                "bf16",
                f"{device.device_kind} has compute capability {capability} >= 8.0: bfloat16 is native",
            )
        return (
            "fp16",
            f"{device.device_kind} has compute capability {capability} < 8.0: float16 with loss scaling",
        )
    if device.platform == "cpu" and "amx_bf16" in hardware.cpu_flags():
        return "bf16", "the CPU has AMX-BF16 matrix units"
    if device.platform == "cpu" and "avx512_bf16" in hardware.cpu_flags():
        return "fp32", "the CPU has AVX512-BF16 but no AMX: its bfloat16 matmuls are slower than float32"
    return "fp32", f"{device.platform} has no fast reduced-precision matmul"
