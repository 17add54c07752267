#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (or several slices): every worker runs this same command, e.g.
#   gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \
#     "cd avlm_jax && bash launch/tpu_pod.sh --config=configs/avlm_b16.py \
#      --config.sharding.preset=fsdp --config.data.kind=array_record --config.data.dir=gs://bucket/synthcxr \
#      --workdir=gs://bucket/run1"
# JAX finds the coordinator, the process count and this worker's id from the TPU metadata
# (avlm_jax/distributed.py, case 3); the workdir must be shared storage every worker can reach:
# a gs:// URL works as is (README, "Data and checkpoints in a bucket": credentials, gcsfuse).
# For multi-slice add --config.sharding.preset=hybrid --config.mesh_dcn.data=<number of slices>.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$AVLM_ROOT"
if ! "$AVLM_VENV/bin/python" -c 'import libtpu' 2>/dev/null; then
  "$AVLM_VENV/bin/python" -m pip install -q "jax[tpu]==$("$AVLM_VENV/bin/python" -c 'import jax; print(jax.__version__)')"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export AVLM_DISTRIBUTED=auto  # let JAX read the pod's coordinator, size and worker id
exec "$AVLM_VENV/bin/python" -m launch.train "$@"
