"""jaxmp against PyTorch AMP: the same GPT-2 shape, optimizer and batch, fp32 and bf16, tokens/s.

    python benchmarks/torch_peer.py [--shapes tiny,gpt2] [--repeats 5] [--json torch_peer.json]

The peer is transformers' ``GPT2LMHeadModel`` (its default attention implementation, no dropout)
trained with ``torch.optim.AdamW`` (betas 0.9/0.95, weight decay 0.1 on matrices only, as
``jaxmp.make_optimizer``), global-norm clipping at 1.0 and an fp32 cross-entropy; bf16 runs the
forward pass under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (PyTorch AMP, whose backward
follows the forward's dtypes). ``torch.set_num_threads`` matches the CPUs JAX uses. All four
candidates of a shape are timed round-robin in one process. ``OMP_WAIT_POLICY`` defaults to
``PASSIVE`` (see below; recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import os

# OpenMP threads that busy-wait at barriers stall for whole scheduler slices when a neighbour holds a
# core, which made PyTorch 8x slower than with one thread on a shared 2-core machine. Passive waiting
# (must be set before torch loads libgomp) costs nothing on an idle one. OMP_WAIT_POLICY=ACTIVE restores it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import interleaved_times, lm_train_step, markdown_table, median, report  # noqa: E402
from policies import SHAPES  # noqa: E402

from jaxmp import models  # noqa: E402


class TorchStep:
    """One PyTorch AMP train step of ``GPT2LMHeadModel`` shaped like jaxmp's ``preset``."""

    def __init__(self, preset: str, batch: dict, bf16: bool):
        c = models.get_config(preset)
        config = transformers.GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.max_positions,
            n_embd=c.d_model,
            n_layer=c.n_layers,
            n_head=c.n_heads,
            n_inner=c.d_ff,
            activation_function=c.activation,
            layer_norm_epsilon=c.layer_norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        torch.manual_seed(0)
        self.model = transformers.GPT2LMHeadModel(config).train()
        self.attention = self.model.config._attn_implementation
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=1e-4,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        self.input_ids = torch.from_numpy(np.array(batch["input_ids"])).long()
        self.targets = torch.from_numpy(np.array(batch["targets"])).long()
        self.bf16 = bf16
        self.run_once()

    def run_once(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            logits = self.model(self.input_ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), self.targets.reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def measure(shape: str, repeats: int) -> dict:
    preset, batch_size, seq_len = SHAPES[shape]
    candidates, tokens, attention = {}, batch_size * seq_len, None
    for policy in ("fp32", "bf16"):
        step = lm_train_step(preset, policy, batch_size, seq_len)
        peer = TorchStep(preset, step.batch, bf16=policy == "bf16")
        attention = peer.attention
        candidates[f"jaxmp {policy}"] = step.run_once
        candidates[f"torch {policy}"] = peer.run_once
    times = interleaved_times(candidates, repeats)
    tokens_per_second = {name: tokens / median(t["wall"]) for name, t in times.items()}
    cpu_tokens_per_second = {name: tokens / median(t["cpu"]) for name, t in times.items()}
    return {
        "shape": shape,
        "model": preset,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "torch_attention": attention,
        "tokens_per_second": tokens_per_second,
        "cpu_tokens_per_second": cpu_tokens_per_second,
        "times": times,
        "jaxmp_over_torch": {
            policy: tokens_per_second[f"jaxmp {policy}"] / tokens_per_second[f"torch {policy}"]
            for policy in ("fp32", "bf16")
        },
        "cpu_jaxmp_over_torch": {
            policy: cpu_tokens_per_second[f"jaxmp {policy}"] / cpu_tokens_per_second[f"torch {policy}"]
            for policy in ("fp32", "bf16")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,gpt2", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per candidate")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    results = [measure(shape, args.repeats) for shape in args.shapes.split(",")]
    rows = []
    for r in results:
        t = r["tokens_per_second"]
        for policy, torch_name in (("fp32", "fp32"), ("bf16", "autocast bf16")):
            rows.append(
                (
                    f"{r['model']} {r['batch_size']}x{r['seq_len']}",
                    policy,
                    f"{t[f'jaxmp {policy}']:.0f}",
                    f"{t[f'torch {policy}']:.0f} ({torch_name})",
                    f"{r['jaxmp_over_torch'][policy]:.2f}",
                    f"{r['cpu_jaxmp_over_torch'][policy]:.2f}",
                )
            )
    headers = (
        "shape",
        "dtype",
        "jaxmp tokens/s",
        "PyTorch tokens/s",
        "jaxmp / PyTorch",
        "jaxmp / PyTorch (CPU)",
    )
    report("jaxmp vs PyTorch AMP", markdown_table(headers, rows), results, args.json)


if __name__ == "__main__":
    main()
