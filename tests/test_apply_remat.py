"""Per-layer activation recomputation: what the plan chose is what runs and what is charged.

A layer whose candidate ends in " +remat" keeps only its inputs for the backward pass;
`apply` runs its calls under `jax.checkpoint`, on the plain jitted path and inside every
pipeline executor, and the cost model charges one more forward of it (collectives
included) in every backward run. Checked here on 8 CPU devices with a small GPT:
numerics against one device, the recomputation itself (in the compiled memory, or in
the traced program), the collectives XLA compiles against the plan's, and the runtime
step time against the candidates' own forward times.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from uniap_jax import cost
from uniap_jax import hlo
from uniap_jax import plans
from uniap_jax.apply import _mesh

import _toy_models as toy
import test_apply as base

# The model, batch, optimizer, tolerances and reference run are tests/test_apply.py's
# (its TinyGPT is toy.MlpGpt with 64-wide blocks); here the blocks' widths may differ.
VOCAB, DIM, BATCH, STEPS = base.VOCAB, base.DIM, base.BATCH, base.STEPS
LOSS_RTOL, PARAM_RTOL, PARAM_ATOL = base.LOSS_RTOL, base.PARAM_RTOL, base.PARAM_ATOL
CLUSTER = base.CPU8
layer_names, stages_of, reference = base.layer_names, base.stages_of, base.reference
train_step = base.train_step


def make_args(hidden=(64, 64, 64, 64)):
  model = toy.MlpGpt(vocab=VOCAB, dim=DIM, hidden=hidden)
  optimizer = nnx.Optimizer(model, optax.adamw(base.LEARNING_RATE), wrt=nnx.Param)
  return model, optimizer, base.make_batch()


def megatron(path):
  if path.endswith("up/kernel"):
    return P(None, "tp")
  if path.endswith("up/bias"):
    return P("tp")
  if path.endswith("down/kernel"):
    return P("tp", None)
  return P()


def hand_plan(args, *, mesh_axes, stages, recompute, num_microbatches=1, param_spec=megatron):
  """tests/test_apply.py's hand plan (the batch over "dp", dummy predictions) with the
  layers in `recompute` recomputing."""
  plan = base.hand_plan(args, mesh_axes=mesh_axes, stages=stages,
                        num_microbatches=num_microbatches,
                        param_spec=lambda path, shape: param_spec(path))
  return dataclasses.replace(plan, layers=tuple(
      dataclasses.replace(l, recompute=l.name in recompute) for l in plan.layers))


params_of = base.params_of


# --- numerics --------------------------------------------------------------------------

REMAT = frozenset({"blocks/0", "blocks/2"})
NUMERICS_CASES = [
    pytest.param([4], 1, "gpipe", "uniform", {"dp": 4, "tp": 2}, id="pp1-megatron"),
    pytest.param([1, 3], 2, "gpipe", "uniform", {"pp": 2, "dp": 2, "tp": 2},
                 id="pp2-gpipe-megatron"),
    pytest.param([2, 2], 2, "1f1b", "uniform", {"pp": 2, "dp": 4}, id="pp2-1f1b"),
    pytest.param([3, 1], 2, "fused", "switch", {"pp": 2, "dp": 4}, id="pp2-fused-switch",
                 marks=pytest.mark.slow),
    pytest.param([1, 3], 2, "gpipe-remat", "uniform", {"pp": 2, "dp": 4},
                 id="pp2-gpipe-remat", marks=pytest.mark.slow),
    pytest.param([1, 3], 2, "gpipe", "switch", {"pp": 2, "dp": 4}, id="pp2-gpipe-switch",
                 marks=pytest.mark.slow),
]


@functools.cache
def applied_case(counts, microbatches, executor, dispatch, mesh_axes_items, recompute=REMAT,
                 hidden=(64, 64, 64, 64)):
  """A hand plan applied (cached, so that a compiled step serves several tests)."""
  mesh_axes = dict(mesh_axes_items)
  plan = hand_plan(make_args(hidden), mesh_axes=mesh_axes, stages=stages_of(list(counts)),
                   recompute=recompute, num_microbatches=microbatches,
                   param_spec=megatron if "tp" in mesh_axes else lambda p: P())
  plan = plans.Plan.from_json(plan.to_json())  # the flag survives the round trip
  assert {l.name for l in plan.layers if l.recompute} == set(recompute)
  return plan.apply(train_step, schedule=executor, dispatch=dispatch,
                    bubble_value=float("nan"))


@pytest.mark.parametrize("counts,microbatches,executor,dispatch,mesh_axes", NUMERICS_CASES)
def test_partly_recomputing_plans_match_one_device(counts, microbatches, executor, dispatch,
                                                    mesh_axes):
  """Blocks 0 and 2 recompute, 1 and 3 do not: with identical blocks, the uniform
  dispatch must keep the two apart (different kinds) and still align them."""
  applied = applied_case(tuple(counts), microbatches, executor, dispatch,
                         tuple(mesh_axes.items()))
  model, optimizer, batch = make_args()
  losses = [float(applied(model, optimizer, batch)) for _ in range(STEPS)]
  ref_losses, ref_params = reference()
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  for (path, a), (_, b) in zip(_mesh.paths_and_leaves(params_of(model)),
                               _mesh.paths_and_leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=path)
  assert applied.compilations == 1


# --- the recomputation happens, for exactly the chosen layers ---------------------------


def test_recomputation_lowers_the_compiled_pipelines_temporary_memory():
  """GPipe by autodiff keeps every tick's residuals; recomputed blocks keep only their
  inputs, which the compiled program's temporary buffers show (the backward loop
  cannot run the recomputation earlier)."""
  case = ((1, 3), 2, "gpipe", "uniform", (("pp", 2), ("dp", 2), ("tp", 2)))
  remat = applied_case(*case).compile(*make_args()).memory_analysis()
  plain = applied_case(*case, recompute=frozenset()).compile(*make_args()).memory_analysis()
  assert remat.temp_size_in_bytes < plain.temp_size_in_bytes, (remat, plain)


WIDTHS = (40, 48, 56, 64)  # every block its own MLP width, so a kernel names its block


def _recomputed_widths(jaxpr) -> list[int]:
  """MLP widths of the blocks recomputed in a traced step: the width of every up
  kernel (DIM, width) read by a `jax.checkpoint` region (`remat2` once differentiated)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
      found += [v.aval.shape[1] for v in eqn.invars
                if getattr(v.aval, "shape", ()) and len(v.aval.shape) == 2
                and v.aval.shape[0] == DIM and v.aval.shape[1] in WIDTHS]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _recomputed_widths(inner)
  return found


