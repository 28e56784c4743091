"""uniap_jax.strategies: mesh shapes, layouts, labels, rules and candidates."""

import dataclasses
import functools
import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import models as zoo
from uniap_jax import graph as graph_lib
from uniap_jax import hlo
from uniap_jax import strategies
from uniap_jax.cluster import Cluster
from uniap_jax.strategies import _candidates
from uniap_jax.strategies import _evaluate
from uniap_jax.strategies import _ir
from uniap_jax.strategies import _liveness

A100_2X8 = Cluster.preset("a100-40g-2x8")
CPU8 = Cluster.preset("cpu-8")


# --- Mesh shapes ------------------------------------------------------------------------

def test_mesh_shapes_cover_the_factorisations_with_tp_innermost():
  shapes = strategies.mesh_shapes(A100_2X8, 16)
  assert len(shapes) == 5
  assert [s.as_dict() for s in shapes[:4]] == [
      {"dp": 16}, {"dp": 8, "tp": 2}, {"dp": 4, "tp": 4}, {"dp": 2, "tp": 8}]
  fine = shapes[-1]
  assert fine.kind == "fine"
  assert fine.sizes == (2, 2, 2, 2)
  assert fine.names[0].startswith("infiniband") and fine.names[-1].startswith("nvlink")
  # tp up to the node size stays on NVLink; a dp axis of 4 over tp=4 spans both levels.
  dp_tp = shapes[2]
  assert dp_tp.level_factors((1,)) == (4, 1)
  assert dp_tp.level_factors((0,)) == (2, 2)
  assert dp_tp.level_factors((0, 1)) == (8, 2)


def test_mesh_shapes_for_a_stage_inside_one_node():
  # Two axes of 2 are already the finest view: no separate fine mesh.
  shapes = strategies.mesh_shapes(A100_2X8, 4)
  assert [s.as_dict() for s in shapes] == [{"dp": 4}, {"dp": 2, "tp": 2}]
  assert all(s.level_factors(tuple(range(len(s.axes))))[1] == 1 for s in shapes)
  assert [s.as_dict() for s in strategies.mesh_shapes(A100_2X8, 8, fine=False)] == [
      {"dp": 8}, {"dp": 4, "tp": 2}, {"dp": 2, "tp": 4}]


def test_mesh_shapes_reject_a_stage_that_does_not_divide():
  with pytest.raises(ValueError, match=r"num_devices=3 does not divide the cluster's 16 "
                     r"devices; use one of \[1, 2, 4, 8, 16\]"):
    strategies.mesh_shapes(A100_2X8, 3)


# --- Layouts and resharding -------------------------------------------------------------

SIZES = (2, 4)  # axes 0 ("dp") and 1 ("tp")


@pytest.mark.parametrize("src,dst,expected", [
    (((), ()), ((1,), ()), []),  # a slice is free
    (((1,), ()), ((), ()), [("all-gather", (1,), 1024.0)]),
    (((0, 1), ()), ((), ()), [("all-gather", (0, 1), 1024.0)]),
    (((1,), ()), ((), (1,)), [("all-to-all", (1,), 256.0)]),
    (((0,), (1,)), ((1,), (0,)), [("all-to-all", (0,), 128.0), ("all-to-all", (1,), 128.0)]),
    (((0,), (1,)), ((0,), ()), [("all-gather", (1,), 512.0)]),
])
def test_reshard_follows_the_spmd_partitioner(src, dst, expected):
  comms, _ = strategies.reshard(src, dst, 1024.0, SIZES)
  assert comms == expected


@pytest.mark.parametrize("natural,partial,target,expected", [
    # Contraction over a dp-split dim, result replicated: all-reduce of the full result.
    (((), ()), (frozenset({0}),), ((), ()), [("all-reduce", (0,), 1024.0)]),
    # Result split over the summed axis: reduce-scatter.
    (((), ()), (frozenset({1}),), ((1,), ()), [("reduce-scatter", (1,), 1024.0)]),
    # Two summed dims: one collective each, the scatter first, then the rest on the shard.
    (((), ()), (frozenset({0}), frozenset({1})), ((1,), ()),
     [("reduce-scatter", (1,), 1024.0), ("all-reduce", (0,), 256.0)]),
])
def test_partial_sums_resolve_per_summed_dim(natural, partial, target, expected):
  comms, _ = strategies.finish(natural, partial, target, 1024.0, SIZES)
  assert comms == expected


def _compiled(fn, args, in_shardings, out_shardings, mesh):
  """The collectives (kind, axes, bytes) of `fn` jitted on `mesh`, as `hlo` reads them."""
  compiled = jax.jit(fn, in_shardings=in_shardings,
                     out_shardings=out_shardings).lower(*args).compile()
  return sorted((c.kind, c.axes, c.bytes) for c in hlo.parse(compiled.as_text(),
                                                            dict(mesh.shape)))


def _mesh_4x2():
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  names = ("dp", "tp")
  mesh = jax.make_mesh((4, 2), names, axis_types=(AxisType.Auto,) * 2)
  return mesh, lambda lay: NamedSharding(mesh, P(*strategies.to_spec(lay, names)))


def _named(comms, names):
  return sorted((kind, tuple(names[a] for a in axes), b) for kind, axes, b in comms)


