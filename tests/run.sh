#!/usr/bin/env bash
# The test command (README Quick start and CI): install if needed, then pytest on 8 fake CPU devices.
#   bash tests/run.sh            # everything
#   bash tests/run.sh -m "not slow"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup_env.sh"
cd "$AVLM_ROOT"
exec "$AVLM_VENV/bin/python" -m pytest "$@"
