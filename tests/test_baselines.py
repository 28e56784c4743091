"""Baselines under UniAP's cost model: valid plans of the prescribed kind, never better
than UniAP, and "out of memory" when nothing of their kind fits."""

import itertools
import math
import random

import jax
import pytest
from jax.sharding import PartitionSpec as P

from experiments import models
from uniap_jax import baselines
from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import search
from uniap_jax import solver
from uniap_jax.baselines import _stages

CPU8 = cluster_lib.Cluster.preset("cpu-8")
RTOL = 1e-9
# Pinned so that the whole comparison (UniAP's outer loop included) stays quick while
# still spanning every pipeline degree and mesh shape.
TINY_KNOBS = dict(global_batch=32, num_microbatches=4, schedule="gpipe", time_limit_s=300.0)


def _trace(name, size, batch):
  model = models.create(name, size, shape_only=True)
  opt = models.create_optimizer(model)
  example = models.example_batch(name, size, batch, shape_only=True)
  args = (model, opt, example)
  return graph_lib.trace(models.train_step(name), *args), args


@pytest.fixture(scope="module", params=["gpt2", "bert_huge"])
def tiny(request):
  """A tiny zoo model compared with every method (shared by several tests)."""
  graph, args = _trace(request.param, "tiny", 32)
  cache = {}
  # UniAP searches on its own here: started from the baselines' plans it could not
  # end worse than them whatever the search did.
  rows = baselines.compare(graph, CPU8, args=args, cache=cache, seed_from_baselines=False,
                           **TINY_KNOBS)
  return request.param, graph, args, cache, {r.method: r for r in rows}


def _param_specs(plan, graph):
  """(path, spec) of every parameter leaf of the plan."""
  params = {(p.arg_index, p.path) for l in graph.layers for p in l.params}
  return [(path, spec) for a, path, spec in plan.leaf_specs if (a, path) in params]


def _mesh_names(spec):
  out = set()
  for entry in spec:
    if entry is not None:
      out.update(entry if isinstance(entry, tuple) else (entry,))
  return out


def test_compare_lists_every_method_in_order(tiny):
  _, _, _, _, rows = tiny
  assert list(rows) == ["uniap", *baselines.BASELINES]
  assert rows["uniap"].status == "optimal"
  table = baselines.format_table(list(rows.values()))
  for name in rows:
    assert name in table


def test_uniap_is_no_worse_than_any_baseline(tiny):
  _, _, _, _, rows = tiny
  uniap = rows["uniap"]
  for name, row in rows.items():
    assert row.feasible, (name, row.description)  # every method has a plan here
    assert uniap.step_time_s <= row.step_time_s * (1 + RTOL), name
  # Pipeline-only and intra-only solve their own restricted problems exactly.
  assert rows["intra_only"].status == "optimal"
  assert rows["pipeline_only"].status == "optimal"


def test_every_baseline_plan_is_valid(tiny):
  _, graph, _, _, rows = tiny
  names = [l.name for l in graph.layers]
  for name, row in rows.items():
    plan = row.plan
    assert math.prod(plan.mesh_axes.values()) == CPU8.num_devices, name
    assert len(plan.stages) == plan.mesh_axes.get("pp", 1), name
    assert all(plan.stages), name
    assert [n for s in plan.stages for n in s] == names, name
    assert plan.num_microbatches == TINY_KNOBS["num_microbatches"]
    assert plan.solver.status in ("optimal", "heuristic", "time_limit")
    assert plan.predicted.throughput == pytest.approx(32 / plan.predicted.step_time_s)
    assert {(i.arg_index, i.path) for i in graph.inputs} == {
        (a, p) for a, p, _ in plan.leaf_specs}


