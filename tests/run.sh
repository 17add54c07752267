#!/usr/bin/env bash
# The test command (README Quick start and CI): install if needed, then pytest on 8 fake CPU devices.
#   bash tests/run.sh            # everything, on $AVLM_TEST_WORKERS (default 4) pytest-xdist workers
#   bash tests/run.sh -m "not slow"
#   bash tests/run.sh -n 0 tests/test_train.py   # one process
# Several workers pay off even on 2 cores: most of a test's time is single-threaded tracing and
# XLA compilation (BENCHMARKS.md, "Budgets"). `loadgroup`: tests that share an expensive build run
# in one worker (tests/conftest.py, `_xdist_group`), so it is built once, not once per worker.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup_env.sh"
cd "$AVLM_ROOT"
workers=(-n "${AVLM_TEST_WORKERS:-4}" --dist loadgroup)
for arg in "$@"; do
  case "$arg" in -n|-n*|--numprocesses*) workers=() ;; esac
done
exec "$AVLM_VENV/bin/python" -m pytest "${workers[@]}" "$@"
