"""What the per-module policy costs on a user's Flax model: interception against hand-written casts.

    python benchmarks/module_policy.py [--width 256] [--depth 4] [--batch-size 16] [--seq-len 128]
                                       [--repeats 20] [--json module_policy.json]

The same Linen transformer (Flax's own layers) trained two ways under
``bf16;.*attention.*:compute=float32``, in one run, alternately:

* **per_module**: the model has no ``dtype`` anywhere; ``make_train_step(cast_params="per_module")``
  casts each param by its path and intercepts every module call;
* **hand_written**: the model's code names every dtype itself (``dtype=bfloat16`` on the
  embedding and MLP, ``float32`` on attention and the LayerNorms, the head's output cast to fp32)
  and the step casts nothing (``cast_params=False``).

Both compute the same thing (the script checks the losses agree); the ratio of their median step
times is the interception's overhead.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
from common import interleaved_times, markdown_table, median, random_batch, report

import jaxmp

POLICY = "bf16;.*attention.*:compute=float32"
VOCAB = 256


class Block(nn.Module):
    num_heads: int
    compute: jnp.dtype | None  # None: as the policy says (per_module); else hand-written dtypes
    attention: jnp.dtype | None
    norm: jnp.dtype | None

    @nn.compact
    def __call__(self, x):
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm(dtype=self.norm)(x)
        attention = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.attention, name="attention")
        x = x + attention(h, h, mask=causal).astype(x.dtype)
        h = nn.LayerNorm(dtype=self.norm)(x)
        h = nn.gelu(nn.Dense(4 * x.shape[-1], dtype=self.compute, name="mlp_in")(h))
        return x + nn.Dense(x.shape[-1], dtype=self.compute, name="mlp_out")(h)


class Model(nn.Module):
    width: int
    depth: int
    hand_written: bool

    @nn.compact
    def __call__(self, ids):
        compute, attention, norm = (
            (jnp.bfloat16, jnp.float32, jnp.float32) if self.hand_written else (None,) * 3
        )
        x = nn.Embed(VOCAB, self.width, dtype=compute, name="embed")(ids)
        for index in range(self.depth):
            x = Block(4, compute, attention, norm, name=f"blocks_{index}")(x)
        x = nn.LayerNorm(dtype=norm)(x)
        if self.hand_written:
            x = x.astype(compute)
        return nn.Dense(VOCAB, dtype=compute, name="lm_head")(x).astype(jnp.float32)


def make_step(model: Model, cast_params, params):
    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params}, batch["input_ids"])
        return jnp.mean(
            jax.nn.logsumexp(logits, -1)
            - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        ), {}

    optimizer = jaxmp.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=1000)
    state = jaxmp.TrainState.create(params=params, optimizer=optimizer)
    step = jaxmp.make_train_step(loss_fn, optimizer, POLICY, cast_params=cast_params, donate=False)
    return step, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    batch = random_batch(VOCAB, args.batch_size, args.seq_len)
    per_module = Model(args.width, args.depth, hand_written=False)
    hand_written = Model(args.width, args.depth, hand_written=True)
    params = per_module.init(jax.random.key(0), batch["input_ids"])["params"]  # same tree for both
    steps = {
        "per_module": make_step(per_module, "per_module", params),
        "hand_written": make_step(hand_written, False, params),
    }
    losses = {}
    for name, (step, state) in steps.items():  # compile, and check both compute the same loss
        losses[name] = float(jax.block_until_ready(step(state, batch))[1]["loss"])
    times = interleaved_times(
        {
            name: (lambda s=step, st=state: jax.block_until_ready(s(st, batch)))
            for name, (step, state) in steps.items()
        },
        args.repeats,
    )
    wall = {name: median(t["wall"]) for name, t in times.items()}
    ratio = wall["per_module"] / wall["hand_written"]
    rows = [
        [name, f"{1000 * wall[name]:.1f}", f"{wall[name] / wall['hand_written']:.3f}", f"{losses[name]:.5f}"]
        for name in steps
    ]
    table = markdown_table(["step", "median ms", "× hand-written", "loss"], rows)
    report(
        f"Per-module policy on a user's Linen model ({POLICY}): width {args.width}, depth {args.depth}, "
        f"batch {args.batch_size} x {args.seq_len}",
        table,
        {"step_seconds": wall, "ratio": ratio, "losses": losses, "times": times},
        args.json,
    )


if __name__ == "__main__":
    main()
