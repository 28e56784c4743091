"""The outer loop and ua.plan: complete plans, pinned knobs, and clear errors."""

import math

import pytest
from jax.sharding import PartitionSpec as P

from experiments import models
from uniap_jax import cluster as cluster_lib
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import search
from uniap_jax import solver

CPU8 = cluster_lib.Cluster.preset("cpu-8")


@pytest.fixture(scope="module")
def gpt2():
  name = "gpt2"
  model = models.create(name, "tiny", shape_only=True)
  opt = models.create_optimizer(model)
  batch = models.example_batch(name, "tiny", 16, shape_only=True)
  step = models.train_step(name)
  graph = graph_lib.trace(step, model, opt, batch)
  return step, (model, opt, batch), graph


def test_plan_is_complete_and_consistent(gpt2):
  step, args, graph = gpt2
  plan = search.plan_graph(graph, CPU8, args=args, pp=2, num_microbatches=4)
  assert math.prod(plan.mesh_axes.values()) == CPU8.num_devices
  assert plan.mesh_axes["pp"] == 2 and len(plan.stages) == 2
  assert [n for s in plan.stages for n in s] == [l.name for l in graph.layers]
  assert plan.num_microbatches == 4 and plan.solver.status == "optimal"
  # Every argument leaf has a spec, and specs only name axes of the stage mesh.
  assert {(i.arg_index, i.path) for i in graph.inputs} == {(a, p) for a, p, _ in plan.leaf_specs}
  axes = set(plan.mesh_axes) - {"pp"}
  for _, _, spec in plan.leaf_specs:
    for entry in spec:
      names = entry if isinstance(entry, tuple) else (entry,)
      assert set(n for n in names if n is not None) <= axes
  # Optimizer moments follow their parameter.
  specs = {(a, p): s for a, p, s in plan.leaf_specs}
  for a, p, s in plan.leaf_specs:
    if "/mu/" in p:
      param = p.split("/mu/", 1)[1]
      assert s == specs[(0, param)]
  assert plans.Plan.from_json(plan.to_json()) == plan
  assert len(plan.predicted.memory_per_device_bytes) == 2
  assert plan.predicted.throughput == pytest.approx(16 / plan.predicted.step_time_s)
  # No plan can use more than the peak the cost model charges for (its efficiency < 1).
  assert 0 < plan.predicted.mfu <= CPU8.compute_efficiency


def test_predicted_step_time_is_the_solvers_objective(gpt2):
  _, args, graph = gpt2
  plan = search.plan_graph(graph, CPU8, args=args, pp=2, num_microbatches=2, schedule="gpipe")
  config = [c for c in search.configurations(graph, CPU8, pp=2, num_microbatches=2,
                                              schedule="gpipe", global_batch=16)
            if c.mesh.as_dict() == {k: v for k, v in plan.mesh_axes.items() if k != "pp"}][0]
  from uniap_jax import cost
  tables = cost.build_cost_tables(graph, CPU8, mesh=config.mesh, num_stages=2,
                                  num_microbatches=2, schedule="gpipe")
  problem = search.to_problem(tables)
  stage = {l.name: l.stage for l in plan.layers}
  choice = {}
  for l in plan.layers:
    costs = tables.layer(l.name)
    choice[l.name] = [c.name for c in costs.candidates].index(l.strategy)
  got = solver.evaluate(problem, choice, stage)
  assert got.objective == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
  # What the runtime's lockstep GPipe (recomputing from stashed stage inputs) costs,
  # and sends, for that choice.
  assert config.executor == "gpipe-remat"
  assert plan.predicted.runtime_step_time_s == pytest.approx(
      cost.runtime_step_time_s(tables, choice, stage, executor="gpipe-remat"), rel=1e-9)
  assert plan.predicted.runtime_step_time_s >= plan.predicted.step_time_s * (1 - 1e-9)
  want = cost.predicted_collectives(tables, choice, stage, executor="gpipe-remat")
  assert {k: v for k, v in plan.predicted.collectives.items() if v} == pytest.approx(want)
  assert "uniap_jax.apply runs it (executor 'gpipe-remat') in" in plan.summary()


