#!/usr/bin/env bash
# N training processes on this machine, talking through a localhost coordinator: a real
# multi-process run (jax.distributed, per-process data slices, global arrays, shared checkpoints).
#   NPROC=2 DEVICES_PER_PROC=1 bash launch/multihost_local.sh --config=configs/tiny.py --workdir=workdir/mh
# Every process gets the same arguments; process i logs to <workdir>/process_<i>.log (process 0
# also to stdout). On CPU each process has DEVICES_PER_PROC fake devices and gloo collectives.
# PORT picks the coordinator port (default 12355); TIMEOUT_S bounds the wait for it (default 120).
# AVLM_VENV=<venv> uses that environment as it is (no install check).
set -euo pipefail
if [ -n "${AVLM_VENV:-}" ]; then
  AVLM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else
  source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
fi
cd "$AVLM_ROOT"
NPROC="${NPROC:-2}"
DEVICES_PER_PROC="${DEVICES_PER_PROC:-1}"
PORT="${PORT:-12355}"
workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; esac
done
if [ -z "$workdir" ]; then echo "error: pass --workdir=..." >&2; exit 2; fi
mkdir -p "$workdir"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROC"
export JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$NPROC"
pids=()
for ((i = 1; i < NPROC; i++)); do
  JAX_PROCESS_ID=$i "$AVLM_VENV/bin/python" -m launch.train "$@" \
    --config.distributed.timeout_s="${TIMEOUT_S:-120}" > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
JAX_PROCESS_ID=0 "$AVLM_VENV/bin/python" -m launch.train "$@" --config.distributed.timeout_s="${TIMEOUT_S:-120}" \
  2>&1 | tee "$workdir/process_0.log" || status=$?
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
