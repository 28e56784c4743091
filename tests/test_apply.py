"""apply_plan: hand-written plans run with single-device numerics on 8 CPU devices.

Every case runs 3 AdamW steps and compares losses and parameters with the same steps
on one device (fp32). Pipelined cases fill bubble buffers with NaN, so a bubble that
leaks into a result fails the comparison, and check the collectives XLA compiled.
Plans from `uniap_jax.plan` are applied and compiled, and their collectives compared
with what the cost model counts for the runtime (`cost.collectives_by_stage`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import uniap_jax
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import hlo
from uniap_jax import plans
from uniap_jax import search
from uniap_jax import solver
from uniap_jax import strategies
from uniap_jax.apply import _mesh
from uniap_jax.apply import _schedules

VOCAB, DIM, SEQ, BATCH, LAYERS = 32, 16, 8, 16, 4
STEPS = 3
LEARNING_RATE = 1e-3
# Tolerances: fp32 sums in another order. Parameters get an absolute term because AdamW
# divides by sqrt(v): a gradient element near zero turns a rounding difference into up
# to one learning-rate step.
LOSS_RTOL = 1e-4
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-4


class Block(nnx.Module):

  def __init__(self, dim, rngs):
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class TinyGPT(nnx.Module):
  """embed, blocks in an nnx.List called in a loop, final norm, head."""

  def __init__(self, *, dim=DIM, layers=LAYERS, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, VOCAB, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def loss_fn(model, batch):
  logits = model(batch["ids"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def train_step(model, optimizer, batch):
  """The ordinary NNX step: value_and_grad, then an in-place optimizer update."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


def make_batch(batch_size=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, (batch_size, SEQ + 1))
  return {"ids": jnp.asarray(ids[:, :-1], jnp.int32),
          "labels": jnp.asarray(ids[:, 1:], jnp.int32)}


def make_state(**kw):
  model = TinyGPT(**kw)
  return model, nnx.Optimizer(model, optax.adamw(LEARNING_RATE), wrt=nnx.Param)


def layer_names(layers=LAYERS):
  return ["embed", *(f"blocks/{i}" for i in range(layers)), "norm", "head"]


def stages_of(counts):
  """Stages holding `counts[s]` blocks each; embed on the first, norm and head on the last."""
  names, out, i = layer_names(sum(counts)), [], 1
  for s, n in enumerate(counts):
    stage = (["embed"] if s == 0 else []) + names[i:i + n]
    i += n
    out.append(stage + (["norm", "head"] if s == len(counts) - 1 else []))
  return out


def plan_from_specs(leaf_specs, *, num_args, batch_argnums, global_batch, mesh_axes, stages,
                    num_microbatches=1, schedule="gpipe", activation_specs=None):
  """A Plan with the given specs and dummy predictions (apply reads none of them)."""
  trees = plans.specs_to_trees(leaf_specs, num_args)
  return plans.Plan(
      mesh_axes=mesh_axes, stages=stages, num_microbatches=num_microbatches, schedule=schedule,
      param_specs=tuple(t for i, t in enumerate(trees) if i not in batch_argnums),
      batch_specs=tuple(trees[i] for i in batch_argnums), leaf_specs=tuple(leaf_specs),
      activation_specs=activation_specs or {},
      layers=tuple(plans.LayerPlan(name=n, stage=s, strategy="hand")
                   for s, names in enumerate(stages) for n in names),
      predicted=plans.Predicted(step_time_s=1.0, compute_time_s=1.0, communication_time_s=0.0,
                                bubble_time_s=0.0, throughput=1.0,
                                memory_per_device_bytes=(0,) * len(stages), mfu=0.0,
                                collectives={}),
      solver=plans.SolverStats(status="heuristic", gap=0.0, time_s=0.0),
      cluster="cpu-8", global_batch=global_batch, batch_argnums=tuple(batch_argnums))


def hand_plan(args, *, param_spec=lambda path, shape: P(), batch_spec=P("dp"), **kwargs):
  """A Plan for `args` = (model, optimizer, batch); moments take their parameter's spec."""
  model, optimizer, batch = args
  leaf_specs = [(0, p, param_spec(p, x.shape)) for p, x in _mesh.paths_and_leaves(
      nnx.state(model))]
  for p, x in _mesh.paths_and_leaves(nnx.state(optimizer)):
    parts = p.split("/")
    inner = "/".join(parts[3:]) if len(parts) > 3 and parts[2] in ("mu", "nu") else None
    leaf_specs.append((1, p, param_spec(inner, x.shape) if inner else P()))
  leaf_specs += [(2, p, batch_spec) for p, _ in _mesh.paths_and_leaves(batch)]
  return plan_from_specs(leaf_specs, num_args=3, batch_argnums=(2,),
                         global_batch=int(jax.tree.leaves(batch)[0].shape[0]), **kwargs)


def params_of(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@functools.cache
def reference():
  """Losses and parameters after STEPS steps on one device."""
  model, optimizer = make_state()
  batch = make_batch()
  step = nnx.jit(train_step)
  losses = [float(step(model, optimizer, batch)) for _ in range(STEPS)]
  return losses, params_of(model)


def run_and_compare(applied, model, optimizer, batch):
  losses = [float(applied(model, optimizer, batch)) for _ in range(STEPS)]
  ref_losses, ref_params = reference()
  assert np.all(np.isfinite(losses)), losses
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  got = params_of(model)
  for (path, a), (_, b) in zip(_mesh.paths_and_leaves(got), _mesh.paths_and_leaves(ref_params)):
    assert np.all(np.isfinite(a)), path
    np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=path)
  assert applied.compilations == 1