@pytest.mark.parametrize("kernel,batch", [
    # Summed axes scattered over two result dims: a full all-reduce per dim.
    (((0,), (1,)), ((0, 1), (), ())),
    (((1,), (0,)), ((0,), (1,), ())),
    # Over one result dim: one reduce-scatter, even across two contracting dims.
    (((0, 1), ()), ((0,), (1,), ())),
    # Over part of the summed axes: reduce-scatter those, all-reduce the rest on the shard.
    (((0,), ()), ((0, 1), (), ())),
    (((), (1,)), ((0, 1), (), ())),
])
def test_weight_gradients_combine_partial_sums_as_xla_compiles_them(kernel, batch):
  """A Linear's kernel split `kernel`, its input's batch (and sequence) split `batch`,
  on a 4x2 mesh: the kernel's forward all-gathers and its gradient's reduction, as
  `reshard` and `finish(combine="contraction")` predict them, against the compiled
  AdamW step."""
  names, sizes = ("dp", "tp"), (4, 2)
  mesh, sharding = _mesh_4x2()
  kernel_shape, x_shape = (32, 64), (256, 8, 32)
  tx = optax.adamw(1e-3)

  def step(w, state, x):
    loss = lambda w: jnp.mean(jax.lax.dot_general(x, w, (((2,), (0,)), ((), ()))) ** 2)
    updates, state = tx.update(jax.grad(loss)(w), state, w)
    return optax.apply_updates(w, updates), state

  w = jax.ShapeDtypeStruct(kernel_shape, jnp.float32)
  state = jax.eval_shape(tx.init, w)
  state_sh = jax.tree.map(lambda a: sharding(kernel if a.ndim == 2 else ()), state)
  got = _compiled(step, (w, state, jax.ShapeDtypeStruct(x_shape, jnp.float32)),
                  (sharding(kernel), state_sh, sharding(batch)), (sharding(kernel), state_sh),
                  mesh)
  nbytes = 4.0 * 32 * 64
  gathers, _ = strategies.reshard(kernel, ((), ()), nbytes, sizes)
  partial = tuple(frozenset(axes) for axes in batch[:2] if axes)
  reduce, _ = strategies.finish(((), ()), partial, kernel, nbytes, sizes, combine="contraction")
  assert got == _named(gathers + reduce, names)


@pytest.mark.parametrize("target", [((0,),), ((1,),), ((0, 1),)])
def test_reductions_combine_partial_sums_dim_by_dim(target):
  """A sum over a dp-split and a tp-split dim (a bias gradient): an all-reduce per
  summed dim, the last dim first; the last a reduce-scatter where the target adds
  exactly its axes (`finish(combine="reduction")`), against compiled HLO."""
  names, sizes = ("dp", "tp"), (4, 2)
  mesh, sharding = _mesh_4x2()
  got = _compiled(lambda a: jnp.sum(jnp.sin(a), axis=(0, 1)),
                  (jax.ShapeDtypeStruct((64, 8, 64), jnp.float32),),
                  (sharding(((0,), (1,), ())),), sharding(target), mesh)
  want, _ = strategies.finish(((),), (frozenset({0}), frozenset({1})), target, 256.0, sizes,
                              combine="reduction")
  assert got == _named(want, names)


def test_to_spec():
  assert strategies.to_spec(((0,), (), (0, 1)), ("dp", "tp")) == ("dp", None, ("dp", "tp"))
  assert strategies.to_spec(((), ()), ("dp", "tp")) == ()


# --- Labels and candidates on a traced MLP ----------------------------------------------

class MLP(nnx.Module):

  def __init__(self, hidden, ffn, rngs):
    self.l1 = nnx.Linear(hidden, ffn, rngs=rngs)
    self.l2 = nnx.Linear(ffn, hidden, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def _train_step(model, optimizer, batch):
  loss = lambda m: jnp.mean((m(batch["x"]) - batch["y"]) ** 2)
  value, grads = nnx.value_and_grad(loss)(model)
  optimizer.update(model, grads)
  return value


def _sgd_graph(model_fn, x_shape):
  """A module traced shape-only under `_train_step` with SGD, on x and y of one shape."""
  model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
  optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, optax.sgd(1e-3), wrt=nnx.Param),
                             model)
  data = {"x": jax.ShapeDtypeStruct(x_shape, jnp.float32),
          "y": jax.ShapeDtypeStruct(x_shape, jnp.float32)}
  return graph_lib.trace(_train_step, model, optimizer, data)


def _mlp_graph(batch=16, hidden=32, ffn=64):
  model = nnx.eval_shape(lambda: MLP(hidden, ffn, nnx.Rngs(0)))
  optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param),
                             model)
  data = {"x": jax.ShapeDtypeStruct((batch, hidden), jnp.float32),
          "y": jax.ShapeDtypeStruct((batch, hidden), jnp.float32)}
  return graph_lib.trace(_train_step, model, optimizer, data)


@pytest.fixture(scope="module")
def mlp():
  graph = _mlp_graph()
  info = strategies.analyze(graph)
  return graph, info, {l.name: strategies.build_ir(l, info) for l in graph.layers}


def _label(ir, value_id, dim):
  return ir.values[value_id].labels[dim]