def test_predicted_time_is_uniaps_objective_for_that_assignment(tiny):
  """A baseline's step time is `solver.evaluate` on the Problem UniAP solves there."""
  _, graph, _, _, rows = tiny
  plan = rows["megatron"].plan
  pp = plan.mesh_axes.get("pp", 1)
  mesh = [c.mesh for c in search.configurations(graph, CPU8, pp=pp, global_batch=32)
          if c.mesh.as_dict() == {k: v for k, v in plan.mesh_axes.items() if k != "pp"}][0]
  tables = cost.build_cost_tables(graph, CPU8, mesh=mesh, num_stages=pp,
                                  num_microbatches=plan.num_microbatches, global_batch=32,
                                  schedule=plan.schedule, prune=False)
  stage = {l.name: l.stage for l in plan.layers}
  choice = {l.name: [c.name for c in tables.layer(l.name).candidates].index(l.strategy)
            for l in plan.layers}
  got = solver.evaluate(search.to_problem(tables), choice, stage)
  assert got.fits
  assert got.objective == pytest.approx(plan.predicted.step_time_s, rel=RTOL)


def test_data_parallel_replicates_every_parameter(tiny):
  _, graph, _, _, rows = tiny
  plan = rows["data_parallel"].plan  # micro-batches of 8 split over the 8 devices
  assert plan.mesh_axes == {"dp": 8}
  assert all(spec == P() for _, spec in _param_specs(plan, graph))
  for _, path, spec in plan.leaf_specs:
    if "/mu/" in path or "/nu/" in path:
      assert spec == P(), path
  assert any(spec != P() for tree in plan.batch_specs for spec in _leaves(tree))


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, P))


def test_fsdp_shards_parameters_and_saves_memory(tiny):
  _, graph, _, _, rows = tiny
  plan = rows["fsdp"].plan
  assert plan.mesh_axes == {"dp": 8}
  specs = dict(_param_specs(plan, graph))
  for layer in graph.layers:
    if layer.name.startswith("blocks/"):  # the largest parameter of every block is split
      big = max(layer.params, key=lambda p: math.prod(p.info.shape))
      assert specs[big.path] != P(), (layer.name, big.path)
  # Each device stores less of the parameters (and so of their gradients and AdamW
  # moments), counted from the specs. (The predicted total need not drop: both models
  # tie their embedding table, which no candidate splits, and at this size the gathered
  # kernels kept for the backward outweigh what sharding the blocks saves.)
  shapes = {p.path: p.info.shape for l in graph.layers for p in l.params}

  def stored_elements(p):
    return sum(math.prod(shapes[path]) / math.prod(
        p.mesh_axes[a] for a in _mesh_names(spec)) for path, spec in _param_specs(p, graph))
  assert stored_elements(plan) < 0.5 * stored_elements(rows["data_parallel"].plan)


def test_megatron_never_splits_parameters_over_dp(tiny):
  _, graph, _, _, rows = tiny
  plan = rows["megatron"].plan
  assert set(plan.mesh_axes) - {"pp"} in ({"dp"}, {"dp", "tp"})
  for path, spec in _param_specs(plan, graph):
    assert "dp" not in _mesh_names(spec), path


def test_pipeline_only_runs_data_parallel_stages(tiny):
  _, graph, _, _, rows = tiny
  plan = rows["pipeline_only"].plan
  assert set(plan.mesh_axes) - {"pp"} == {"dp"}
  assert all(spec == P() for _, spec in _param_specs(plan, graph))


def test_an_impossible_memory_limit_is_out_of_memory(tiny):
  _, graph, _, cache, _ = tiny
  for name, fn in baselines.BASELINES.items():
    with pytest.raises(search.InfeasibleError) as info:
      fn(graph, CPU8, memory_limit_bytes=1e3, cache=cache, **TINY_KNOBS)
    assert info.value.limit_bytes == 1e3, name
  rows = baselines.compare(graph, CPU8, memory_limit_bytes=1e3, cache=cache,
                           methods=["data_parallel", "alpa"], **TINY_KNOBS)
  assert [r.status for r in rows] == ["out of memory"] * 2
  assert "out of memory" in baselines.format_table(rows)