def megatron(path, shape):
  if path.endswith("up/kernel"):
    return P(None, "tp")
  if path.endswith("up/bias"):
    return P("tp")
  if path.endswith("down/kernel"):
    return P("tp", None)
  return P()


def fsdp(path, shape):
  return P("dp") if shape and shape[0] % 8 == 0 else P()


# --- intra-layer (pp = 1) ----------------------------------------------------------------

# Sequence-parallel layout between the embedding and the first block.
SEQUENCE_SPLIT = {"embed->blocks/0": P("dp", "tp", None)}
INTRA_CASES = [
    pytest.param({"dp": 8}, lambda p, s: P(), "all-reduce", ("dp",), {}, id="dp"),
    pytest.param({"tp": 2, "dp": 4}, megatron, "all-reduce", ("tp",), SEQUENCE_SPLIT,
                 id="megatron"),
    pytest.param({"dp": 8}, fsdp, "all-gather", ("dp",), {}, id="fsdp"),
]


@pytest.mark.parametrize("mesh_axes,param_spec,kind,axes,activation_specs", INTRA_CASES)
def test_intra_layer_plans_match_one_device(mesh_axes, param_spec, kind, axes,
                                            activation_specs):
  model, optimizer = make_state()
  batch = make_batch()
  plan = hand_plan((model, optimizer, batch), mesh_axes=mesh_axes, stages=[layer_names()],
                   param_spec=param_spec, activation_specs=activation_specs)
  plan = plans.Plan.from_json(plan.to_json())  # specs as nested dicts, matched by path
  applied = plan.apply(train_step)
  if activation_specs:  # the boundary activation is constrained as planned
    text = applied.lower(model, optimizer, batch).as_text()
    assert f'[{{"dp"}}, {{"tp"}}, {{}}]> : tensor<{BATCH}x{SEQ}x{DIM}xf32>' in text
  assert applied.mesh.axis_names == tuple(_mesh.mesh_axis_order(mesh_axes))
  assert applied.mesh.axis_names[-1] == ("tp" if "tp" in mesh_axes else "dp")
  run_and_compare(applied, model, optimizer, batch)
  for path, leaf in _mesh.paths_and_leaves(nnx.state(model)):
    want = NamedSharding(applied.mesh, param_spec(path, leaf.shape))
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
  found = hlo.by_axes(hlo.parse(applied.compile(model, optimizer, batch).as_text(),
                                dict(applied.mesh.shape)))
  assert (kind, axes) in found, found


def test_functional_step_returns_state_laid_out_as_planned():
  w_spec = {"w1": P(None, "tp"), "b1": P("tp"), "w2": P("tp", None)}
  tx = optax.adamw(LEARNING_RATE)
  rng = np.random.default_rng(1)
  params = {"w1": jnp.asarray(rng.normal(size=(8, 32)), jnp.float32),
            "b1": jnp.zeros((32,), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)

  def step(state, batch):
    params, opt_state = state

    def loss(p):
      h = jax.nn.relu(batch["x"] @ p["w1"] + p["b1"])
      return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": value}

  state = (params, tx.init(params))
  batch = {"x": x, "y": y}
  leaf_specs = []
  for path, leaf in _mesh.paths_and_leaves(state):
    name = path.split("/")[-1]
    leaf_specs.append((0, path, w_spec.get(name, P()) if leaf.ndim else P()))
  leaf_specs += [(1, p, P("dp")) for p, _ in _mesh.paths_and_leaves(batch)]
  plan = plan_from_specs(leaf_specs, num_args=2, batch_argnums=(1,), global_batch=16,
                         mesh_axes={"dp": 4, "tp": 2}, stages=[["mlp"]])
  applied = plan.apply(step)
  ref_state, ref_losses, losses = state, [], []
  for _ in range(STEPS):
    ref_state, metrics = jax.jit(step)(ref_state, batch)
    ref_losses.append(float(metrics["loss"]))
    state, metrics = applied(state, batch)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)
  w1 = state[0]["w1"]
  assert w1.sharding.is_equivalent_to(NamedSharding(applied.mesh, P(None, "tp")), 2)


# --- inter-layer (pipelines) ---------------------------------------------------------------


def expected_permutes(executor, stages, microbatches):
  """Collective-permutes one step executes: one per direction per tick (section 4)."""
  fill = microbatches + stages - 1
  if executor in ("gpipe", "gpipe-remat"):
    return 2 * fill  # forward ticks send activations, backward ticks cotangents
  ticks = microbatches + 2 * stages - 2 if executor == "fused" else 2 * fill
  return fill + 2 * ticks  # a forward pass, then the whole table in the backward rule


