"""Policy grammar, presets, overrides, round trips and the bad-spec table."""

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

import jaxmp
from jaxmp import hardware
from jaxmp.precision import auto_policy

F32, BF16, F16 = np.dtype("float32"), np.dtype(jnp.bfloat16), np.dtype("float16")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
        ("p=f32,c=bf16,o=bf16", (F32, BF16, BF16)),
        ("params=fp32,compute=fp16", (F32, F16, F32)),  # output defaults to float32, not compute
        ("c=half", (F32, F16, F32)),  # half is always float16
        ("p=full,c=full", (F32, F32, F32)),
        ("compute=bf16", (F32, BF16, F32)),
        ("params=bf16", (BF16, BF16, F32)),  # compute follows params, as in jmp
        ("P = F32 , C = BF16", (F32, BF16, F32)),  # case and spaces are forgiven
        ("fp32", (F32, F32, F32)),
        ("bf16", (F32, BF16, F32)),
        ("fp16", (F32, F16, F32)),
        ("pure-bf16", (BF16, BF16, F32)),
    ],
)
def test_grammar_and_presets(spec, expected):
    policy = jaxmp.get_policy(spec)
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == expected


class FakeDevice:
    def __init__(self, platform, device_kind="fake", compute_capability=None):
        self.platform, self.device_kind, self.compute_capability = platform, device_kind, compute_capability


@pytest.mark.parametrize(
    "device, cpu_flags, expected",
    [
        (FakeDevice("tpu", "TPU v4"), set(), "bf16"),
        (FakeDevice("gpu", "NVIDIA H100", "9.0"), set(), "bf16"),
        (FakeDevice("gpu", "NVIDIA A100", "8.0"), set(), "bf16"),
        (FakeDevice("gpu", "Tesla V100", "7.0"), set(), "fp16"),
        (FakeDevice("cpu"), {"avx512_bf16", "amx_tile", "amx_bf16"}, "bf16"),
        (FakeDevice("cpu"), {"avx512f", "avx512_bf16"}, "fp32"),  # bf16 dots slower than fp32 without AMX
        (FakeDevice("cpu"), {"avx2"}, "fp32"),
    ],
)
def test_auto_picks_for_the_hardware_and_says_why(monkeypatch, device, cpu_flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(cpu_flags))
    preset, reason = auto_policy([device])
    assert preset == expected
    assert reason and (device.device_kind in reason or "CPU" in reason or "cpu" in reason)


def test_auto_spec_is_the_chosen_preset():
    preset, _ = auto_policy()
    assert jaxmp.get_policy("auto") == jaxmp.get_policy(preset)


def test_overrides_first_match_wins_and_keep_unset_keys():
    policy = jaxmp.get_policy(
        "params=float32,compute=float16;.*norm.*:compute=float32;lm_head:output=bfloat16;.*:compute=bfloat16"
    )
    norm = policy.for_module("blocks_0/attn_norm")
    assert isinstance(norm, jmp.Policy)
    assert np.dtype(norm.compute_dtype) == F32 and np.dtype(norm.param_dtype) == F32
    head = policy.for_module("lm_head")
    assert np.dtype(head.output_dtype) == BF16 and np.dtype(head.compute_dtype) == F16
    assert np.dtype(policy.for_module("blocks_0/mlp/fc").compute_dtype) == BF16
    # fullmatch: a pattern must match the whole path
    assert np.dtype(policy.for_module("lm_head_extra").output_dtype) == F32


def test_fp32_islands_apply_unless_overridden():
    policy = jaxmp.get_policy("bf16")
    assert np.dtype(policy.for_module("blocks_0/attn/softmax").compute_dtype) == F32
    assert np.dtype(policy.for_module("final_norm").compute_dtype) == F32
    assert np.dtype(policy.for_module("lm_head/logits").compute_dtype) == F32
    assert np.dtype(policy.for_module("blocks_0/attn/query").compute_dtype) == BF16
    overridden = jaxmp.get_policy("bf16;.*softmax:compute=bf16")
    assert np.dtype(overridden.for_module("blocks_0/attn/softmax").compute_dtype) == BF16


