"""Collective traffic and matmul FLOPs of a compiled SPMD program, from its HLO (`compiled.as_text()`).

Per device, for each kind (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute):
  - `result_bytes`: the summed result-shape bytes of its ops (the shapes of a partitioned program
    are per device);
  - `wire_bytes`: what one device must at least receive for them, from the group size n:
    all-gather and all-to-all (n−1)/n of the result, reduce-scatter (n−1) × the result (its
    result is one shard), all-reduce 2(n−1)/n (reduce-scatter + all-gather), permute the result.
Ops inside a while loop count once per iteration (XLA's `known_trip_count`, else N from a
condition `i < N`; a loop with neither counts once and is reported in `unknown_trip_loops`).
Async pairs count once, at their `-done`; ops that share a channel_id (one collective the
compiler cloned, e.g. spread over a loop's iterations) count once. With `devices_per_slice`, traffic of groups that span
slices also counts what must cross between slices, per chip, as DCN traffic. The kinds are the ops XLA emitted: the TPU compiler may
write a gather as an all-reduce of zero-padded shards, whose wire estimate is then twice a gather's.
`matmul_flops` counts the dots and convolutions the same way, once per loop iteration.
"""

import dataclasses
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# Opcode -> kind; the `-start` halves of async pairs are skipped (counted at `-done`).
_OPCODES = {"all-gather": "all-gather", "all-gather-done": "all-gather", "reduce-scatter": "reduce-scatter",
            "all-reduce": "all-reduce", "all-reduce-done": "all-reduce", "all-to-all": "all-to-all",
            "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
            "collective-permute-done": "collective-permute"}

_BITS = {"pred": 8, "s1": 1, "u1": 1, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
         "s32": 32, "u32": 32, "s64": 64, "u64": 64, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "c64": 64,
         "c128": 128, "token": 0}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# A computation's header: compiled text has a signature ("%name (...) -> ... {"), lowered text
# ("ENTRY main.1 {") may not.
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:(?:\(.*\))?\s*->.*)?\{\s*$")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[0-9,\s]*\},?\s*)*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?"
                          r"\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def shape_bytes(text: str) -> float:
  """Bytes of every array shape in `text` (a shape or a tuple of shapes); unknown dtypes count 0."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(text):
    if dtype.startswith("f8") or dtype.startswith("f4"):
      bits = 8 if dtype.startswith("f8") else 4
    else:
      bits = _BITS.get(dtype, 0)
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * bits / 8
  return total


def _split_type(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (type text, the remainder from the opcode)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _mesh_members(attrs: str) -> list[list[int]] | None:
  """Members of replica_groups=mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'} (newer XLA)."""
  m = _MESH_GROUPS.search(attrs)
  if not m:
    return None
  import numpy as np
  axes = [(a, int(n)) for a, n in re.findall(r"'([^']*)'=(\d+)", m.group(1))]
  sizes = [n for _, n in axes]
  total = int(np.prod(sizes))
  ids = np.arange(total)
  if m.group(2):
    ids = ids.reshape([int(x) for x in m.group(2).split(",")])
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
  ids = ids.reshape(sizes)
  in_group = [i for i, (a, _) in enumerate(axes) if f"'{a}'" in m.group(4)]
  rest = [i for i in range(len(axes)) if i not in in_group]
  size = int(np.prod([sizes[i] for i in in_group])) if in_group else 1
  return ids.transpose(rest + in_group).reshape(-1, size).tolist()


def _groups(attrs: str) -> list[list[int]] | None:
  members = _mesh_members(attrs)
  if members is not None:
    return members
  m = _IOTA_GROUPS.search(attrs)
  if m:  # iota form [G,S]<=[...]: G groups of S; members are not listed, only the size matters here
    return [[-1] * int(m.group(2))] * int(m.group(1))
  m = _LIST_GROUPS.search(attrs)
  if m and m.group(1).strip():
    return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9,\s]*)\}", m.group(1))]
  return None


def _iota_members(attrs: str) -> list[list[int]] | None:
  """Explicit members of an iota replica_groups=[G,S]<=[dims]T(perm) (None if not that form)."""
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
  if not m:
    return None
  import numpy as np
  dims = [int(x) for x in m.group(3).split(",")]
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  if m.group(4):
    ids = ids.transpose([int(x) for x in m.group(4).split(",")])
  return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()


