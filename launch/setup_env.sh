#!/usr/bin/env bash
# Source me: makes sure $AVLM_VENV (default: <repo>/.venv) holds this project and its test extras.
# Installs once, and again whenever requirements*.txt or setup.cfg change. CPU JAX by default.
set -euo pipefail
AVLM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AVLM_VENV="${AVLM_VENV:-$AVLM_ROOT/.venv}"
_py="${PYTHON:-python3}"
if ! "$_py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $_py is $("$_py" --version 2>&1); avlm_jax needs Python 3.11 or newer (set PYTHON=...)" >&2
  exit 1
fi
_want=$(cat "$AVLM_ROOT/requirements.txt" "$AVLM_ROOT/requirements-data.txt" "$AVLM_ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)
if [ ! -x "$AVLM_VENV/bin/python" ] || [ "$(cat "$AVLM_VENV/.avlm_installed" 2>/dev/null)" != "$_want" ]; then
  echo "setting up $AVLM_VENV (one-time, ~1-2 min) ..." >&2
  "$_py" -m venv "$AVLM_VENV"
  "$AVLM_VENV/bin/python" -m pip install -q -U pip
  "$AVLM_VENV/bin/python" -m pip install -q -r "$AVLM_ROOT/requirements.txt" -e "$AVLM_ROOT[test]"
  "$AVLM_VENV/bin/python" -m pip install -q --no-deps -r "$AVLM_ROOT/requirements-data.txt"
  echo "$_want" > "$AVLM_VENV/.avlm_installed"
fi
export AVLM_ROOT AVLM_VENV