@pytest.mark.parametrize("counts,microbatches,mesh_axes", [
    ((4,), 1, (("dp", 8),)),
    ((1, 3), 2, (("pp", 2), ("dp", 4))),
])
def test_exactly_the_chosen_layers_run_under_checkpoint(counts, microbatches, mesh_axes):
  """On CPU, XLA schedules the recomputation of the plain jitted step next to the
  forward pass, so its temporary memory does not change (checked: 78,256 bytes with
  0, 2 or 4 recomputed blocks); the traced program shows which calls recompute."""
  applied = applied_case(counts, microbatches, "gpipe", "uniform", mesh_axes,
                         hidden=WIDTHS)
  found = _recomputed_widths(applied.trace(*make_args(WIDTHS)).jaxpr.jaxpr)
  assert sorted(found) == sorted(WIDTHS[int(n.split("/")[1])] for n in REMAT), found
  plain = applied_case(counts, microbatches, "gpipe", "uniform", mesh_axes,
                       recompute=frozenset(), hidden=WIDTHS)
  assert _recomputed_widths(plain.trace(*make_args(WIDTHS)).jaxpr.jaxpr) == []


# --- plans through the search's own build path ------------------------------------------


def built_plan(*, pp, mesh_axes, microbatches, schedule, strategy, stages):
  """The Plan `uniap_jax.plan` would build had the solver chosen `strategy(layer)` for
  every layer and these stages (tests/test_apply.py's `built_plan`).

  Returns the plan, the tables and the choice (layer -> candidate index).
  """
  assert len(stages) == pp, (pp, stages)
  return base.built_plan(mesh_axes=mesh_axes, stages=stages, microbatches=microbatches,
                         schedule=schedule, strategy=strategy)


