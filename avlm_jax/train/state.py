"""Train state, optimizer, and a state that is born sharded on the mesh."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from avlm_jax import sharding


@flax.struct.dataclass
class TrainState:
  """`opt_state` covers the trainable params only: `frozen` top-level subtrees (e.g. a frozen text
  tower) are neither differentiated nor updated, and hold no optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any
  frozen: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


def split_frozen(params: dict, frozen: Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen) top-level subtrees of `params`."""
  return ({k: v for k, v in params.items() if k not in frozen},
          {k: v for k, v in params.items() if k in frozen})


def param_path(path) -> str:
  """'image/block_0/mlp/fc1/kernel': the string the optimizer's regexes match.

  A logical-partitioning box adds a trailing `.value` to the path of the array it holds; it is
  dropped so boxed and plain trees give the same names.
  """
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def lr_groups(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  """A tree of learning-rate multipliers: the first regex (full match) that fits a path wins; 1.0 else.

  A rule that matches no parameter is an error: a silently unused rule is a typo.
  """
  compiled = [(re.compile(pattern), float(m)) for pattern, m in rules]
  used = [False] * len(compiled)

  def one(path, _):
    name = param_path(path)
    for i, (pattern, m) in enumerate(compiled):
      if pattern.fullmatch(name):
        used[i] = True
        return m
    return 1.0

  out = jax.tree_util.tree_map_with_path(one, params)
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused:
    raise ValueError(f"config.optimizer.lr_multipliers: {unused} match no parameter (paths look like "
                     f"'image/block_0/mlp/fc1/kernel', or 'image/blocks/block/...' when scanned)")
  return out


def decays(params: Any) -> Any:
  """Weight decay applies to matrices (dense/conv kernels, embedding tables) only: not to biases,
  norms, scalars, CLS/anatomy tokens or position tables, whether or not layers are scanned."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_path(path).rsplit("/", 1)[-1] in ("kernel", "embedding"), params)


def optimizer_groups(cfg: ml_collections.ConfigDict) -> list[tuple[str, float]]:
  """The config's (regex, multiplier) rules."""
  return [(str(p), float(m)) for p, m in cfg.lr_multipliers]


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   groups: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (linear warmup + cosine decay) per learning-rate group.

  `groups` are (regex, multiplier) rules over parameter paths: new heads and pretrained weights can
  learn at different rates (LiT-style per-tower rates), and multiplier 0 freezes a subtree (its
  gradients are zeroed before clipping, so they do not shrink the others' updates; it gets no
  optimizer state). Weight decay: see `decays`.
  """
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    if multiplier == 0.0:
      return optax.set_to_zero()
    schedule = base if multiplier == 1.0 else (lambda step: multiplier * base(step))
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decays)

  multipliers = sorted({1.0} | {float(m) for _, m in groups})
  label = lambda params: jax.tree.map(lambda m: f"lr_x{m:g}", lr_groups(params, groups))
  chain = [optax.clip_by_global_norm(cfg.grad_clip_norm),
           optax.multi_transform({f"lr_x{m:g}": adamw(m) for m in multipliers}, label)]
  if 0.0 in multipliers:
    frozen = lambda params: jax.tree.map(lambda m: m == 0.0, lr_groups(params, groups))
    chain.insert(0, optax.masked(optax.set_to_zero(), frozen))
  return optax.chain(*chain)


def _opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any, mesh) -> Any:
  """Optimizer-state shardings: a leaf shaped like a parameter, whose path ends with that
  parameter's path (Adam's `mu/image/.../kernel`), is sharded like it; everything else (counts,
  masked placeholders) is replicated. Works for any optax chain, masked or multi-transformed."""
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                              jax.tree.leaves(param_shardings)):
    by_path[param_path(path)] = (leaf.shape, sh)
  replicated = sharding.replicated(mesh)

  def one(path, leaf):
    parts = param_path(path).split("/")
    for k in range(len(parts)):
      hit = by_path.get("/".join(parts[k:]))
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


class StatePlan:
  """Where every leaf of the train state will live, before any of it exists.

  `eval_shape` of the init gives shapes and the parameters' logical names; the preset's rules
  turn them into shardings (the optimizer state follows its parameters). `abstract`
  (ShapeDtypeStructs carrying those shardings) is the target of a checkpoint restore;
  `initialize` runs `jit(init, out_shardings=...)`, so a fresh state is born sharded: no full copy
  of it ever sits on one device or on the host.
  """

  def __init__(self, init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
               mesh, rules, frozen: Sequence[str] = ()):
    frozen = tuple(frozen)

    def init_state(rng):
      params = nn.unbox(init_params(rng))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(split_frozen(params, frozen)[0]), frozen=frozen)

    self._init_state = init_state
    self.mesh, self.rules = mesh, rules
    key = jax.random.key(0)
    boxed_params = jax.eval_shape(init_params, key)
    abstract = jax.eval_shape(init_state, key)
    param_shardings = sharding.logical_to_shardings(boxed_params, mesh, rules)
    self.shardings = TrainState(
        step=sharding.replicated(mesh), params=param_shardings,
        opt_state=_opt_state_shardings(abstract.opt_state, abstract.params, param_shardings, mesh),
        frozen=frozen)
    self.abstract: TrainState = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, self.shardings)

  def initialize(self, rng: jax.Array) -> TrainState:
    with sharding.activate(self.mesh, self.rules):
      return jax.jit(self._init_state, out_shardings=self.shardings)(rng)
