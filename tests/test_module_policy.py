"""One policy string for a user's own Flax model: per-module dtypes in Linen and NNX models built only
from Flax's layers, read off the traced train step (every ``dot_general``'s operand dtypes)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import equations
from user_models import NnxLM, TinyLM

import jaxmp
from jaxmp.data.corpus import read_corpus
from jaxmp.diagnostics import diagnose
from jaxmp.module_policy import module_path_of
from jaxmp.training.compare_model import compare_policies
from jaxmp.training.compare_model import markdown_table as compare_markdown

OVERRIDE = "bf16;.*attention.*:compute=float32"
VOCAB, LENGTH = 64, 16


def operand_dtypes(jaxpr, primitive: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(name stack, operand dtypes)`` of every ``primitive`` equation in ``jaxpr``, sub-jaxprs included."""
    return [
        (str(eqn.source_info.name_stack), tuple(str(v.aval.dtype) for v in eqn.invars))
        for eqn in equations(jaxpr)
        if eqn.primitive.name == primitive
    ]


def dots(jaxpr) -> list[tuple[str, tuple[str, ...]]]:
    return operand_dtypes(jaxpr, "dot_general")


def batch(seed: int = 0, size: int = 4) -> dict:
    ids = jax.random.randint(jax.random.key(seed), (size, LENGTH + 1), 0, VOCAB)
    return {"ids": ids}


def linen_loss(model):
    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params}, batch["ids"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean(), logits[
            0, 0, 0
        ]

    return loss_fn


def step_jaxpr(model, params, policy, cast_params="per_module"):
    optimizer = jaxmp.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    state = jaxmp.TrainState.create(params=params, optimizer=optimizer)
    step = jaxmp.make_train_step(linen_loss(model), optimizer, policy, cast_params=cast_params, jit=False)
    return jax.make_jaxpr(step)(state, batch()).jaxpr


def init(model):
    return model.init(jax.random.key(0), batch()["ids"][:, :-1])["params"]


def by_module(found, *names):
    """The operand dtypes of the dots whose name stack names ``name`` (forward and backward)."""
    return {name: {dtypes for stack, dtypes in found if name in stack} for name in names}


# ------------------------------------------------------------------------------------------------ Linen


@pytest.mark.parametrize("variant", ["plain", "scan", "remat", "vmap", "shared"])
def test_linen_dots_follow_the_policy_per_module(variant):
    model = TinyLM(vocab=VOCAB, variant=variant)
    found = dots(step_jaxpr(model, init(model), OVERRIDE))
    groups = by_module(found, "attention", "mlp", "lm_head")
    assert groups == {
        "attention": {("float32", "float32")},  # q/k/v/out projections and both attention einsums
        "mlp": {("bfloat16", "bfloat16")},
        "lm_head": {("bfloat16", "bfloat16")},
    }, groups
    assert {dtypes for _, dtypes in found} == {("float32", "float32"), ("bfloat16", "bfloat16")}


def test_without_the_override_attention_computes_in_bf16_and_a_global_cast_ignores_overrides():
    model = TinyLM(vocab=VOCAB)
    params = init(model)
    assert by_module(dots(step_jaxpr(model, params, "bf16")), "attention")["attention"] == {("bfloat16",) * 2}
    # The global cast (today's default for plain functions) cannot see modules: the override does nothing.
    globally = dots(step_jaxpr(model, params, OVERRIDE, cast_params=True))
    assert by_module(globally, "attention")["attention"] == {("bfloat16",) * 2}


def layer_norm_dtypes(model, policy) -> dict[str, set[str]]:
    """The dtypes LayerNorm_0 of block 0 reads, normalises in and returns, recorded at its call."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if "/".join(context.module.path) == "blocks_0/LayerNorm_0":
            seen.update(input=args[0].dtype, output=out.dtype)
        return out

    import flax.linen as nn

    params = jaxmp.cast_params_per_module(init(model), policy)
    with jaxmp.linen_policy(policy), nn.intercept_methods(record):
        model.apply({"params": params}, batch()["ids"][:, :-1])
    return {key: str(value) for key, value in seen.items()}


def test_layer_norm_is_an_fp32_island_unless_an_override_says_otherwise():
    """Flax's LayerNorm takes its mean and variance in at least fp32 whatever it is given (its
    ``force_float32_reductions``, and jnp's reductions); the policy decides what it normalises in."""
    model = TinyLM(vocab=VOCAB)
    assert layer_norm_dtypes(model, "bf16") == {"input": "float32", "output": "float32"}
    overridden = "bf16;.*LayerNorm.*:compute=bfloat16"
    assert layer_norm_dtypes(model, overridden) == {"input": "bfloat16", "output": "bfloat16"}


def test_gradients_are_float32_and_the_loss_and_outputs_float32():
    model = TinyLM(vocab=VOCAB)
    params = init(model)
    loss_fn = linen_loss(model)

    def loss(params):
        with jaxmp.linen_policy(OVERRIDE):
            return loss_fn(jaxmp.cast_params_per_module(params, OVERRIDE), batch(), None)

    (value, a_logit), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert value.dtype == jnp.float32 and a_logit.dtype == jnp.float32  # the model's output: policy output
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))


