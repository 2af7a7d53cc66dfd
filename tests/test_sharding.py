"""Data parallelism and FSDP over 8 fake CPU devices: the numbers of one device, shards of 1/8,
one global skip decision, mesh-independent checkpoints, and clear errors.

This pytest process has initialised JAX with one CPU device, so the 8-device scenarios run once
in a subprocess (this file run as a script) with ``--xla_force_host_platform_device_count=8``
set before JAX is imported; the tests below check what it recorded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxmp
from jaxmp import models, sharding
from jaxmp.checkpoint import Checkpointer
from jaxmp.losses import lm_loss
from jaxmp.train import main
from jaxmp.train_step import leaf_paths

MESHES = ("data=8", "data=4,fsdp=2", "fsdp=8")
BATCH, SEQ, MICRO_STEPS = 8, 16, 40  # 20 updates of accum_steps=2
# Fake devices share 2 cores: a lower LLVM optimisation level halves compile time, for every run alike.
XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


# fp8 matmuls with delayed scaling, in float32 otherwise: only the order of float32 sums differs
FP8 = "params=float32,compute=float32,matmul=fp8"


def tiny_gpt(policy="fp32"):
    """A 2-layer GPT-2 (d_model 64) whose every array dimension 8 divides; its optimizer; its loss."""
    model = models.get_model("gpt2-tiny", policy, d_model=64, n_layers=2)
    optimizer = jaxmp.make_optimizer(learning_rate=3e-3, accum_steps=2, warmup_steps=0)

    def loss_fn(params, batch, rng, fp8_variables=None):
        del rng
        logits = model.apply({"params": params, **(fp8_variables or {})}, batch["input_ids"]).logits
        return lm_loss(logits, batch["targets"]), {}

    state = jaxmp.TrainState.create(
        params=models.init_params(model, jax.random.key(0), SEQ),
        optimizer=optimizer,
        fp8=models.init_fp8_scaling(model),
    )
    return state, optimizer, loss_fn


def token_batches():
    """Runs of consecutive token ids from random starts: learnable in a few updates."""
    starts = np.random.default_rng(0).integers(0, 256, (MICRO_STEPS, BATCH, 1))
    tokens = ((starts + np.arange(SEQ + 1)) % 256).astype(np.int32)
    return [{"input_ids": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def host_leaves(state):
    """Every leaf of ``state`` as whole numpy arrays, keyed by path (the PRNG key as its data)."""
    state = state.replace(rng=jax.random.key_data(state.rng))
    return dict(zip(leaf_paths(state), (np.asarray(leaf) for leaf in jax.tree.leaves(state)), strict=True))


def shard_data(tree):
    """Each device's shard of each leaf, as numpy."""
    return [[np.asarray(shard.data) for shard in leaf.addressable_shards] for leaf in jax.tree.leaves(tree)]


# --- the 8-device subprocess -------------------------------------------------------------


def _train_on(spec, batches, policy="fp32"):
    """Losses, gradient norms and final state of the tiny GPT on mesh ``spec`` (None: plain jit, one device)."""
    state, optimizer, loss_fn = tiny_gpt(policy)
    if spec is None:
        step = jaxmp.make_train_step(loss_fn, optimizer, policy, cast_params=False, donate=False)
        feed = dict
    else:
        mesh = sharding.make_mesh(spec)
        plan = sharding.plan_state_sharding(state, mesh)
        assert plan.replicated == (), plan.replicated
        state = sharding.shard_state(state, plan.shardings)
        step = sharding.make_sharded_train_step(
            loss_fn, optimizer, policy, mesh, plan.shardings, cast_params=False
        )
        rows = sharding.process_rows(mesh, BATCH)
        assert rows == slice(0, BATCH)  # one process feeds every row

        def feed(batch):
            return sharding.shard_batch({k: v[rows] for k, v in batch.items()}, mesh)

    losses, grad_norms = [], []
    for batch in batches:
        state, metrics = step(state, feed(batch))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return {"losses": losses, "grad_norms": grad_norms}, state


