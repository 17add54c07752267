"""Train state, optimizer, and a state that is born sharded on the mesh.

The optimizer is AdamW whose statistics start per parameter leaf: a leaf's Adam step count (the
exponent of the bias correction) advances only from the first step its gradient is nonzero. The
stages (`schedule.py`) switch loss terms on late, and heads used only by a late term (projections,
logit scales, bias) get exactly zero gradient until then; with one shared count, the bias
correction would already be ~1 at their first gradient while the second moment had seen one
squared gradient, so their first updates would be ~3x the learning rate (after 20k idle steps).
With per-leaf counts their first updates are those of a freshly started Adam, and until then they
are not touched at all (no weight decay either); a leaf active from step 0 is updated exactly as
by `optax.adamw`. The learning-rate schedule stays global: it follows the training step, not the
leaf's count.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


# Row blocks of an AnatomyViT position table (1, 1 + R + N, D): CLS, the R anatomy tokens, the N
# patches. A rule 'image/pos_embedding[anatomy]' gives those rows their own learning rate: the table
# is one parameter, but its anatomy rows are new while the others may come from a pretrained ViT.
POSITION_BLOCKS = ("cls", "anatomy", "patches")
_BLOCK_SUFFIX = re.compile(r"(.+)\[(" + "|".join(POSITION_BLOCKS) + r")\]")


def _position_rows(name: str, shape: tuple[int, ...], shapes: dict[str, tuple[int, ...]]) -> dict[str, slice]:
  """Row slices (axis -2) of the blocks of the position table `name`; R from its sibling `anatomy_tokens`."""
  if name.rsplit("/", 1)[-1] != "pos_embedding" or len(shape) < 2:
    raise ValueError(f"config.optimizer.lr_multipliers: a row block [{'|'.join(POSITION_BLOCKS)}] applies "
                     f"to a position table '.../pos_embedding', not to {name!r} {shape}")
  parent = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
  tokens = shapes.get(parent + "anatomy_tokens")
  regions = tokens[-2] if tokens else 0
  return {"cls": slice(0, 1), "anatomy": slice(1, 1 + regions), "patches": slice(1 + regions, shape[-2])}


def lr_groups(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  """A tree of learning-rate multipliers: the first regex (full match) that fits a path wins; 1.0 else.

  A leaf's multiplier is a float, or, where rules with a row block (`'image/pos_embedding[anatomy]'`,
  see POSITION_BLOCKS) split a position table, an array of per-row multipliers shaped to broadcast
  against the table: each row takes the first rule that covers it.
  A rule that matches no parameter is an error: a silently unused rule is a typo.
  """
  compiled = []
  for pattern, m in rules:
    block = _BLOCK_SUFFIX.fullmatch(pattern)
    compiled.append((re.compile(block[1] if block else pattern), block[2] if block else None, float(m)))
  used = [False] * len(compiled)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  shapes = {param_path(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}

  def one(path, _):
    name = param_path(path)
    rows = None  # per-row multipliers once a row rule has matched; NaN = not decided yet
    for i, (regex, block, m) in enumerate(compiled):
      if not regex.fullmatch(name):
        continue
      used[i] = True
      if block is None:
        if rows is None:
          return m
        rows[np.isnan(rows)] = m
        break
      shape = shapes[name]
      if rows is None:
        rows = np.full(shape[-2], np.nan)
      part = rows[_position_rows(name, shape, shapes)[block]]  # a view: writes land in `rows`
      part[np.isnan(part)] = m
    if rows is None:
      return 1.0
    rows[np.isnan(rows)] = 1.0
    if np.all(rows == rows[0]):
      return float(rows[0])
    shape = shapes[name]
    return rows.reshape((1,) * (len(shape) - 2) + (shape[-2], 1)).astype(np.float32)

  out = jax.tree_util.tree_map_with_path(one, params)
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused:
    raise ValueError(f"config.optimizer.lr_multipliers: {unused} match no parameter, or only ones an "
                     f"earlier rule already covers (paths look like 'image/block_0/mlp/fc1/kernel', or "
                     f"'image/blocks/block/...' when scanned)")
  return out


def decays(params: Any) -> Any:
  """Weight decay applies to matrices (dense/conv kernels, embedding tables) only: not to biases,
  norms, scalars, CLS/anatomy tokens or position tables, whether or not layers are scanned."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_path(path).rsplit("/", 1)[-1] in ("kernel", "embedding"), params)


def optimizer_groups(cfg: ml_collections.ConfigDict) -> list[tuple[str, float]]:
  """The config's (regex, multiplier) rules."""
  return [(str(p), float(m)) for p, m in cfg.lr_multipliers]


class ScaleByAdamFromFirstGradientState(NamedTuple):
  count: Any  # per leaf, int32 (): updates since (and including) the leaf's first nonzero gradient
  mu: Any
  nu: Any