@pytest.mark.parametrize("objective", ["paper", "runtime"])
def test_searching_everything_is_no_worse_than_any_pinned_choice(gpt2, objective):
  _, args, graph = gpt2
  value = lambda p: (p.predicted.step_time_s if objective == "paper"
                     else p.predicted.runtime_step_time_s)
  cache = {}
  free = search.plan_graph(graph, CPU8, args=args, objective=objective, cache=cache)
  for pp in (1, 2, 4):
    pinned = search.plan_graph(graph, CPU8, args=args, pp=pp, objective=objective,
                               cache=cache)
    assert value(free) <= value(pinned) * (1 + 1e-9)


def test_spec_trees_mirror_the_arguments(gpt2):
  import jax
  from flax import nnx
  _, args, graph = gpt2
  plan = search.plan_graph(graph, CPU8, args=args, pp=1)
  state = nnx.state(args[0])
  leaves = jax.tree_util.tree_leaves(plan.param_specs[0], is_leaf=lambda x: isinstance(x, P))
  assert len(leaves) == len(jax.tree_util.tree_leaves(state))
  assert all(isinstance(x, P) for x in leaves)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pp=3), r"pp=3 does not divide the cluster's 8 devices. Use pp in 1, 2, 4, 8"),
    (dict(pp=8), r"pp=8 needs at least 8 layers but the step has 5"),
    (dict(num_microbatches=5), r"global_batch=16 does not split into num_microbatches=5"),
    (dict(schedule="zb"), r"schedule='zb'; allowed: gpipe, 1f1b"),
    (dict(time_limit_s=0), r"time_limit_s must be a positive number"),
])
def test_bad_knobs_say_what_works(gpt2, kwargs, match):
  _, args, graph = gpt2
  with pytest.raises(ValueError, match=match):
    search.plan_graph(graph, CPU8, args=args, **kwargs)


def test_memory_limit_no_plan_meets(gpt2):
  _, args, graph = gpt2
  with pytest.raises(search.InfeasibleError, match="No plan fits: the leanest") as err:
    search.plan_graph(graph, CPU8, args=args, memory_limit_bytes=1000)
  assert err.value.needed_bytes > 1000 and err.value.limit_bytes == 1000
  assert "the limit is 1000 bytes" in str(err.value)


def _exhaustive(graph, cluster, **knobs):
  """The outer loop without any bound: every configuration built and solved; without
  a memory limit, with all its candidates (none dropped as dominated). (With one, the
  reserve kept free is the largest transient of the candidates kept, so unpruned
  tables would change the problem itself.)"""
  from uniap_jax import cost
  batch = knobs.pop("global_batch", graph.batch_size)
  limit = knobs.pop("memory_limit_bytes", None)
  best, cache = math.inf, {}
  for config in search.configurations(graph, cluster, global_batch=batch, **knobs):
    tables = cost.build_cost_tables(
        graph, cluster, mesh=config.mesh, num_stages=config.num_stages,
        num_microbatches=config.num_microbatches, global_batch=batch,
        schedule=config.schedule, memory_limit_bytes=limit, prune=limit is not None,
        cache=cache)
    if (any(not l.candidates for l in tables.layers) or tables.over_limit
        or tables.reserve_bytes >= tables.memory_limit_bytes):
      continue
    sol = solver.solve(search.to_problem(tables))
    if sol.choice:
      best = min(best, sol.objective)
  return best


@pytest.mark.parametrize("knobs", [
    dict(pp=2, schedule="gpipe"),
    dict(num_microbatches=4),
    dict(pp=1, memory_limit_bytes=1.2e6),  # tight: one micro-batch does not fit
])
def test_pruned_search_finds_the_exhaustive_optimum(gpt2, knobs):
  _, args, graph = gpt2
  want = _exhaustive(graph, CPU8, **dict(knobs))
  if math.isinf(want):
    with pytest.raises(search.InfeasibleError):
      search.plan_graph(graph, CPU8, args=args, objective="paper", **knobs)
    return
  plan = search.plan_graph(graph, CPU8, args=args, objective="paper", **knobs)
  assert plan.solver.status == "optimal"
  assert plan.predicted.step_time_s == pytest.approx(want, rel=1e-9)


