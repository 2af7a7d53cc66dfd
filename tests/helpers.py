"""Helpers shared by the tests that train through ``jaxmp.train``: a tiny model and reading runs back."""

import json
from pathlib import Path

import jax

from jaxmp import hf, models
from jaxmp.checkpoint import Checkpointer

# A 2-layer, 32-wide GPT-2 with the byte tokenizer's 256 ids: checkpoints of about 0.3 MB instead of
# gpt2-tiny's 35 MB, so tests that save, kill and resume many times stay fast.
TINY_GPT2 = {"vocab_size": 256, "n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64, "max_positions": 64}


def write_tiny_lm(directory: Path) -> Path:
    """Writes the tiny GPT-2 as a Hugging Face directory (``--init DIRECTORY``); returns it."""
    model = models.get_model("gpt2-tiny", **TINY_GPT2)
    hf.save_pretrained(model, models.init_params(model, jax.random.key(0), 8), directory)
    return directory


def run_params(run_dir: Path):
    """The params of a run directory's newest checkpoint (fp32), for its ``--init`` model or preset."""
    config = json.loads((run_dir / "config.json").read_text())
    if config["init"]:
        _, params = hf.from_pretrained(config["init"], "fp32")
        target = jax.eval_shape(lambda: params)
    else:
        model = models.get_model(config["model"], config["policy"], vocab_size=256)
        target = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 16))
    return Checkpointer(run_dir / "checkpoints").restore_params(target)