def test_labels_tie_activations_weights_and_gradients(mlp):
  graph, _, irs = mlp
  ir = irs["l1"]
  kernel = next(p.value_id for p in graph.layer("l1").params if p.path == "l1/kernel")
  (out,) = ir.output_ids
  # The activation's hidden dim is the kernel's output dim; its rows are the batch.
  assert _label(ir, out, 1) == _label(ir, kernel, 1)
  assert _label(ir, out, 0) in ir.batch_labels
  assert _label(ir, kernel, 0) in ir.param_labels
  # Gradients follow their parameter.
  assert ir.grad_ids and all(
      set(ir.values[g].labels) <= set(ir.values[kernel].labels) | {-1} or
      ir.values[g].shape == (64,) for g in ir.grad_ids)
  # The optimizer state of a layer is read by that layer's ops.
  assert len(ir.opt_state_ids) >= 4


def test_micro_batch_scales_batch_dims_only(mlp):
  graph, info, _ = mlp
  ir = strategies.build_ir(graph.layer("l1"), info, microbatch=4)
  (out,) = ir.output_ids
  assert ir.values[out].shape == (4, 64)
  kernel = next(p.value_id for p in graph.layer("l1").params if p.path == "l1/kernel")
  assert ir.values[kernel].shape == (32, 64)
  with pytest.raises(ValueError, match="does not scale to micro-batch 3"):
    strategies.build_ir(graph.layer("l1"), info, microbatch=3.5)


def _find(cands, ir, inputs=None, **specs):
  paths = [p.path for p in ir.layer.params if p.value_id in ir.values]
  for c in cands:
    got = dict(zip(paths, c.param_specs))
    if all(got[k] == v for k, v in specs.items()) and (
        inputs is None or c.input_specs[:len(inputs)] == inputs):
      return c
  raise AssertionError(f"no candidate with {specs}, inputs {inputs}")


def test_megatron_split_is_among_the_candidates(mlp):
  """Column-split l1, row-split l2: one all-reduce of l2's output, nothing else."""
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[0]  # one axis of 8 ("dp" by name only)
  l1 = _find(strategies.layer_candidates(irs["l1"], mesh, recompute=False), irs["l1"],
             inputs=((),), **{"l1/kernel": (None, "dp"), "l1/bias": ("dp",)})
  l2 = _find(strategies.layer_candidates(irs["l2"], mesh, recompute=False), irs["l2"],
             inputs=((None, "dp"),), **{"l2/kernel": ("dp",), "l2/bias": ()})
  assert l1.output_specs == ((None, "dp"),) and l2.input_specs[0] == (None, "dp")
  assert [(c.kind, c.phase) for c in l1.comms] == []
  forward = [c for c in l2.comms if c.phase == "forward" and c.bytes > 4]
  assert [(c.kind, c.axes, c.count, c.bytes) for c in forward] == [
      ("all-reduce", ("dp",), 1, 16 * 32 * 4)]


def test_data_parallel_synchronises_gradients_once_per_step(mlp):
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  dp = _find(strategies.layer_candidates(irs["l1"], mesh, recompute=False), irs["l1"],
             inputs=(("dp",),), **{"l1/kernel": (), "l1/bias": ()})
  assert dp.input_specs == (("dp",),)
  assert [(c.kind, c.per_step, c.count) for c in dp.comms] == [("all-reduce", True, 2)]
  assert dp.comms[0].bytes == (32 * 64 + 64) * 4 / 2


def test_fsdp_gathers_weights_and_reduce_scatters_gradients(mlp):
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  fsdp = _find(strategies.layer_candidates(irs["l1"], mesh, recompute=False), irs["l1"],
               inputs=(("dp",),), **{"l1/kernel": ("dp",), "l1/bias": ()})
  kinds = {(c.kind, c.phase, c.per_step) for c in fsdp.comms}
  assert ("all-gather", "forward", False) in kinds
  assert ("reduce-scatter", "backward", True) in kinds
  assert fsdp.param_bytes < (32 * 64 + 64) * 4 / 4


