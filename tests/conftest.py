"""Test configuration: strict rank promotion and a quiet, CPU-only JAX; shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import write_tiny_lm  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny GPT-2 Hugging Face directory to train from with ``--init`` (see ``helpers.TINY_GPT2``)."""
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm") / "gpt2")
