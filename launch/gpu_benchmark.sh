#!/usr/bin/env bash
# The avlm_b16 train step on one GPU (bf16, cuDNN flash attention) over a batch sweep:
# MFU, peak memory and examples/s per batch size, as JSON and a Markdown table in OUT.
#
#   bash launch/gpu_benchmark.sh [OUT] [more launch.benchmark_gpu flags]
#   AVLM_GPU_BENCHMARK_DRY=1 bash launch/gpu_benchmark.sh /tmp/dry   # CPU dry run, tiny config
#
# Python from $AVLM_VENV (default: .venv beside this repo). Without a GPU (and not dry) it
# exits with one line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-workdir/gpu_benchmark}"
shift || true
python="${AVLM_VENV:-.venv}/bin/python"
# Leave the GPU's memory to XLA as it grows, so peak_bytes_in_use reflects what each step needs.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "$python" -m launch.benchmark_gpu --out="$out" "$@"