def test_fsdp_beside_an_idle_axis_is_not_offered(mlp):
  """FSDP over one axis of a 2x2x2 mesh, the others splitting nothing: XLA moves the
  kernel's shards onto the idle axes with collective-permutes (checked on compiled
  HLO), which the rules cannot say; such candidates are left out. Over a 4-way group
  (one axis or two) beside an idle 2-way axis XLA gathers and reduce-scatters as
  planned: offered."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 2, 2), ("a", "b", "c"), axis_types=(AxisType.Auto,) * 3)
  tx = optax.sgd(1e-3)

  def step(w, x):
    grad = jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w)
    return optax.apply_updates(w, tx.update(grad, tx.init(w))[0])

  sh = lambda *spec: NamedSharding(mesh, P(*spec))
  got = _compiled(step, (jax.ShapeDtypeStruct((32, 64), jnp.float32),
                         jax.ShapeDtypeStruct((256, 32), jnp.float32)),
                  (sh("a"), sh("a")), sh("a"), mesh)
  assert "send" in {kind for kind, _, _ in got}
  _, _, irs = mlp
  fine = strategies.mesh_shapes(CPU8, 8)[3]
  assert fine.sizes == (2, 2, 2)
  cands = strategies.layer_candidates(irs["l1"], fine, recompute=False)
  assert cands
  size = dict(zip(fine.names, fine.sizes))
  offered = set()
  for cand in cands:
    scattered = [c.axes for c in cand.comms if c.kind == "reduce-scatter"]
    if scattered:
      used = {a for spec in (*cand.param_specs, *cand.input_specs, *cand.output_specs)
              for e in spec if e for a in (e if isinstance(e, tuple) else (e,))}
      idle = math.prod(size[a] for a in fine.names if a not in used)
      assert idle < min(math.prod(size[a] for a in axes) for axes in scattered), cand.name
      offered.add(len(scattered[0]))
  assert 2 in offered  # FSDP over two axes beside the idle third
  dp4 = strategies.mesh_shapes(CPU8, 8)[1]
  assert dp4.as_dict() == {"dp": 4, "tp": 2}
  _find(strategies.layer_candidates(irs["l1"], dp4, recompute=False), irs["l1"],
        inputs=(("dp",),), **{"l1/kernel": ("dp",), "l1/bias": ()})


def test_recomputation_of_a_lone_linear_saves_nothing(mlp):
  """jax.checkpoint wraps the module call; the relu after it runs in the parent's call
  and keeps its residual either way, and the Linear's backward reads only its input:
  nothing to recompute, nothing saved."""
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  ir = irs["l1"]
  plain, remat = strategies.layer_candidates(
      ir, mesh, assignments_=[(tuple(sorted(ir.batch_labels)),)])
  assert (plain.recompute, remat.recompute) == (False, True)
  assert remat.activation_bytes == plain.activation_bytes
  assert not remat.op_rerun.any()
  assert [c for c in remat.comms if c.phase == "recompute"] == []


def _gpt_block_pair(name):
  """The GPT-2 block's candidates `name` and `name + " +remat"` on dp=2 x tp=2."""
  ir = _zoo_irs("gpt2")["blocks/0"]
  mesh = next(m for m in strategies.mesh_shapes(CPU8, 4) if m.as_dict() == {"dp": 2, "tp": 2})
  cands = {c.name: c for c in strategies.layer_candidates(ir, mesh)}
  return ir, cands[name], cands[name + " +remat"]


def test_recomputation_trades_activation_memory_for_forward_time():
  ir, plain, remat = _gpt_block_pair("dp=batch tp=c_attn:1,attn_proj:0,c_fc:1")
  assert (plain.recompute, remat.recompute) == (False, True)
  assert remat.activation_bytes < plain.activation_bytes
  forward = np.array(remat.op_phase) == "forward"
  assert remat.op_rerun.any() and not remat.op_rerun[~forward].any()
  # The same ops for every candidate of the layer: what the backward reads.
  assert np.array_equal(plain.op_rerun, remat.op_rerun)


def test_recomputation_reissues_only_what_the_backward_reads():
  """Megatron's row-parallel projections end the block's attention and MLP with an
  all-reduce each. The attention's result feeds the MLP, whose backward reads it, so
  a recomputation runs it again; the MLP's closes the block's output, which no
  backward of the block reads: a recomputation (XLA drops the rest of the
  rematerialised forward as dead code) runs neither that matmul nor its all-reduce."""
  ir, plain, remat = _gpt_block_pair("dp=batch tp=c_attn:1,attn_proj:0,c_fc:1")
  forward_ar = [c for c in plain.comms if c.phase == "forward" and c.kind == "all-reduce"
                and c.axes == ("tp",)]
  assert sum(c.count for c in forward_ar) == 2  # attention and MLP outputs
  again = [c for c in remat.comms if c.phase == "recompute" and c.kind == "all-reduce"]
  assert [(c.axes, c.count, c.bytes) for c in again] == [
      (("tp",), 1, forward_ar[0].bytes)]  # the attention's, as large as the output
  assert [dataclasses.replace(c, phase="recompute") for c in plain.rerun_comms] == [
      c for c in remat.comms if c.phase == "recompute"]
  dots = [k for k, o in enumerate(ir.ops) if o.op.phase == "forward" and o.family == "dot"
          and any(v in ir.param_ids for v in o.op.in_ids)]
  rerun = {ir.ops[k].op.module.rsplit("/", 1)[-1] for k in dots if remat.op_rerun[k]}
  skipped = {ir.ops[k].op.module.rsplit("/", 1)[-1] for k in dots if not remat.op_rerun[k]}
  assert rerun == {"c_attn", "attn_proj", "c_fc"} and skipped == {"mlp_proj"}