def train(model, policy, steps, cast_params="per_module"):
    """``steps`` updates on tiny Shakespeare's bytes (ids modulo the vocabulary); returns (losses, params)."""
    text = np.frombuffer("".join(read_corpus(None).documents())[:200_000].encode(), np.uint8) % VOCAB
    optimizer = jaxmp.make_optimizer(learning_rate=3e-3, warmup_steps=5, total_steps=steps, clip_norm=1.0)
    state = jaxmp.TrainState.create(params=init(model), optimizer=optimizer)
    step = jaxmp.make_train_step(linen_loss(model), optimizer, policy, cast_params=cast_params)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        starts = rng.integers(0, len(text) - LENGTH - 1, 16)
        ids = np.stack([text[s : s + LENGTH + 1] for s in starts]).astype(np.int32)
        state, metrics = step(state, {"ids": ids})
        losses.append(float(metrics["loss"]))
    return losses, state.params


def test_an_all_fp32_policy_equals_a_plain_fp32_step_bit_for_bit():
    model = TinyLM(vocab=VOCAB)
    per_module = train(model, "fp32", 3)
    plain = train(model, "fp32", 3, cast_params=False)
    assert per_module[0] == plain[0]
    jax.tree.map(np.testing.assert_array_equal, per_module[1], plain[1])


def test_bf16_with_overrides_trains_within_one_percent_of_fp32():
    model = TinyLM(vocab=VOCAB)
    fp32, _ = train(model, "fp32", 150)
    mixed, _ = train(model, OVERRIDE, 150)
    assert fp32[-1] < 0.75 * fp32[0]  # it learned something
    final = lambda losses: float(np.mean(losses[-10:]))  # noqa: E731 -- a moving average of the last steps
    assert abs(final(mixed) / final(fp32) - 1) < 0.01, (final(mixed), final(fp32))


# -------------------------------------------------------------------------------------------------- NNX


