"""Device mesh and logical-axis rules: the one place that decides where arrays live.

Models name their parameter axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `length`, `region`,
`joint`, and `layers` for scanned layer stacks) and activation axes (`act_batch`, `act_len`,
`act_embed`, …). A *preset* (dp, fsdp, tp, fsdp_tp, hybrid) is one rule table mapping those names
onto the mesh axes `('data', 'fsdp', 'tensor')`; switching presets changes no model code. The
batch is always split over `('data', 'fsdp')`. Multi-slice meshes keep the same three axes; the
config's `mesh_dcn` says how much of each crosses slices.
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

from avlm_jax.config_check import ConfigValueError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def _table(embed=None, tensor=None) -> tuple[tuple[str, Any], ...]:
  """A full rule table: parameter `embed` dims go to `embed`; the Megatron dims (attention heads,
  MLP hidden, vocabulary) and their activations go to `tensor`. The batch always goes to
  ('data', 'fsdp'); everything else is replicated."""
  return (
      ("act_batch", BATCH_AXES), ("act_len", None), ("act_embed", None), ("act_mlp", tensor),
      ("act_heads", tensor), ("act_kv", None), ("act_region", None),
      ("embed", embed), ("mlp", tensor), ("heads", tensor), ("kv", None), ("vocab", tensor),
      ("length", None), ("region", None), ("joint", None), ("layers", None),
  )


# One rule table per preset. Every logical name appears in every table, so a table reads whole.
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Data parallel: parameters replicated on every device.
    "dp": _table(),
    # Fully sharded data parallel (ZeRO-3 style): every parameter's `embed` dimension is split over
    # `fsdp`; XLA all-gathers weights per layer and reduce-scatters their gradients.
    "fsdp": _table(embed="fsdp"),
    # Tensor parallel (Megatron): q/k/v and fc1 kernels split by columns (heads, mlp), the
    # attention output and fc2 kernels by rows, so each block needs one all-reduce forward and
    # one backward; the word-embedding table is split by vocabulary.
    "tp": _table(tensor="tensor"),
    # FSDP within each tensor-parallel group: `embed` over fsdp, Megatron dims over tensor.
    "fsdp_tp": _table(embed="fsdp", tensor="tensor"),
    # Multi-slice: the fsdp_tp table on a hybrid mesh (`config.mesh_dcn`) whose `data` axis spans
    # slices over DCN while fsdp and tensor stay inside a slice (ICI): only the once-per-step
    # gradient all-reduce crosses the slow links.
    "hybrid": _table(embed="fsdp", tensor="tensor"),
}

# Presets that are meant to shard parameters (the replicated-parameter check applies to them),
# and the mesh axes each one maps something onto.
SHARDED_AXES = {"dp": (), "fsdp": ("fsdp",), "tp": ("tensor",), "fsdp_tp": ("fsdp", "tensor"),
                "hybrid": ("fsdp", "tensor")}


def check_mesh_for_preset(mesh: Mesh, preset: str, dcn: dict[str, int] | None = None) -> None:
  """Refuse meshes a preset would waste: a `tensor` axis > 1 under a preset that maps nothing to
  it only repeats work; `hybrid` needs its `data` axis across slices and nothing else there."""
  rules_for(preset)
  if mesh.shape["tensor"] != 1 and "tensor" not in SHARDED_AXES[preset]:
    raise ConfigValueError(f"config.mesh.tensor={mesh.shape['tensor']}, but preset {preset!r} maps nothing "
                     f"to the 'tensor' axis; use tensor=1 or a tensor-parallel preset (tp, fsdp_tp, hybrid)")
  dcn = {a: int(v) for a, v in (dcn or {}).items()}
  across = {a: v for a, v in dcn.items() if v != 1}
  if preset == "hybrid" and (set(across) - {"data"} or not across):
    raise ConfigValueError(f"preset 'hybrid' puts only the data axis across slices: config.mesh_dcn={dcn}; "
                     f"set mesh_dcn.data to the number of slices (> 1) and the other axes to 1")
  if preset != "hybrid" and across:
    raise ConfigValueError(f"config.mesh_dcn={dcn} spans several slices, which only preset 'hybrid' lays out; "
                     f"preset is {preset!r}")


def rules_for(preset: str) -> tuple[tuple[str, Any], ...]:
  try:
    return RULES[preset]
  except KeyError:
    raise ConfigValueError(f"config.sharding.preset={preset!r}; known presets: {sorted(RULES)}") from None


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Mesh axis sizes from the config (at most one -1, filled in) checked against the device count."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ConfigValueError(f"config.mesh has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
  if shape.count(-1) > 1:
    raise ConfigValueError(f"config.mesh ({described}) has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigValueError(f"config.mesh ({described}) has a size that is not positive or -1")
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % fixed:
      raise ConfigValueError(f"config.mesh ({described}): the fixed sizes multiply to {fixed}, which does "
                       f"not divide the {num_devices} devices present")
    shape[shape.index(-1)] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigValueError(f"config.mesh ({described}) needs {fixed} devices, but {num_devices} are present")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None,
              dcn: dict[str, int] | None = None) -> Mesh:
  """A mesh with Auto axis types (linen's logical constraints need Auto, not Explicit).

  `dcn` (the config's `mesh_dcn`) says how many slices each axis spans; with more than one slice
  the device order comes from `mesh_utils.create_hybrid_device_mesh`, so each slice holds a
  contiguous block of every axis and only the DCN part of an axis crosses slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  dcn_shape = tuple(int((dcn or {}).get(a, 1)) for a in MESH_AXES)
  if math.prod(dcn_shape) > 1:
    return Mesh(_hybrid_device_array(shape, dcn_shape, devices), MESH_AXES)
  try:
    arr = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):
    # Device kinds without a topology-aware layout (e.g. a subset of CPU devices) get row-major order.
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def _hybrid_device_array(shape: tuple[int, ...], dcn_shape: tuple[int, ...], devices) -> np.ndarray:
  described = ", ".join(f"{a}={d}" for a, d in zip(MESH_AXES, dcn_shape))
  if any(d < 1 or s % d for s, d in zip(shape, dcn_shape)):
    raise ConfigValueError(f"config.mesh_dcn ({described}) must divide the mesh axes "
                     f"{dict(zip(MESH_AXES, shape))}")
  ici = tuple(s // d for s, d in zip(shape, dcn_shape))
  slices = math.prod(dcn_shape)
  if hasattr(devices[0], "slice_index"):  # TPU multi-slice: slices are real
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices)
  if jax.process_count() == slices:  # GPU clusters: one process (host) per slice
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices, process_is_granule=True)
  if jax.process_count() > 1:
    raise ConfigValueError(f"config.mesh_dcn ({described}) asks for {slices} slices, but these devices have "
                     f"no slice index and there are {jax.process_count()} processes")
  # One process without slices (CPU, tests): consecutive blocks of devices stand in for slices,
  # laid out as create_hybrid_device_mesh lays real ones.
  logging.info("no device slices: emulating %d slices with consecutive device blocks", slices)
  arr = np.asarray(devices).reshape(dcn_shape + ici)
  arr = arr.transpose([i for a in range(len(MESH_AXES)) for i in (a, a + len(MESH_AXES))])
  return arr.reshape(shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str, notes: list[str] | None = None) -> P:
  """Drop mesh axes from dimensions they do not divide evenly (that dimension stays replicated),
  with a note naming the parameter, the dimension and the axis size (`preset_warnings` shows it)."""
  out = []
  for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      note = (f"{path}: dimension {i} (size {dim}) is not divisible by mesh axis "
              f"{'×'.join(names)} (size {size}); that dimension is replicated")
      logging.info("%s", note)
      if notes is not None:
        notes.append(note)
      out.append(None)
    else:
      out.append(axes)
  return P(*out)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules, notes: list[str] | None = None) -> Any:
  """Shardings for a tree of (possibly `nn.LogicallyPartitioned`-boxed) abstract arrays.

  The returned tree matches `nn.unbox(abstract_tree)`; unboxed leaves are replicated. Dimensions a
  mesh axis does not divide stay replicated; each such case is appended to `notes` (and logged).
  """
  logical_specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.unbox(abstract_tree)

  def one(path, spec, leaf):
    return NamedSharding(mesh, _fit(spec, leaf.shape, mesh, _name(path), notes))

  return jax.tree_util.tree_map_with_path(one, mesh_specs, shapes,
                                          is_leaf=lambda x: isinstance(x, P))