def test_zero_and_tensor_parallel_on_one_dim_list_the_kept_axis_first():
  """A weight dim split over "tp" (kept) and "dp" (gathered before use, ZeRO) is
  stored as ("tp", "dp"): gathering "dp" then leaves each device its contiguous "tp"
  shard. In mesh order ("dp", "tp") XLA gathers over both and runs the layer data
  parallel (checked on compiled HLO)."""
  ir = _zoo_irs("gpt2")["blocks/0"]
  mesh = next(m for m in strategies.mesh_shapes(CPU8, 4) if m.as_dict() == {"dp": 2, "tp": 2})
  paths = [p.path.removeprefix("blocks/0/") for p in ir.layer.params if p.value_id in ir.values]
  cands = {c.name: dict(zip(paths, c.param_specs))
           for c in strategies.layer_candidates(ir, mesh, recompute=False)}
  zero_tp = cands["dp=batch,c_fc:1 tp=c_attn:1,attn_proj:0,c_fc:1"]  # ZeRO over Megatron
  assert zero_tp["c_fc/kernel"] == (None, ("tp", "dp"))
  assert zero_tp["c_fc/bias"] == (("tp", "dp"),)  # read through a reshape
  assert zero_tp["mlp_proj/kernel"] == (("tp", "dp"),)
  assert zero_tp["c_attn/kernel"] == (None, "tp")
  # Both axes gathered (the batch split over both): mesh order.
  both = cands["dp=batch,c_fc:1 tp=batch,c_fc:1"]
  assert both["c_fc/kernel"] == (None, ("dp", "tp"))
  # Both axes kept (tensor parallel over both): mesh order.
  kept = cands["dp=c_attn:1,attn_proj:0,c_fc:1 tp=c_attn:1,attn_proj:0,c_fc:1"]
  assert kept["c_fc/kernel"] == (None, ("dp", "tp"))


def test_recomputation_keeps_the_peak_and_lowers_what_is_held_between_passes(mlp):
  """Re-running the forward inside the backward reaches the same working peak."""
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  ir = irs["l2"]
  plain, remat = strategies.layer_candidates(
      ir, mesh, assignments_=[(tuple(sorted(ir.batch_labels)),)])
  peak = lambda c: c.temp_bytes + max(c.activation_bytes, c.grad_bytes)
  assert peak(remat) == pytest.approx(peak(plain))
  assert remat.activation_bytes <= plain.activation_bytes
  assert 0 <= plain.temp_bytes <= remat.temp_bytes


class GeluMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(32, 64, rngs=rngs)
    self.l2 = nnx.Linear(64, 32, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.gelu(self.l1(x)))


def test_cheap_chains_are_recomputed_not_kept():
  """GELU keeps its input and tanh; 0.5 * (1 + tanh(.)) and x**3 are recomputed."""
  graph = _sgd_graph(GeluMLP, (16, 32))
  ir = strategies.build_ir(graph.layer("l1"), strategies.analyze(graph))
  producer = {v: o.op.primitive for o in ir.ops for v in o.op.out_ids}
  residuals = sorted(producer.get(v, "input") for v in ir.residual_ids)
  kept = sorted(producer.get(v, "input") for v in ir.kept_ids)
  assert len(residuals) > len(kept)  # the elementwise chain is among the residuals
  assert kept == ["add", "input", "tanh"]  # x, x @ W + b, tanh(.)


