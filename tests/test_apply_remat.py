"""Per-layer activation recomputation: what the plan chose is what runs and what is charged.

A layer whose candidate ends in " +remat" keeps only its inputs for the backward pass;
`apply` runs its calls under `jax.checkpoint`, on the plain jitted path and inside every
pipeline executor, and the cost model charges one more forward of it (collectives
included) in every backward run. Checked here on 8 CPU devices with a small GPT:
numerics against one device, the recomputation itself (in the compiled memory, or in
the traced program), the collectives XLA compiles against the plan's, and the runtime
step time against the candidates' own forward times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import uniap_jax
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import hlo
from uniap_jax import plans
from uniap_jax import search
from uniap_jax import solver
from uniap_jax import strategies
from uniap_jax.apply import _mesh

VOCAB, DIM, SEQ, BATCH = 32, 16, 8, 16
STEPS = 3
LEARNING_RATE = 1e-3
# fp32 sums in another order; the absolute term covers AdamW's division by sqrt(v) for
# gradient elements near zero (as in tests/test_apply.py).
LOSS_RTOL = 1e-4
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-4
CLUSTER = "cpu-8"


class Block(nnx.Module):

  def __init__(self, dim, hidden, rngs):
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Gpt(nnx.Module):
  """embed, one block per entry of `hidden` (its MLP width), final norm, head."""

  def __init__(self, hidden=(64, 64, 64, 64), seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.blocks = nnx.List([Block(DIM, h, rngs) for h in hidden])
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def loss_fn(model, batch):
  logits = model(batch["ids"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def train_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


def make_args(hidden=(64, 64, 64, 64), batch_size=BATCH):
  model = Gpt(hidden)
  optimizer = nnx.Optimizer(model, optax.adamw(LEARNING_RATE), wrt=nnx.Param)
  ids = np.random.default_rng(0).integers(0, VOCAB, (batch_size, SEQ + 1))
  batch = {"ids": jnp.asarray(ids[:, :-1], jnp.int32),
           "labels": jnp.asarray(ids[:, 1:], jnp.int32)}
  return model, optimizer, batch


def layer_names(blocks=4):
  return ["embed", *(f"blocks/{i}" for i in range(blocks)), "norm", "head"]


def stages_of(counts):
  """Stages holding `counts[s]` blocks each; embed on the first, norm and head on the last."""
  names, out, i = layer_names(sum(counts)), [], 1
  for s, n in enumerate(counts):
    stage = (["embed"] if s == 0 else []) + names[i:i + n]
    i += n
    out.append(stage + (["norm", "head"] if s == len(counts) - 1 else []))
  return out


def megatron(path):
  if path.endswith("up/kernel"):
    return P(None, "tp")
  if path.endswith("up/bias"):
    return P("tp")
  if path.endswith("down/kernel"):
    return P("tp", None)
  return P()


def hand_plan(args, *, mesh_axes, stages, recompute, num_microbatches=1, param_spec=megatron):
  """A Plan with Megatron blocks, the batch over "dp" and the layers in `recompute`
  recomputing (dummy predictions: apply reads none of them)."""
  model, optimizer, batch = args
  leaf_specs = [(0, p, param_spec(p)) for p, _ in _mesh.paths_and_leaves(nnx.state(model))]
  for p, _ in _mesh.paths_and_leaves(nnx.state(optimizer)):
    parts = p.split("/")
    inner = "/".join(parts[3:]) if len(parts) > 3 and parts[2] in ("mu", "nu") else None
    leaf_specs.append((1, p, param_spec(inner) if inner else P()))
  leaf_specs += [(2, p, P("dp")) for p, _ in _mesh.paths_and_leaves(batch)]
  trees = plans.specs_to_trees(leaf_specs, 3)
  return plans.Plan(
      mesh_axes=mesh_axes, stages=stages, num_microbatches=num_microbatches, schedule="gpipe",
      param_specs=trees[:2], batch_specs=(trees[2],), leaf_specs=tuple(leaf_specs),
      activation_specs={},
      layers=tuple(plans.LayerPlan(name=n, stage=s, strategy="hand", recompute=n in recompute)
                   for s, names in enumerate(stages) for n in names),
      predicted=plans.Predicted(step_time_s=1.0, compute_time_s=1.0, communication_time_s=0.0,
                                bubble_time_s=0.0, throughput=1.0,
                                memory_per_device_bytes=(0,) * len(stages), mfu=0.0,
                                collectives={}),
      solver=plans.SolverStats(status="heuristic", gap=0.0, time_s=0.0),
      cluster=CLUSTER, global_batch=BATCH, batch_argnums=(2,))


def params_of(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@functools.cache
def reference():
  model, optimizer, batch = make_args()
  step = nnx.jit(train_step)
  losses = [float(step(model, optimizer, batch)) for _ in range(STEPS)]
  return losses, params_of(model)


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


@functools.cache
def _tables(pp, mesh_axes_items, microbatches, schedule, hidden=(64, 64, 64, 64)):
  args = make_args(hidden)
  cluster = uniap_jax.Cluster.preset(CLUSTER)
  graph = graph_lib.trace(train_step, *args)
  mesh = next(m for m in strategies.mesh_shapes(cluster, cluster.num_devices // pp)
              if m.as_dict() == dict(mesh_axes_items))
  tables = cost.build_cost_tables(graph, cluster, mesh=mesh, num_stages=pp,
                                  num_microbatches=microbatches, global_batch=BATCH,
                                  schedule=schedule,
                                  prune=False)  # hand choices by name: keep them all
  return graph, cluster, mesh, tables


def built_plan(*, pp, mesh_axes, microbatches, schedule, strategy, stages):
  """The Plan `uniap_jax.plan` would build had the solver chosen `strategy(layer)` for
  every layer (a candidate name of the cost tables) and these stages.

  Returns the plan, the tables and the choice (layer -> candidate index).
  """
  graph, cluster, mesh, tables = _tables(pp, tuple(sorted(mesh_axes.items())), microbatches,
                                         schedule)
  choice = {}
  for layer in tables.layers:
    names = [c.name for c in layer.candidates]
    assert strategy(layer.name) in names, (layer.name, strategy(layer.name), names)
    choice[layer.name] = names.index(strategy(layer.name))
  stage_of = {n: s for s, names in enumerate(stages) for n in names}
  problem = search.to_problem(tables)
  ev = solver.evaluate(problem, choice, stage_of)
  sol = solver.Solution(choice=choice, stage=stage_of, objective=ev.objective,
                        status="optimal", gap=0.0, time_s=0.0, stage_times=ev.stage_times,
                        send_times=ev.send_times, stage_memory=ev.stage_memory)
  config = search.Config(num_stages=pp, mesh=mesh, num_microbatches=microbatches,
                         schedule=schedule)
  plan = search.build_plan(graph, cluster, config, tables, sol,
                           stats=plans.SolverStats(status="heuristic", gap=0.0, time_s=0.0),
                           global_batch=BATCH, args=make_args())
  return plan, tables, choice, stage_of


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
  tests/test_apply.py, the loss's reduction and the one psum of the model's outputs
  over "pp" are outside the tables."""
  plan, tables, choice, stage_of = built_plan(
      pp=2, mesh_axes={"dp": 4}, microbatches=2, schedule="gpipe", stages=stages_of([1, 3]),
      strategy=remat_strategy("dp=batch", {"embed": "dp=batch", "norm": "dp=batch",
                                           "head": "dp=batch"}))
  want = cost.collectives_by_stage(tables, choice, stage_of, executor="gpipe")[0]
  colls = compiled_collectives(plan)
  losses = [c for c in colls if c.kind == "all-reduce" and c.bytes == 4 and c.executions == 1]
  assert len(losses) <= 2, losses
  got = hlo.by_axes([c for c in colls if c not in losses])
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
    times[recompute] = cost.runtime_step_time_s(tables, choice, stage_of, executor=schedule)
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