def remat_strategy(block, others, recompute=REMAT):
  """layer -> candidate name: `block` for every block (" +remat" for those in
  `recompute`), `others[layer]` for the rest."""
  def strategy(name):
    if name.startswith("blocks/"):
      return block + (plans.REMAT_SUFFIX if name in recompute else "")
    return others[name]
  return strategy


def compiled_collectives(plan):
  applied = plan.apply(train_step)
  return hlo.parse(applied.compile(*make_args()).as_text(), dict(applied.mesh.shape))


# ZeRO-3 blocks: every parameter gathered over "dp" for the forward, and again for the
# recomputation (its backward reads the gathered kernels).
ZERO3 = {"embed": "dp=batch,embedding:0", "norm": "dp=batch", "head": "dp=batch,kernel:1"}


@pytest.mark.parametrize("recompute", [REMAT, frozenset()], ids=["remat", "plain"])
def test_applied_plan_without_pipeline_compiles_its_predicted_collectives(recompute):
  """pp=1: kinds equal, bytes within 1%; the recomputed blocks' all-gathers included."""
  plan, *_ = built_plan(pp=1, mesh_axes={"dp": 8}, microbatches=1, schedule="gpipe",
                        stages=[layer_names()],
                        strategy=remat_strategy("dp=batch,down:0", ZERO3, recompute))
  assert {l.name for l in plan.layers if l.recompute} == set(recompute)
  got = hlo.bytes_by_kind(compiled_collectives(plan))
  want = {k: v for k, v in plan.predicted.collectives.items() if v}
  assert sorted(got) == sorted(want), (got, want)
  for kind, value in want.items():
    assert got[kind] == pytest.approx(value, rel=0.01), (kind, got, want)


def test_applied_pipeline_compiles_the_collectives_the_cost_model_counts():
  """pp=2, GPipe: recomputing and plain blocks are separate kinds with separate stacks,
  in the runtime and in the cost model alike, so the collectives the pipeline runtime
  decides (sends, the all-to-alls between the stored state and the stacks, the
  per-stack gradient all-reduce over the manual "dp") agree in count and bytes. As in
  tests/test_apply.py, the one psum of the model's outputs over "pp" is outside the
  tables (the loss's mean, once per step, is counted)."""
  plan, tables, choice, stage_of = built_plan(
      pp=2, mesh_axes={"dp": 4}, microbatches=2, schedule="gpipe", stages=stages_of([1, 3]),
      strategy=remat_strategy("dp=batch", {"embed": "dp=batch", "norm": "dp=batch",
                                           "head": "dp=batch"}))
  want = cost.collectives_by_stage(tables, choice, stage_of, executor="gpipe")[0]
  got = hlo.by_axes(compiled_collectives(plan))
  outputs = got.pop(("all-reduce", ("pp",)))
  assert outputs["count"] == 1
  assert set(got) == set(want), (got, want)
  for key in want:
    assert got[key]["count"] == want[key]["count"], (key, got[key], want[key])
    assert got[key]["bytes"] == pytest.approx(want[key]["bytes"], rel=0.01), key
  # 7 layers, the blocks in two kinds: one stack per leaf and kind, each way.
  leaves = 1 + 6 + 6 + 2 + 2
  assert want[("all-to-all", ("pp",))]["count"] == 2 * leaves
  assert {k for k, _ in want} == {k for k, v in plan.predicted.collectives.items() if v}


# --- the runtime's step time charges the recomputation --------------------------------


def _recomputed_forward_time_s(tables, cand, manual):
  """One more forward of `cand`, as far as its backward reads it: those forward ops
  (`op_rerun`) at the roofline and the "recompute" collectives (those over manual axes
  excepted: the body runs on this device's share of the batch)."""
  per_op = cost.roofline_time_s(cand.op_flops, cand.op_bytes, cand.op_dtype, tables.cluster)
  assert all(phase == "forward" for phase, again in zip(cand.op_phase, cand.op_rerun) if again)
  compute = float(sum(t for t, again in zip(per_op, cand.op_rerun) if again))
  comms = sum(cost.comm_time_s(c, tables.mesh, tables.cluster) * c.count for c in cand.comms
              if c.phase == "recompute" and not set(c.axes) & set(manual))
  return compute + comms