def _name(path) -> str:
  """'image/block_0/mlp/fc1/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def replicated_parameters(abstract_params: Any, shardings: Any, preset: str,
                          min_mib: float) -> list[str]:
  """Parameters of at least `min_mib` MiB that `preset`, which should shard parameters, leaves
  whole on every device (their logical names map to no mesh axis > 1, or the axis did not divide
  them). One line per parameter; empty for `dp`, which replicates by design."""
  if not SHARDED_AXES[preset]:
    return []
  lines = []
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params))[0],
                              jax.tree.leaves(shardings)):
    mib = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize / 2**20
    if mib >= min_mib and sh.is_fully_replicated and sh.mesh.size > 1:
      lines.append(f"{_name(path)} {tuple(leaf.shape)} ({mib:.1f} MiB) is replicated on all "
                   f"{sh.mesh.size} devices under preset {preset!r}")
  return lines


def preset_warnings(boxed_params: Any, mesh: Mesh, rules, preset: str, min_mib: float) -> list[str]:
  """What a user should hear at start-up about this preset on this mesh: dimensions a mesh axis
  does not divide (left replicated), and large parameters the preset leaves replicated."""
  notes: list[str] = []
  shardings = logical_to_shardings(boxed_params, mesh, rules, notes)
  return notes + replicated_parameters(boxed_params, shardings, preset, min_mib)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """Context for tracing/compiling: the mesh plus this preset's rules for activation constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
