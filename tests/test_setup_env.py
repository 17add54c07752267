"""launch/setup_env.sh is sourced by users' interactive shells: it must never change their shell
options or exit their shell, and a failure must say why and return non-zero."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(ROOT, "launch", "setup_env.sh")


def _bash(script, **env):
  return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                        env={**os.environ, **env})


def test_sourcing_keeps_the_callers_options_and_exports_the_venv():
  # This suite's own venv is installed (tests/run.sh made it), so sourcing installs nothing.
  venv = os.environ.get("AVLM_VENV", os.path.join(ROOT, ".venv"))
  done = _bash(f'before=$(set +o); source {SETUP}; [ "$before" = "$(set +o)" ] && echo same-options; '
               'false; echo "still here $AVLM_VENV"', AVLM_VENV=venv)
  assert done.returncode == 0, done.stderr
  assert "same-options" in done.stdout and f"still here {venv}" in done.stdout


def test_a_failure_returns_to_the_shell_with_one_line_saying_why():
  done = _bash(f'source {SETUP}; echo "returned $?"', PYTHON="/nonexistent/python3")
  assert done.returncode == 0 and "returned 1" in done.stdout
  assert "error: /nonexistent/python3 not found; avlm_jax needs Python 3.11 or newer" in done.stderr