def _shard_shapes(state):
    """``path -> [shape, shard shape]`` of every floating-point array of rank >= 1."""
    return {
        path: [list(leaf.shape), list(leaf.addressable_shards[0].data.shape)]
        for path, leaf in zip(leaf_paths(state), jax.tree.leaves(state), strict=True)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 1
    }


def _checkpoint_across_meshes(state, directory):
    """Saves ``state`` (on data=4,fsdp=2), restores it on fsdp=8; both as numpy for the parent to compare."""
    Checkpointer(directory / "ckpt").save(MICRO_STEPS, state, {"mesh": "data=4,fsdp=2"})
    np.savez(directory / "saved.npz", **host_leaves(state))
    fresh, _, _ = tiny_gpt()
    plan = sharding.plan_state_sharding(fresh, sharding.make_mesh("fsdp=8"))
    restored, metadata = Checkpointer(directory / "ckpt").restore(sharding.shard_state(fresh, plan.shardings))
    assert metadata == {"mesh": "data=4,fsdp=2"}
    np.savez(directory / "restored_fsdp8.npz", **host_leaves(restored))
    return _shard_shapes(restored)


def _mlp_loss(params, batch, rng):
    """tanh saturates at an infinite input, so the loss stays finite while ``d loss / d w`` row i is inf * 0."""
    del rng
    hidden = jnp.tanh(batch["x"] @ params["w"] + params["b"][None, :])
    return jnp.mean(hidden**2), {}


def _skip_on_one_device():
    """A NaN in one fsdp shard of one gradient (device 0's) must skip the step on all 8 devices."""
    mesh = sharding.make_mesh("fsdp=8")
    params = {"w": jnp.linspace(-1.0, 1.0, 16 * 8).reshape(16, 8), "b": jnp.zeros(8)}
    optimizer = jaxmp.make_optimizer(learning_rate=1e-2, accum_steps=2)
    state = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=jaxmp.DynamicLossScale(initial_scale=2.0**10)
    )
    plan = sharding.plan_state_sharding(state, mesh)
    state = sharding.shard_state(state, plan.shardings)
    step = sharding.make_sharded_train_step(_mlp_loss, optimizer, "fp32", mesh, plan.shardings, donate=False)
    x = np.random.default_rng(1).normal(size=(BATCH, 16)).astype(np.float32)
    poisoned = x.copy()
    poisoned[0, 0] = np.inf  # row 0 is device 0's; only the gradient's row 0 (device 0's shard) is NaN

    grads = jax.jit(
        jax.grad(lambda p, b: _mlp_loss(p, b, None)[0]),
        in_shardings=(plan.shardings.params, sharding.batch_sharding(mesh)),
        out_shardings=plan.shardings.params,
    )(state.params, {"x": poisoned})
    bad_shards = [
        [index for index, shard in enumerate(leaf) if not np.isfinite(shard).all()]
        for leaf in shard_data(grads)
    ]

    state, finite_metrics = step(state, sharding.shard_batch({"x": x}, mesh))
    before = shard_data((state.params, state.opt_state))
    after_state, metrics = step(state, sharding.shard_batch({"x": poisoned}, mesh))
    unchanged = all(
        np.array_equal(a, b, equal_nan=True)
        for leaf_a, leaf_b in zip(
            before, shard_data((after_state.params, after_state.opt_state)), strict=True
        )
        for a, b in zip(leaf_a, leaf_b, strict=True)
    )
    single = jaxmp.make_train_step(_mlp_loss, optimizer, "fp32")
    fresh = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=jaxmp.DynamicLossScale(initial_scale=2.0**10)
    )
    _, single_metrics = single(fresh, {"x": x})
    return {
        "bad_shards": bad_shards,
        "loss": float(metrics["loss"]),
        "grads_finite": bool(metrics["grads_finite"]),
        "skipped_steps": int(after_state.skipped_steps),
        "params_and_moments_unchanged": unchanged,
        "loss_scale_per_device": [
            float(s.data) for s in after_state.loss_scale.loss_scale.addressable_shards
        ],
        "grad_norm": float(finite_metrics["grad_norm"]),
        "grad_norm_one_device": float(single_metrics["grad_norm"]),
        "replicated_report": sharding.plan_state_sharding(
            jaxmp.TrainState.create(params={"w": params["w"], "odd": jnp.ones((3, 5))}, optimizer=optimizer),
            mesh,
        ).replicated,
    }


