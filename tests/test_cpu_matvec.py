"""The CPU decoding kernel: exact against float64 products, read as stored inside a model, and optional."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxmp import cpu_matvec, models, quantize
from jaxmp.inference.decode import generate
from jaxmp.lowp import tree_bytes
from jaxmp.precision import get_policy

pytestmark = pytest.mark.skipif(not cpu_matvec.usable(), reason="no C++ compiler for jaxmp's CPU kernel")

WEIGHT_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.float8_e4m3fn]


def _weights(rng, shape, dtype):
    values = rng.standard_normal(shape).astype(np.float32)
    if dtype == jnp.int8:
        return jnp.asarray(np.clip(np.round(values * 40), -127, 127).astype(np.int8))
    return jnp.asarray(values).astype(dtype)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("w_contract_axis", [0, 1], ids=["KxN", "NxK"])
def test_rows_times_stored_weights_equal_float64_products(dtype, w_contract_axis):
    rng = np.random.default_rng(0)
    # K and N not multiples of the kernel's blocks (2048 columns, 64 lanes): every tail is exercised
    K, N = 300, 2100
    w = _weights(rng, (K, N) if w_contract_axis == 0 else (N, K), dtype)
    w_KxN = np.asarray(w.astype(jnp.float32), np.float64)  # the stored values, exactly
    w_KxN = w_KxN if w_contract_axis == 0 else w_KxN.T
    scale_N = rng.uniform(0.5, 2.0, N).astype(np.float32)
    for rows in (1, 2, 3, 4, 5, 9):  # 5 and 9: a second and third pass over the weights
        x_MxK = rng.standard_normal((rows, K)).astype(np.float32)
        got = jax.jit(cpu_matvec.matvec, static_argnums=3)(x_MxK, w, scale_N, w_contract_axis)
        expected = (x_MxK.astype(np.float64) @ w_KxN) * scale_N
        # fp32 accumulation of K exact products: error ~ sqrt(K) ulp of the sum of |products|
        bound = 1e-6 * np.sqrt(K) * (np.abs(x_MxK) @ np.abs(w_KxN)) * scale_N
        assert got.shape == (rows, N) and got.dtype == jnp.float32
        assert np.all(np.abs(np.asarray(got, np.float64) - expected) <= bound), (rows, dtype)


def test_fp8_weights_are_decoded_like_ml_dtypes_including_subnormals_and_nan():
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # every E4M3 value
    w_NxK = jnp.asarray(codes.reshape(256, 1))
    y = cpu_matvec.matvec(jnp.ones((1, 1), jnp.float32), w_NxK, jnp.ones((256,), jnp.float32), 1)
    np.testing.assert_array_equal(np.asarray(y)[0], codes.astype(np.float32))  # NaN where E4M3 has NaN


def test_gradient_is_the_gradient_of_the_xla_product():
    rng = np.random.default_rng(1)
    x_MxK, w_KxN = (
        rng.standard_normal((2, 64)).astype(np.float32),
        rng.standard_normal((64, 96)).astype(np.float32),
    )
    scale_N = rng.uniform(0.5, 2.0, 96).astype(np.float32)

    def loss(f, x, w, s):
        return jnp.sum(jnp.sin(f(x, w, s)))

    grads = jax.grad(loss, argnums=(1, 2, 3))(
        lambda x, w, s: cpu_matvec.matvec(x, w, s, 0), x_MxK, w_KxN, scale_N
    )
    expected = jax.grad(loss, argnums=(1, 2, 3))(lambda x, w, s: (x @ w) * s[None, :], x_MxK, w_KxN, scale_N)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int8], ids=lambda d: jnp.dtype(d).name)
def test_take_rows_copies_rows_as_stored_and_scatters_gradients(dtype):
    table_VxD = _weights(np.random.default_rng(2), (50, 24), dtype)
    ids_R = jnp.array([3, 0, 49, 3, 17])
    rows_RxD = jax.jit(cpu_matvec.take_rows)(table_VxD, ids_R)
    assert rows_RxD.dtype == table_VxD.dtype
    np.testing.assert_array_equal(
        np.asarray(rows_RxD).view(np.uint8), np.asarray(table_VxD[ids_R]).view(np.uint8)
    )
    if dtype != jnp.int8:
        weights_RxD = jnp.asarray(np.random.default_rng(3).standard_normal((5, 24)), dtype)
        grad = jax.grad(lambda t: jnp.sum(cpu_matvec.take_rows(t, ids_R) * weights_RxD).astype(jnp.float32))
        expected = jax.grad(lambda t: jnp.sum(t[ids_R] * weights_RxD).astype(jnp.float32))
        np.testing.assert_array_equal(grad(table_VxD), expected(table_VxD))  # row 3 gets two rows' sum


@pytest.fixture(scope="module")
def gpt2():
    model = models.get_model("gpt2-tiny", vocab_size=512, n_layers=2)
    return models.init_params(model, jax.random.key(0), seq_len=8)


@pytest.mark.parametrize(
    "spec",
    [
        "fp32",
        "params=bfloat16,compute=bfloat16",
        "fp32,weights=int8;.*embed.*:weights=int8",
        "bf16,weights=fp8",
    ],
)
def test_one_row_logits_equal_xla_dots(gpt2, spec, monkeypatch):
    """A decoding step's logits through the kernel equal XLA's dots on the same stored weights."""
    policy = get_policy(spec)
    model = models.get_model("gpt2-tiny", vocab_size=512, n_layers=2, policy=policy)
    served = quantize.quantize_params(gpt2, policy)
    ids_1x1 = jnp.array([[17]])
    kernel_logits = jax.jit(model.apply)({"params": served}, ids_1x1).logits
    monkeypatch.setenv("JAXMP_CPU_MATVEC", "0")
    xla_logits = jax.jit(model.apply)({"params": served}, ids_1x1).logits
    tolerance = 1e-5 if policy.compute_dtype == jnp.float32 else 2e-2  # bf16 activations round per layer
    np.testing.assert_allclose(kernel_logits, xla_logits, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "spec", ["fp32,weights=int8;.*embed.*:weights=int8", "params=bfloat16,compute=bfloat16"]
)
def test_decoding_keeps_weights_as_stored(gpt2, spec):
    """The decode program holds the weights as stored and little else: no float32 copy of 8-bit weights
    (XLA's dots: 4.8x the stored bytes), no converted copy of the bf16 table for the lookup (1.13x)."""
    policy = get_policy(spec)
    model = models.get_model("gpt2-tiny", vocab_size=512, n_layers=2, policy=policy)
    served = quantize.quantize_params(gpt2, policy)
    decoded = generate(model, served, [np.array([1, 2, 3])], 4)
    assert decoded.program_bytes < 1.06 * tree_bytes(served)


def test_without_a_compiler_decoding_falls_back_to_xla_with_one_warning(tmp_path):
    script = (
        "import warnings, jax.numpy as jnp\n"
        "from jaxmp import cpu_matvec\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    print(cpu_matvec.usable(), cpu_matvec.supports(1, jnp.int8))\n"
        "print([str(w.message) for w in caught])\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "JAXMP_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "False False"
    assert "CPU decoding kernel is not available" in lines[1] and "XLA's dot" in lines[1]