class ResidualNorm(nnx.Module):
  """A layer norm of x + lin(x): the norm's input is made inside the layer."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(32, 32, rngs=rngs)
    self.ln = nnx.LayerNorm(32, rngs=rngs)

  def __call__(self, x):
    return self.ln(x + self.lin(x))


class ResidualNormModel(nnx.Module):

  def __init__(self, rngs):
    self.pre, self.block = nnx.Linear(32, 32, rngs=rngs), ResidualNorm(rngs)

  def __call__(self, x):
    return self.block(self.pre(x))


def test_residuals_made_from_one_value_are_recomputed_from_it():
  """The norm's `x1 - mean` and its variance's `2 * x1` are [b, h] residuals made by
  cheap ops from x1 = x + lin(x); the backward fusions recompute them from lin(x) and
  the [b] mean, which are kept instead, until the last reader of those residuals."""
  graph = _sgd_graph(ResidualNormModel, (16, 32))
  ir = strategies.build_ir(graph.layer("block"), strategies.analyze(graph))
  producer = {v: o.op.primitive for o in ir.ops for v in o.op.out_ids}
  full = lambda ids: sorted(producer.get(v, "input") for v in ids
                            if ir.values[v].shape == (16, 32))
  assert full(ir.residual_ids).count("mul") >= 2 and "sub" in full(ir.residual_ids)
  assert full(ir.kept_ids) == ["dot_general", "input"]  # lin(x), and x for lin's weight
  (dot,) = [v for v in ir.kept_ids if producer.get(v) == "dot_general"]
  assert {producer[r] for r in ir.kept_for[dot]} >= {"sub", "mul"}
  live = _liveness.intervals(ir)
  end = live.end[live.ids.index(dot)] - 1
  last_reader = max(k for k, o in enumerate(ir.ops) for r in ir.kept_for[dot]
                    if r in o.op.in_ids)
  assert end == last_reader and ir.ops[end].op.phase == "backward"


def test_a_mesh_axis_that_does_not_divide_removes_the_candidate():
  graph = _mlp_graph(batch=16, hidden=32, ffn=6)
  info = strategies.analyze(graph)
  ir = strategies.build_ir(graph.layer("l1"), info)
  mesh = strategies.mesh_shapes(CPU8, 8)[1]  # dp=4, tp=2
  cands = strategies.layer_candidates(ir, mesh, recompute=False)
  kernels = [dict(zip(["l1/bias", "l1/kernel"], c.param_specs))["l1/kernel"] for c in cands]
  second = [k[1] if len(k) > 1 else None for k in kernels]
  # ffn=6: tp=2 divides it, dp=4 and dp x tp = 8 do not.
  assert "tp" in second
  assert not any(s in ("dp", ("dp", "tp"), ("tp", "dp")) for s in second)


def test_candidates_are_deterministic(mlp):
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[2]
  a = strategies.layer_candidates(irs["l2"], mesh)
  b = strategies.layer_candidates(irs["l2"], mesh)
  assert [c.name for c in a] == [c.name for c in b]
  assert [c.comms for c in a] == [c.comms for c in b]


def test_value_layouts_cover_every_value(mlp):
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  cand = strategies.layer_candidates(irs["l1"], mesh, recompute=False)[0]
  layouts = strategies.value_layouts(irs["l1"], mesh, cand)
  assert set(layouts) == set(irs["l1"].values)
  assert tuple(layouts[v] for v in irs["l1"].input_ids) == cand.input_layouts


# --- Unsupported primitives -------------------------------------------------------------

class Cum(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return jnp.cumsum(jnp.cumsum(self.lin(x), axis=0), axis=1)


class CumModel(nnx.Module):

  def __init__(self, rngs):
    self.cum = Cum(rngs)
    self.out = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(self.cum(x))


def test_unsupported_primitive_is_replicated_with_one_warning():
  graph = _sgd_graph(CumModel, (8, 8))
  info = strategies.analyze(graph)
  ir = strategies.build_ir(graph.layer("cum"), info)
  assert set(strategies.unsupported(ir)) == {"cumsum"}
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cands = strategies.layer_candidates(ir, mesh, recompute=False)
  messages = [str(w.message) for w in caught if "No sharding rule" in str(w.message)]
  assert len(messages) == 1
  assert "'cumsum'" in messages[0] and "layer 'cum'" in messages[0]
  assert ".py:" in messages[0]  # the user's source line
  # Data parallel still works around it: the cumsum's operand is gathered.
  dp = next(c for c in cands if c.input_specs == (("dp",),))
  assert any(c.kind == "all-gather" and c.phase == "forward" for c in dp.comms)


# --- Captured constants -----------------------------------------------------------------

class Masked(nnx.Module):
  """Multiplies by a numpy mask closed over by the model (as Swin's shifted windows do)."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    mask = np.tril(np.ones((8, 8), np.float32))  # a jaxpr constant, not an input
    return self.lin(x) * jnp.broadcast_to(mask[None], (x.shape[0], 8, 8))


class MaskedModel(nnx.Module):

  def __init__(self, rngs):
    self.masked = Masked(rngs)
    self.out = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(self.masked(x))


def test_a_captured_constant_is_broadcast_like_any_operand():
  """Regression: a broadcast of a captured array constant (id -1, shape in in_types)."""
  graph = _sgd_graph(MaskedModel, (8, 8, 8))
  info = strategies.analyze(graph)
  ir = strategies.build_ir(graph.layer("masked"), info)
  constant_broadcasts = [o for o in ir.ops if o.family == "broadcast" and o.op.in_ids[0] < 0
                         and len(o.op.in_types[0].shape) > 0]
  assert constant_broadcasts, "the model no longer broadcasts a captured constant"
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  cands = strategies.layer_candidates(ir, mesh, recompute=False)
  dp = next(c for c in cands if c.input_specs == (("dp",),) and c.param_specs[0] == ())
  # The constant is on every device: slicing it to the batch split costs nothing, so
  # data parallel only synchronises gradients.
  assert [(c.kind, c.per_step) for c in dp.comms] == [("all-reduce", True)]


# --- Candidate names --------------------------------------------------------------------

# Characters that separate the parts of a candidate name; no label name may hold one.
_SEPARATORS = (" ", ",", "=", "+")


@functools.cache
def _zoo_irs(name):
  """The tiny zoo model's layers, one IR per signature, by layer name."""
  model = zoo.create(name, "tiny", shape_only=True)
  optimizer = zoo.create_optimizer(model)
  batch = zoo.example_batch(name, "tiny", 8, shape_only=True)
  graph = graph_lib.trace(zoo.train_step(name), model, optimizer, batch)
  info = strategies.analyze(graph)
  irs = {}
  seen = set()
  for layer in graph.layers:
    if layer.signature not in seen:
      seen.add(layer.signature)
      irs[layer.name] = strategies.build_ir(layer, info)
  return irs


@pytest.mark.parametrize("model", ["gpt2", "llama_7b", "t5_large", "vit_huge", "swin_huge"])
def test_label_names_are_unique_and_hold_no_separator(model):
  for name, ir in _zoo_irs(model).items():
    assert len(set(ir.label_names)) == ir.num_labels, (name, ir.label_names)
    for label in ir.label_names:
      assert label and not any(s in label for s in _SEPARATORS), (name, label)
    assert all(ir.label_names[l] == "batch" for l in ir.batch_labels), name


@pytest.mark.parametrize("model", ["gpt2", "t5_large", "swin_huge"])
def test_distinct_assignments_get_distinct_names(model):
  """Every assignment a layer costs, on each 4-device mesh, has a name of its own."""
  for name, ir in _zoo_irs(model).items():
    for mesh in strategies.mesh_shapes(CPU8, 4):
      seen = {}
      for a in strategies.assignments(ir, mesh):
        text = _candidates.describe(a, mesh.names, ir.label_names, ir.batch_labels)
        assert seen.setdefault(text, a) == a, (name, text, a, seen[text])


def test_candidate_names_are_unique_per_layer_and_mark_recomputation():
  ir = _zoo_irs("gpt2")["blocks/0"]
  mesh = next(m for m in strategies.mesh_shapes(CPU8, 4) if m.as_dict() == {"dp": 2, "tp": 2})
  cands = strategies.layer_candidates(ir, mesh)
  names = [c.name for c in cands]
  assert len(set(names)) == len(names)
  by_name = {c.name: c for c in cands}
  remat = [c for c in cands if c.recompute]
  assert remat and all(c.name.endswith(" +remat") for c in remat)
  for c in remat:  # the same sharding without recomputation is there too
    plain = by_name[c.name.removesuffix(" +remat")]
    assert not plain.recompute and plain.assignment == c.assignment


def _gpt_block_candidates(axes):
  ir = _zoo_irs("gpt2")["blocks/0"]
  mesh = next(m for m in strategies.mesh_shapes(CPU8, 4) if m.as_dict() == axes)
  cands = strategies.layer_candidates(ir, mesh, recompute=False)
  paths = [p.path.removeprefix("blocks/0/") for p in ir.layer.params if p.value_id in ir.values]
  return [(c, dict(zip(paths, c.param_specs))) for c in cands]


def test_megatron_split_of_a_gpt_block_names_its_weights():
  """Column-split c_attn and c_fc, row-split attn_proj and mlp_proj, batch over dp."""
  megatron = [c for c, specs in _gpt_block_candidates({"dp": 2, "tp": 2})
              if specs["c_attn/kernel"] == (None, "tp") and specs["c_fc/kernel"] == (None, "tp")
              and specs["attn_proj/kernel"] == ("tp",) and specs["mlp_proj/kernel"] == ("tp",)
              and c.input_specs[0][:1] == ("dp",)]
  assert megatron
  names = sorted(c.name for c in megatron)
  plain = names[0]  # without sequence parallelism: the shortest
  dp, tp = plain.split(" ")
  assert dp == "dp=batch"
  assert tp.startswith("tp=")
  assert set(tp.removeprefix("tp=").split(",")) == {"c_attn:1", "attn_proj:0", "c_fc:1"}
  assert len(plain) < 40
  # Megatron with sequence parallelism also splits the sequence where no weight is split.
  assert any(n.endswith(",seq") for n in names)


def test_data_parallel_reads_dp_batch(mlp):
  _, _, irs = mlp
  mesh = strategies.mesh_shapes(CPU8, 8)[0]
  dp = _find(strategies.layer_candidates(irs["l1"], mesh, recompute=False), irs["l1"],
             inputs=(("dp",),), **{"l1/kernel": (), "l1/bias": ()})
  assert dp.name == "dp=batch"
  block = [c for c, specs in _gpt_block_candidates({"dp": 4})
           if not any(s for s in specs.values())
           and c.input_specs[0][:1] == ("dp",) and not any(c.input_specs[0][1:])]
  assert [c.name for c in block] == ["dp=batch"]
  fsdp = _find(strategies.layer_candidates(irs["l1"], mesh, recompute=False), irs["l1"],
               inputs=(("dp",),), **{"l1/kernel": ("dp",), "l1/bias": ()})
  assert fsdp.name == "dp=batch,hidden"  # FSDP: the batch, and weights along hidden


def test_label_names_say_what_is_split():
  irs = _zoo_irs("gpt2")
  block = irs["blocks/0"]
  (out,) = block.output_ids
  b, s, h = block.values[out].labels
  assert [block.label_names[l] for l in (b, s, h)] == ["batch", "seq", "hidden"]
  embed = irs["embed"]
  wte = next(p.value_id for p in embed.layer.params if p.path == "embed/wte/embedding")
  assert embed.label_names[embed.values[wte].labels[0]] == "wte:0"  # the vocabulary
  # T5's decoder reads the encoder's output: a second sequence, numbered to stay unique.
  t5 = next(ir for name, ir in _zoo_irs("t5_large").items() if name.startswith("decoder_blocks"))
  assert "seq" in t5.label_names
  assert any(n.startswith("seq#") for n in t5.label_names)
  # Images: NHWC.
  vit = _zoo_irs("vit_huge")["embed"]
  image = vit.input_ids[0]
  assert [vit.label_names[l] for l in vit.values[image].labels] == [
      "batch", "height", "width", "channel"]


def test_describe_reads_several_batch_labels_as_one_and_stays_injective():
  """Two batch labels (e.g. a layer whose ops never tie them): "batch" is both."""
  names = ("batch#0", "seq", "batch#2", "up:1")
  batch = frozenset({0, 2})
  assert _candidates.describe(((0, 2), (1,)), ("dp", "tp"), names, batch) == "dp=batch tp=seq"
  assert _candidates.describe(((2,), ()), ("dp", "tp"), names, batch) == "dp=batch#2"
  assert _candidates.describe(((), ()), ("dp", "tp"), names, batch) == "replicated"
  tuples = [()] + [t for n in (1, 2, 3) for t in itertools.permutations(range(4), n)]
  seen = {}
  for a in itertools.product(tuples, repeat=2):
    text = _candidates.describe(a, ("dp", "tp"), names, batch)
    assert seen.setdefault(text, a) == a, (text, a, seen[text])


def test_label_names_number_a_clash():
  """Two [batch, seq, hidden] inputs whose dims are not tied: the second pair is numbered,
  unless a parameter names it."""
  values = {
      10: _ir.Value(id=10, shape=(8, 16, 32), itemsize=4, labels=(0, 1, 2), batched=True,
                    nbytes=0),
      11: _ir.Value(id=11, shape=(8, 12, 32), itemsize=4, labels=(0, 3, 4), batched=True,
                    nbytes=0),
      12: _ir.Value(id=12, shape=(32, 32), itemsize=4, labels=(4, 5), batched=False,
                    nbytes=0),
      13: _ir.Value(id=13, shape=(8, 16), itemsize=4, labels=(0, 6), batched=True, nbytes=0),
  }
  names = _ir.label_names(
      num_labels=7, batch_labels={0}, values=values,
      params=[("blk/cross/k/kernel", 12)], input_ids=(10, 11), output_ids=(13,),
      layer_name="blk")
  assert names == ("batch", "seq", "hidden", "seq#3", "cross.k:0", "cross.k:1", "hidden#6")


# --- Tied parameters, parameter-made splits and model outputs ---------------------------


def _cpu_mesh(sizes):
  return next(m for m in strategies.mesh_shapes(CPU8, 8) if m.as_dict() == sizes)


def test_a_tied_table_is_kept_whole_by_every_layer_that_reads_it():
  """GPT-2's head reads the token table the embedding owns: one stored layout, so no
  candidate of either layer splits it, and the head's candidates carry the table's
  bytes for the stack slot a pipeline gives it."""
  irs = _zoo_irs("gpt2")
  embed, head = irs["embed"], irs["lm_head"]
  (table,) = embed.tied_ids
  assert table in embed.param_ids and not embed.passed_ids
  assert head.tied_ids == head.passed_ids == frozenset({table})
  mesh = _cpu_mesh({"dp": 4, "tp": 2})
  for ir in (embed, head):
    cands = _evaluate.layer_candidates(ir, mesh, recompute=False)
    assert cands
    for c in cands:
      assert _evaluate.value_layouts(ir, mesh, c)[table] == ((), ()), (ir.layer.name, c.name)
  # Untied, the embedding may split its table (over hidden, over rows).
  llama = _zoo_irs("llama_7b")["embed"]
  assert not llama.tied_ids
  names = {c.name for c in _evaluate.layer_candidates(llama, mesh, recompute=False)}
  assert "dp=hidden" in names
  head_cands = _evaluate.layer_candidates(head, mesh, recompute=False)
  assert {c.tied_bytes for c in head_cands} == {(float(head.values[table].nbytes),)}


def test_a_second_call_of_the_owning_module_reads_its_own_parameter():
  """T5 calls its shared embedding twice and the head reads its table: all three keep
  it whole, and only the head is passed it (a stack slot of its own)."""
  irs = _zoo_irs("t5_large")
  (table,) = irs["shared"].tied_ids
  assert irs["shared@1"].tied_ids == {table} and not irs["shared@1"].passed_ids
  assert irs["lm_head"].passed_ids == {table}


def test_an_output_split_taken_from_a_parameter_is_flagged():
  """An embedding whose output is split over hidden takes that split from its table,
  not from its inputs: flagged (`splits_new_dims`), so pipelined tables leave it out;
  the batch split and a block's hidden split of its own input are not."""
  mesh = _cpu_mesh({"dp": 8})
  embed = {c.name: c for c in _evaluate.layer_candidates(
      _zoo_irs("llama_7b")["embed"], mesh, recompute=False)}
  assert embed["dp=hidden"].splits_new_dims
  assert not embed["dp=batch"].splits_new_dims
  assert not embed["replicated"].splits_new_dims
  norm = {c.name: c for c in _evaluate.layer_candidates(
      _zoo_irs("llama_7b")["norm"], mesh, recompute=False)}
  assert norm["dp=hidden"].output_specs == ((None, None, "dp"),)
  assert not norm["dp=hidden"].splits_new_dims


def test_model_outputs_and_values_made_by_the_loss_are_marked():
  """GPT-2's head makes the logits its loss reads (a model output, which a pipeline
  carries to its last stage); BERT's MLM head hands the NSP head a part of the loss,
  made by the ops outside the module calls (a pipeline computes it outside)."""
  mesh = _cpu_mesh({"dp": 8})
  head = _zoo_irs("gpt2")["lm_head"]
  logits = [v for v in head.values.values() if v.shape[-1:] == (256,) and len(v.shape) == 3]
  c = {c.name: c for c in _evaluate.layer_candidates(head, mesh, recompute=False)}
  assert c["replicated"].model_outputs == ((float(logits[0].nbytes),) * 2,)
  assert c["dp=batch"].model_outputs == ((float(logits[0].nbytes), logits[0].nbytes / 8),)
  assert c["replicated"].outside_outputs == (True,)  # the loss the step returns
  mlm = _zoo_irs("bert_huge")["mlm_head"]
  (cand, *_) = _evaluate.layer_candidates(mlm, mesh, recompute=False)
  assert cand.outside_outputs == (True,) and len(cand.model_outputs) == 1
  block = _zoo_irs("bert_huge")["blocks/0"]
  (cand, *_) = _evaluate.layer_candidates(block, mesh, recompute=False)
  assert cand.outside_outputs == (False,) and cand.model_outputs == ()