def scale_by_adam_from_first_gradient(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                                      eps_root: float = 0.0, weight_decay: float = 0.0,
                                      decay_mask: Any = None) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with one step count per leaf, started by the leaf's first nonzero
  gradient, then decoupled weight decay (`optax.add_decayed_weights(weight_decay, decay_mask)`).

  Until its start a leaf's moments stay exactly zero and its update is zero, decay included: a
  head that no loss term uses yet stays at its initialisation. From the start on, the update is
  that of an Adam started at that step. A leaf with a nonzero gradient at its first step is
  `optax.scale_by_adam` + `add_decayed_weights`; a zero gradient after the start is an ordinary
  Adam step. `decay_mask`: a tree of bools, or a callable on the params giving one.
  """
  int_max = jnp.iinfo(jnp.int32).max

  def init_fn(params):
    return ScaleByAdamFromFirstGradientState(
        count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
        mu=optax.tree.zeros_like(params), nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    if weight_decay and params is None:
      raise ValueError("scale_by_adam_from_first_gradient: weight decay needs the params in update()")
    decayed = decay_mask(params) if callable(decay_mask) else decay_mask
    if not weight_decay:
      decayed = jax.tree.map(lambda _: False, updates)
    elif decayed is None:
      decayed = jax.tree.map(lambda _: True, updates)
    if params is None:
      params = updates  # a stand-in of the right structure: without decay it is never read

    def one(g, count, mu, nu, p, decay):
      started = (count > 0) | jnp.any(g != 0)
      count = count + (started & (count < int_max)).astype(jnp.int32)
      mu = optax.tree.update_moment(g, mu, b1, 1)
      nu = optax.tree.update_moment_per_elem_norm(g, nu, b2, 2)
      # Before the start mu = nu = 0, so any count >= 1 gives the zero update (and no 0/0).
      c = jnp.maximum(count, 1)
      mu_hat = optax.tree.bias_correction(mu, b1, c)
      nu_hat = optax.tree.bias_correction(nu, b2, c)
      u = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
      if decay:
        u = jnp.where(started, u + weight_decay * p, u)
      return u, count, mu, nu

    out = jax.tree.map(one, updates, state.count, state.mu, state.nu, params, decayed)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)
    return pick(0), ScaleByAdamFromFirstGradientState(count=pick(1), mu=pick(2), nu=pick(3))

  return optax.GradientTransformation(init_fn, update_fn)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_lr_fraction` of it."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def _per_leaf(multipliers: Callable[[Any], Any], fn: Callable[[jax.Array, Any], jax.Array]
              ) -> optax.GradientTransformation:
  """A stateless transformation applying `fn(update, multiplier)` leaf by leaf."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(fn, updates, multipliers(updates)), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _zero_frozen(g: jax.Array, m) -> jax.Array:
  if np.all(np.asarray(m) != 0):
    return g
  return jnp.zeros_like(g) if np.all(np.asarray(m) == 0) else g * jnp.asarray(np.asarray(m) != 0, g.dtype)


def _scale(u: jax.Array, m) -> jax.Array:
  return u if np.all(np.asarray(m) == 1.0) else u * jnp.asarray(m, u.dtype)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   groups: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (linear warmup + cosine decay) with per-leaf Adam counts
  and decay from each leaf's first gradient on (`scale_by_adam_from_first_gradient`), and
  learning-rate multipliers.

  `groups` are (regex, multiplier) rules over parameter paths (`lr_groups`): new heads and
  pretrained weights can learn at different rates (LiT-style per-tower rates), and multiplier 0
  freezes a subtree (its gradients are zeroed before clipping, so they do not shrink the others'
  updates; it gets no optimizer state). The multiplier scales the whole AdamW update, decay
  included, i.e. it is AdamW at `multiplier × learning rate`. Weight decay: see `decays`.
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  multipliers = lambda tree: lr_groups(tree, groups)
  trainable = lambda tree: jax.tree.map(lambda m: bool(np.any(np.asarray(m) != 0)), multipliers(tree))
  adamw = optax.chain(scale_by_adam_from_first_gradient(cfg.b1, cfg.b2, weight_decay=cfg.weight_decay,
                                                        decay_mask=decays),
                      optax.scale_by_learning_rate(schedule))
  return optax.chain(_per_leaf(multipliers, _zero_frozen),
                     optax.clip_by_global_norm(cfg.grad_clip_norm),
                     optax.masked(adamw, trainable),
                     _per_leaf(multipliers, _scale))


def _opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any, mesh) -> Any:
  """Optimizer-state shardings: a leaf shaped like a parameter, whose path ends with that
  parameter's path (Adam's `mu/image/.../kernel`), is sharded like it; everything else (the
  per-leaf Adam counts, shaped (), the schedule's count) is replicated. Works for any optax chain,
  masked or multi-transformed."""
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
    self.boxed_params = boxed_params  # shapes with logical axis names (for preset warnings)
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