def test_every_bound_is_below_the_configurations_optimum(gpt2):
  """FLOPs, scaled and exact layer bounds never exceed the solved objective, and a
  configuration either memory test rules out has no feasible assignment (under a
  limit tight enough that some configurations have none)."""
  from uniap_jax import cost
  from uniap_jax.cost import _tables
  _, _, graph = gpt2
  cache, batch, limit = {}, graph.batch_size, 1.2e6
  configs = search.configurations(graph, CPU8, pp=2, schedule="1f1b", global_batch=batch)
  configs += search.configurations(graph, CPU8, pp=1, global_batch=batch)
  loop = search._Search(graph=graph, cluster=CPU8, configs=configs, cache=cache,
                        limit=limit, memory_limit_bytes=limit, global_batch=batch,
                        deadline=math.inf, progress=None)
  flops = _tables.flops_time_bounds(graph, CPU8, global_batch=batch, cache=cache)
  statuses = set()
  for config in configs:
    tables = cost.build_cost_tables(
        graph, CPU8, mesh=config.mesh, num_stages=config.num_stages,
        num_microbatches=config.num_microbatches, global_batch=batch,
        schedule=config.schedule, memory_limit_bytes=limit, cache=cache)
    ref = loop._reference[config.mesh]
    scaled = search._check_layers(loop._layers(config, ref), config, limit=limit,
                                  scale=ref / config.num_microbatches, exact=False)
    exact = search._check_layers(loop._layers(config, config.num_microbatches), config,
                                 limit=limit, scale=1.0, exact=True)
    if tables.reserve_bytes >= limit or tables.over_limit:
      # The search rules these out (no room left, or a layer over the limit on stage 0).
      assert not exact.feasible, config.describe()
      statuses.add("infeasible")
      continue
    sol = solver.solve(search.to_problem(tables))
    statuses.add(sol.status)
    if sol.status == "infeasible":
      continue
    assert scaled.feasible and exact.feasible, config.describe()
    tol = 1 + 1e-9
    assert loop._flops_bound(config, flops) <= sol.objective * tol, config.describe()
    assert scaled.bound <= sol.objective * tol, config.describe()
    assert exact.bound <= sol.objective * tol, config.describe()
    assert exact.bound == pytest.approx(search.lower_bound(tables), rel=1e-9)
  assert statuses == {"optimal", "infeasible"}


@pytest.mark.parametrize("mesh_index", [0, 1, 2])
def test_costs_scaled_from_a_larger_microbatch_bound_the_smaller_ones(gpt2, mesh_index):
  """The scaled bound rests on this: per layer, the fastest candidate's time and the
  leanest candidate's memory at b samples are at least b / B of those at B > b."""
  from uniap_jax import strategies
  from uniap_jax.cost import _tables
  _, _, graph = gpt2
  cache = {}
  meshes = strategies.mesh_shapes(CPU8, 8)
  mesh = meshes[min(mesh_index, len(meshes) - 1)]
  big = _tables.layer_costs(graph, CPU8, mesh=mesh, microbatch=16, cache=cache)
  for small_b in (1, 2, 4, 8):
    small = _tables.layer_costs(graph, CPU8, mesh=mesh, microbatch=small_b, cache=cache)
    r = small_b / 16
    for lb, ls in zip(big, small):
      for c in (1, 2, 8):
        want = min(m + s / c for m, s in zip(ls.microbatch_time_s, ls.step_time_s))
        got = min(r * m + s / c for m, s in zip(lb.microbatch_time_s, lb.step_time_s))
        assert got <= want * (1 + 1e-9), (lb.name, small_b, c)
      for f in (1, 3):
        want = min(ls.memory_bytes(f))
        got = min(s + g + a * r * f for s, g, a in
                  zip(lb.state_bytes, lb.grad_bytes, lb.activation_bytes))
        assert got <= want * (1 + 1e-9), (lb.name, small_b, f)


def test_infeasible_message_states_small_limits_in_readable_units():
  """A limit far below a GiB reads in MiB/KiB/bytes, not as "0.00 GiB"."""
  from uniap_jax.plans import format_bytes
  assert format_bytes(40 * 2**30) == "40.00 GiB"
  assert format_bytes(1.5 * 2**20) == "1.50 MiB"
  assert format_bytes(3 * 2**10) == "3.00 KiB"
  assert format_bytes(12) == "12 bytes"
