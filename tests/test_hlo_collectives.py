"""Collective bytes read from the HLO of real compiled sharded functions on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from avlm_jax import hlo_collectives


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))


def _hlo(fn, *specs, **jit_kw):
  return jax.jit(fn, **jit_kw).lower(*specs).compile().as_text()


def test_all_gather_of_a_known_array(mesh):
  # A (64, 32) f32 array split over all 8 devices, gathered whole: one all-gather whose result is
  # the full 8 KiB array, of which each device receives the 7/8 it does not hold.
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P(("a", "b"), None)))
  stats = hlo_collectives.collective_stats(_hlo(lambda x: x * 2, x, out_shardings=NamedSharding(mesh, P())))
  assert stats.result_bytes["all-gather"] == 64 * 32 * 4
  assert stats.wire_bytes["all-gather"] == 64 * 32 * 4 * 7 / 8
  assert stats.counts == {"all-gather": 1, "reduce-scatter": 0, "all-reduce": 0, "all-to-all": 0,
                          "collective-permute": 0}
  assert stats.total_dcn_wire_bytes == 0  # no slices given


def test_all_reduce_and_slices(mesh):
  # psum of each device's (4, 32) f32 block over "a": an all-reduce in groups of 2 devices, one
  # from each half of the mesh, so with 4 devices per slice every group crosses slices.
  x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(mesh, P("a", "b")))

  def psum_over(axis):
    return jax.shard_map(lambda b: jax.lax.psum(b, axis), mesh=mesh, in_specs=P("a", "b"), out_specs=P(None, "b")
                         if axis == "a" else P("a", None))

  stats = hlo_collectives.collective_stats(_hlo(psum_over("a"), x), devices_per_slice=4)
  assert stats.result_bytes["all-reduce"] == 4 * 32 * 4
  assert stats.wire_bytes["all-reduce"] == 2 * 4 * 32 * 4 * (2 - 1) / 2
  assert stats.dcn_wire_bytes["all-reduce"] == stats.wire_bytes["all-reduce"]
  # Over "b" the groups are devices 0-3 and 4-7: within a slice, all on ICI.
  stats = hlo_collectives.collective_stats(_hlo(psum_over("b"), x), devices_per_slice=4)
  assert stats.result_bytes["all-reduce"] == 4 * 32 * 4
  assert stats.wire_bytes["all-reduce"] == 2 * 4 * 32 * 4 * 3 / 4
  assert stats.total_dcn_wire_bytes == 0


def test_scan_body_counts_once_per_iteration(mesh):
  # FSDP-style: each of 5 scanned (32, 32) weights is sharded on "b" and all-gathered inside the loop.
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P(("a", "b"), None)))
  w = jax.ShapeDtypeStruct((5, 32, 32), jnp.float32, sharding=NamedSharding(mesh, P(None, "b", None)))

  def f(x, w):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

  stats = hlo_collectives.collective_stats(_hlo(f, x, w))
  assert stats.counts["all-gather"] == 5
  assert stats.result_bytes["all-gather"] == 5 * 32 * 32 * 4
  assert stats.wire_bytes["all-gather"] == 5 * 32 * 32 * 4 * 3 / 4
  assert stats.unknown_trip_loops == 0


def test_text_forms():
  # Async pairs count at -done; iota and listed replica groups; a loop bounded by `i < 3` in its condition.
  text = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %constant.1 = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %constant.1), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %rs = f32[1]{0} reduce-scatter(%x), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %cp = f32[4]{0} collective-permute(%x), source_target_pairs={{0,4},{4,0}}
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %x)
}

ENTRY %main (a: bf16[2,8]) -> bf16[16,8] {
  %a = bf16[2,8]{1,0} parameter(0)
  %ags = (bf16[2,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%a), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %agd = bf16[16,8]{1,0} all-gather-done(%ags)
}
"""
  stats = hlo_collectives.collective_stats(text, devices_per_slice=4)
  assert stats.result_bytes["all-gather"] == 16 * 8 * 2
  assert stats.counts["all-gather"] == 1
  assert stats.result_bytes["reduce-scatter"] == 3 * 4
  assert stats.wire_bytes["reduce-scatter"] == 3 * 4 * 3
  assert stats.dcn_wire_bytes["collective-permute"] == 3 * 16
  assert stats.dcn_wire_bytes["reduce-scatter"] == 0  # [2,4]<=[8]: {0..3}, {4..7}


def test_shape_bytes():
  assert hlo_collectives.shape_bytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, f32[], pred[4], s4[8])") == 12 + 4 + 4 + 4