@pytest.mark.parametrize("pp,mesh_axes,microbatches,schedule,backward_runs", [
    (1, {"dp": 8}, 1, "gpipe", 1),  # the plain jitted step: once
    (2, {"dp": 4}, 2, "gpipe", 3),  # GPipe: M + S - 1 backward ticks
    (2, {"dp": 4}, 2, "1f1b", 6),  # 1F1B's table: 2 (M + S - 1) ticks, a backward in each
])
def test_runtime_step_time_charges_one_more_forward_per_backward_run(
    pp, mesh_axes, microbatches, schedule, backward_runs):
  """Every block recomputes or none does: the same positions and stacks, so the runtime
  step times differ by the recomputation alone, once per backward run and block
  position (with stages [1, 3], stage 1's three blocks are three positions that stage 0
  shares)."""
  others = dict(ZERO3)
  every = frozenset(f"blocks/{i}" for i in range(4))
  times, cands = {}, {}
  for recompute in (every, frozenset()):
    plan, tables, choice, stage_of = built_plan(
        pp=pp, mesh_axes=mesh_axes, microbatches=microbatches, schedule=schedule,
        stages=stages_of([1, 3]) if pp == 2 else [layer_names()],
        strategy=remat_strategy("dp=batch,down:0", others, recompute))
    times[recompute] = cost.runtime_step_time_s(
        tables, choice, stage_of, executor=plans.runtime_executor(schedule, pp, microbatches))
    cands[recompute] = {n: tables.layer(n).candidates[k] for n, k in choice.items()}
    assert plan.predicted.runtime_step_time_s == pytest.approx(times[recompute], rel=1e-12)
  manual = cost.manual_axes(tables, choice)
  assert "dp" not in manual  # the blocks shard parameters over it: it stays automatic
  positions = 4 if pp == 1 else 3
  extra = _recomputed_forward_time_s(tables, cands[every]["blocks/1"], manual)
  assert extra > 0
  # the recomputed gathers are the forward's, again
  assert sorted((c.kind, c.count) for c in cands[every]["blocks/1"].comms
                if c.phase == "recompute") == sorted(
      (c.kind, c.count) for c in cands[frozenset()]["blocks/1"].comms if c.phase == "forward")
  assert times[every] - times[frozenset()] == pytest.approx(
      backward_runs * positions * extra, rel=1e-9)


def test_recomputation_without_an_nnx_model_is_refused():
  """A functional step has no submodule calls to checkpoint: say so instead of running
  a plan whose memory the step would not honour."""
  def step(params, batch):
    return params, jnp.mean((batch @ params["w"]) ** 2)
  params = {"w": jnp.ones((4, 4))}
  batch = jnp.ones((8, 4))
  plan = plans.Plan(
      mesh_axes={"dp": 8}, stages=[["mlp"]], num_microbatches=1, schedule="gpipe",
      param_specs=({"w": P()},), batch_specs=(P("dp"),),
      leaf_specs=((0, "w", P()), (1, "", P("dp"))), activation_specs={},
      layers=(plans.LayerPlan(name="mlp", stage=0, strategy="dp=batch +remat"),),
      predicted=plans.Predicted(step_time_s=1.0, compute_time_s=1.0, communication_time_s=0.0,
                                bubble_time_s=0.0, throughput=1.0,
                                memory_per_device_bytes=(0,), mfu=0.0, collectives={}),
      solver=plans.SolverStats(status="heuristic", gap=0.0, time_s=0.0),
      cluster=CLUSTER, global_batch=8, batch_argnums=(1,))
  with pytest.raises(NotImplementedError, match=r"recomputes the activations of layers "
                     r"\['mlp'\].*no NNX model.*memory_limit_bytes="):
    plan.apply(step)(params, batch)
