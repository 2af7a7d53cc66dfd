"""The same for a Flax NNX model: a per-module policy without touching the model's code.

    python examples/custom_nnx_model.py --policy "bf16;.*attention.*:compute=float32"

``jaxmp.nnx_with_policy`` returns a copy of the model whose layers compute in the dtype the
policy names for their path (``blocks/0/attention/query``); ``cast_params="per_module"`` casts
each fp32 master param to its module's compute dtype inside the step.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxmp
from jaxmp.data.corpus import read_corpus


class Block(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=4, in_features=width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x_BxLxD):
        x_BxLxD = x_BxLxD + self.attention(self.norm1(x_BxLxD), mask=nnx.make_causal_mask(x_BxLxD[..., 0]))
        return x_BxLxD + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x_BxLxD))))


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 128, depth: int = 2):
        self.embed = nnx.Embed(256, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs) for _ in range(depth)])
        self.final_norm = nnx.LayerNorm(width, rngs=rngs)
        self.lm_head = nnx.Linear(width, 256, rngs=rngs)

    def __call__(self, ids_BxL):
        x_BxLxD = self.embed(ids_BxL)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        return self.lm_head(self.final_norm(x_BxLxD))


def main(argv=None) -> float:
    """Trains; returns the final loss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--policy", default="bf16;.*attention.*:compute=float32", help="a jaxmp policy string"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    policy = jaxmp.get_policy(args.policy)
    model = TinyLM(nnx.Rngs(0))
    print(jaxmp.describe_policy(model, policy))
    graphdef, params = nnx.split(jaxmp.nnx_with_policy(model, policy), nnx.Param)
    tokens = np.frombuffer("".join(read_corpus(None).documents()).encode(), np.uint8).astype(np.int32)

    def loss_fn(params, batch, rng):
        del rng
        logits = nnx.merge(graphdef, params)(batch["ids"]).astype(jnp.float32)  # fp32 island: the loss
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean(), {}

    optimizer = jaxmp.make_optimizer(learning_rate=3e-3, warmup_steps=10, total_steps=args.steps)
    state = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=jaxmp.default_loss_scale(policy)
    )
    step = jaxmp.make_train_step(loss_fn, optimizer, policy, cast_params="per_module")
    rng = np.random.default_rng(0)
    for i in range(args.steps):
        starts = rng.integers(0, len(tokens) - args.seq_len - 1, args.batch_size)
        window = np.stack([tokens[s : s + args.seq_len + 1] for s in starts])
        state, metrics = step(state, {"ids": window[:, :-1], "targets": window[:, 1:]})
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {float(metrics['loss']):.3f}")
    return float(metrics["loss"])


if __name__ == "__main__":
    main()
