"""Device mesh and logical-axis rules: the one place that decides where arrays live.

Models name their parameter axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `length`, `region`,
`joint`, and `layers` for scanned layer stacks) and activation axes (`act_batch`, `act_len`, `act_embed`, …). A *preset* is one rule table
mapping those names onto the mesh axes `('data', 'fsdp', 'tensor')`; switching presets changes no
model code. The batch is always split over `('data', 'fsdp')`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_ACTIVATIONS = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", None),
    ("act_heads", None),
    ("act_kv", None),
    ("act_region", None),
)

# One rule table per preset. Every logical name appears in every table, so a table reads whole.
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Data parallel: parameters replicated on every device.
    "dp": _ACTIVATIONS + (
        ("embed", None), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("length", None), ("region", None), ("joint", None), ("layers", None),
    ),
    # Fully sharded data parallel (ZeRO-3 style): every parameter's `embed` dimension is split over
    # `fsdp`; XLA all-gathers weights per layer and reduce-scatters their gradients.
    "fsdp": _ACTIVATIONS + (
        ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv", None), ("vocab", None),
        ("length", None), ("region", None), ("joint", None), ("layers", None),
    ),
}


def check_mesh_for_preset(mesh: Mesh, preset: str) -> None:
  """The `tensor` axis is used by no preset yet (tensor parallelism comes with the TP presets):
  a tensor size > 1 would only repeat work, so it is refused."""
  if mesh.shape["tensor"] != 1:
    raise ValueError(f"config.mesh.tensor={mesh.shape['tensor']}, but preset {preset!r} maps nothing "
                     f"to the 'tensor' axis; use tensor=1 (presets: {sorted(RULES)})")


def rules_for(preset: str) -> tuple[tuple[str, Any], ...]:
  try:
    return RULES[preset]
  except KeyError:
    raise ValueError(f"config.sharding.preset={preset!r}; known presets: {sorted(RULES)}") from None


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Mesh axis sizes from the config (at most one -1, filled in) checked against the device count."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh ({described}) has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh ({described}) has a size that is not positive or -1")
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % fixed:
      raise ValueError(f"config.mesh ({described}): the fixed sizes multiply to {fixed}, which does "
                       f"not divide the {num_devices} devices present")
    shape[shape.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"config.mesh ({described}) needs {fixed} devices, but {num_devices} are present")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with Auto axis types (linen's logical constraints need Auto, not Explicit)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  try:
    arr = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    # Device kinds without a topology-aware layout (e.g. a subset of CPU devices) get row-major order.
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
  """Drop mesh axes from dimensions they do not divide evenly (that dimension stays replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      logging.info("%s: dimension %d not divisible by mesh axes %s (%d); replicated", path, dim, names, size)
      out.append(None)
    else:
      out.append(axes)
  return P(*out)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a tree of (possibly `nn.LogicallyPartitioned`-boxed) abstract arrays.

  The returned tree matches `nn.unbox(abstract_tree)`; unboxed leaves are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.unbox(abstract_tree)

  def one(path, spec, leaf):
    return NamedSharding(mesh, _fit(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

  return jax.tree_util.tree_map_with_path(one, mesh_specs, shapes,
                                          is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """Context for tracing/compiling: the mesh plus this preset's rules for activation constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
