"""objective="runtime": configurations ranked by the step time of what apply runs, with
sound runtime bounds; and the warm start from a known plan."""

import dataclasses
import math
import random

import pytest

from experiments import models
from uniap_jax import baselines
from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import search
from uniap_jax import solver

CPU8 = cluster_lib.Cluster.preset("cpu-8")
TOL = 1 + 1e-9


def _trace(name, batch=16, size="tiny"):
  model = models.create(name, size, shape_only=True)
  opt = models.create_optimizer(model)
  example = models.example_batch(name, size, batch, shape_only=True)
  args = (model, opt, example)
  return graph_lib.trace(models.train_step(name), *args), args


@pytest.fixture(scope="module")
def gpt2():
  """The traced tiny GPT-2, its arguments, and a cost-table cache its tests share."""
  return (*_trace("gpt2"), {})


@pytest.fixture(scope="module")
def llama():
  return (*_trace("llama_7b"), {})


def _tables(graph, config, cache, limit=None, objective="runtime"):
  """The tables the search builds for `config` under `objective`: under "runtime" the
  memory is the runtime model of the configuration's executor."""
  return cost.build_cost_tables(
      graph, CPU8, mesh=config.mesh, num_stages=config.num_stages,
      num_microbatches=config.num_microbatches, global_batch=graph.batch_size,
      schedule=config.schedule, memory_limit_bytes=limit, cache=cache,
      executor=config.executor if objective == "runtime" else None)


def _random_assignment(tables, rng):
  """One candidate per layer and contiguous, non-empty stages, at random."""
  names = [l.name for l in tables.layers]
  cuts = sorted(rng.sample(range(1, len(names)), tables.num_stages - 1))
  bounds = [0, *cuts, len(names)]
  stage = {names[i]: s for s in range(tables.num_stages)
           for i in range(bounds[s], bounds[s + 1])}
  choice = {l.name: rng.randrange(len(l.candidates)) for l in tables.layers}
  return choice, stage


def _usable(tables):
  return not (any(not l.candidates for l in tables.layers) or tables.over_limit
              or tables.reserve_bytes >= tables.memory_limit_bytes)


@pytest.fixture(scope="module")
def bert():
  return (*_trace("bert_huge"), {})


@pytest.mark.parametrize("model", [
    "gpt2", "llama",
    pytest.param("bert", marks=pytest.mark.slow)])  # t5: over 15 minutes here
