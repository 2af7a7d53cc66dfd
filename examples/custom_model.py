"""Train your own small Flax transformer with jaxmp's mixed-precision step.

    python examples/custom_model.py --policy bf16
    python examples/custom_model.py --policy fp16      # dynamic loss scaling by default

The model knows nothing about precision: ``make_train_step`` casts its fp32 master
params (and float inputs) to the policy's compute dtype, keeps gradients and the
optimizer in fp32, and scales the loss when the policy computes in fp16.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmp

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. "
) * 20


class Block(nn.Module):
    """Pre-norm transformer block; computes in whatever dtype its inputs and params have."""

    num_heads: int

    @nn.compact
    def __call__(self, x_BxLxD):
        length = x_BxLxD.shape[1]
        causal = nn.make_causal_mask(jnp.ones((1, length)))
        h = nn.LayerNorm(dtype=x_BxLxD.dtype)(x_BxLxD)
        x_BxLxD = x_BxLxD + nn.SelfAttention(self.num_heads, dtype=x_BxLxD.dtype)(h, mask=causal)
        h = nn.LayerNorm(dtype=x_BxLxD.dtype)(x_BxLxD)
        h = nn.Dense(4 * x_BxLxD.shape[-1], dtype=x_BxLxD.dtype)(h)
        return x_BxLxD + nn.Dense(x_BxLxD.shape[-1], dtype=x_BxLxD.dtype)(nn.gelu(h))


class TinyLM(nn.Module):
    """A byte-level causal LM: ``ids int32[B, L] -> logits[B, L, 256]``."""

    width: int = 128
    depth: int = 2
    num_heads: int = 4
    dtype: jnp.dtype = jnp.float32  # compute dtype of the embedding output

    @nn.compact
    def __call__(self, ids_BxL):
        embed = nn.Embed(256, self.width, dtype=self.dtype)
        position = self.param("position", nn.initializers.normal(0.02), (256, self.width))
        x_BxLxD = embed(ids_BxL) + position[None, : ids_BxL.shape[1]].astype(self.dtype)
        for _ in range(self.depth):
            x_BxLxD = Block(self.num_heads)(x_BxLxD)
        return embed.attend(nn.LayerNorm(dtype=self.dtype)(x_BxLxD))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="bf16", help="a jaxmp policy string, e.g. fp16 or bf16")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    policy = jaxmp.get_policy(args.policy)
    model = TinyLM(dtype=policy.compute_dtype)
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int32)
    params = model.init(jax.random.key(0), jnp.zeros((1, args.seq_len), jnp.int32))["params"]

    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params}, batch["ids"]).astype(jnp.float32)  # fp32 island: logits
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return loss, {}

    optimizer = jaxmp.make_optimizer(
        learning_rate=3e-3, warmup_steps=10, total_steps=args.steps, weight_decay=0.0
    )
    state = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=jaxmp.default_loss_scale(policy), rng=jax.random.key(1)
    )
    step = jaxmp.make_train_step(loss_fn, optimizer, policy)
    rng = np.random.default_rng(0)
    print(f"policy {policy}; loss scale {type(state.loss_scale).__name__}")
    start = time.perf_counter()
    for i in range(args.steps):
        starts = rng.integers(0, len(tokens) - args.seq_len - 1, args.batch_size)
        window = np.stack([tokens[s : s + args.seq_len + 1] for s in starts])
        state, metrics = step(state, {"ids": window[:, :-1], "targets": window[:, 1:]})
        if i % 25 == 0 or i == args.steps - 1:
            print(
                f"step {i:4d}  loss {float(metrics['loss']):.3f}  loss_scale {float(metrics['loss_scale']):g}"
                f"  skipped {int(metrics['skipped_steps'])}"
            )
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    return float(metrics["loss"])


if __name__ == "__main__":
    main()
