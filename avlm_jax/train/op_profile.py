"""Where a compiled step's time goes, op by op, from a `jax.profiler` trace.

XLA's CPU runtime records one trace event per executed HLO op (its `hlo_op` stat) on the
threads that run the program; a GPU or TPU trace has the same stat on its device lines. We sum the
events' durations per op over the traced steps, and label each op with its opcode and the JAX
source operation XLA kept in its metadata (`op_name`), read from the compiled HLO text. Ops run
on parallel threads, so a share is of the summed op time, not of the wall clock.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import time

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FUSION_KIND = re.compile(r"kind=(k\w+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class OpInfo:
  opcode: str  # e.g. 'fusion', 'dot', 'copy'
  op_name: str  # JAX's metadata: 'jit(train_step)/transpose(jvp(...))/image/block_0/...'
  detail: str = ""  # fusion kind, and for a fusion the opcodes that matter inside it


def hlo_op_info(hlo_text: str) -> dict[str, OpInfo]:
  """Instruction name -> opcode and JAX op_name, for every instruction of an HLO module's text.

  A fusion's `detail` lists the heavy ops it contains (dot, convolution, reduce, ...), so a
  fusion that does a matmul reads as one.
  """
  computations: dict[str, list[str]] = collections.defaultdict(list)
  current = None
  lines = hlo_text.splitlines()
  for line in lines:  # the opcodes inside each computation, for fusions' details
    head = line.split("{")[0]
    if line and not line.startswith(" ") and ("(" in head or head.startswith("ENTRY")):
      m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", line)
      current = m.group(1) if m else None
      continue
    m = _INSTRUCTION.match(line)
    if m and current:
      computations[current].append(m.group(2))
  heavy = ("dot", "convolution", "reduce", "reduce-window", "scatter", "gather", "sort", "exponential")
  out = {}
  for line in lines:
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(2)
    op_name = _OP_NAME.search(line)
    detail = ""
    if opcode == "fusion":
      kind = _FUSION_KIND.search(line)
      calls = _CALLS.search(line)
      inner = sorted({o for o in computations.get(calls.group(1), []) if o in heavy}) if calls else []
      detail = " ".join(filter(None, [kind.group(1) if kind else "", ",".join(inner)]))
    out[name] = OpInfo(opcode, op_name.group(1) if op_name else "", detail)
  return out


def latest_xplane(trace_dir: str) -> str:
  """The newest `*.xplane.pb` under a `jax.profiler.trace` folder."""
  files = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}/plugins/profile: was the trace written?")
  return max(files, key=os.path.getmtime)


def op_seconds(xplane_path: str, module_prefix: str = "") -> dict[str, tuple[float, int]]:
  """HLO op name -> (total seconds, number of executions) over every event in the trace whose
  `hlo_module` starts with `module_prefix` (e.g. 'jit_train_step')."""
  import jax.profiler

  data = jax.profiler.ProfileData.from_file(xplane_path)
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        if op is None or not str(stats.get("hlo_module", "")).startswith(module_prefix):
          continue
        totals[op][0] += event.duration_ns * 1e-9
        totals[op][1] += 1
  return {k: (v[0], v[1]) for k, v in totals.items()}


def readable(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(apply))/image/block_0/attn/dot_general' ->
  'bwd image/block_0/attn/dot_general' (forward ops have no prefix)."""
  backward = "transpose(" in op_name
  path = [p for p in op_name.split("/") if not re.fullmatch(r"(jit|jvp|transpose|vmap|remat|checkpoint)\(.*\)|"
                                                            r"while|body|cond|closed_call|pjit\(.*\)", p)]
  return ("bwd " if backward else "") + "/".join(path)


def top_ops(seconds: dict[str, tuple[float, int]], info: dict[str, OpInfo], steps: int, k: int = 20
            ) -> list[dict]:
  """The `k` ops that took longest, each with ms per step, its share of all op time, calls per
  step, opcode (+ fusion detail) and readable source op."""
  total = sum(s for s, _ in seconds.values()) or 1.0
  rows = []
  for op, (s, n) in sorted(seconds.items(), key=lambda kv: -kv[1][0])[:k]:
    i = info.get(op, OpInfo("?", ""))
    rows.append({"op": op, "ms_per_step": 1e3 * s / steps, "share": s / total, "calls_per_step": n / steps,
                 "opcode": i.opcode + (f" ({i.detail})" if i.detail else ""), "source": readable(i.op_name)})
  return rows


def by_source(seconds: dict[str, tuple[float, int]], info: dict[str, OpInfo], depth: int) -> dict[str, float]:
  """Op seconds summed by the first `depth` parts of their readable source (e.g. depth 2:
  'image/block_0', 'bwd image/block_0', 'losses/region_phrase'), largest first."""
  groups: dict[str, float] = collections.defaultdict(float)
  for op, (s, _) in seconds.items():
    src = readable(info.get(op, OpInfo("?", "")).op_name) or "(no source)"
    prefix, _, rest = src.partition(" ") if src.startswith("bwd ") else ("", "", src)
    key = "/".join(rest.split("/")[:depth])
    groups[(prefix + " " + key).strip()] += s
  return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def trace_steps(trainer, state, steps: int, warmup: int, trace_dir: str):
  """Run `warmup` untimed then `steps` traced train steps of a started trainer on one batch.
  Returns (state, each traced step's seconds, the trace's xplane path)."""
  import jax

  batch = trainer.next_batch()
  for _ in range(warmup):
    state, _ = trainer.step_fn(state, batch, trainer.prompts)
  jax.block_until_ready(state)
  step_s = []
  jax.profiler.start_trace(trace_dir)
  try:
    for i in range(steps):
      t0 = time.perf_counter()
      with jax.profiler.StepTraceAnnotation("train", step_num=i):
        state, metrics = trainer.step_fn(state, batch, trainer.prompts)
        jax.block_until_ready(metrics)
      step_s.append(time.perf_counter() - t0)
  finally:
    jax.profiler.stop_trace()
  return state, step_s, latest_xplane(trace_dir)