def test_runtime_bounds_are_below_the_runtime_of_any_assignment(model, request):
  """Level 0 (FLOPs), level 2 (the configuration's own layers, with and without
  memory: the position bound and the per-layer one it never falls below) and the
  tables' bound never exceed `cost.runtime_step_time_s` of random assignments and of
  the solver's answer, for every configuration (pp 1 to 8, both schedules)."""
  graph, _, cache = request.getfixturevalue(model)
  rng = random.Random(0)
  batch = graph.batch_size
  flops = search.phase_flops_bounds(graph, CPU8, global_batch=batch, cache=cache)
  checked = 0
  for config in search.configurations(graph, CPU8, global_batch=batch):
    tables = _tables(graph, config, cache)
    if not _usable(tables):
      continue
    layers = cost.layer_costs(graph, CPU8, mesh=config.mesh,
                              microbatch=batch // config.num_microbatches, cache=cache)
    level0 = search._runtime_flops_bound(config, flops, batch)
    level2 = search._runtime_layer_bound(layers, config, CPU8, cache)
    cap = tables.memory_limit_bytes - tables.reserve_bytes
    with_memory = search._runtime_layer_bound(layers, config, CPU8, cache, memory_cap=cap,
                                              executor=config.executor)
    of_tables = search.runtime_lower_bound(tables)
    positions = search._runtime_position_bound(layers, config, CPU8, cache)
    positions_memory = search._runtime_position_bound(layers, config, CPU8, cache,
                                                      memory_cap=cap,
                                                      executor=config.executor)
    assert positions >= level2 and positions_memory >= with_memory, config.describe()
    problem = search.to_problem(tables)
    sol = solver.solve(problem)
    assignments = [(sol.choice, sol.stage)] + [_random_assignment(tables, rng)
                                               for _ in range(4)]
    for choice, stage in assignments:
      # The bounds hold whether or not a pipeline skips idle ticks' work (on CPU it
      # depends on the choice's automatic axes; on GPU and TPU it always does).
      runtime = min(cost.runtime_step_time_s(tables, choice, stage, executor=config.executor,
                                             skip_idle=skip)
                    for skip in ((None, False, True) if config.num_stages > 1 else (None,)))
      what = (config.describe(), choice, stage)
      assert 0 < level0 <= runtime * TOL, what
      assert level0 <= level2 * TOL or config.num_stages * config.num_microbatches == 1, what
      assert level2 <= runtime * TOL, what
      assert positions <= runtime * TOL, what
      if solver.evaluate(problem, choice, stage).fits:
        assert with_memory <= runtime * TOL, what
        assert positions_memory <= runtime * TOL, what
        assert of_tables <= runtime * TOL, what
      checked += 1
  assert checked >= 100


def test_memory_aware_bound_is_sound_and_tighter_under_a_tight_limit(gpt2):
  """Under a limit that rules out the fastest candidates, the Lagrangian bound is
  still below the runtime of every assignment that fits (the solver's, and random
  ones that happen to fit), and for some configuration above the plain bound."""
  graph, _, cache = gpt2
  rng = random.Random(1)
  batch, limit = graph.batch_size, 1.2e6
  tighter = 0
  for config in search.configurations(graph, CPU8, pp=1, global_batch=batch):
    tables = _tables(graph, config, cache, limit=limit)
    if not _usable(tables):
      continue
    problem = search.to_problem(tables)
    sol = solver.solve(problem)
    if not sol.choice:
      continue
    layers = cost.layer_costs(graph, CPU8, mesh=config.mesh,
                              microbatch=batch // config.num_microbatches, cache=cache)
    plain = search._runtime_layer_bound(layers, config, CPU8, cache)
    cap = limit - cost.reserve_bytes(layers)
    bound = search._runtime_layer_bound(layers, config, CPU8, cache, memory_cap=cap,
                                        executor=config.executor)
    tighter += bound > plain * TOL
    assignments = [(sol.choice, sol.stage)] + [_random_assignment(tables, rng)
                                               for _ in range(20)]
    for choice, stage in assignments:
      if solver.evaluate(problem, choice, stage).fits:
        runtime = cost.runtime_step_time_s(tables, choice, stage, executor=config.executor)
        assert bound <= runtime * TOL, config.describe()
  assert tighter > 0


def test_position_bound_is_never_looser_and_often_tighter(gpt2):
  """The position bound (kinds counted by their busiest stage, the stacks' all-to-alls,
  the sends) is at least the per-layer bound on every configuration, with and
  without memory, and strictly above it on some pipelined ones."""
  graph, _, cache = gpt2
  batch = graph.batch_size
  tighter = 0
  for config in search.configurations(graph, CPU8, global_batch=batch):
    layers = cost.layer_costs(graph, CPU8, mesh=config.mesh,
                              microbatch=batch // config.num_microbatches, cache=cache)
    cap = CPU8.memory_bytes - cost.reserve_bytes(layers)
    for memory_cap, executor in ((None, None), (cap, None), (cap, config.executor)):
      old = search._runtime_layer_bound(layers, config, CPU8, cache, memory_cap=memory_cap,
                                        executor=executor)
      new = search._runtime_position_bound(layers, config, CPU8, cache,
                                           memory_cap=memory_cap, executor=executor)
      assert new >= old, config.describe()
      tighter += new > old * TOL
  assert tighter > 0


def _brute_least_counts(kinds, counts, memory, cap, num_stages, cost_of):
  """Every split of the layers into num_stages contiguous, possibly empty stages."""
  from itertools import combinations_with_replacement
  n, best = len(kinds), math.inf
  for cuts in combinations_with_replacement(range(n + 1), num_stages - 1):
    bounds = [0, *cuts, n]
    caps, fits = [0] * len(counts), True
    for s in range(num_stages):
      part = range(bounds[s], bounds[s + 1])
      if memory is not None and sum(memory[i][s] for i in part) > cap:
        fits = False
      for g in range(len(counts)):
        caps[g] = max(caps[g], sum(kinds[i] == g for i in part))
    if fits:
      best = min(best, cost_of(caps))
  return best


def test_least_counts_is_the_least_over_contiguous_splits():
  """`_least_counts` (greedy per cap vector, bisection on the last kind) equals the
  least cost over every contiguous split, with and without per-stage memory."""
  rng = random.Random(3)
  for trial in range(300):
    num_kinds = rng.randint(1, 3)
    n = rng.randint(1, 9)
    kinds = [rng.randrange(num_kinds) for _ in range(n)]
    counts = [kinds.count(g) for g in range(num_kinds)]
    weights = [rng.uniform(0.1, 2.0) for _ in range(num_kinds)]
    cost_of = lambda caps: sum(w * m for w, m in zip(weights, caps))
    stages = rng.randint(1, 4)
    memory, cap = None, math.inf
    if trial % 2:
      memory = [[rng.uniform(0.5, 1.5) for _ in range(stages)] for _ in range(n)]
      cap = rng.uniform(1.0, 5.0)
    got = search._least_counts(kinds, counts, memory, cap, stages, cost_of)
    want = _brute_least_counts(kinds, counts, memory, cap * (1 + solver.MEMORY_RTOL),
                               stages, cost_of)
    assert got == pytest.approx(want, rel=1e-12, abs=0) or got == want == math.inf, (
        kinds, stages, memory, cap)


def _least_runtime(graph, cache, **knobs):
  """Every configuration built and solved to its paper optimum, no bound, no cutoff:
  the least runtime step time of those answers whose runtime memory fits."""
  batch, limit = graph.batch_size, knobs.pop("memory_limit_bytes", None)
  best = math.inf
  for config in search.configurations(graph, CPU8, global_batch=batch, **knobs):
    tables = _tables(graph, config, cache, limit=limit)
    if not _usable(tables):
      continue
    sol = solver.solve(search.to_problem(tables))
    if not sol.choice:
      continue
    # What plan.apply would hold must fit too: the search rejects the others.
    need = max(cost.runtime_memory_bytes(tables, sol.choice, sol.stage,
                                         executor=config.executor))
    if need <= (limit or CPU8.memory_bytes) * (1 + solver.MEMORY_RTOL):
      best = min(best, cost.runtime_step_time_s(tables, sol.choice, sol.stage,
                                                executor=config.executor))
  return best


@pytest.mark.parametrize("knobs", [
    dict(),
    dict(pp=2, memory_limit_bytes=2.5e6),
    dict(pp=1, memory_limit_bytes=1.5e6),
])
def test_runtime_search_returns_the_least_runtime_over_configurations(gpt2, knobs):
  graph, args, cache = gpt2
  want = _least_runtime(graph, cache, **dict(knobs))
  assert math.isfinite(want)
  plan = search.plan_graph(graph, CPU8, args=args, objective="runtime", cache=cache, **knobs)
  assert plan.solver.status == "optimal"
  assert plan.predicted.runtime_step_time_s == pytest.approx(want, rel=1e-9)
  unpruned = search.plan_graph(graph, CPU8, args=args, prune=False, cache=cache, **knobs)
  assert unpruned.predicted.runtime_step_time_s == pytest.approx(want, rel=1e-9)
  if not knobs:  # some configurations were skipped unsolved, and rightly so
    assert plan.solver.skipped > 0


def test_the_two_objectives_rank_by_their_own_figure(gpt2):
  graph, args, cache = gpt2
  runtime = search.plan_graph(graph, CPU8, args=args, cache=cache)  # the default
  paper = search.plan_graph(graph, CPU8, args=args, objective="paper", cache=cache)
  assert runtime.predicted.runtime_step_time_s <= paper.predicted.runtime_step_time_s * TOL
  assert paper.predicted.step_time_s <= runtime.predicted.step_time_s * TOL
  for plan, objective in ((runtime, "runtime"), (paper, "paper")):
    if "objective" in {f.name for f in dataclasses.fields(plans.SolverStats)}:
      assert plan.solver.objective == objective


def test_progress_reports_runtime_figures(gpt2):
  graph, args, cache = gpt2
  seen = []
  plan = search.plan_graph(graph, CPU8, args=args, pp=2, num_microbatches=4,
                           progress=seen.append, cache=cache)
  assert seen[-1].incumbent == pytest.approx(plan.predicted.runtime_step_time_s, rel=1e-12)
  assert all(p.bound >= p.incumbent for p in seen if p.status == "pruned")


@pytest.mark.parametrize("bad", ["fast", "Runtime", None, 1])
def test_an_unknown_objective_says_what_is_allowed(gpt2, bad):
  graph, args, _ = gpt2
  with pytest.raises(ValueError, match=r"objective=.*allowed: 'runtime' .* or 'paper'"):
    search.plan_graph(graph, CPU8, args=args, objective=bad)


# Warm start.


def _warm_flag(plan):
  return getattr(plan.solver, "warm_start", None)


@pytest.fixture(scope="module")
def baseline(gpt2):
  graph, args, cache = gpt2
  return baselines.data_parallel(graph, CPU8, args=args, cache=cache)


@pytest.mark.parametrize("objective", ["runtime", "paper"])
def test_a_warm_start_comes_back_when_time_runs_out(gpt2, baseline, objective):
  graph, args, _ = gpt2
  plan = search.plan_graph(graph, CPU8, args=args, objective=objective, incumbent=baseline,
                           time_limit_s=1e-9)
  assert plan.solver.status == "time_limit" and plan.solver.gap > 0
  assert _warm_flag(plan) in (None, True)
  assert (plan.mesh_axes, plan.stages, plan.num_microbatches, plan.schedule) == (
      baseline.mesh_axes, baseline.stages, baseline.num_microbatches, baseline.schedule)
  assert plan.predicted == baseline.predicted and plan.leaf_specs == baseline.leaf_specs
  # Without the warm start the same budget finds nothing.
  with pytest.raises(ValueError, match="ran out before any plan was found"):
    search.plan_graph(graph, CPU8, args=args, objective=objective, time_limit_s=1e-9)


@pytest.mark.parametrize("objective", ["runtime", "paper"])
def test_with_time_a_warm_start_never_makes_the_plan_worse(gpt2, baseline, objective):
  graph, args, cache = gpt2
  value = lambda p: (p.predicted.runtime_step_time_s if objective == "runtime"
                     else p.predicted.step_time_s)
  cold = search.plan_graph(graph, CPU8, args=args, objective=objective, cache=cache)
  warm = search.plan_graph(graph, CPU8, args=args, objective=objective, cache=cache,
                           incumbent=baseline)
  assert cold.solver.status == warm.solver.status == "optimal"
  assert value(warm) <= value(baseline) * TOL
  assert value(warm) == pytest.approx(value(cold), rel=1e-9)
  # The optimum itself as the warm start: nothing is strictly better, so it comes back.
  again = search.plan_graph(graph, CPU8, args=args, objective=objective, cache=cache,
                            incumbent=cold)
  assert again.solver.status == "optimal" and _warm_flag(again) in (None, True)
  assert (again.mesh_axes, again.stages, again.predicted) == (
      cold.mesh_axes, cold.stages, cold.predicted)


def test_a_warm_start_from_elsewhere_is_refused(gpt2, baseline):
  graph, args, cache = gpt2
  with pytest.raises(TypeError, match="incumbent must be a uniap_jax.Plan"):
    search.plan_graph(graph, CPU8, args=args, incumbent=baseline.to_json())
  with pytest.raises(ValueError, match="it has pp=1 but pp=2 is pinned"):
    search.plan_graph(graph, CPU8, args=args, pp=2, incumbent=baseline)
  with pytest.raises(ValueError, match="its global batch is 16, not 8"):
    search.plan_graph(graph, CPU8, args=args, global_batch=8, incumbent=baseline)
  with pytest.raises(ValueError, match="over the limit"):
    search.plan_graph(graph, CPU8, args=args, memory_limit_bytes=1e3, incumbent=baseline)
  other, _ = _trace("gpt2", batch=8)
  with pytest.raises(ValueError, match="made for another program"):
    search.plan_graph(other, CPU8, global_batch=16, incumbent=baseline)
  unpriced = dataclasses.replace(
      baseline, predicted=dataclasses.replace(baseline.predicted, runtime_step_time_s=0.0))
  with pytest.raises(ValueError, match="no runtime step time to start from"):
    search.plan_graph(graph, CPU8, args=args, incumbent=unpriced)
  # The paper objective does not need it.
  got = search.plan_graph(graph, CPU8, args=args, objective="paper", incumbent=unpriced,
                          cache=cache)
  assert got.predicted.step_time_s <= baseline.predicted.step_time_s * TOL


# The solver's memory under "runtime": the per-layer runtime model.


def _paper_and_runtime(graph, config, cache, limit=None):
  return (_tables(graph, config, cache, limit, objective="paper"),
          _tables(graph, config, cache, limit, objective="runtime"))


def test_paper_tables_keep_the_paper_memory(gpt2):
  """executor=None (objective "paper", the baselines) is the paper's memory exactly:
  each layer's activations times the micro-batches in flight on its stage."""
  graph, _, cache = gpt2
  for config in search.configurations(graph, CPU8, pp=2, global_batch=graph.batch_size):
    if config.num_microbatches not in (2, 8):
      continue
    tables = _tables(graph, config, cache, objective="paper")
    assert tables.executor is None
    for l in tables.layers:
      for s, row in enumerate(tables.memory_by_stage(l.name)):
        f = cost.microbatches_in_flight(config.schedule, config.num_microbatches, 2, s)
        assert row == l.memory_bytes(f, True)


def test_runtime_memory_is_far_below_the_papers_for_gpipe_with_many_microbatches(gpt2):
  """GPipe's executor holds one micro-batch's activations and a stash of stage inputs,
  not M micro-batches' activations: per layer the runtime model charges less than the
  paper's on every stage once M is large, and equal on one stage and micro-batch."""
  graph, _, cache = gpt2
  config = next(c for c in search.configurations(graph, CPU8, pp=2, num_microbatches=16,
                                                 schedule="gpipe",
                                                 global_batch=graph.batch_size))
  paper, runtime = _paper_and_runtime(graph, config, cache)
  assert runtime.executor == "gpipe-remat"
  lower = 0
  for l in runtime.layers:
    p = paper.layer(l.name)
    for k, cand in enumerate(l.candidates):
      kp = p.candidates.index(cand) if cand in p.candidates else None
      if kp is None:
        continue
      got = runtime.memory_by_stage(l.name)[0][k]
      lower += got < min(row[kp] for row in paper.memory_by_stage(l.name))
  assert lower > 0
  one = next(c for c in search.configurations(graph, CPU8, pp=1, num_microbatches=1,
                                              global_batch=graph.batch_size))
  paper, runtime = _paper_and_runtime(graph, one, cache)
  assert [paper.memory_by_stage(l.name) for l in paper.layers] == [
      runtime.memory_by_stage(l.name) for l in runtime.layers]


@pytest.fixture(scope="module")
def llama_paper():
  """Llama-7B at its paper size, 64 samples: 32 blocks whose activations dwarf their
  inputs, where the paper's M x activations matter."""
  return (*_trace("llama_7b", batch=64, size="paper"), {})


def test_runtime_solves_a_gpipe_configuration_the_paper_memory_rules_out(llama_paper):
  """pp=2, 32 micro-batches, GPipe, under a limit between the two models' least
  figures: the paper's memory has no feasible assignment, the runtime model's has, and
  the plan the search returns fits the limit at runtime (`cost.runtime_memory_bytes`).
  The limit: halfway between the least memory each model's search reports."""
  graph, args, cache = llama_paper
  knobs = dict(pp=2, num_microbatches=32, schedule="gpipe")
  configs = search.configurations(graph, CPU8, global_batch=graph.batch_size, **knobs)
  least = {}
  for objective in ("paper", "runtime"):
    # The least per-device memory any assignment needs under the model: the solver's
    # least peak under a limit nothing meets, plus the memory kept free.
    least[objective] = min(
        solver.solve(dataclasses.replace(search.to_problem(tables), memory_limit=1.0)
                     ).min_peak_memory + tables.reserve_bytes
        for tables in (_tables(graph, c, cache, objective=objective) for c in configs))
  assert least["runtime"] < least["paper"]
  limit = (least["runtime"] + least["paper"]) / 2
  for config in configs:
    paper = _tables(graph, config, cache, limit, objective="paper")
    if _usable(paper):
      assert solver.solve(search.to_problem(paper)).status == "infeasible", config.describe()
  with pytest.raises(search.InfeasibleError):
    search.plan_graph(graph, CPU8, objective="paper", memory_limit_bytes=limit,
                      cache=cache, **knobs)
  plan = search.plan_graph(graph, CPU8, objective="runtime", memory_limit_bytes=limit,
                           cache=cache, **knobs)
  assert plan.solver.status == "optimal"
  assert max(plan.predicted.runtime_memory_per_device_bytes) <= limit * (
      1 + solver.MEMORY_RTOL)
  # The solver's own figure (its constraint, with the transient) fits as well.
  assert max(plan.predicted.memory_per_device_bytes) <= limit * (1 + solver.MEMORY_RTOL)


def test_runtime_memory_checks_agree_with_the_runtime_tables(gpt2):
  """Under "runtime" the search's exact and relaxed memory tests (`_check_layers` with
  the executor) rule out only configurations whose runtime tables have no feasible
  assignment, and their bounds stay below the solved configurations' runtime."""
  graph, _, _ = gpt2
  cache, batch, limit = {}, graph.batch_size, 1.2e6
  configs = search.configurations(graph, CPU8, pp=2, global_batch=batch)
  configs += search.configurations(graph, CPU8, pp=1, global_batch=batch)
  loop = search._Search(graph=graph, cluster=CPU8, configs=configs, cache=cache,
                        limit=limit, memory_limit_bytes=limit, global_batch=batch,
                        deadline=math.inf, progress=None, objective="runtime")
  statuses = set()
  for config in configs:
    tables = _tables(graph, config, cache, limit)
    scaled = loop._check(config, exact=False)
    exact = loop._check(config, exact=True)
    if not _usable(tables):
      assert not exact.feasible, config.describe()
      statuses.add("infeasible")
      continue
    sol = solver.solve(search.to_problem(tables))
    statuses.add(sol.status)
    if sol.status == "infeasible":
      continue
    assert scaled.feasible and exact.feasible, config.describe()
    runtime = cost.runtime_step_time_s(tables, sol.choice, sol.stage,
                                       executor=config.executor)
    assert exact.bound <= runtime * TOL, config.describe()
    assert search.runtime_lower_bound(tables) <= runtime * TOL, config.describe()
  assert statuses == {"optimal", "infeasible"}


def test_runtime_memory_scaled_from_a_larger_microbatch_bounds_the_smaller_ones(gpt2):
  """The relaxed test's scaling holds for the runtime model: per layer, the leanest
  candidate's runtime memory at b samples is at least that at B > b with its
  batch-proportional terms scaled by b / B."""
  from uniap_jax import strategies
  graph, _, cache = gpt2
  for mesh in strategies.mesh_shapes(CPU8, 4)[:3]:
    big = cost.layer_costs(graph, CPU8, mesh=mesh, microbatch=16, cache=cache)
    produced = {v for l in big for v in l.output_ids}
    for small_b in (1, 4):
      small = cost.layer_costs(graph, CPU8, mesh=mesh, microbatch=small_b, cache=cache)
      for m in (2, 16):
        for lb, ls in zip(big, small):
          for executor in ("gpipe-remat", "1f1b"):
            kw = dict(executor=executor, num_stages=2, num_microbatches=m,
                      produced=produced)
            want = min(cost.runtime_layer_memory_bytes(ls, **kw))
            got = min(cost.runtime_layer_memory_bytes(lb, batch_scale=small_b / 16, **kw))
            assert got <= want * (1 + 1e-9), (lb.name, small_b, m, executor)
