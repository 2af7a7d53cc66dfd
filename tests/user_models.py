"""Small transformers as a user writes them: only Flax's own layers (Linen and NNX), no jaxmp code."""

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class Mlp(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(4 * self.width, name="up")(x))
        return nn.Dense(self.width, name="down")(h)


class Block(nn.Module):
    width: int
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:-1]))  # [..., L, D] -> [..., 1, L, L]
        h = nn.LayerNorm()(x)  # auto-named LayerNorm_0
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        return x + Mlp(self.width, name="mlp")(h)


class ScannedBlock(nn.Module):
    """``Block`` in the ``(carry, x) -> (carry, y)`` form ``nn.scan`` asks for."""

    width: int

    @nn.compact
    def __call__(self, x, _):
        return Block(self.width, name="block")(x), None


class TinyLM(nn.Module):
    """Embedding, two pre-norm blocks, final LayerNorm, head. ``variant``: ``plain`` (blocks_0,
    blocks_1), ``scan`` (one ``nn.scan``-ned block), ``remat`` (``nn.remat`` blocks), ``vmap``
    (``nn.vmap``-ped blocks, each sequence of the batch on its own) or ``shared`` (one block
    applied twice)."""

    vocab: int
    width: int = 32
    variant: str = "plain"

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="embed")(ids)
        if self.variant == "scan":
            stack = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            x, _ = stack(self.width, name="blocks")(x, None)
        elif self.variant == "shared":
            block = Block(self.width, name="blocks_0")
            x = block(block(x))
        else:
            kind = {
                "remat": nn.remat(Block),
                "vmap": nn.vmap(
                    Block, in_axes=0, out_axes=0, variable_axes={"params": None}, split_rngs={"params": False}
                ),
            }.get(self.variant, Block)
            for index in range(2):
                x = kind(self.width, name=f"blocks_{index}")(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(self.vocab, name="lm_head")(x)


class NnxBlock(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.LayerNorm = nnx.LayerNorm(width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=width, decode=False, rngs=rngs)
        self.mlp = NnxMlp(width, rngs)

    def __call__(self, x):
        mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + self.attention(self.LayerNorm(x), mask=mask)
        return x + self.mlp(x)


class NnxMlp(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


class NnxLM(nnx.Module):
    num_blocks = 2

    def __init__(self, vocab: int, rngs: nnx.Rngs, width: int = 32):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(width, rngs) for _ in range(self.num_blocks)])
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