@pytest.mark.parametrize(
    "spec",
    [
        "fp32",
        "bf16",
        "pure-bf16",
        "p=f32,c=f16,o=f16",
        "params=float32,compute=float16;.*norm.*:compute=float32;lm_head:output=float32",
        r"bf16;blocks_(?:0|1)/attn:compute=float32,params=bfloat16",
    ],
)
def test_str_round_trips_and_policies_are_values(spec):
    policy = jaxmp.get_policy(spec)
    again = jaxmp.get_policy(str(policy))
    assert again == policy and hash(again) == hash(policy)
    assert {policy: 1}[again] == 1


def test_policy_is_a_static_jit_argument():
    calls = []

    def f(x, policy):
        calls.append(policy)
        return policy.cast_to_compute(x)

    jitted = jax.jit(f, static_argnums=1)
    assert jitted(jnp.ones(2), jaxmp.get_policy("bf16")).dtype == jnp.bfloat16
    jitted(jnp.ones(2), jaxmp.get_policy("params=float32,compute=bfloat16"))  # equal: no retrace
    assert len(calls) == 1
    assert jitted(jnp.ones(2), jaxmp.get_policy("fp16")).dtype == jnp.float16


def test_casts_leave_integers_alone():
    policy = jaxmp.get_policy("p=f32,c=bf16,o=f16")
    tree = {"ids": jnp.arange(3), "x": jnp.ones(3)}
    assert policy.cast_to_compute(tree)["ids"].dtype == jnp.int32
    assert policy.cast_to_compute(tree)["x"].dtype == jnp.bfloat16
    assert policy.cast_to_output(tree)["x"].dtype == jnp.float16
    assert policy.cast_to_param(policy.cast_to_compute(tree))["x"].dtype == jnp.float32


BAD_SPECS = [
    ("", "empty"),
    ("   ", "empty"),
    ("params=float33", "float33"),
    ("params=float32,compute=int8", "int8"),
    ("compute=", "''"),
    ("prams=float32", "prams"),
    ("params=float32,params=bfloat16", "duplicate"),
    ("p=f32,params=bf16", "duplicate"),
    ("params=float32,,compute=bf16", "key=dtype"),
    ("params", "params"),
    ("bf17", "bf17"),
    ("fp4", "fp4"),
    ("params=fp8", "fp8"),  # fp8 is a matmul mode (matmul=fp8), not a storage dtype
    ("params:float32", "params:float32"),
    ("bf16;.*norm.*", "no ':'"),
    ("bf16;[unclosed:compute=float32", "regular expression"),
    ("bf16;(a:compute=float32", "regular expression"),
    ("bf16;.*norm.*:", "empty"),
    ("bf16;.*norm.*:compute=float64", "float64"),
    ("bf16;.*norm.*:colour=float32", "colour"),
    ("bf16;:compute=float32", "empty pattern"),
    ("bf16;.*norm.*:compute=f32,compute=bf16", "duplicate"),
    ("bf16;", "no ':'"),
    ("params=float32;lm_head=output:float32", "lm_head=output"),
    ("compute=bfloat16 output=float32", "bfloat16 output"),
]


@pytest.mark.parametrize("spec, named", BAD_SPECS)
def test_bad_specs_name_the_token_and_what_is_valid(spec, named):
    with pytest.raises(ValueError) as error:
        jaxmp.get_policy(spec)
    message = str(error.value)
    assert named in message
    assert "\n" not in message
    assert any(word in message for word in ("valid", "use a preset", "write", "expected", "give each"))


def test_at_least_twenty_bad_specs():
    assert len(BAD_SPECS) >= 20


@pytest.mark.parametrize(
    "spec, uses",
    [
        ("fp32", False),
        ("bf16", False),
        ("pure-bf16", False),
        ("fp16", True),
        ("params=float16,compute=float32", True),
        ("bf16;.*mlp.*:compute=float16", True),  # an override alone
        ("bf16;.*mlp.*:params=float16", True),
        (
            "fp16;.*:compute=float32,params=float32",
            True,
        ),  # the base still computes in float16 where unmatched
    ],
)
def test_uses_float16_sees_params_computes_and_overrides(spec, uses):
    policy = jaxmp.get_policy(spec)
    assert policy.uses_float16 is uses
    assert isinstance(jaxmp.default_loss_scale(policy), jaxmp.DynamicLossScale) is uses