PIPELINE_CASES = [
    pytest.param([1, 3], 2, "gpipe", "uniform", id="pp2-uneven-gpipe"),
    pytest.param([1, 1, 1, 1], 4, "fused", "uniform", id="pp4-fused"),
    pytest.param([3, 1], 4, "1f1b", "switch", id="pp2-1f1b-switch"),
    pytest.param([4], 2, "gpipe", "uniform", id="pp1-microbatched", marks=pytest.mark.slow),
    pytest.param([2, 2], 2, "gpipe-remat", "uniform", id="pp2-gpipe-remat",
                 marks=pytest.mark.slow),
    pytest.param([1, 1, 1, 1], 2, "gpipe", "switch", id="pp4-gpipe-switch",
                 marks=pytest.mark.slow),
    pytest.param([1, 3], 4, "1f1b", "uniform", id="pp2-uneven-1f1b-m4", marks=pytest.mark.slow),
    pytest.param([1, 3], 2, "fused", "switch", id="pp2-fused-switch", marks=pytest.mark.slow),
    pytest.param([2, 1, 1], 2, "fused", "uniform", id="pp3", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("counts,microbatches,executor,dispatch", PIPELINE_CASES)
def test_pipelines_match_one_device_and_compile_the_planned_collectives(
    counts, microbatches, executor, dispatch):
  stages = len(counts)
  dp = 8 // stages if 8 % stages == 0 else 2  # pp=3 runs on 6 of the 8 devices
  model, optimizer = make_state()
  batch = make_batch()
  mesh_axes = {"pp": stages, "dp": dp} if stages > 1 else {"dp": dp}
  plan = hand_plan((model, optimizer, batch), mesh_axes=mesh_axes, stages=stages_of(counts),
                   num_microbatches=microbatches)
  applied = plan.apply(train_step, schedule=executor, dispatch=dispatch,
                       bubble_value=float("nan"))
  run_and_compare(applied, model, optimizer, batch)

  colls = hlo.parse(applied.compile(model, optimizer, batch).as_text(),
                    dict(applied.mesh.shape))
  # Activations and cotangents: one micro-batch per permute, in the schedule's loops.
  sends = [c for c in colls if c.kind == "send" and c.executions > 1]
  activation_bytes = BATCH // dp // microbatches * SEQ * DIM * 4
  assert sum(c.executions for c in sends) == (
      expected_permutes(executor, stages, microbatches) if stages > 1 else 0)
  assert all(c.axes == ("pp",) and c.bytes == activation_bytes for c in sends), sends
  # Gradients are reduced over dp once, after the loop, not in every tick.
  dp_reduces = [c for c in colls if c.kind == "all-reduce" and c.axes == ("dp",)]
  assert dp_reduces and all(c.executions == 1 for c in dp_reduces)
  # Everything else over pp happens once per step: the model output leaves the last
  # stage once, and the state moves to its stages and the gradients back once.
  others = [c for c in colls if "pp" in c.axes and c not in sends]
  assert all(c.executions == 1 for c in others), others
  if stages > 1:
    outputs = [c for c in others if c.kind == "all-reduce"]
    output_bytes = BATCH // dp * SEQ * VOCAB * 4
    if DIM % stages == 0:  # every state leaf splits over pp: nothing else is reduced over pp
      assert [c.bytes for c in outputs] == [output_bytes]
    else:  # leaves replicated over pp also get their gradients reduced over pp
      assert output_bytes in [c.bytes for c in outputs]
    assert not [c for c in colls if c.kind == "all-gather" and "pp" in c.axes]


def test_tensor_parallel_inside_pipeline_stages():
  model, optimizer = make_state()
  batch = make_batch()
  plan = hand_plan((model, optimizer, batch), mesh_axes={"pp": 2, "dp": 2, "tp": 2},
                   stages=stages_of([2, 2]), num_microbatches=2, param_spec=megatron)
  applied = plan.apply(train_step, bubble_value=float("nan"))
  run_and_compare(applied, model, optimizer, batch)
  found = hlo.by_axes(hlo.parse(applied.compile(model, optimizer, batch).as_text(),
                                dict(applied.mesh.shape)))
  assert ("all-reduce", ("tp",)) in found
  kernel = nnx.state(model)["blocks"][0]["up"]["kernel"][...]
  assert kernel.sharding.is_equivalent_to(NamedSharding(applied.mesh, P("pp", "tp")), 2)


@pytest.mark.slow
def test_fsdp_axis_stays_automatic_inside_pipeline():
  model, optimizer = make_state()
  batch = make_batch()
  plan = hand_plan((model, optimizer, batch), mesh_axes={"pp": 2, "dp": 4},
                   stages=stages_of([2, 2]), num_microbatches=2, param_spec=fsdp)
  applied = plan.apply(train_step, bubble_value=float("nan"))
  run_and_compare(applied, model, optimizer, batch)


def test_schedule_tables():
  for stages, m in [(2, 4), (4, 8), (4, 5), (3, 7)]:
    fused = _schedules.fused(stages, m)
    assert fused.ticks == m + 2 * stages - 2
    assert fused.stash_slots <= 2 * stages - 1
    one = _schedules.one_f_one_b(stages, m)
    assert one.ticks == 2 * (m + stages - 1)
    assert one.stash_slots <= stages
    for table in (fused, one):
      for s in range(stages):  # every micro-batch once forward and once backward per stage
        assert sorted(table.forward[:, s][table.forward[:, s] >= 0]) == list(range(m))
        assert sorted(table.backward[:, s][table.backward[:, s] >= 0]) == list(range(m))
    # classic 1F1B runs at most one operation per stage and tick
    assert not ((one.forward >= 0) & (one.backward >= 0)).any()


def test_runtime_runs_follow_the_schedule_tables():
  """The cost model's tick arithmetic (cost.runtime_runs) is the executors' own."""
  for stages, m in [(1, 1), (1, 4), (2, 4), (4, 8), (3, 7)]:
    fill = _schedules.forward_only(stages, m).ticks
    assert fill == m + stages - 1
    for executor in ("gpipe", "gpipe-remat", "fused", "1f1b"):
      forward, backward, permutes = cost.runtime_runs(executor, stages, m)
      if stages == 1 and m == 1:  # nothing pipelined: the plain jitted step
        assert (forward, backward, permutes) == (1, 1, 0)
        continue
      if executor == "gpipe":  # autodiff through the forward ticks: no recomputation
        assert (forward, backward) == (fill, fill)
      elif executor == "gpipe-remat":
        ticks = _schedules.backward_only(stages, m).ticks
        # each backward tick recomputes the stage before differentiating it
        assert (forward, backward) == (fill + ticks, ticks)
      else:
        ticks = _schedules.table(executor, stages, m).ticks
        # a forward pass, then the whole table (a forward and a backward every tick)
        assert (forward, backward) == (fill + 2 * ticks, ticks)
      assert permutes == (expected_permutes(executor, stages, m) if stages > 1 else 0)
  with pytest.raises(ValueError, match="executor='interleaved'; allowed"):
    cost.runtime_runs("interleaved", 2, 4)


# --- planned, applied, compiled: the collectives the plan predicts -----------------------

CPU8 = "cpu-8"


@functools.cache
def planned(pp, schedule, microbatches, batch_size=BATCH):
  """uniap_jax.plan on TinyGPT, and the configuration's cost tables and chosen candidates."""
  model, optimizer = make_state()
  batch = make_batch(batch_size)
  cluster = uniap_jax.Cluster.preset(CPU8)
  plan = uniap_jax.plan(train_step, model, optimizer, batch, cluster=cluster, pp=pp,
                        schedule=schedule, num_microbatches=microbatches)
  graph = graph_lib.trace(train_step, model, optimizer, batch)
  intra = {k: v for k, v in plan.mesh_axes.items() if k != "pp"}
  mesh = next(m for m in strategies.mesh_shapes(cluster, cluster.num_devices // pp)
              if m.as_dict() == intra)
  tables = cost.build_cost_tables(graph, cluster, mesh=mesh, num_stages=pp,
                                  num_microbatches=plan.num_microbatches,
                                  global_batch=plan.global_batch, schedule=plan.schedule)
  choice, stage_of = {}, {}
  for layer in plan.layers:
    names = [c.name for c in tables.layer(layer.name).candidates]
    assert names.count(layer.strategy) == 1, (layer.name, layer.strategy)
    choice[layer.name] = names.index(layer.strategy)
    stage_of[layer.name] = layer.stage
  return plan, tables, choice, stage_of


def compiled_collectives(plan, **apply_kwargs):
  model, optimizer = make_state()
  batch = make_batch(plan.global_batch)
  applied = plan.apply(train_step, **apply_kwargs)
  return hlo.parse(applied.compile(model, optimizer, batch).as_text(),
                   dict(applied.mesh.shape))


@pytest.mark.parametrize("batch_size", [
    BATCH,
    # The embedding table split over "tp" with the sequence over "tp" too is not
    # offered (XLA gathers the table, not the ids: tests/test_cost.py); FSDP blocks'
    # biases reduced over a batch on "dp" and a sequence on "tp" are all-reduced over
    # "tp" whole, then reduce-scattered over "dp" (`strategies.finish`).
    pytest.param(64, marks=pytest.mark.slow),
])
def test_applied_plan_without_pipeline_compiles_its_predicted_collectives(batch_size):
  """pp=1, one micro-batch: the plain jitted step; kinds equal, bytes within 1%.

  The plan pins parameters, the batch and layer-boundary activations; XLA lays out the
  values inside each layer and must reproduce the candidates' collectives. (At the
  default batch the planner keeps this tiny model replicated: no collective at all.)
  """
  plan, *_ = planned(1, "gpipe", 1, batch_size)
  got = hlo.bytes_by_kind(compiled_collectives(plan))
  want = {k: v for k, v in plan.predicted.collectives.items() if v}
  assert sorted(got) == sorted(want), (got, want)
  for kind, value in want.items():
    assert got[kind] == pytest.approx(value, rel=0.01), (kind, got, want)


@pytest.mark.parametrize("pp,schedule,microbatches,batch_size", [
    (2, "gpipe", 4, 64),
    pytest.param(2, "1f1b", 4, 64, marks=pytest.mark.slow),
    pytest.param(4, "gpipe", 8, BATCH, marks=pytest.mark.slow),
])
def test_applied_pipeline_compiles_the_collectives_the_cost_model_counts(
    pp, schedule, microbatches, batch_size):
  """Planned by uniap_jax.plan, applied with the executor its schedule runs as.

  What the pipeline runtime decides is exact: the collectives over "pp" (one
  collective-permute per buffer slot, tick and direction; one all-to-all per parameter
  leaf each way between the stored state and the per-stage stacks) and over the manual
  data-parallel axes (one all-reduce per stacked gradient, once per step), counts and
  bytes, and the loss (the graph puts it in the last layer), reduced once per step
  outside the pipeline. Outside the tables: the one psum over "pp" of the model's
  returned arrays (the logits of every micro-batch, as this device holds them).

  Collectives over the automatic intra-stage axes are the layers' own, counted once per
  forward or backward run of every layer position (cost.runtime_runs); the test checks
  that they run over the axis groups the cost model charges, not their bytes: where the
  plan splits the sequence over an automatic axis, XLA computes the embedding's
  gradient in every backward run by gathering the indices and cotangents over that axis
  (bytes growing with the micro-batch) instead of all-reducing the table's gradient as
  the strategies charge it (about 10% of those bytes for the pp=2 plans here).
  """
  plan, tables, choice, stage_of = planned(pp, schedule, microbatches, batch_size)
  assert plan.mesh_axes["pp"] == pp and plan.schedule == schedule
  executor = plans.runtime_executor(schedule, pp, microbatches)  # what apply runs
  want = cost.collectives_by_stage(tables, choice, stage_of, executor=executor)
  assert all(s == want[0] for s in want)  # lockstep: every device runs the same program
  want = want[0]
  colls = compiled_collectives(plan)
  got = hlo.by_axes(colls)
  manual = set(cost.manual_axes(tables, choice))
  assert "pp" in manual
  outputs = got.pop(("all-reduce", ("pp",)))
  assert outputs["count"] == 1
  logits_bytes = batch_size * SEQ * VOCAB * 4
  assert logits_bytes % outputs["bytes"] == 0  # this device's share of the logits
  runtime = {k for k in set(got) | set(want) if set(k[1]) <= manual}
  assert ("send", ("pp",)) in runtime and ("all-to-all", ("pp",)) in runtime
  for key in runtime:
    assert key in got and key in want, (key, got, want)
    assert got[key]["count"] == want[key]["count"], (key, got[key], want[key])
    assert got[key]["bytes"] == pytest.approx(want[key]["bytes"], rel=0.01), key
  automatic = lambda table: sorted({a for _, a in table if not set(a) <= manual})
  assert automatic(got) == automatic(want), (got, want)


@functools.cache
def configuration_tables(mesh_items, pp, microbatches, schedule, batch_size):
  """The traced TinyGPT step and one configuration's cost tables (cached)."""
  cluster = uniap_jax.Cluster.preset(CPU8)
  model, optimizer = make_state()
  graph = graph_lib.trace(train_step, model, optimizer, make_batch(batch_size))
  mesh = next(m for m in strategies.mesh_shapes(cluster, cluster.num_devices // pp)
              if m.as_dict() == dict(mesh_items))
  tables = cost.build_cost_tables(graph, cluster, mesh=mesh, num_stages=pp,
                                  num_microbatches=microbatches, global_batch=batch_size,
                                  schedule=schedule,
                                  prune=False)  # hand choices by name: keep them all
  return graph, cluster, mesh, tables


def built_plan(*, mesh_axes, stages, microbatches, schedule, strategy, batch_size=BATCH):
  """The Plan `uniap_jax.plan` builds had the solver chosen candidate `strategy(layer)`
  for every layer and these stages; with the tables and the choice."""
  pp = len(stages)
  graph, cluster, mesh, tables = configuration_tables(
      tuple(sorted(mesh_axes.items())), pp, microbatches, schedule, batch_size)
  model, optimizer = make_state()
  args = (model, optimizer, make_batch(batch_size))
  choice = {}
  for layer in tables.layers:
    names = [c.name for c in layer.candidates]
    choice[layer.name] = names.index(strategy(layer.name))
  stage_of = {n: s for s, names in enumerate(stages) for n in names}
  ev = solver.evaluate(search.to_problem(tables), choice, stage_of)
  sol = solver.Solution(choice=choice, stage=stage_of, objective=ev.objective,
                        status="optimal", gap=0.0, time_s=0.0, stage_times=ev.stage_times,
                        send_times=ev.send_times, stage_memory=ev.stage_memory)
  config = search.Config(num_stages=pp, mesh=mesh, num_microbatches=microbatches,
                         schedule=schedule)
  plan = search.build_plan(graph, cluster, config, tables, sol,
                           stats=plans.SolverStats(status="heuristic", gap=0.0, time_s=0.0),
                           global_batch=batch_size, args=args)
  return plan, tables, choice, stage_of


# Megatron blocks (column-parallel MLP-in, row-parallel MLP-out over "tp"), a
# vocabulary-parallel embedding, the final norm and the head split over the hidden dim;
# the batch over the manual "dp" everywhere.
MEGATRON_STAGES = {"embed": "dp=batch tp=embedding:0", "norm": "dp=batch tp=hidden",
                   "head": "dp=batch tp=hidden"}


def megatron_strategy(name):
  return "dp=batch tp=down:0" if name.startswith("blocks/") else MEGATRON_STAGES[name]


@pytest.mark.parametrize("executor,recompute", [
    pytest.param("gpipe", (), id="gpipe", marks=pytest.mark.slow),
    pytest.param("1f1b", (), id="1f1b"),
    pytest.param("1f1b", ("blocks/0", "blocks/2"), id="1f1b-remat-blocks",
                 marks=pytest.mark.slow),
    pytest.param("fused", (), id="fused", marks=pytest.mark.slow),
    pytest.param("gpipe-remat", (), id="gpipe-remat"),
    pytest.param("gpipe", ("blocks/0", "blocks/2"), id="gpipe-remat-blocks",
                 marks=pytest.mark.slow),
])
def test_tensor_parallel_pipeline_compiles_exactly_the_predicted_collectives(executor,
                                                                            recompute):
  """pp=2 with "tp" automatic inside the stages: every (kind, axes) agrees, counts
  exactly and bytes within 1%, the layers' own tensor-parallel collectives included.

  What this pins down about XLA: each layer position's collectives run once per forward
  and backward run (lockstep: idle positions too); in "fused" and "1f1b" the forward
  runs of the table, inside the backward rule, lose the positions whose outputs feed
  only the model's outputs (norm and head here: 6 instead of 8 tensor-parallel
  all-reduces per run), and every recomputation of the stage loses the head's closing
  all-reduce, which no backward reads. Blocks that recompute their activations
  (" +remat") do not issue their closing all-reduce again either: their candidates
  list only what the backward reads among the recomputed collectives (`rerun_comms`,
  `op_rerun`). The loss's mean runs once per step, outside the pipeline. Outside the
  tables, as above: the one psum of the model's outputs over "pp".
  """
  schedule = "1f1b" if executor == "1f1b" else "gpipe"
  plan, tables, choice, stage_of = built_plan(
      mesh_axes={"dp": 2, "tp": 2}, stages=stages_of([2, 2]), microbatches=4,
      schedule=schedule, strategy=lambda n: megatron_strategy(n) + (
          plans.REMAT_SUFFIX if n in recompute else ""))
  assert {l.name for l in plan.layers if l.recompute} == set(recompute)
  want = cost.collectives_by_stage(tables, choice, stage_of, executor=executor)[0]
  colls = compiled_collectives(plan, schedule=executor)
  got = hlo.by_axes(colls)
  assert got.pop(("all-reduce", ("pp",)))["count"] == 1
  assert ("all-reduce", ("tp",)) in want and ("all-gather", ("tp",)) in want
  assert set(got) == set(want), (got, want)
  for key in want:
    assert got[key]["count"] == want[key]["count"], (key, got[key], want[key])
    assert got[key]["bytes"] == pytest.approx(want[key]["bytes"], rel=0.01), key
  if executor == plans.runtime_executor(schedule, 2, 4):  # the plan's own, by kind
    by_kind = hlo.bytes_by_kind([c for c in colls if not (
        c.kind == "all-reduce" and c.axes == ("pp",))])
    predicted = {k: v for k, v in plan.predicted.collectives.items() if v}
    assert sorted(by_kind) == sorted(predicted)
    for kind, value in predicted.items():
      assert by_kind[kind] == pytest.approx(value, rel=0.01), (kind, by_kind, value)


# ZeRO-3 everywhere on a 4-device stage: every parameter stored split over "dp", which
# stays automatic. At the default batch XLA gathers the (smaller) activations instead of
# the weights; at 64 it gathers the weights, as the candidates say.
ZERO3_STAGES = {"embed": "dp=batch,embedding:0", "norm": "dp=batch",
                "head": "dp=batch,kernel:1"}


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["gpipe", "1f1b"])
def test_zero_pipeline_compiles_collectives_over_the_predicted_axes(executor):
  """pp=2 with ZeRO-3 stages, "dp" automatic: every count and byte accounted for.

  What the candidates declare and the runtime model counts (each checked on this
  case's compiled HLO): parameter all-gathers are loop-invariant and hoisted out of
  the tick loops, once per loop that reads them, and autodiff GPipe's backward loop
  gathers again in every run the parameters whose gathered copy the backward reads
  (`ParamGather.backward_reads`: the matmul kernels, not the biases nor the embedding
  table); gradient synchronisation runs in every backward run. The loss, which the
  graph puts into the head, runs once per step outside the pipeline: the mean's
  4-byte all-reduce once (`Candidate.outside_comms`). Inside the pipeline XLA forms
  the embedding table's gradient by all-gathering the ids and the cotangents over
  "dp" in every backward run, and scatters them into the rows each device owns, where
  a plain jit (tests/test_cost.py's ("gpt", "fsdp_vocab")) reduce-scatters the
  table's gradient (`Candidate.pipeline_comms`).
  """
  microbatches, batch_size = 4, 64
  plan, tables, choice, stage_of = built_plan(
      mesh_axes={"dp": 4}, stages=stages_of([2, 2]), microbatches=microbatches,
      schedule=executor, batch_size=batch_size, strategy=lambda n: (
          "dp=batch,down:0" if n.startswith("blocks/") else ZERO3_STAGES[n]))
  manual = set(cost.manual_axes(tables, choice))
  assert manual == {"pp"}  # every layer shards parameters over "dp": it stays automatic
  want = cost.collectives_by_stage(tables, choice, stage_of, executor=executor)[0]
  got = hlo.by_axes(compiled_collectives(plan, schedule=executor))
  assert got.pop(("all-reduce", ("pp",)))["count"] == 1  # the model's outputs
  assert set(got) == set(want), (got, want)
  for key in want:
    assert got[key]["count"] == want[key]["count"], (key, got[key], want[key])
    assert got[key]["bytes"] == pytest.approx(want[key]["bytes"], rel=1e-6), key
  # The embedding's in-pipeline gradient: ids and cotangents gathered in every
  # backward run, no reduce-scatter of the table's gradient.
  backward_runs = cost.runtime_run_split(executor, 2, microbatches)[3]
  micro = batch_size // microbatches
  embed = tables.layer("embed").candidates[choice["embed"]]
  gathers = [c for c in embed.pipeline_comms if c.kind == "all-gather" and c.phase == "backward"]
  assert sum(c.count for c in gathers) == 2  # the ids and the cotangents
  assert sum(c.bytes * c.count for c in gathers) == micro * SEQ * 4 + micro * SEQ * DIM * 4
  assert not [c for c in embed.pipeline_comms if c.kind == "reduce-scatter"]
  assert [c.bytes for c in embed.comms if c.kind == "reduce-scatter"] == [VOCAB * DIM * 4]
  assert backward_runs > 1


def test_runtime_of_the_plain_step_is_the_solvers_objective_for_any_choice():
  """One stage, one micro-batch: the jitted step runs the layers and reshards at the
  edges, exactly what the solver's objective sums, whatever the candidates."""
  _, tables, _, stage_of = planned(1, "gpipe", 1, 64)
  problem = search.to_problem(tables)
  rng = np.random.default_rng(0)
  reshards = 0
  for _ in range(20):
    choice = {l.name: int(rng.integers(len(l.candidates))) for l in tables.layers}
    want = solver.evaluate(problem, choice, stage_of).objective
    reshards += want > sum(tables.solver_time_s(n)[k] for n, k in choice.items())
    assert cost.runtime_step_time_s(tables, choice, stage_of, executor="gpipe") == (
        pytest.approx(want, rel=1e-12))
  assert reshards  # some of the choices reshard between layers


def test_runtime_step_time_against_the_papers_objective():
  """Without a pipeline the runtime's time is the solver's objective; pipelined, the
  lockstep runtime pays recomputation and idle positions on top of the paper's GPipe
  time, and the explicit tables their extra forward pass and runs in every tick."""
  plan, tables, choice, stage_of = planned(1, "gpipe", 1)
  for executor in cost.EXECUTORS:
    assert cost.runtime_step_time_s(tables, choice, stage_of, executor=executor) == (
        pytest.approx(plan.predicted.step_time_s, rel=1e-9))
  plan, tables, choice, stage_of = planned(2, "gpipe", 4, 64)
  times = {e: cost.runtime_step_time_s(tables, choice, stage_of, executor=e)
           for e in cost.EXECUTORS}
  assert plan.predicted.step_time_s < times["gpipe"] < times["gpipe-remat"]
  assert times["gpipe-remat"] < times["fused"] < times["1f1b"]


# --- the zoo's models ----------------------------------------------------------------------

def gpt2_megatron(path, shape):
  """Column-parallel fused qkv and MLP-in, row-parallel projections: splitting the fused
  qkv makes XLA move data with collective-permutes inside a stage."""
  if path.endswith(("c_attn/kernel", "c_fc/kernel")):
    return P(None, "tp")
  if path.endswith(("c_attn/bias", "c_fc/bias")):
    return P("tp")
  if path.endswith(("attn_proj/kernel", "mlp_proj/kernel")):
    return P("tp", None)
  return P()


ZOO_CASES = [
    pytest.param("gpt2", {"pp": 2, "dp": 2, "tp": 2}, 2, "gpipe", gpt2_megatron,
                 id="gpt2-pp2-tp2-tied-embedding"),
    pytest.param("bert_huge", {"pp": 2, "dp": 4}, 2, "fused", None, id="bert-pp2",
                 marks=pytest.mark.slow),
    pytest.param("vit_huge", {"pp": 2, "dp": 4}, 2, "1f1b", None, id="vit-pp2",
                 marks=pytest.mark.slow),
    pytest.param("llama_7b", {"pp": 4, "dp": 2}, 2, "gpipe", None, id="llama-pp4",
                 marks=pytest.mark.slow),
    pytest.param("t5_large", {"pp": 4, "dp": 2}, 4, "fused", None, id="t5-pp4-skip-edges",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,mesh_axes,microbatches,executor,param_spec", ZOO_CASES)
def test_zoo_models_pipeline(name, mesh_axes, microbatches, executor, param_spec):
  models = pytest.importorskip("experiments.models")
  step_fn = models.train_step(name)

  def make():
    model = models.create(name, "tiny")
    return model, models.create_optimizer(model), models.example_batch(name, "tiny", 8)
  ref = make()
  ref_losses = [float(nnx.jit(step_fn)(*ref)) for _ in range(STEPS)]
  model, optimizer, batch = make()
  names, stages = list(model.layer_names()), mesh_axes["pp"]
  cuts = [0] + [max(1, len(names) * (s + 1) // stages - (s == 0)) for s in range(stages)]
  plan = hand_plan((model, optimizer, batch), mesh_axes=mesh_axes,
                   stages=[names[a:b] for a, b in zip(cuts, cuts[1:])],
                   num_microbatches=microbatches,
                   param_spec=param_spec or (lambda path, shape: P()))
  applied = plan.apply(step_fn, schedule=executor, bubble_value=float("nan"))
  losses = [float(applied(model, optimizer, batch)) for _ in range(STEPS)]
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(ref[0], nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL)
  if param_spec is gpt2_megatron:  # the case that hangs a "switch" dispatch on CPU
    colls = hlo.parse(applied.compile(model, optimizer, batch).as_text(),
                      dict(applied.mesh.shape))
    assert [c for c in colls if c.kind == "send" and c.axes == ("tp",) and c.executions > 1]


@pytest.mark.slow
def test_switch_dispatch_refuses_a_program_that_would_hang_on_cpu():
  models = pytest.importorskip("experiments.models")
  model = models.create("gpt2", "tiny")
  optimizer, batch = models.create_optimizer(model), models.example_batch("gpt2", "tiny", 8)
  names = list(model.layer_names())
  plan = hand_plan((model, optimizer, batch), mesh_axes={"pp": 2, "dp": 2, "tp": 2},
                   stages=[names[:2], names[2:]], num_microbatches=2, param_spec=gpt2_megatron)
  applied = plan.apply(models.train_step("gpt2"), dispatch="switch")
  with pytest.raises(NotImplementedError, match=r"collective-permutes over \[\('tp',\)\] inside "
                     r"a pipeline stage.*dispatch='uniform'"):
    applied(model, optimizer, batch)


# --- bad input -----------------------------------------------------------------------------


def test_plan_for_another_model_names_the_first_leaf_that_differs():
  model, optimizer = make_state()
  batch = make_batch()
  plan = hand_plan((model, optimizer, batch), mesh_axes={"dp": 8}, stages=[layer_names()])
  small_model, small_opt = make_state(layers=3)
  with pytest.raises(ValueError, match=r"Plan does not match this step: the plan has argument 0 "
                     r"leaf 'blocks/3/down/bias'.*Plan again for this model"):
    plan.apply(train_step)(small_model, small_opt, batch)
  # With leaf shapes in the plan (a proposed Plan field, read when present), a model of
  # another width is caught with both shapes.
  object.__setattr__(plan, "leaf_shapes", tuple(
      (0, p, tuple(x.shape)) for p, x in _mesh.paths_and_leaves(nnx.state(model))))
  wide_model, wide_opt = make_state(dim=24)
  with pytest.raises(ValueError, match=r"argument 0 leaf 'blocks/0/down/bias' is \(24,\) here "
                     r"but \(16,\) in the plan\. Plan again for this model\."):
    plan.apply(train_step)(wide_model, wide_opt, batch)


def test_plan_needing_more_devices_says_how_many():
  model, optimizer = make_state()
  batch = make_batch()
  plan = hand_plan((model, optimizer, batch), mesh_axes={"pp": 2, "dp": 8},
                   stages=stages_of([2, 2]))
  with pytest.raises(ValueError, match=r"needs 16 devices \(mesh pp=2 x dp=8\) but JAX sees 8"):
    plan.apply(train_step)


def test_batch_that_does_not_split_says_what_would():
  model, optimizer = make_state()
  plan = hand_plan((model, optimizer, make_batch()), mesh_axes={"pp": 2, "dp": 4},
                   stages=stages_of([2, 2]), num_microbatches=2)
  with pytest.raises(ValueError, match=r"batch size 12, which does not split into "
                     r"num_microbatches=2 x data-parallel 4 = 8 .* multiple of 8 \(e\.g\. 8 or "
                     r"16\), or plan with num_microbatches in \[1, 3\]"):
    plan.apply(train_step)(model, optimizer, make_batch(12))


def test_stages_naming_layers_the_model_does_not_call():
  model, optimizer = make_state()
  batch = make_batch()
  stages = stages_of([2, 2])
  stages[1] = ["blocks/7" if n == "blocks/3" else n for n in stages[1]]
  plan = hand_plan((model, optimizer, batch), mesh_axes={"pp": 2, "dp": 4}, stages=stages)
  with pytest.raises(ValueError, match=r"stages name layers \['blocks/7'\] that the model's "
                     r"forward does not call"):
    plan.apply(train_step)(model, optimizer, batch)


class GlueModel(TinyGPT):
  """Computes on a layer's output in its own forward: cannot be split into stages."""

  def __call__(self, ids):
    x = self.embed(ids) * 2.0
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def test_forward_computing_on_a_layer_output_is_refused_with_its_line():
  model = GlueModel()
  optimizer = nnx.Optimizer(model, optax.adamw(LEARNING_RATE), wrt=nnx.Param)
  batch = make_batch()
  plan = hand_plan((model, optimizer, batch), mesh_axes={"pp": 2, "dp": 4},
                   stages=stages_of([2, 2]))
  with pytest.raises(NotImplementedError, match=r"computes on the output of layer 'embed' "
                     r"outside a submodule call, at .*test_apply.py:\d+"):
    plan.apply(train_step)(model, optimizer, batch)


def test_unknown_schedule_is_rejected():
  model, optimizer = make_state()
  plan = hand_plan((model, optimizer, make_batch()), mesh_axes={"dp": 8}, stages=[layer_names()])
  with pytest.raises(ValueError, match="schedule='interleaved' is not known"):
    plan.apply(train_step, schedule="interleaved")