def _worker(directory: Path) -> None:
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == 8
    batches = token_batches()
    result = {"one_device": _train_on(None, batches)[0]}
    for spec in MESHES:
        result[spec], state = _train_on(spec, batches)
        if spec == "fsdp=8":
            result["fsdp8_shard_shapes"] = _shard_shapes(state)
        if spec == "data=4,fsdp=2":
            result["restored_fsdp8_shard_shapes"] = _checkpoint_across_meshes(state, directory)
    result["skip"] = _skip_on_one_device()
    for spec in (None, "data=4,fsdp=2"):
        metrics, state = _train_on(spec, batches[:8], FP8)
        result[f"fp8 {spec}"] = {
            **metrics,
            "fp8": [np.asarray(x).tolist() for x in jax.tree.leaves(state.fp8.dots)],
        }
    (directory / "result.json").write_text(json.dumps(result))


# --- the tests -----------------------------------------------------------------------------


def eight_devices(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": XLA_FLAGS}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eight_devices")
    process = eight_devices(__file__, str(directory))
    assert process.returncode == 0, process.stderr[-3000:]
    return directory, json.loads((directory / "result.json").read_text())


@pytest.mark.parametrize("spec", MESHES)
def test_meshes_train_like_one_device(recorded, spec):
    _, result = recorded
    reference = result["one_device"]
    assert len(reference["losses"]) == MICRO_STEPS
    np.testing.assert_allclose(result[spec]["losses"], reference["losses"], rtol=1e-5)
    np.testing.assert_allclose(result[spec]["grad_norms"], reference["grad_norms"], rtol=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]  # it learns


def test_fsdp8_holds_an_eighth_of_every_param_moment_and_accumulator(recorded):
    _, result = recorded
    for shapes in (result["fsdp8_shard_shapes"], result["restored_fsdp8_shard_shapes"]):
        for kind in ("params/", "/mu/", "/nu/", "acc_grads/"):
            assert sum(kind in path for path in shapes) == 36, kind  # GPT-2 with 2 blocks: 36 arrays
        for path, (shape, shard) in shapes.items():
            assert np.prod(shard) * 8 == np.prod(shape), (path, shape, shard)
        assert shapes["params/blocks_0/mlp/fc_in/kernel"] == [[64, 1024], [64, 128]]
        assert shapes["params/token_embed/embedding"] == [[256, 64], [32, 64]]


def test_non_finite_gradient_on_one_device_skips_the_step_everywhere(recorded):
    skip = recorded[1]["skip"]
    assert skip["bad_shards"] == [[], [0]]  # b's gradient is finite; w's is NaN on device 0 alone
    assert np.isfinite(skip["loss"]) and skip["grads_finite"] is False
    assert skip["skipped_steps"] == 1 and skip["params_and_moments_unchanged"]
    assert skip["loss_scale_per_device"] == [2.0**9] * 8  # one back-off, the same everywhere
    np.testing.assert_allclose(skip["grad_norm"], skip["grad_norm_one_device"], rtol=1e-6)  # a global norm
    assert len(skip["replicated_report"]) == 4  # the param, Adam's mu and nu, the accumulator
    assert all(entry.endswith("/odd [3, 5]") for entry in skip["replicated_report"])


def test_checkpoint_restores_on_another_mesh_and_on_one_device(recorded):
    directory, _ = recorded
    saved = dict(np.load(directory / "saved.npz"))
    on_fsdp8 = dict(np.load(directory / "restored_fsdp8.npz"))
    assert saved.keys() == on_fsdp8.keys()
    for path, value in saved.items():
        np.testing.assert_array_equal(on_fsdp8[path], value, err_msg=path)

    target, _, _ = tiny_gpt()  # this process: one device
    restored, _ = Checkpointer(directory / "ckpt").restore(target)
    for path, leaf in zip(leaf_paths(target), jax.tree.leaves(restored.replace(rng=target.rng)), strict=True):
        if path != "rng":
            assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]), path
    one_device = host_leaves(restored)
    for path, value in saved.items():
        np.testing.assert_array_equal(one_device[path], value, err_msg=path)


