"""Start-of-run config validation: every key must be one the code knows."""

from __future__ import annotations

import ml_collections


class ConfigValueError(ValueError):
  """A config value this run cannot work with (a mesh that does not fit the devices, a batch that
  does not divide, an unknown preset or data kind). The message names the key; entry points print
  it as one line."""


def _keys(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
  out: dict[str, object] = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_config_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
  """Raise KeyError naming every key of `config` that `reference` (the defaults) does not have,
  and every key the defaults have that `config` lost."""
  have, known = _keys(config), _keys(reference)
  unknown = sorted(set(have) - set(known))
  missing = sorted(set(known) - set(have))
  if unknown or missing:
    msg = []
    if unknown:
      msg.append(f"unknown config keys {unknown}")
    if missing:
      msg.append(f"config lacks keys {missing}")
    raise KeyError("; ".join(msg) + " (the known keys are defined in configs/common.py)")


def check_override_flags(argv: list[str], reference: ml_collections.ConfigDict, flag: str = "config") -> None:
  """Reject `--config.some.key=v` overrides for keys the defaults do not have, naming the key.

  ml_collections would also refuse them, but with a bare `AttributeError: 'key'`.
  """
  known = _keys(reference)
  prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
  for arg in argv:
    if arg.startswith(f"--{flag}."):
      key = arg[len(flag) + 3:].split("=", 1)[0]
      if key not in known and key not in prefixes:
        raise KeyError(f"{arg!r}: config key {key!r} does not exist (the known keys are defined in "
                       f"configs/common.py)")


def run_app(main, reference: ml_collections.ConfigDict) -> None:
  """`absl.app.run` for an entry point with `--config`, doing what every such entry point needs
  first: a misspelt `--config.<key>=` override stops before absl parses it, with one line naming
  the key; stray positional arguments are refused; library INFO logs are quiet unless
  `--verbosity` is given (the progress lines go to stdout); `jax_threefry_partitionable` is on.
  `main()` takes no arguments."""
  import sys

  from absl import app, flags, logging

  try:
    check_override_flags(sys.argv[1:], reference)
  except KeyError as e:
    sys.exit(f"error: {e.args[0]}")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    main()

  app.run(run)
