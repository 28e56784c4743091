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


def test_searching_everything_is_no_worse_than_any_pinned_choice(gpt2):
  _, args, graph = gpt2
  free = search.plan_graph(graph, CPU8, args=args)
  for pp in (1, 2, 4):
    pinned = search.plan_graph(graph, CPU8, args=args, pp=pp)
    assert free.predicted.step_time_s <= pinned.predicted.step_time_s * (1 + 1e-9)


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
