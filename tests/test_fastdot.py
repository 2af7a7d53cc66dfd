"""fastdot.matmul: plain-dot values, correct gradients, and compute-dtype backward dots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmp import fastdot, hardware, models
from jaxmp.losses import lm_loss

F32, BF16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)


def _plain(x, w, w_contract_axis):
    dims = (((x.ndim - 1,), (w_contract_axis,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _inputs(dtype, w_contract_axis):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 5, 8), jnp.float32).astype(dtype)
    w_shape = (8, 6) if w_contract_axis == 0 else (6, 8)
    return x, jax.random.normal(kw, w_shape, jnp.float32).astype(dtype)


def _loss(matmul, w_contract_axis):
    # A nonlinear scalar, so the cotangent differs per element.
    return lambda x, w: jnp.sum(jnp.sin(matmul(x, w, w_contract_axis)))


def _dots(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dots(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dots(sub)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("w_contract_axis", [0, 1])
def test_fp32_matches_plain_dot_and_autodiff(jit, w_contract_axis):
    x, w = _inputs(jnp.float32, w_contract_axis)
    matmul = jax.jit(fastdot.matmul, static_argnums=2) if jit else fastdot.matmul
    y = matmul(x, w, w_contract_axis)
    np.testing.assert_array_equal(y, _plain(x, w, w_contract_axis))
    assert y.dtype == F32 and y.shape == (2, 5, 6)
    grad_fn = jax.grad(_loss(fastdot.matmul, w_contract_axis), argnums=(0, 1))
    grads = (jax.jit(grad_fn) if jit else grad_fn)(x, w)
    expected = jax.grad(_loss(_plain, w_contract_axis), argnums=(0, 1))(x, w)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == F32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("native", ["0", "1"])
@pytest.mark.parametrize("w_contract_axis", [0, 1])
def test_bf16_gradients_within_bf16_tolerance(native, w_contract_axis, monkeypatch):
    monkeypatch.setenv("JAXMP_NATIVE_LOW_PRECISION_DOTS", native)
    x, w = _inputs(jnp.bfloat16, w_contract_axis)
    y = fastdot.matmul(x, w, w_contract_axis)
    assert y.dtype == F32
    np.testing.assert_allclose(y, _plain(x.astype(F32), w.astype(F32), w_contract_axis), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(_loss(fastdot.matmul, w_contract_axis), argnums=(0, 1)))(x, w)
    reference = jax.grad(_loss(_plain, w_contract_axis), argnums=(0, 1))(x.astype(F32), w.astype(F32))
    for got, want in zip(grads, reference, strict=True):
        assert got.dtype == BF16
        np.testing.assert_allclose(got.astype(F32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("w_contract_axis", [0, 1])
def test_backward_dots_take_compute_dtype_inputs(w_contract_axis):
    x, w = _inputs(jnp.bfloat16, w_contract_axis)
    jaxpr = jax.make_jaxpr(jax.grad(_loss(fastdot.matmul, w_contract_axis), argnums=(0, 1)))(x, w).jaxpr
    dots = list(_dots(jaxpr))
    assert len(dots) == 3  # forward, dx, dw
    for dot in dots:
        assert [np.dtype(v.aval.dtype) for v in dot.invars] == [BF16, BF16]
        assert np.dtype(dot.params["preferred_element_type"]) == F32
    # Neither backward dot contracts a transposed cotangent: each contracts the token axis (dw) or
    # the cotangent's last axis (dx), as laid out in memory.
    dx_dims, dw_dims = (dot.params["dimension_numbers"][0] for dot in dots[1:])
    assert dx_dims[0] == (1,) and dw_dims == ((0,), (0,))


@pytest.mark.parametrize(
    ("env", "backend", "flags", "expected"),
    [
        ("1", "cpu", frozenset(), True),
        ("0", "gpu", frozenset(), False),
        (None, "gpu", frozenset(), True),
        (None, "cpu", frozenset({"avx512_bf16"}), False),
        (None, "cpu", frozenset({"avx512_bf16", "amx_bf16"}), True),
    ],
)
def test_native_low_precision_dots_choice(env, backend, flags, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("JAXMP_NATIVE_LOW_PRECISION_DOTS", raising=False)
    else:
        monkeypatch.setenv("JAXMP_NATIVE_LOW_PRECISION_DOTS", env)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert fastdot.native_low_precision_dots(jnp.bfloat16) is expected


def test_upcast_dot_keeps_bf16_operands_in_the_jaxpr(monkeypatch):
    monkeypatch.setenv("JAXMP_NATIVE_LOW_PRECISION_DOTS", "0")
    x, w = _inputs(jnp.bfloat16, 0)
    [dot] = _dots(jax.make_jaxpr(fastdot.matmul)(x, w).jaxpr)
    assert [np.dtype(v.aval.dtype) for v in dot.invars] == [BF16, BF16]
    assert dot.params["precision"] == jax.lax.DotAlgorithmPreset.F32_F32_F32


@pytest.mark.parametrize("w_contract_axis", [0, 1])
def test_master_weights_are_cast_inside_and_get_fp32_gradients(w_contract_axis):
    x, w = _inputs(jnp.bfloat16, w_contract_axis)
    w_master = jax.random.normal(jax.random.key(1), w.shape, jnp.float32)
    np.testing.assert_array_equal(
        fastdot.matmul(x, w_master, w_contract_axis),
        fastdot.matmul(x, w_master.astype(BF16), w_contract_axis),
    )
    loss = _loss(fastdot.matmul, w_contract_axis)
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w_master).jaxpr
    assert all([np.dtype(v.aval.dtype) for v in dot.invars] == [BF16, BF16] for dot in _dots(jaxpr))
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w_master)
    assert dx.dtype == BF16 and dw.dtype == F32
    # The weight gradient leaves the fp32 accumulator unrounded: as the cast copy's gradient, but finer.
    _, dw_cast = jax.grad(loss, argnums=(0, 1))(x, w_master.astype(BF16))
    np.testing.assert_allclose(dw, dw_cast.astype(F32), rtol=1e-2, atol=1e-2)
    assert not np.array_equal(dw, dw.astype(BF16).astype(F32))


def _attention_inputs(dtype):
    key = jax.random.key(2)
    q, k, v = (
        jax.random.normal(jax.random.fold_in(key, i), (2, 6, heads, 8)).astype(dtype)
        for i, heads in enumerate((4, 2, 2))
    )
    # Row 1 is left-padded: its first two queries see no key at all (attend uniformly, as XLA does).
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)[:, None, None, :]
    return q, k, v, mask & jnp.tril(jnp.ones((6, 6), bool))[None, None]


def _attention_loss(attend, mask):
    return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask).astype(jnp.float32)))


def _xla_attention(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize(("dtype", "tolerance"), [(F32, 1e-6), (BF16, 1e-2)])
def test_attention_matches_xla_attention_and_its_gradients(masked, dtype, tolerance):
    q, k, v, mask = _attention_inputs(dtype)
    mask = mask if masked else None
    out = jax.jit(fastdot.attention)(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    expected_out = _xla_attention(q, k, v, mask).astype(F32)
    np.testing.assert_allclose(out.astype(F32), expected_out, rtol=tolerance, atol=tolerance)
    grads = jax.jit(jax.grad(_attention_loss(fastdot.attention, mask), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(_attention_loss(_xla_attention, mask), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == dtype
        np.testing.assert_allclose(got.astype(F32), want.astype(F32), rtol=tolerance, atol=tolerance)


def test_attention_backward_dots_take_compute_dtype_inputs():
    q, k, v, mask = _attention_inputs(BF16)
    jaxpr = jax.make_jaxpr(jax.grad(_attention_loss(fastdot.attention, mask), argnums=(0, 1, 2)))(q, k, v)
    dots = list(_dots(jaxpr.jaxpr))
    assert len(dots) == 2 + 5  # forward q kᵀ and p v; backward recomputed q kᵀ, dv, dp, dq, dk
    for dot in dots:
        assert [np.dtype(v.aval.dtype) for v in dot.invars] == [BF16, BF16]
        assert np.dtype(dot.params["preferred_element_type"]) == F32


@pytest.mark.parametrize(("policy", "tolerance"), [("fp32", 1e-6), ("bf16", 2e-2)])
def test_gpt2_gradients_match_plain_autodiff(policy, tolerance, monkeypatch):
    model = models.get_model("gpt2-tiny", policy, n_layers=2, d_model=64, n_heads=4, d_ff=128)
    params = models.init_params(model, jax.random.key(0), 16)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    padding = jnp.array([[1] * 16, [0] * 3 + [1] * 13])

    def loss(p):
        return lm_loss(model.apply({"params": p}, ids, attention_mask=padding).logits, ids)

    def grads():  # a fresh jit on each call: traced with the layers as they are now
        return jax.jit(jax.grad(loss))(params)

    fast = jax.tree.leaves(grads())
    monkeypatch.setattr(fastdot, "matmul", lambda x, w, axis=0: _plain(x, w.astype(x.dtype), axis))
    monkeypatch.setattr(fastdot, "attention", _xla_attention)
    plain = jax.tree.leaves(grads())
    scale = max(float(jnp.max(jnp.abs(g))) for g in plain)
    for got, want in zip(fast, plain, strict=True):
        assert got.dtype == want.dtype == F32
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * scale)