def test_batch_the_data_axes_do_not_divide_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "jaxmp.train", "--mesh", "data=4,fsdp=2", "--batch-size", "6", "--out", str(out)]
    process = eight_devices(*args, timeout=300)
    assert process.returncode == 2, process.stderr
    assert process.stderr.strip().splitlines() == [
        "python -m jaxmp.train: error: --batch-size: batch size 6 does not split over the 8 devices of "
        "mesh data=4,fsdp=2 (data x fsdp); use a multiple of 8"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    "spec, sizes",
    [
        (None, {"data": 8, "fsdp": 1}),
        ("", {"data": 8, "fsdp": 1}),
        ("fsdp=2", {"data": 4, "fsdp": 2}),
        ("data=4, fsdp=2", {"data": 4, "fsdp": 2}),
        ("fsdp=8", {"data": 1, "fsdp": 8}),
    ],
)
def test_mesh_spec(spec, sizes):
    assert sharding.parse_mesh_spec(spec, 8) == sizes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("model=2", "unknown mesh axis 'model'"),
        ("data=0", "axis=size >= 1"),
        ("data=two", "axis=size >= 1"),
        ("data=2,data=4", "each axis once"),
        ("data=3", "needs 3 devices; there are 8"),
        ("fsdp=3", "fsdp=3 does not divide the 8 devices"),
    ],
)
def test_bad_mesh_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_spec(spec, 8)


def test_fsdp_partition_takes_the_largest_divisible_dimension():
    assert sharding.fsdp_partition((256, 64), 8) == P("fsdp")
    assert sharding.fsdp_partition((64, 1024), 8) == P(None, "fsdp")
    assert sharding.fsdp_partition((12, 64, 64), 8) == P(None, "fsdp")  # the first of equals
    assert sharding.fsdp_partition((12, 6), 4) == P("fsdp")
    assert sharding.fsdp_partition((3, 5), 2) == P()
    assert sharding.fsdp_partition((), 2) == P()
    assert sharding.fsdp_partition((64, 64), 1) == P()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--mesh", "data=3"], "--mesh: mesh data=3,fsdp=1 needs 3 devices; there are 1"),
        (["--mesh", "tensor=1"], "unknown mesh axis 'tensor'"),
        (["--coordinator", "localhost"], "HOST:PORT"),
        (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id 2"),
        (["--num-processes", "2"], "need --coordinator"),
    ],
)
def test_cli_device_flags_are_checked_first(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    assert main([*flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert not out.exists()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_delayed_fp8_scaling_on_a_mesh_sees_the_global_amax_and_equals_one_device(recorded):
    _, result = recorded
    one, mesh = result["fp8 None"], result["fp8 data=4,fsdp=2"]
    assert len(one["fp8"]) == 2 * 2 * 6  # amax history and scales of the 6 fp8 dots of each of 2 blocks
    pairs = [
        (np.asarray(m), np.asarray(o))
        for m, o in zip(mesh["fp8"], one["fp8"], strict=True)
        if np.ndim(o) == 2
    ]
    for ours, reference in pairs:  # [3, 16] amax histories, newest first: 4 updates recorded
        assert (reference[:, :4] > 0).all() and (reference[:, 4:] == 0).all()
        # the first three windows' amaxes are the global ones: a per-device amax would be off by tens
        # of percent; later an fp8 rounding flipped by a float32 sum in another order may move a
        # near-zero gradient's amax, and the runs agree as the fp32 meshes do (1e-5, as above)
        np.testing.assert_allclose(ours[:, 1:4], reference[:, 1:4], rtol=1e-6)
    np.testing.assert_allclose(mesh["losses"], one["losses"], rtol=1e-5)