def test_roofline_fields_of_a_compiled_step(mesh):
  # What the benchmark scripts report per row: XLA's costs, the collectives, and the bound.
  from avlm_jax import roofline
  from avlm_jax.train.benchmarking import roofline_fields

  x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P(("a", "b"), None)))
  compiled = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P())).lower(x).compile()
  chip = roofline.Chip("slow links", peak_flops=1e12, hbm_bytes_per_s=1e12, ici_bytes_per_s=1e3, dcn_bytes_per_s=1e2)
  f = roofline_fields(compiled, chip, model_flops_per_chip=8.0, devices_per_slice=4)
  assert f["collective_bytes_per_chip"] == {"all-gather": 64 * 32 * 4}
  # Gathering 8 KiB over two slices of 4: 7/8 of it arrives at each chip; half of it comes from
  # the other slice, and the 4 chips of a slice can share that: 1 KiB each over DCN.
  assert f["collective_wire_bytes_per_chip"] == 64 * 32 * 4 * 7 / 8
  assert f["dcn_wire_bytes_per_chip"] == 64 * 32 * 4 / 2 / 4
  assert f["bound_by"] == "dcn" and f["roofline_s"] == pytest.approx(64 * 32 * 4 / 8 / 1e2)
  assert f["xla_flops_per_chip"] is not None and f["hbm_bytes_per_chip"] > 0
  assert roofline_fields(compiled, None, 8.0)["roofline"].startswith("n/a")


def test_matmul_flops_count_every_iteration(mesh):
  # 5 scanned (32, 32) layers on an (8, 32) block per device: 5 × 2·8·32·32 FLOPs per device,
  # where XLA's cost analysis counts the loop body once.
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P(("a", "b"), None)))
  w = jax.ShapeDtypeStruct((5, 32, 32), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = jax.jit(lambda x, w: jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]).lower(x, w).compile()
  assert hlo_collectives.matmul_flops(compiled.as_text()) == 5 * 2 * 8 * 32 * 32
  # A convolution as TPU programs write matmuls: out (4, 6), contracting 3 input features.
  text = """HloModule m

ENTRY %main (a: bf16[4,3], b: bf16[3,6]) -> bf16[4,6] {
  %a = bf16[4,3]{1,0} parameter(0)
  %b = bf16[3,6]{1,0} parameter(1)
  ROOT %c = bf16[4,6]{1,0:T(8,128)(2,1)} convolution(%a, %b), dim_labels=bf_io->bf
}
"""
  assert hlo_collectives.matmul_flops(text) == 2 * 4 * 6 * 3


def test_convolution_forms():
  # A patch embedding (a real 16×16 window, stride 16) and attention scores written as a
  # convolution whose batch and head dims are spatial dims of unchanged size.
  text = """HloModule m

ENTRY %main (x: bf16[2,32,32,1], w: bf16[16,16,1,8], q: bf16[2,10,3,4], k: bf16[2,10,3,4]) -> bf16[2,2,2,8] {
  %x = bf16[2,32,32,1]{3,2,1,0} parameter(0)
  %w = bf16[16,16,1,8]{3,2,1,0} parameter(1)
  %q = bf16[2,10,3,4]{3,2,1,0} parameter(2)
  %k = bf16[2,10,3,4]{3,2,1,0} parameter(3)
  %s = bf16[2,3,10,10]{3,2,1,0} convolution(%q, %k), window={size=2x3 pad=1_1x2_2 rhs_reversal=1x1}, dim_labels=0b1f_0o1i->01bf
  ROOT %p = bf16[2,2,2,8]{3,2,1,0} convolution(%x, %w), window={size=16x16 stride=16x16}, dim_labels=b01f_01io->b01f
}
"""
  assert hlo_collectives.matmul_flops(text) == 2 * (2 * 2 * 2 * 8) * 256 + 2 * (2 * 3 * 10 * 10) * 4


def test_one_channel_counts_once():
  # The TPU compiler's async collective fusion clones one all-gather (one channel_id) into a
  # loop body: it is one collective, counted once at the fewest runs; another channel counts apart.
  text = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[1]{0} get-tuple-element(%p), index=1
  %g = f32[8]{0} all-gather(%x), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
  %h = f32[8]{0} all-gather(%x), channel_id=6, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %g)
}

ENTRY %main (a: f32[1]) -> f32[8] {
  %a = f32[1]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %g0 = f32[8]{0} all-gather(%a), channel_id=5, replica_groups=[1,8]<=[8], dimensions={0}
}
"""
  stats = hlo_collectives.collective_stats(text)
  assert stats.counts["all-gather"] == 1 + 4
  assert stats.result_bytes["all-gather"] == 32 + 4 * 32
