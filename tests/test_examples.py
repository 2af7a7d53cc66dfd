"""The examples a user copies from: each trains its own Flax model under a per-module policy and learns."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["custom_model", "custom_nnx_model"])
def test_example_prints_the_policy_table_and_learns(name, capsys):
    final = load(name).main(["--steps", "40", "--seq-len", "32", "--batch-size", "8"])
    out = capsys.readouterr().out
    first = float(next(line for line in out.splitlines() if line.startswith("step    0")).split()[3])
    assert final < 0.8 * first, out
    table = [line.split() for line in out.splitlines() if "attention/query" in line]
    assert table and all(row[3] == "float32" and row[-1] == "1" for row in table), out  # override 1
