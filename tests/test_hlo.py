"""uniap_jax.hlo: collectives, bytes, device groups and loop counts from HLO text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from uniap_jax import hlo

MESH_AXES = {"dp": 2, "tp": 4}


def _mesh():
  return jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)


# --- Device groups, in every format XLA prints -----------------------------------------

@pytest.mark.parametrize("attrs,groups", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, x=1", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups=[2,4]<=[8]", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("replica_groups=[4,2]<=[2,2,2]T(0,2,1)", ((0, 2), (1, 3), (4, 6), (5, 7))),
    ("replica_groups=mesh['a'=2,'b'=4] {'b'}", ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups=mesh['a'=2,'b'=4] {'a'}", ((0, 4), (1, 5), (2, 6), (3, 7))),
    ("replica_groups=mesh['a'=2,'b'=1,'c'=4] {'a'}", ((0, 4), (1, 5), (2, 6), (3, 7))),
    # Sub-axis b:(1)2 is the major half of b (size 4): positions 0,1 vs 2,3 differ.
    ("replica_groups=mesh['a'=2,'b'=4] {'b':(1)2}", ((0, 2), (1, 3), (4, 6), (5, 7))),
    # device_ids: iota(8) as [2,4], transposed, laid out as [a=1,b=4,c=2]: [[0,4],[1,5],...].
    ("replica_groups=mesh['a'=1,'b'=4,'c'=2], device_ids=([2,4]T(1,0)) {'b'}",
     ((0, 1, 2, 3), (4, 5, 6, 7))),
    ("replica_groups=mesh['a'=1,'b'=4,'c'=2], device_ids=([2,4]T(1,0)) {'c'}",
     ((0, 4), (1, 5), (2, 6), (3, 7))),
])
def test_replica_group_formats(attrs, groups):
  assert hlo.expand_replica_groups(attrs) == groups


def test_empty_groups_mean_all_devices():
  assert hlo.expand_replica_groups("replica_groups={}", 4) == ((0, 1, 2, 3),)


@pytest.mark.parametrize("groups,axes", [
    (((0, 1, 2, 3), (4, 5, 6, 7)), ("tp",)),
    (((0, 4), (1, 5), (2, 6), (3, 7)), ("dp",)),
    ((tuple(range(8)),), ("dp", "tp")),
    (((0, 1), (2, 3), (4, 5), (6, 7)), ("tp",)),
])
def test_groups_to_axes(groups, axes):
  assert hlo.groups_to_axes(groups, MESH_AXES) == axes


@pytest.mark.parametrize("shape,nbytes", [
    ("f32[8,32]{1,0}", 1024), ("bf16[4]", 8), ("f32[]", 4), ("pred[16]", 16),
    ("(f32[], f32[2,2]{1,0})", 20), ("s4[8]", 4),
])
def test_shape_bytes(shape, nbytes):
  assert hlo.shape_bytes(shape) == nbytes


def test_unknown_element_type_is_named():
  with pytest.raises(ValueError, match="Unknown HLO element type 'q9'"):
    hlo.shape_bytes("q9[3]")


# --- Parsing synthetic programs ---------------------------------------------------------

_ASYNC_LOOP = """
HloModule m, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[4,64])) -> (s32[], f32[4,64]) {
  %p = (s32[], f32[4,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[4,64]{1,0} get-tuple-element(%p), index=1
  %ags = (f32[4,64]{1,0}, f32[16,64]{1,0}) all-gather-start(%v), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %agd = f32[16,64]{1,0} all-gather-done(%ags)
  %ars = f32[16,64]{1,0} all-reduce-start(%agd), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %ard = f32[16,64]{1,0} all-reduce-done(%ars)
  %sl = f32[4,64]{1,0} slice(%ard), slice={[0:4], [0:64]}
  ROOT %t = (s32[], f32[4,64]{1,0}) tuple(%i, %sl)
}

%cond (p: (s32[], f32[4,64])) -> pred[] {
  %p = (s32[], f32[4,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[4,64]) -> f32[4,64] {
  %a = f32[4,64]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[4,64]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[4,64]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %cp = f32[4,64]{1,0} get-tuple-element(%w), index=1
  %cps = (f32[4,64]{1,0}, f32[4,64]{1,0}, u32[], u32[]) collective-permute-start(%cp), channel_id=3, source_target_pairs={{0,4},{4,0}}
  ROOT %cpd = f32[4,64]{1,0} collective-permute-done(%cps)
}
"""


def test_async_pairs_count_once_and_loops_multiply():
  got = hlo.parse(_ASYNC_LOOP, MESH_AXES)
  by_kind = {c.kind: c for c in got}
  assert sorted(by_kind) == ["all-gather", "all-reduce", "send"]
  ag, ar, send = by_kind["all-gather"], by_kind["all-reduce"], by_kind["send"]
  assert (ag.executions, ag.operand_bytes, ag.result_bytes, ag.axes) == (3, 1024, 4096, ("tp",))
  assert (ar.executions, ar.bytes, ar.axes) == (3, 4096, ("dp",))
  assert (send.executions, send.bytes, send.axes) == (1, 1024, ("dp",))
  summary = hlo.summarize(got)
  assert summary["all-gather"] == {"count": 3, "bytes": 3 * 4096}
  assert hlo.bytes_by_kind(got) == {"all-gather": 12288, "all-reduce": 12288, "send": 1024}


_COMBINED_AND_FOLDED = """
HloModule m, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused (param_0.1: f32[64,8], param_1.2: s32[]) -> f32[8,8] {
  %param_0.1 = f32[64,8]{1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[8,8]{1,0} dynamic-slice(%param_0.1, %param_1.2, %c), dynamic_slice_sizes={8,8}
}

ENTRY %main (a: f32[], b: f32[64,8], i: s32[]) -> (f32[], f32[8,8]) {
  %a = f32[] parameter(0)
  %b = f32[64,8]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %ar = (f32[], f32[64,8]{1,0}) all-reduce(%a, %b), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %g0 = f32[] get-tuple-element(%ar), index=0
  %g1 = f32[64,8]{1,0} get-tuple-element(%ar), index=1
  %f = f32[8,8]{1,0} fusion(%g1, %i), kind=kLoop, calls=%fused
  ROOT %r = (f32[], f32[8,8]{1,0}) tuple(%g0, %f)
}
"""


def test_combined_all_reduce_counts_per_array_and_cpu_slice_is_a_reduce_scatter():
  got = hlo.parse(_COMBINED_AND_FOLDED, MESH_AXES)
  assert [(c.kind, c.operand_bytes, c.result_bytes) for c in got] == [
      ("all-reduce", 4, 4), ("reduce-scatter", 2048, 256)]
  plain = hlo.parse(_COMBINED_AND_FOLDED, MESH_AXES, fold_reduce_scatter=False)
  assert [c.kind for c in plain] == ["all-reduce", "all-reduce"]


def test_loop_without_trip_count_is_reported_not_guessed():
  text = _ASYNC_LOOP.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
  with pytest.warns(UserWarning, match="without a known trip count"):
    got = hlo.parse(text, MESH_AXES)
  assert {c.kind: c.executions for c in got} == {"all-gather": 0, "all-reduce": 0, "send": 1}


def test_not_hlo_is_an_error():
  with pytest.raises(ValueError, match="No ENTRY computation"):
    hlo.parse("hello")


# --- Real programs compiled for the 8 CPU devices ---------------------------------------

def test_fori_loop_all_gather_runs_per_trip():
  mesh = _mesh()

  def f(x):
    return jax.lax.fori_loop(0, 5, lambda i, c: c @ jnp.ones((64, 64)), x)

  sharding = NamedSharding(mesh, P(None, "tp"))
  compiled = jax.jit(f, in_shardings=sharding, out_shardings=sharding).lower(
      jax.ShapeDtypeStruct((32, 64), jnp.float32)).compile()
  got = hlo.parse(compiled.as_text(), MESH_AXES)
  assert [(c.kind, c.axes, c.executions, c.bytes) for c in got] == [
      ("all-gather", ("tp",), 5, 32 * 64 * 4)]


def test_shard_map_collectives_name_their_axes():
  mesh = _mesh()

  def g(x):
    y = jax.lax.psum_scatter(x, "tp", scatter_dimension=0, tiled=True)
    z = jax.lax.ppermute(y, "dp", [(0, 1), (1, 0)])
    return jax.lax.all_to_all(z, "tp", 0, 1, tiled=True)

  compiled = jax.jit(jax.shard_map(g, mesh=mesh, in_specs=P(), out_specs=P(("dp", "tp")))
                     ).lower(jax.ShapeDtypeStruct((32, 64), jnp.float32)).compile()
  got = {(c.kind, c.axes): c for c in hlo.parse(compiled.as_text(), MESH_AXES)}
  full = 32 * 64 * 4
  assert sorted(got) == [("all-to-all", ("tp",)), ("reduce-scatter", ("tp",)),
                         ("send", ("dp",))]
  assert got[("reduce-scatter", ("tp",))].operand_bytes == full
  assert got[("reduce-scatter", ("tp",))].result_bytes == full // 4
  assert got[("send", ("dp",))].bytes == full // 4
  assert got[("all-to-all", ("tp",))].bytes == full // 4


def test_data_parallel_gradient_all_reduce():
  mesh = _mesh()

  def step(w, x):
    g = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)
    return w - 0.1 * g

  ws, xs = NamedSharding(mesh, P()), NamedSharding(mesh, P(("dp", "tp")))
  compiled = jax.jit(step, in_shardings=(ws, xs), out_shardings=ws).lower(
      jax.ShapeDtypeStruct((16, 8), jnp.float32),
      jax.ShapeDtypeStruct((64, 16), jnp.float32)).compile()
  by_axes = hlo.by_axes(hlo.parse(compiled.as_text(), MESH_AXES))
  assert by_axes == {("all-reduce", ("dp", "tp")): {"count": 1, "bytes": 16 * 8 * 4}}
  assert np.isclose(hlo.bytes_by_kind(hlo.parse(compiled.as_text()))["all-reduce"], 512)


def test_collectives_in_a_conditional_branch_are_marked_and_counted_as_if_it_ran():
  """A pipeline that skips idle ticks' work puts collectives in a lax.cond: each branch
  counts as if it ran in every trip (an upper bound), and says so."""
  mesh = _mesh()

  def g(x, flag):
    def tick(i, c):
      busy = lambda v: jax.lax.psum(v, "tp")
      return jax.lax.cond(flag[0] > i, busy, lambda v: v, c)
    y = jax.lax.fori_loop(0, 3, tick, x)
    return jax.lax.psum(y, "dp")  # outside any branch

  compiled = jax.jit(jax.shard_map(g, mesh=mesh, in_specs=(P(), P()), out_specs=P())).lower(
      jax.ShapeDtypeStruct((16, 8), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.int32)).compile()  # compiled only: never run
  got = {c.axes: c for c in hlo.parse(compiled.as_text(), MESH_AXES)
         if c.kind == "all-reduce"}
  assert sorted(got) == [("dp",), ("tp",)]
  assert got[("tp",)].conditional and got[("tp",)].executions == 3
  assert not got[("dp",)].conditional and got[("dp",)].executions == 1
