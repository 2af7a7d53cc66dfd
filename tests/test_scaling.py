"""Loss-scale states: the documented rule, PyTorch's GradScaler rule, and pytree round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxmp


def reference_trajectory(flags, initial_scale, period, factor, min_scale, hysteresis):
    """The pseudocode of ``DynamicLossScale``'s docstring, in plain Python floats."""
    scale, counter, budget = float(initial_scale), 0, hysteresis
    scales = []
    for finite in flags:
        if finite:
            counter += 1
            if counter == period:
                counter = 0
                if scale * factor <= float(np.finfo(np.float32).max):
                    scale = scale * factor
                budget = hysteresis
        else:
            counter = 0
            if budget <= 1:
                scale = max(scale / factor, min_scale)
            else:
                budget -= 1
        scales.append(scale)
    return scales


def run(loss_scale, flags, jit):
    adjust = jax.jit(lambda ls, f: ls.adjust(f)) if jit else (lambda ls, f: ls.adjust(f))
    scales = []
    for finite in flags:
        loss_scale = adjust(loss_scale, jnp.asarray(finite))
        scales.append(float(loss_scale.loss_scale))
    return scales


rng = np.random.default_rng(0)
FLAG_SEQUENCES = {
    "mixed": [bool(b) for b in rng.random(60) > 0.3],
    "overflow_storm": [False] * 30 + [True] * 10,  # drives the scale to the min clamp
    "long_growth": [True] * 40,
    "alternating": [True, False] * 20,
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", FLAG_SEQUENCES)
@pytest.mark.parametrize(
    "config",
    [
        dict(initial_scale=2.0**15, period=3, factor=2.0, min_scale=1.0, hysteresis=1),
        dict(initial_scale=2.0**10, period=4, factor=2.0, min_scale=1.0, hysteresis=2),
        dict(initial_scale=8.0, period=2, factor=4.0, min_scale=0.125, hysteresis=3),
        dict(initial_scale=2.0**126, period=2, factor=2.0, min_scale=1.0, hysteresis=1),  # growth guard
    ],
)
def test_trajectory_follows_documented_rule(config, name, jit):
    flags = FLAG_SEQUENCES[name]
    expected = reference_trajectory(flags, **config)
    got = run(jaxmp.DynamicLossScale(**config), flags, jit)
    np.testing.assert_array_equal(np.float32(got), np.float32(expected))


def test_hysteresis_two_tolerates_one_overflow_and_refills_on_growth():
    loss_scale = jaxmp.DynamicLossScale(initial_scale=16.0, period=2, hysteresis=2)
    scales = run(loss_scale, [False, False, False, True, True, False, False], jit=False)
    # 1st overflow spends the budget, 2nd and 3rd back off, growth refills, then again.
    assert scales == [16.0, 8.0, 4.0, 4.0, 8.0, 8.0, 4.0]


def test_min_scale_below_one_is_respected():
    loss_scale = jaxmp.DynamicLossScale(initial_scale=1.0, min_scale=0.25)
    assert run(loss_scale, [False] * 5, jit=True)[-1] == 0.25


@pytest.mark.parametrize("name", FLAG_SEQUENCES)
def test_matches_pytorch_grad_scaler_rule(name):
    torch = pytest.importorskip("torch")
    flags = FLAG_SEQUENCES[name]
    scale = torch.full((), 2.0**15, dtype=torch.float32)
    tracker = torch.zeros((), dtype=torch.int32)
    torch_scales = []
    for finite in flags:
        found_inf = torch.full((), 0.0 if finite else 1.0)
        # The kernel torch.amp.GradScaler.update() runs.
        torch._amp_update_scale_(scale, tracker, found_inf, 2.0, 0.5, 5)
        torch_scales.append(float(scale))
    ours = run(jaxmp.DynamicLossScale(2.0**15, period=5, factor=2, min_scale=0.0, hysteresis=1), flags, True)
    assert ours == torch_scales


def test_scale_and_unscale_are_fp32():
    loss_scale = jaxmp.StaticLossScale(1024.0)
    assert loss_scale.scale(jnp.asarray(2.0, jnp.bfloat16)).dtype == jnp.float32
    grads = {"a": jnp.full((3,), 2048.0, jnp.float16), "b": jnp.full((2,), 3.0, jnp.bfloat16)}
    unscaled = loss_scale.unscale(grads)
    assert unscaled["a"].dtype == jnp.float32 and unscaled["b"].dtype == jnp.float32
    np.testing.assert_array_equal(unscaled["a"], 2.0)
    # 3/1024 is exact in fp32; in bf16 it would be too (power of two) - check a non-dyadic scale
    odd = jaxmp.StaticLossScale(3.0).unscale({"g": jnp.asarray([1.0], jnp.bfloat16)})["g"]
    np.testing.assert_allclose(odd, 1 / 3, rtol=1e-7)


def test_noop_scale_is_identity():
    noop = jaxmp.NoOpLossScale()
    assert float(noop.loss_scale) == 1.0
    assert noop.adjust(jnp.asarray(False)) is noop
    assert jax.tree.leaves(noop) == []


@pytest.mark.parametrize(
    "bad",
    [dict(initial_scale=0.0), dict(period=0), dict(factor=1.0), dict(min_scale=-1.0), dict(hysteresis=0)],
)
def test_bad_dynamic_config_is_refused(bad):
    with pytest.raises(ValueError, match="DynamicLossScale"):
        jaxmp.DynamicLossScale(**bad)


def test_all_finite():
    assert bool(jaxmp.all_finite({"a": jnp.ones(3), "b": jnp.arange(2)}))
    assert not bool(jaxmp.all_finite({"a": jnp.ones(3), "b": jnp.asarray([1.0, jnp.inf])}))
    assert not bool(jax.jit(jaxmp.all_finite)([jnp.asarray([jnp.nan], jnp.bfloat16)]))
    assert bool(jaxmp.all_finite({}))


def custom_state():
    return jaxmp.DynamicLossScale(initial_scale=64.0, period=7, factor=3.0, min_scale=0.5, hysteresis=2)


def fields(state):
    return {name: np.asarray(getattr(state, name)) for name in state._fields}


def assert_same_fields(a, b):
    assert type(a) is type(b)
    for name, value in fields(a).items():
        np.testing.assert_array_equal(value, fields(b)[name], err_msg=name)


@pytest.mark.parametrize(
    "state", [custom_state(), jaxmp.StaticLossScale(12.0), jaxmp.NoOpLossScale()], ids=type
)
def test_every_field_survives_jit_lower_tree_map_and_flatten(state):
    assert_same_fields(jax.jit(lambda s: s)(state), state)
    lowered = jax.jit(lambda s: s.adjust(jnp.asarray(False))).lower(state)
    assert len(jax.tree.leaves(lowered.args_info)) == len(state._fields)
    assert_same_fields(lowered.compile()(state), state.adjust(jnp.asarray(False)))
    leaves, treedef = jax.tree.flatten(state)
    assert_same_fields(jax.tree.unflatten(treedef, leaves), state)
    as_strings = jax.tree.map(lambda x: f"{x.dtype}", state)  # tree_map to non-arrays
    assert all(isinstance(leaf, str) for leaf in jax.tree.leaves(as_strings))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths == [f".{name}" for name in state._fields]


def test_dynamic_state_survives_orbax_round_trip(tmp_path):
    state = custom_state().adjust(jnp.asarray(False))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ls", state)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, jaxmp.DynamicLossScale())
    restored = checkpointer.restore(tmp_path / "ls", target)
    assert_same_fields(restored, state)
    assert float(restored.min_scale) == 0.5  # the field jmp loses


def test_make_loss_scale_and_policy_default():
    assert isinstance(jaxmp.default_loss_scale(jaxmp.get_policy("fp16")), jaxmp.DynamicLossScale)
    assert isinstance(jaxmp.default_loss_scale(jaxmp.get_policy("bf16")), jaxmp.NoOpLossScale)
    per_module_fp16 = jaxmp.get_policy("bf16;lm_head:compute=float16")
    assert isinstance(jaxmp.default_loss_scale(per_module_fp16), jaxmp.DynamicLossScale)
    bf16 = jaxmp.get_policy("bf16")
    assert float(jaxmp.make_loss_scale("static:128", bf16).loss_scale) == 128.0
    assert isinstance(jaxmp.make_loss_scale("dynamic", bf16), jaxmp.DynamicLossScale)
    assert isinstance(jaxmp.make_loss_scale("none", jaxmp.get_policy("fp16")), jaxmp.NoOpLossScale)
    for bad in ("static:", "static:-2", "static:abc", "sometimes"):
        with pytest.raises(ValueError, match="valid|static:N"):
            jaxmp.make_loss_scale(bad, bf16)
