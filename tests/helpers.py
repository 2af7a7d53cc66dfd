"""Helpers shared by the tests that train through ``jaxmp.train``: a tiny model and reading runs back."""

import json
import struct
from collections import defaultdict
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


def read_event_files(logdir: Path) -> list[list]:
    """Every TensorBoard event file's events, files in name order (as TensorBoard reads a directory).

    Records are TFRecord frames (length, masked CRC-32C of the length, data, masked CRC-32C of the
    data); both checksums are checked. A truncated last frame (a process killed while writing it) is
    left out, as TensorBoard leaves it out.
    """
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    files = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, offset, events = path.read_bytes(), 0, []
        while offset + 12 <= len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            if offset + 16 + length > len(data):
                break
            assert struct.unpack("<I", data[offset + 8 : offset + 12])[0] == masked_crc32c(header), path
            body = data[offset + 12 : offset + 12 + length]
            assert struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])[0] == masked_crc32c(
                body
            )
            events.append(Event.FromString(body))
            offset += 16 + length
        files.append(events)
    return files


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: each tag's (step, value) points, where a ``SessionLog.START`` event at
    step s (a writer's ``purge_step``) hides every point read before it at a step >= s."""
    from tensorboardX.proto.event_pb2 import SessionLog

    scalars = defaultdict(list)
    for events in read_event_files(logdir):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for tag, points in scalars.items():
                    scalars[tag] = [(step, value) for step, value in points if step < event.step]
            for value in event.summary.value:
                scalars[value.tag].append((event.step, value.simple_value))
    return dict(scalars)


def equations(jaxpr) -> list:
    """Every equation of ``jaxpr`` and of the jaxprs inside it (scan, remat, pjit, custom VJPs)."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += equations(sub)
    return found
