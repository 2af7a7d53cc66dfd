"""Test configuration: strict rank promotion and a quiet, CPU-only JAX; one XLA compilation cache for
the session; shared fixtures."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests train the same tiny models, in this process and in `python -m jaxmp.train` subprocesses
# (which inherit the environment): a persistent cache compiles each program once per session.
_XLA_CACHE = tempfile.mkdtemp(prefix="jaxmp-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The tests' programs are tiny and compiled once or twice each: LLVM's lowest optimisation level
# compiles them faster than its default runs them slower. It changes machine code, not the HLO the
# tests inspect; the CLI subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import write_tiny_lm  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny GPT-2 Hugging Face directory to train from with ``--init`` (see ``helpers.TINY_GPT2``)."""
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm") / "gpt2")
