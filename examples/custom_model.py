"""Train your own Flax (Linen) transformer under a per-module precision policy.

    python examples/custom_model.py                                   # bf16, attention in fp32
    python examples/custom_model.py --policy fp16                     # dynamic loss scaling by default
    python examples/custom_model.py --policy "bf16;.*mlp.*:compute=float32"

The model is built only from Flax's own layers and says nothing about precision: no ``dtype``
anywhere. ``make_train_step(..., cast_params="per_module")`` gives each module the dtypes the
policy names for its path: ``.*attention.*`` computes in float32 here, the MLPs in bfloat16, the
LayerNorms in float32 (an fp32 island) and the logits come out in float32. Gradients, the
optimizer and the loss stay in float32. The table printed first shows what every module gets
(``python -m jaxmp.policy`` prints the same for presets and checkpoints).
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
from jaxmp.data.corpus import read_corpus


class Block(nn.Module):
    """Pre-norm transformer block made of Flax's layers."""

    num_heads: int

    @nn.compact
    def __call__(self, x_BxLxD):
        causal = nn.make_causal_mask(jnp.ones(x_BxLxD.shape[:2]))
        h = nn.LayerNorm()(x_BxLxD)
        x_BxLxD = x_BxLxD + nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(
            h, h, mask=causal
        )
        h = nn.LayerNorm()(x_BxLxD)
        h = nn.gelu(nn.Dense(4 * x_BxLxD.shape[-1], name="mlp_in")(h))
        return x_BxLxD + nn.Dense(x_BxLxD.shape[-1], name="mlp_out")(h)


class TinyLM(nn.Module):
    """A byte-level causal LM: ``ids int32[B, L] -> logits[B, L, 256]``."""

    width: int = 128
    depth: int = 2
    num_heads: int = 4
    max_len: int = 256

    @nn.compact
    def __call__(self, ids_BxL):
        x_BxLxD = nn.Embed(256, self.width, name="embed")(ids_BxL)
        x_BxLxD = x_BxLxD + nn.Embed(self.max_len, self.width, name="position")(
            jnp.arange(ids_BxL.shape[1])[None]
        )
        for index in range(self.depth):
            x_BxLxD = Block(self.num_heads, name=f"blocks_{index}")(x_BxLxD)
        return nn.Dense(256, name="lm_head")(nn.LayerNorm()(x_BxLxD))


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
    model = TinyLM()
    example = jnp.zeros((1, args.seq_len), jnp.int32)
    print(jaxmp.describe_policy(model, policy, example))  # also refuses an override matching no module
    params = model.init(jax.random.key(0), example)["params"]
    text = "".join(read_corpus(None).documents())  # tiny Shakespeare, shipped with jaxmp
    tokens = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int32)

    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params}, batch["ids"])  # float32: the model's output
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean(), {}

    optimizer = jaxmp.make_optimizer(learning_rate=3e-3, warmup_steps=10, total_steps=args.steps)
    state = jaxmp.TrainState.create(
        params=params, optimizer=optimizer, loss_scale=jaxmp.default_loss_scale(policy), rng=jax.random.key(1)
    )
    step = jaxmp.make_train_step(loss_fn, optimizer, policy, cast_params="per_module")
    rng = np.random.default_rng(0)
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