@dataclasses.dataclass
class CollectiveStats:
  result_bytes: dict  # kind -> bytes per device
  wire_bytes: dict  # kind -> bytes one device receives at least, over any link
  dcn_wire_bytes: dict  # kind -> bytes it must at least receive across slices (hierarchical collectives)
  counts: dict  # kind -> executed ops (trip counts applied)
  unknown_trip_loops: int

  @property
  def total_wire_bytes(self) -> float:
    return sum(self.wire_bytes.values())

  @property
  def total_dcn_wire_bytes(self) -> float:
    return sum(self.dcn_wire_bytes.values())

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _parse(hlo_text: str):
  """Computations -> their instructions (name, type text, opcode, attribute text); the entry name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.lstrip().startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    type_text, rest = _split_type(m.group(2))
    opcode, _, attrs = rest.partition("(")
    comps[current].append((m.group(1), type_text, opcode.strip(), attrs))
  return comps, entry


def _trip_from_condition(instrs: list) -> int | None:
  """N from a loop condition `counter < N` (N a constant): XLA's TPU windowed-einsum loops carry no
  known_trip_count but count from 0 in steps of 1 to such a constant."""
  constants = {}
  for name, _, opcode, attrs in instrs:
    if opcode == "constant":
      value = attrs.partition(")")[0].strip()
      if value.lstrip("-").isdigit():
        constants[name] = int(value)
  for _, _, opcode, attrs in instrs:
    if opcode == "compare" and "direction=LT" in attrs:
      operands = re.findall(r"%?([\w.\-]+)", attrs.partition(")")[0])
      if len(operands) == 2 and operands[1] in constants:
        return constants[operands[1]]
  return None


def _multipliers(comps: dict, entry: str) -> tuple[dict, int]:
  """How many times each computation runs per program execution (while bodies × trip count)."""
  callees, unknown = {}, 0
  for name, instrs in comps.items():
    for _, _, opcode, attrs in instrs:
      trip = 1
      if opcode == "while":
        m = _TRIP.search(attrs)
        cond = re.search(r"condition=%?([\w.\-]+)", attrs)
        inferred = _trip_from_condition(comps.get(cond.group(1), [])) if cond and not m else None
        if m:
          trip = int(m.group(1))
        elif inferred is not None:
          trip = inferred
        else:
          unknown += 1
      for role, callee in _CALLS.findall(attrs):
        callees.setdefault(name, []).append((callee, trip if role in ("body", "condition") else 1))
      for block in _BRANCHES.findall(attrs):
        for callee in re.findall(r"%?([\w.\-]+)", block):
          callees.setdefault(name, []).append((callee, 1))
  mult = {entry: 1}
  # Computations form a DAG from the entry; propagate in topological order.
  order, seen = [], set()

  def visit(c):
    if c in seen:
      return
    seen.add(c)
    for callee, _ in callees.get(c, ()):
      visit(callee)
    order.append(c)

  visit(entry)
  for c in reversed(order):
    for callee, k in callees.get(c, ()):
      mult[callee] = mult.get(callee, 0) + mult.get(c, 0) * k
  return mult, unknown


def _dims(type_text: str) -> list[int]:
  m = _SHAPE.search(type_text)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _conv_contraction(attrs: str, lhs: list, rhs: list, out: list) -> int | None:
  """Multiply-adds per output element of a convolution: its input features (rhs 'i') times the
  window along spatial dims that are real windows (output size differs from the input's). A
  batched matmul written as a convolution turns its batch dims into spatial dims that keep
  their size; those contribute one term, not their window."""
  m = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", attrs)
  if not m or (len(m.group(1)), len(m.group(2)), len(m.group(3))) != (len(lhs), len(rhs), len(out)):
    return None
  lhs_l, rhs_l, out_l = m.groups()
  k = rhs[rhs_l.index("i")]
  for label, size in zip(rhs_l, rhs):
    if label.isdigit() and lhs[lhs_l.index(label)] != out[out_l.index(label)]:
      k *= size
  return k


def matmul_flops(hlo_text: str) -> float:
  """FLOPs of the program's dots and convolutions (2 × multiply-adds), loop bodies × trip count.

  XLA's cost analysis counts a while loop's body once, so a model that scans over its layers
  shows a fraction of its FLOPs there; this count runs each body as often as the loop does,
  remat recomputation included. (TPU programs express matmuls as convolutions.)
  """
  comps, entry = _parse(hlo_text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  mult, _ = _multipliers(comps, entry)
  types = {name: type_text for instrs in comps.values() for name, type_text, _, _ in instrs}
  total = 0.0
  for comp, instrs in comps.items():
    times = mult.get(comp, 0)
    for _, type_text, opcode, attrs in instrs if times else ():
      if opcode not in ("dot", "convolution"):
        continue
      operands = re.findall(r"%?([\w.\-]+)", attrs.partition(")")[0])
      out = _dims(type_text)
      if len(operands) < 2 or not out:
        continue
      if opcode == "dot":
        lhs = _dims(types.get(operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
        k = 1
        for i in (int(x) for x in (m.group(1).split(",") if m else []) if x):
          k *= lhs[i]
      else:
        k = _conv_contraction(attrs, _dims(types.get(operands[0], "")), _dims(types.get(operands[1], "")), out)
        if k is None:
          continue
      n = 1
      for d in out:
        n *= d
      total += 2.0 * n * k * times
  return total


def collective_stats(hlo_text: str, devices_per_slice: int | None = None) -> CollectiveStats:
  """Collective bytes per device of one compiled (partitioned) program; see the module docstring."""
  comps, entry = _parse(hlo_text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  mult, unknown = _multipliers(comps, entry)
  zero = lambda: {k: 0.0 for k in KINDS}
  result, wire, dcn, counts = zero(), zero(), zero(), {k: 0 for k in KINDS}
  # One logical collective can appear as several ops sharing a channel_id: the TPU compiler's
  # async collective fusion clones an all-gather into a loop's iterations to overlap it with
  # compute. Such a channel counts once: its largest op, at the fewest times any of them runs.
  ops, by_channel = [], {}
  for comp, instrs in comps.items():
    times = mult.get(comp, 0)
    for _, type_text, opcode, attrs in instrs if times else ():
      kind = _OPCODES.get(opcode)
      if kind is None:
        continue
      m = re.search(r"channel_id=(\d+)", attrs)
      op = (kind, shape_bytes(type_text), attrs, times)
      if m:
        by_channel.setdefault(m.group(1), []).append(op)
      else:
        ops.append(op)
  for same in by_channel.values():
    ops.append(max(same, key=lambda o: o[1])[:3] + (min(o[3] for o in same),) if len(same) > 1 else same[0])
  for kind, nbytes, attrs, times in ops:
    groups = _groups(attrs)
    n = len(groups[0]) if groups else None
    if kind == "collective-permute":
      moved = nbytes
    elif not n or n == 1:
      moved = 0.0 if n == 1 else nbytes  # a group of one moves nothing; unknown groups: the result
    elif kind == "reduce-scatter":
      moved = nbytes * (n - 1)
    elif kind == "all-reduce":
      moved = 2 * nbytes * (n - 1) / n
    else:
      moved = nbytes * (n - 1) / n
    result[kind] += nbytes * times
    wire[kind] += moved * times
    counts[kind] += times
    if devices_per_slice:
      dcn[kind] += _dcn_bytes(attrs, kind, nbytes, devices_per_slice) * times
  return CollectiveStats(result, wire, dcn, counts, unknown)


def _dcn_bytes(attrs: str, kind: str, nbytes: float, per_slice: int) -> float:
  """What one chip must at least receive across slices for this op (0 if its groups stay in one).

  A group of n devices over s slices, m = n/s in each: the data that must enter a slice from the
  others, shared by its m chips (a hierarchical collective: ICI inside, DCN across). That is
  (s−1)/s of the gathered data (all-gather, all-to-all), of the scattered input (reduce-scatter,
  n × its result), twice that for an all-reduce. A permute pair across slices moves its result.
  """
  if kind == "collective-permute":
    m = _PAIRS.search(attrs)
    pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1)) if m else []
    return nbytes if any(int(a) // per_slice != int(b) // per_slice for a, b in pairs) else 0.0
  members = _mesh_members(attrs) or _iota_members(attrs) or _groups(attrs) or []
  for group in members:
    slices = {d // per_slice for d in group if d >= 0}
    if len(slices) > 1:
      n, s = len(group), len(slices)
      data = {"reduce-scatter": nbytes * n, "all-reduce": 2 * nbytes}.get(kind, nbytes)
      return data * (s - 1) / s / (n / s)
  return 0.0
