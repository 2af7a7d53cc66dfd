#!/usr/bin/env bash
# One prepared GPU benchmark run (at most 8 minutes): GPT-2-medium-sized bf16 tokens/s and MFU,
# bf16 : TF32 : fp32 step times, fp8 (delayed, current) vs bf16 with the FP8 GEMMs XLA emitted,
# fp16 loss-scaling overhead.
#
#   bash benchmarks/gpu.sh [gpu_bench.py flags, e.g. --batch-size 16]
#
# Needs a Python with CUDA JAX, flax, optax and jmp already installed; downloads nothing. jaxmp
# is used from this checkout through PYTHONPATH (no pip install). Results: the printed table and
# $OUT/gpu_bench.json (OUT defaults to the current directory).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-.}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
python - <<'PY'
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "jmp", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages {', '.join(missing)}; install them first (no network is used)")
import jax
print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
if jax.default_backend() != "gpu":
    print("gpu.sh: warning: no GPU backend; timings below are not GPU figures", file=sys.stderr)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
exec timeout 480 python "$repo/benchmarks/gpu_bench.py" --json "$out/gpu_bench.json" "$@"
