"""Decoding's matmuls on the CPU: a few rows times weights read as stored, on every core.

XLA:CPU multiplies the one row of a batch-1 decoding step in a single-threaded loop, and it converts
8-bit and 16-bit weights into float32 copies before a dot (kept for the whole decode loop). So
decoding read 4-byte weights on one core whatever the weights' dtype. :func:`matvec` is a custom call
(``jaxmp/kernels/matvec.cc``, an XLA FFI handler) that reads float32, bfloat16, float16, int8 and
float8_e4m3fn weights in place, converts them in registers, accumulates in float32 and splits the
columns over XLA's intra-op threads. Products of a compute-dtype row and a weight already in that dtype
(or an 8-bit weight, exact in any float dtype) are the same as XLA's dot up to summation order.

The kernel is compiled once per machine on first use (``c++ -O3 -march=native``, about ten seconds) into
``$JAXMP_CACHE_DIR`` (default ``~/.cache/jaxmp``), keyed on its source, jaxlib's version and the CPU's
flags. Without a C++ compiler, or with ``JAXMP_CPU_MATVEC=0``, :func:`usable` is False and callers keep
XLA's dot (one warning says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp import hardware

__all__ = ["MAX_LOOKUP_IDS", "MAX_ROWS", "matvec", "supports", "take_rows", "usable"]

# Rows of x per call: the kernel reads w once per 4 rows. Float weights take XLA's dot beyond one pass;
# 8-bit weights up to a prompt's length (XLA's dot would first convert the whole weight to float32).
MAX_ROWS = {1: 64, 2: 4, 4: 4}  # by the weight's bytes per value
# Ids per lookup for take_rows: decoding steps and prompts. A training batch keeps XLA's gather, which
# a mesh can shard (a custom call is run on whole, replicated operands).
MAX_LOOKUP_IDS = 256
_TARGET, _TAKE_ROWS_TARGET = "jaxmp_matvec", "jaxmp_take_rows"
_SOURCE = Path(__file__).parent / "kernels" / "matvec.cc"
_ENV = "JAXMP_CPU_MATVEC"
_WEIGHT_DTYPES = frozenset(
    map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.float8_e4m3fn))
)


def supports(rows: int, weight_dtype: jnp.dtype) -> bool:
    """Whether :func:`matvec` takes ``rows`` rows against weights of ``weight_dtype`` on this process."""
    dtype = jnp.dtype(weight_dtype)
    return dtype in _WEIGHT_DTYPES and 1 <= rows <= MAX_ROWS[dtype.itemsize] and usable()


def usable() -> bool:
    """True on the CPU backend once the kernel is compiled and registered (compiling it on first call)."""
    if os.environ.get(_ENV) == "0" or jax.default_backend() != "cpu":
        return False
    return _registered()


@functools.cache
def _registered() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(_compiled_library()))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"jaxmp's CPU decoding kernel is not available ({detail.strip().splitlines()[-1]}); "
            "decoding uses XLA's dot",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.JaxmpMatvec), platform="cpu")
    jax.ffi.register_ffi_target(_TAKE_ROWS_TARGET, jax.ffi.pycapsule(library.JaxmpTakeRows), platform="cpu")
    return True


def _compiled_library() -> Path:
    """The shared library for this source, jaxlib and CPU, compiled if the cache does not have it."""
    compiler = os.environ.get("CXX", "c++")
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
    command += ["-isystem", jax.ffi.include_dir()]
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jax.lib.__version__, " ".join(command), platform.machine()):
        key.update(part if isinstance(part, bytes) else part.encode())
    key.update(" ".join(sorted(hardware.cpu_flags())).encode())
    cache = Path(os.environ.get("JAXMP_CACHE_DIR", Path.home() / ".cache" / "jaxmp"))
    library = cache / f"matvec-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: processes compiling at once each write their own file.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        subprocess.run([*command, str(_SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, library)
    return library


def _reference(x_MxK: jax.Array, w: jax.Array, scale_N: jax.Array, w_contract_axis: int) -> jax.Array:
    """What :func:`matvec` computes, as XLA dots (its gradient)."""
    dims = (((1,), (w_contract_axis,)), ((), ()))
    y_MxN = jax.lax.dot_general(x_MxK, w.astype(jnp.float32), dims, preferred_element_type=jnp.float32)
    return y_MxN * scale_N[None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matvec(x_MxK: jax.Array, w: jax.Array, scale_N: jax.Array, w_contract_axis: int = 0) -> jax.Array:
    """float32 ``[M, N]``: ``(x @ w) * scale``, ``w`` read in its stored dtype (once per 4 rows of ``x``).

    Args:
      x_MxK: float32 rows (a compute-dtype row converted exactly).
      w: ``[K, N]`` (``w_contract_axis=0``, a Dense kernel) or ``[N, K]`` (``1``, a tied embedding
        table) in float32, bfloat16, float16, int8 or float8_e4m3fn.
      scale_N: float32 per-output-column scales (ones for float weights).
      w_contract_axis: which axis of ``w`` is contracted with ``x``'s last.

    Differentiable (the backward pass is XLA's), though it exists for decoding. Call only where
    :func:`supports` says so.
    """
    return _forward(x_MxK, w, scale_N, w_contract_axis)[0]


def _require_kernel() -> None:
    if not _registered():
        raise RuntimeError(
            "jaxmp's CPU decoding kernel could not be compiled (see the warning); ask `usable()` first"
        )


def _forward(x_MxK, w, scale_N, w_contract_axis):
    _require_kernel()
    columns = w.shape[1 - w_contract_axis]
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x_MxK.shape[0], columns), jnp.float32))
    y_MxN = call(x_MxK, w, scale_N, w_is_n_by_k=np.bool_(w_contract_axis == 1))
    return y_MxN, (x_MxK, w, scale_N)


def _backward(w_contract_axis, residuals, cotangent_MxN):
    x_MxK, w, scale_N = residuals
    _, pullback = jax.vjp(lambda x, w, s: _reference(x, w, s, w_contract_axis), x_MxK, w, scale_N)
    return pullback(cotangent_MxN)


matvec.defvjp(_forward, _backward)


@jax.custom_vjp
def take_rows(table_VxD: jax.Array, ids_R: jax.Array) -> jax.Array:
    """``table[ids]``: ``[R, D]`` rows in the table's dtype, copied as stored (ids clamped to ``[0, V)``).

    XLA:CPU gathers a bfloat16/float16 table in float32 and keeps that converted copy of the whole table
    for a decode loop; this reads only the rows asked for. Differentiable in ``table`` (XLA's scatter-add).
    """
    return _take_rows_forward(table_VxD, ids_R)[0]


def _take_rows_forward(table_VxD, ids_R):
    _require_kernel()
    rows_RxD = jax.ShapeDtypeStruct((ids_R.shape[0], table_VxD.shape[1]), table_VxD.dtype)
    return jax.ffi.ffi_call(_TAKE_ROWS_TARGET, rows_RxD)(ids_R.astype(jnp.int32), table_VxD), (
        table_VxD,
        ids_R,
    )


def _take_rows_backward(residuals, cotangent_RxD):
    table_VxD, ids_R = residuals
    _, pullback = jax.vjp(lambda table: jnp.take(table, ids_R, axis=0, mode="clip"), table_VxD)
    return (*pullback(cotangent_RxD), None)


take_rows.defvjp(_take_rows_forward, _take_rows_backward)
