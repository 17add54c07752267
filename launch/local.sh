#!/usr/bin/env bash
# Train on this machine (one process, all local devices), installing the project first if needed.
#   bash launch/local.sh --config=configs/tiny.py --workdir=workdir/tiny
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$AVLM_ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "$AVLM_VENV/bin/python" -m launch.train "$@"