def nnx_step_dots(policy):
    model = jaxmp.nnx_with_policy(NnxLM(vocab=VOCAB, rngs=nnx.Rngs(0)), policy)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, batch, rng):
        del rng
        logits = nnx.merge(graphdef, params)(batch["ids"][:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean(), ()

    optimizer = jaxmp.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    state = jaxmp.TrainState.create(params=params, optimizer=optimizer)
    step = jaxmp.make_train_step(loss_fn, optimizer, policy, cast_params="per_module", jit=False)
    grads = jax.grad(lambda p: loss_fn(jaxmp.cast_params_per_module(p, policy), batch(), None)[0])(params)
    return [dtypes for _, dtypes in dots(jax.make_jaxpr(step)(state, batch()).jaxpr)], grads


def test_nnx_layers_compute_in_the_dtype_of_their_path():
    found, grads = nnx_step_dots(OVERRIDE)
    # Per block: q, k, v and out projections and two attention einsums in fp32 (the override), the
    # MLP's two Linears in bf16; then the head in bf16. Every forward dot has two backward dots.
    blocks = NnxLM.num_blocks
    assert found.count(("float32", "float32")) == 3 * 6 * blocks
    assert found.count(("bfloat16", "bfloat16")) == 3 * (2 * blocks + 1)
    assert len(found) == 3 * (8 * blocks + 1)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    found, _ = nnx_step_dots("bf16")
    # No dot computes in fp32 (the backward of flax's attention softmax feeds two of them an fp32
    # cotangent, which XLA converts).
    assert ("float32", "float32") not in found and found.count(("bfloat16", "bfloat16")) >= len(found) - 4


def test_nnx_with_policy_sets_each_layers_dtype_and_leaves_the_model_alone():
    model = NnxLM(vocab=VOCAB, rngs=nnx.Rngs(0))
    applied = jaxmp.nnx_with_policy(model, OVERRIDE)
    dtypes = {
        "/".join(map(str, path)): module.dtype
        for path, module in nnx.iter_modules(applied)
        if hasattr(module, "dtype")
    }
    assert dtypes["blocks/0/attention/query"] == jnp.float32 and dtypes["blocks/0/attention"] == jnp.float32
    assert dtypes["blocks/0/mlp/up"] == jnp.bfloat16 and dtypes["head"] == jnp.bfloat16
    assert dtypes["blocks/0/LayerNorm"] == jnp.float32  # the island, by its attribute name
    assert all(getattr(m, "dtype", None) in (None, jnp.float32) for _, m in nnx.iter_modules(model))


# ---------------------------------------------------------------------------------------------- paths


def test_param_paths_name_their_module():
    tree = {"params": {"blocks_0": {"attention": {"query": {"kernel": 1}}}}}
    ((key_path, _),) = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert module_path_of(key_path) == "blocks_0/attention/query"
    _, state = nnx.split(NnxLM(vocab=VOCAB, rngs=nnx.Rngs(0)), nnx.Param)
    paths = {module_path_of(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert "blocks/0/attention/query" in paths and "head" in paths


# ------------------------------------------------------------------------------------ describe_policy


def rows(table) -> dict[str, tuple[str, str, str, str]]:
    return {row.path: (row.params, row.compute, row.output, row.rule) for row in table.rows}


def test_describe_policy_of_a_users_linen_and_nnx_model():
    linen = rows(jaxmp.describe_policy(TinyLM(vocab=VOCAB), OVERRIDE, batch()["ids"]))
    assert linen[""] == ("float32", "bfloat16", "float32", "base")  # the model: outputs in fp32
    assert linen["blocks_0/attention/query"] == ("float32", "float32", "float32", "override 1")
    assert linen["blocks_0/LayerNorm_0"] == ("float32", "float32", "float32", "island")
    assert linen["blocks_1/mlp/up"] == ("float32", "bfloat16", "bfloat16", "base")
    nnx_rows = rows(jaxmp.describe_policy(NnxLM(vocab=VOCAB, rngs=nnx.Rngs(0)), OVERRIDE))
    assert nnx_rows["blocks/0/attention/query"][1:] == ("float32", "float32", "override 1")
    assert nnx_rows["blocks/1/mlp/up"][1] == "bfloat16" and nnx_rows["blocks/0/LayerNorm"][3] == "island"


def test_describe_policy_of_a_preset_lists_the_softmax_and_logits_inside_modules():
    model = jaxmp.models.get_model("gpt2-tiny")
    table = jaxmp.describe_policy(model, "bf16;.*softmax:compute=bfloat16,output=bfloat16", batch()["ids"])
    described = rows(table)
    assert described["blocks_0/attn/softmax"] == ("float32", "bfloat16", "bfloat16", "override 1")
    assert described["blocks_0/norm1"][1:] == ("float32", "float32", "island")
    assert described["blocks_0/mlp/fc_in"][1:] == ("bfloat16", "bfloat16", "base")
    lines = str(table).splitlines()
    assert lines[0].startswith("policy params=float32,compute=bfloat16") and lines[1].split()[0] == "module"
    assert any(line.split()[:2] == ["blocks_0/attn/softmax", "softmax"] for line in lines)


@pytest.mark.parametrize(
    "model, args",
    [(TinyLM(vocab=VOCAB), (batch()["ids"],)), (NnxLM(vocab=VOCAB, rngs=nnx.Rngs(0)), ())],
    ids=["linen", "nnx"],
)
def test_an_override_matching_no_module_is_an_error_naming_it_and_the_closest_paths(model, args):
    with pytest.raises(ValueError, match=r"override 2 pattern '\.\*atention\.\*' matches no module") as error:
        jaxmp.describe_policy(model, "bf16;.*mlp.*:compute=float32;.*atention.*:compute=float32", *args)
    assert "attention" in str(error.value).split("closest module paths:")[1]


def test_policy_cli_tables_a_preset_and_a_hugging_face_directory(tiny_lm_dir, capsys):
    from jaxmp.policy import main

    assert main(["--model", "llama-tiny", "--policy", "bf16;.*attn.*:compute=float32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(
        line.split()[:2] == ["blocks_0/attn/query", "Dense"] and line.endswith("override 1") for line in out
    )
    assert main(["--model", str(tiny_lm_dir), "--policy", "fp16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.split()[0] == "blocks_1/norm2" and line.split()[3] == "float32" for line in out)
    for argv, named in (
        (
            ["--model", "llama-tiny", "--policy", "bf16;.*atn.*:compute=float32"],
            "'.*atn.*' matches no module",
        ),
        (["--model", "gpt5", "--policy", "bf16"], "unknown model 'gpt5'"),
        (["--model", "llama-tiny", "--policy", "bf17"], "--policy: unknown policy 'bf17'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and named in err, err


# --------------------------------------------------------------------------- diagnose and compare


def lm_batches(count: int = 2) -> list[dict]:
    return [{"input_ids": b["ids"][:, :-1], "targets": b["ids"][:, 1:]} for b in map(batch, range(count))]


def test_diagnose_a_users_linen_model_per_module():
    model = TinyLM(vocab=VOCAB)
    params = init(model)
    exact = diagnose(model, params, "fp32", lm_batches())
    assert exact.entries and all(e.at_one.relative_error == 0 for e in exact.entries)
    diagnosis = diagnose(model, params, "fp16;.*attention.*:compute=float32", lm_batches())
    entries = {(e.kind, e.name): e for e in diagnosis.entries}
    assert entries["param_grad", "blocks_0/mlp/up/kernel"].dtype == "float16"
    assert entries["param_grad", "blocks_0/attention/query/kernel"].dtype == "float32"
    assert entries["activation", "blocks_1/mlp/down"].dtype == "float16"
    assert entries["activation", "blocks_1/attention/out"].dtype == "float32"
    mlp, attention = (
        entries["activation", f"blocks_1/{m}"].at_one.relative_error for m in ("mlp/down", "attention/out")
    )
    assert 1e-5 < mlp < 1e-2 and attention < mlp  # fp16 rounding where the policy says fp16 only
    assert diagnosis.recommended_loss_scale is not None


def test_diagnose_a_users_nnx_model_reports_its_parameter_gradients():
    model = NnxLM(vocab=VOCAB, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    diagnosis = diagnose(model, params, "fp16;.*attention.*:compute=float32", lm_batches())
    grads = {e.name: e for e in diagnosis.entries if e.kind == "param_grad"}
    assert {e.kind for e in diagnosis.entries} == {"param_grad"}
    assert grads["blocks/0/mlp/up/kernel"].dtype == "float16" and grads["head/kernel"].dtype == "float16"
    assert grads["blocks/0/attention/query/kernel"].dtype == "float32"
    assert 0 < grads["blocks/0/mlp/up/kernel"].at_one.relative_error < 1e-2


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_compare_policies_on_a_users_model(kind):
    if kind == "linen":
        model = TinyLM(vocab=VOCAB)
        params = init(model)
    else:
        model = NnxLM(vocab=VOCAB, rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
    # XLA:CPU has no fp16 x fp16 -> fp32 dot, which NNX's attention asks for: its attention stays fp32.
    policies = ["fp32", OVERRIDE, "fp16" if kind == "linen" else "fp16;.*attention.*:compute=float32"]
    runs = compare_policies(
        model, params, policies, lm_batches(4), steps=12, eval_batches=lm_batches(1), learning_rate=3e-3
    )
    assert [run.policy for run in runs] == [str(jaxmp.get_policy(p)) for p in policies]
    for run in runs:
        assert len(run.losses) == 12 and run.losses[-1] < run.losses[0] and run.eval_loss is not None
    fp32, mixed, fp16 = runs
    assert fp32.losses[0] == pytest.approx(mixed.losses[0], rel=1e-2)  # same params, same first batch
    assert fp32.final_loss_scale == 1.0 and fp16.final_loss_scale > 1.0  # auto: dynamic for fp16 only
    table = compare_markdown(runs).splitlines()
    assert len(table) == 5 and table[2].split("|")[4].strip() == "1.0000"  # fp32 against itself