def test_non_pipelining_methods_reject_a_pinned_pp(tiny):
  _, graph, _, cache, _ = tiny
  for name in ("data_parallel", "fsdp", "intra_only"):
    with pytest.raises(ValueError, match="does not pipeline"):
      baselines.BASELINES[name](graph, CPU8, pp=2, cache=cache, **TINY_KNOBS)
  rows = baselines.compare(graph, CPU8, pp=2, cache=cache, methods=["uniap", "fsdp", "alpa"],
                           **TINY_KNOBS)
  assert [r.status for r in rows][1] == "not applicable"
  assert rows[0].step_time_s <= rows[2].step_time_s * (1 + RTOL)
  assert rows[2].plan.mesh_axes["pp"] == 2


def test_unknown_method_is_named():
  with pytest.raises(ValueError, match="known: uniap, data_parallel"):
    baselines.compare(None, CPU8, methods=["zero"])


@pytest.mark.parametrize("seed", range(20))
def test_min_max_split_matches_brute_force(seed):
  rng = random.Random(seed)
  n, k = rng.randint(1, 7), rng.randint(1, 4)
  if k > n:
    k = n
  weights = [rng.choice([0.0, 1.0, 2.0, 3.5]) for _ in range(n)]
  cap = rng.choice([math.inf, 4.0, 6.0])
  prefix = _stages.prefix(weights)
  cost_fn = lambda a, b, s: (prefix[b] - prefix[a]) if prefix[b] - prefix[a] <= cap else math.inf
  best = math.inf
  for cuts in itertools.combinations(range(1, n), k - 1):
    bounds = (0, *cuts, n)
    best = min(best, max(cost_fn(a, b, 0) for a, b in zip(bounds, bounds[1:])))
  worst, stage_of = _stages.min_max_split(n, k, cost_fn)
  assert worst == best
  if best < math.inf:
    assert stage_of == sorted(stage_of) and set(stage_of) == set(range(k))
    assert max(sum(w for w, s in zip(weights, stage_of) if s == j) for j in range(k)) == best


def test_uniform_stages_split_the_blocks_evenly():
  graph, _ = _trace("gpt2", "tiny", 16)
  names = [l.name for l in graph.layers]
  assert names == ["embed", "blocks/0", "blocks/1", "norm", "lm_head"]
  assert _stages.uniform_stages(graph, 2) == {
      "embed": 0, "blocks/0": 0, "blocks/1": 1, "norm": 1, "lm_head": 1}
  four = _stages.uniform_stages(graph, 4)  # fewer blocks than stages: all layers count
  assert sorted(set(four.values())) == [0, 1, 2, 3]
  assert list(four.values()) == sorted(four.values())


@pytest.mark.slow
@pytest.mark.parametrize("name,cluster,batch", [("bert_huge", "env_a", 8),
                                                ("llama_7b", "env_c", 16)])
def test_uniap_beats_baselines_on_paper_models(name, cluster, batch):
  graph, args = _trace(name, "paper", batch)
  rows = baselines.compare(graph, cluster_lib.Cluster.preset(cluster), args=args,
                           global_batch=batch, time_limit_s=600.0, seed_from_baselines=False)
  uniap = rows[0]
  assert uniap.method == "uniap" and uniap.status == "optimal"
  for row in rows[1:]:
    if row.feasible:
      assert uniap.step_time_s <= row.step_time_s * (1 + RTOL), row.method


def test_uniap_starts_from_the_best_baseline_plan(tiny):
  """With a budget too short to search, UniAP returns the best baseline plan it was
  seeded with (never a worse plan, never an error); with time, it proves one optimal."""
  _, graph, args, cache, rows = tiny
  best = min((r for r in rows.values() if r.feasible and r.method != "uniap"),
             key=lambda r: r.step_time_s)
  knobs = dict(TINY_KNOBS, time_limit_s=1e-9)
  (seeded,) = baselines.compare(graph, CPU8, args=args, cache=cache, methods=["uniap"],
                                warm_start=[best.plan], **knobs)
  assert seeded.plan.solver.warm_start and seeded.status.endswith("(warm start kept)")
  assert seeded.step_time_s == best.step_time_s
  (full,) = baselines.compare(graph, CPU8, args=args, cache=cache, methods=["uniap"],
                              warm_start=[best.plan], **TINY_KNOBS)
  assert full.status.startswith("optimal")
  assert full.step_time_s == pytest.approx(rows["uniap"].step_time_s, rel=RTOL)
