"""Tests of uniap_jax.solver: exactness against enumeration, statuses, validation."""

import ast
import math
import pathlib
import time

import numpy as np
import pytest

from uniap_jax import solver
from uniap_jax.solver import _chain_sweeps
from uniap_jax.solver import _hub
from uniap_jax.solver import _labels
from uniap_jax.solver import _miqp
from uniap_jax.solver import _one_stage
from uniap_jax.solver import _tables

NUM_RANDOM = 300


def independent_objective(problem, choice, stage):
  """The DESIGN.md semantics, written out plainly: (objective, fits in memory)."""
  num_stages = problem.num_stages
  p = [0.0] * num_stages
  o = [0.0] * (num_stages - 1)
  memory = [0.0] * num_stages
  for layer in problem.layers:
    s, k = stage[layer.name], choice[layer.name]
    p[s] += layer.time[k]
    table = layer.memory if layer.memory_by_stage is None else layer.memory_by_stage[s]
    memory[s] += table[k]
  for edge in problem.edges:
    a, b = stage[edge.src], stage[edge.dst]
    k, l = choice[edge.src], choice[edge.dst]
    if a == b:
      p[a] += edge.same_stage[k][l]
    for j in range(a, b):  # once per boundary crossed
      o[j] += edge.cross_stage[k][l]
  objective = sum(p) + sum(o) + (problem.num_microbatches - 1) * max(p + o)
  fits = max(memory) <= problem.memory_limit * (1 + 1e-9)
  return objective, fits


def check_assignment_shape(problem, sol):
  names = [layer.name for layer in problem.layers]
  assert sorted(sol.choice) == sorted(names) and sorted(sol.stage) == sorted(names)
  stages = [sol.stage[name] for name in names]
  assert stages[0] == 0 and all(b - a in (0, 1) for a, b in zip(stages, stages[1:]))
  assert stages[-1] == problem.num_stages - 1  # non-decreasing, every stage used
  for layer in problem.layers:
    assert 0 <= sol.choice[layer.name] < layer.num_candidates


def random_problem(seed: int) -> solver.Problem:
  """2-8 layers, 1-4 stages, 1-4 candidates; chains (even seeds) or DAGs (odd seeds)."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 9))
  num_stages = int(rng.integers(1, min(4, n) + 1))
  counts = [int(rng.integers(1, 5)) for _ in range(n)]
  while math.prod(counts) * math.comb(n - 1, num_stages - 1) > 60_000:  # brute force budget
    counts[int(np.argmax(counts))] -= 1
  integer = rng.random() < 0.3  # small integers make ties
  draw = (lambda lo, hi, size: rng.integers(lo, hi + 1, size).astype(float)) if integer else (
      lambda lo, hi, size: rng.uniform(lo, hi, size))
  by_stage = rng.random() < 0.35
  layers = []
  for u, k in enumerate(counts):
    memory = draw(1, 10, k)
    rows = None
    if by_stage:
      rows = memory[None, :] * (1 + 0.5 * rng.random((num_stages, 1))) + draw(0, 2, (num_stages, k))
    layers.append(solver.Layer(name=f"l{u}", time=draw(1, 9, k) / 4, memory=memory, memory_by_stage=rows))
  pairs = [(u, u + 1) for u in range(n - 1) if rng.random() < 0.85]
  if seed % 2 and n >= 3:
    skips = {(int(u), int(rng.integers(u + 2, n))) for u in rng.integers(0, n - 2, int(rng.integers(1, 4)))}
    pairs += sorted(skips)
  edges = []
  for u, v in pairs:
    same = draw(0, 3, (counts[u], counts[v])) / 8 * (rng.random((counts[u], counts[v])) < 0.7)
    edges.append(solver.Edge(src=f"l{u}", dst=f"l{v}", same_stage=same,
                             cross_stage=draw(0, 6, (counts[u], counts[v])) / 8))
  lean = sum(min(min(row) for row in (l.memory_by_stage or [l.memory])) for l in layers)
  fat = sum(max(max(row) for row in (l.memory_by_stage or [l.memory])) for l in layers)
  fraction = rng.choice([0.6, 0.9, 1.0, 1.1, 1.3, 1.6, 2.0, 100.0])
  limit = max(lean / num_stages, max(min(l.memory) for l in layers)) * fraction
  if fraction == 100.0:
    limit = fat * 2
  return solver.Problem(layers=layers, edges=edges, num_stages=num_stages,
                        num_microbatches=int(rng.choice([1, 2, 3, 8, 32])), memory_limit=float(limit))


@pytest.mark.parametrize("seed", range(NUM_RANDOM))
def test_solve_matches_brute_force(seed):
  problem = random_problem(seed)
  reference = solver.brute_force(problem)
  methods = ["auto", "miqp"] if seed % 3 == 0 else ["auto"]
  for method in methods:
    sol = solver.solve(problem, method=method)
    if reference.status == "infeasible":
      assert sol.status == "infeasible" and not sol.choice
      assert sol.min_peak_memory == pytest.approx(reference.min_peak_memory, rel=1e-9)
      assert "memory_limit" in sol.message
      continue
    assert sol.status == "optimal", (method, sol)
    check_assignment_shape(problem, sol)
    objective, fits = independent_objective(problem, sol.choice, sol.stage)
    assert fits
    assert objective == pytest.approx(sol.objective, rel=1e-9)
    assert sol.objective == pytest.approx(reference.objective, rel=1e-6)
    assert sol.gap == 0.0 and sol.bound == sol.objective


def solved_as_brute_force(problem: solver.Problem) -> solver.Solution:
  """`solver.solve`'s answer, checked against brute force and an independent evaluation."""
  reference = solver.brute_force(problem)
  sol = solver.solve(problem)
  assert sol.status == reference.status
  if sol.status == "optimal":
    assert sol.objective == pytest.approx(reference.objective, rel=1e-9)
    assert independent_objective(problem, sol.choice, sol.stage) == (pytest.approx(sol.objective), True)
  return sol


@pytest.mark.parametrize("seed", range(40))
def test_one_stage_dags_match_brute_force(seed):
  # One stage: every edge is local and an exact DP handles any DAG with few pending edges.
  rng = np.random.default_rng(1000 + seed)
  n = int(rng.integers(3, 9))
  counts = [int(rng.integers(1, 5)) for _ in range(n)]
  while math.prod(counts) > 20_000:
    counts[int(np.argmax(counts))] -= 1
  layers = [solver.Layer(name=f"l{u}", time=rng.uniform(0.2, 2, k), memory=rng.uniform(1, 9, k))
            for u, k in enumerate(counts)]
  pairs = {(u, u + 1) for u in range(n - 1)} | {
      (int(u), int(rng.integers(u + 2, n))) for u in rng.integers(0, n - 2, int(rng.integers(1, 6)))}
  edges = [solver.Edge(src=f"l{u}", dst=f"l{v}", same_stage=rng.uniform(0, 1, (counts[u], counts[v])),
                       cross_stage=np.zeros((counts[u], counts[v]))) for u, v in sorted(pairs)]
  limit = sum(np.mean(l.memory) for l in layers) * rng.choice([0.5, 0.9, 1.2])
  problem = solver.Problem(layers=layers, edges=edges, num_microbatches=int(rng.choice([1, 4])),
                           memory_limit=float(limit))
  sol = solved_as_brute_force(problem)
  if sol.status == "optimal":
    tables = _tables.prune(_tables.build(problem))
    assert sol.method == ("one_stage_dp" if _one_stage.supported(tables) else "miqp") or (
        sol.method == "chain_dp")  # the chain relaxation's bound can settle it first


def layout_dag(seed: int) -> solver.Problem:
  """A one-stage DAG whose candidates share a few output layouts (edge entries depend
  on the layouts alone, as resharding does), under a tight to slack memory limit."""
  rng = np.random.default_rng(5000 + seed)
  n = int(rng.integers(4, 9))
  counts = [int(rng.integers(2, 6)) for _ in range(n)]
  while math.prod(counts) > 20_000:
    counts[int(np.argmax(counts))] -= 1
  layouts = [rng.integers(0, 2, k) for k in counts]
  reshard = rng.uniform(0, 1, (2, 2)) * (1 - np.eye(2))
  layers = [solver.Layer(name=f"l{u}", time=rng.uniform(0.2, 2, k), memory=rng.uniform(1, 9, k))
            for u, k in enumerate(counts)]
  pairs = {(u, u + 1) for u in range(n - 1)} | {
      (int(u), int(rng.integers(u + 2, n))) for u in rng.integers(0, n - 2, int(rng.integers(1, 4)))}
  edges = [solver.Edge(src=f"l{u}", dst=f"l{v}",
                       same_stage=reshard[layouts[u][:, None], layouts[v][None, :]],
                       cross_stage=np.zeros((counts[u], counts[v]))) for u, v in sorted(pairs)]
  limit = sum(np.mean(l.memory) for l in layers) * rng.choice([0.7, 1.0, 1.5, 10.0])
  return solver.Problem(layers=layers, edges=edges, num_microbatches=int(rng.choice([1, 4])),
                        memory_limit=float(limit))


@pytest.mark.parametrize("seed", range(40))
def test_one_stage_sweep_over_layout_classes_matches_brute_force(seed):
  """Labels carry candidate classes (equal outgoing edge rows) and drop labels slower
  than one that fits any completion: still exact."""
  solved_as_brute_force(layout_dag(seed))


@pytest.mark.parametrize("seed", range(6))
def test_one_stage_sweep_too_large_goes_on_to_the_miqp(seed, monkeypatch):
  monkeypatch.setattr(_one_stage, "MAX_EXTENSIONS", 1)
  problem = layout_dag(seed)
  reference = solver.brute_force(problem)
  sol = solver.solve(problem)
  assert sol.status == reference.status
  if sol.status == "optimal":
    assert sol.method != "one_stage_dp"
    assert sol.objective == pytest.approx(reference.objective, rel=1e-9)


NUM_HUB = 80


def hub_problem(seed: int) -> solver.Problem:
  """3-8 layers, 2-4 stages; skip edges all leave one or two source layers (T5-like)."""
  rng = np.random.default_rng(5000 + seed)
  n = int(rng.integers(3, 9))
  num_stages = int(rng.integers(2, min(4, n) + 1))
  counts = [int(rng.integers(1, 5)) for _ in range(n)]
  while math.prod(counts) * math.comb(n - 1, num_stages - 1) > 40_000:  # brute force budget
    counts[int(np.argmax(counts))] -= 1
  integer = rng.random() < 0.3
  draw = (lambda lo, hi, size: rng.integers(lo, hi + 1, size).astype(float)) if integer else (
      lambda lo, hi, size: rng.uniform(lo, hi, size))
  layers = [solver.Layer(name=f"l{u}", time=draw(1, 9, k) / 4, memory=draw(1, 10, k))
            for u, k in enumerate(counts)]
  pairs = {(u, u + 1) for u in range(n - 1) if rng.random() < 0.9}
  sources = sorted({int(s) for s in rng.integers(0, n - 2, int(rng.integers(1, 3)))})
  for source in sources:
    targets = [v for v in range(source + 2, n) if rng.random() < 0.7]
    pairs |= {(source, v) for v in targets or [int(rng.integers(source + 2, n))]}
  # Sources whose first two candidates cost the same on every skip edge (one layout,
  # say, with and without recomputation): the solver fixes them as one class.
  twins = {s for s in sources if counts[s] >= 2 and rng.random() < 0.4}
  edges = []
  flat = rng.random() < 0.3  # send cost independent of the destination's candidate
  for u, v in sorted(pairs):
    same = draw(0, 3, (counts[u], counts[v])) / 8 * (rng.random((counts[u], counts[v])) < 0.7)
    cross = draw(0, 6, (counts[u], counts[v])) / 8
    if flat and v > u + 1:
      cross = np.repeat(cross[:, :1], counts[v], axis=1)
    if u in twins and v > u + 1:
      same[1], cross[1] = same[0], cross[0]
    edges.append(solver.Edge(src=f"l{u}", dst=f"l{v}", same_stage=same, cross_stage=cross))
  lean = sum(min(l.memory) for l in layers)
  limit = max(lean / num_stages, max(min(l.memory) for l in layers)) * rng.choice([0.9, 1.1, 1.5, 3.0, 100.0])
  return solver.Problem(layers=layers, edges=edges, num_stages=num_stages,
                        num_microbatches=int(rng.choice([1, 2, 8])), memory_limit=float(limit))


def test_hub_problems_cover_classes():
  tables = [_tables.prune(_tables.build(hub_problem(seed))) for seed in range(NUM_HUB)]
  sizes = [len(c) for t in tables for s in _hub._sources(t) for c in _hub._classes(t, s)]
  assert max(sizes) >= 2 and min(sizes) == 1
  assert {len(_hub._sources(t)) for t in tables} == {1, 2}


@pytest.mark.parametrize("seed", range(NUM_HUB))
def test_hub_dags_match_brute_force(seed):
  problem = hub_problem(seed)
  assert _hub.supported(_tables.prune(_tables.build(problem)))
  reference = solver.brute_force(problem)
  for method in ["auto", "miqp"] if seed % 4 == 0 else ["auto"]:
    sol = solver.solve(problem, method=method)
    if reference.status == "infeasible":
      assert sol.status == "infeasible"
      continue
    assert sol.status == "optimal", (method, sol)
    check_assignment_shape(problem, sol)
    assert independent_objective(problem, sol.choice, sol.stage) == (pytest.approx(sol.objective, rel=1e-9), True)
    assert sol.objective == pytest.approx(reference.objective, rel=1e-6)


def test_hub_bounds_and_assignments_are_valid():
  # Per source combination the expanded chain undercharges only the excess of a send
  # over its row's least entry: the bound never exceeds the optimum and the assignment
  # is real; they often meet (sends independent of the destination, or no excess used).
  methods = []
  for seed in range(40):
    problem = hub_problem(seed)
    reference = solver.brute_force(problem)
    if reference.status != "optimal":
      continue
    tables = _tables.prune(_tables.build(problem))
    result = _hub.solve_hub(tables, upper_bound=math.inf, deadline=math.inf, scip=False)
    assert not result.scip_used and result.bound <= reference.objective * (1 + 1e-9)
    assert result.objective >= reference.objective * (1 - 1e-9)
    objective = _tables.evaluate(tables, result.stages, result.choice)[0]
    assert objective == pytest.approx(result.objective, rel=1e-12)
    cut = _hub.solve_hub(tables, upper_bound=reference.objective, deadline=math.inf, scip=False)
    assert cut.choice is None and cut.bound <= reference.objective * (1 + 1e-9)
    # With SCIP on the combinations left open, the bound proves the optimum.
    proof = _hub.solve_hub(tables, upper_bound=math.inf, deadline=math.inf)
    assert proof.objective == pytest.approx(reference.objective, rel=1e-6)
    assert proof.bound >= proof.objective * (1 - 1e-6)
    methods.append(solver.solve(problem).method)
  assert methods.count("hub_dp") >= len(methods) // 4  # the DPs alone prove a good share


NUM_MULTI = 100
NUM_MULTI_FAST = 25  # the other seeds are marked slow: `pytest -m slow`


def multi_source_problem(seed: int) -> tuple[solver.Problem, dict[int, str]]:
  """7-9 layers, 2-4 stages, skip edges from 4-6 sources (T5: encoder output, position
  biases, shared embedding). A source's skip tables are constant, equal in every row
  (one layout for all its candidates), or free. Returns the problem and each source's kind."""
  rng = np.random.default_rng(9000 + seed)
  n = int(rng.integers(7, 10))
  num_stages = int(rng.integers(2, 5))
  counts = [int(rng.integers(1, 4)) for _ in range(n)]
  while math.prod(counts) * math.comb(n - 1, num_stages - 1) > 6_000:  # brute force budget
    counts[int(np.argmax(counts))] -= 1
  draw = lambda lo, hi, size: rng.integers(lo, hi + 1, size).astype(float)
  layers = [solver.Layer(name=f"l{u}", time=draw(1, 9, k) / 4, memory=draw(1, 10, k))
            for u, k in enumerate(counts)]
  pairs = {(u, u + 1) for u in range(n - 1) if rng.random() < 0.9}
  num_sources = int(rng.integers(4, 7))
  sources = sorted(int(s) for s in rng.choice(n - 2, size=min(num_sources, n - 2), replace=False))
  kinds = {s: str(rng.choice(["constant", "rows", "free"])) for s in sources}
  tables = {}
  for source in sources:
    targets = [v for v in range(source + 2, n) if rng.random() < 0.6]
    for v in targets or [int(rng.integers(source + 2, n))]:
      pairs.add((source, v))
  for u, v in sorted(pairs):
    shape = (counts[u], counts[v])
    same = draw(0, 3, shape) / 8 * (rng.random(shape) < 0.7)
    cross = draw(0, 6, shape) / 8
    if v > u + 1 and kinds[u] == "constant":
      same, cross = np.full(shape, same[0, 0]), np.full(shape, cross[0, 0])
    elif v > u + 1 and kinds[u] == "rows":
      same, cross = np.repeat(same[:1], counts[u], axis=0), np.repeat(cross[:1], counts[u], axis=0)
    tables[u, v] = (same, cross)
  edges = [solver.Edge(src=f"l{u}", dst=f"l{v}", same_stage=same, cross_stage=cross)
           for (u, v), (same, cross) in tables.items()]
  lean = sum(min(l.memory) for l in layers)
  limit = max(lean / num_stages, max(min(l.memory) for l in layers)) * rng.choice([0.9, 1.1, 1.5, 3.0, 100.0])
  problem = solver.Problem(layers=layers, edges=edges, num_stages=num_stages,
                           num_microbatches=int(rng.choice([1, 2, 8])), memory_limit=float(limit))
  return problem, kinds


def test_multi_source_problems_cover_kinds():
  count = 0
  for seed in range(NUM_MULTI):
    problem, kinds = multi_source_problem(seed)
    tables = _tables.build(problem)  # unpruned: every candidate still there
    assert len(_hub._sources(tables)) >= 4
    for s, kind in kinds.items():
      if kind != "free":  # rows that agree make one class: nothing to enumerate
        assert len(_hub._classes(tables, s)) == 1
    count += any(len(_hub._classes(tables, s)) > 1 for s in kinds)
  assert count >= NUM_MULTI // 3


@pytest.mark.parametrize("seed", [
    seed if seed < NUM_MULTI_FAST else pytest.param(seed, marks=pytest.mark.slow)
    for seed in range(NUM_MULTI)])
def test_multi_source_dags_match_brute_force(seed):
  problem, _ = multi_source_problem(seed)
  tables = _tables.prune(_tables.build(problem))
  reference = solver.brute_force(problem)
  sol = solver.solve(problem)
  if reference.status == "infeasible":
    assert sol.status == "infeasible"
    return
  assert sol.status == "optimal", sol
  check_assignment_shape(problem, sol)
  assert independent_objective(problem, sol.choice, sol.stage) == (pytest.approx(sol.objective, rel=1e-9), True)
  assert sol.objective == pytest.approx(reference.objective, rel=1e-6)
  if tables.skips and _hub.supported(tables):
    # The branch and bound over source classes alone (no SCIP): a valid bound and a
    # real assignment.
    result = _hub.solve_hub(tables, upper_bound=math.inf, deadline=math.inf, scip=False)
    assert result.bound <= reference.objective * (1 + 1e-9)
    assert result.objective >= reference.objective * (1 - 1e-9)


def test_multi_source_dags_mostly_solved_by_chain_dps():
  methods = []
  for seed in range(NUM_MULTI):
    problem, _ = multi_source_problem(seed)
    tables = _tables.prune(_tables.build(problem))
    if problem.num_stages > 1 and tables.skips:
      assert _hub.supported(tables)  # at most a few flags, however many sources
      methods.append(solver.solve(problem).method)
  assert len(methods) >= NUM_MULTI // 2
  # The chain DPs alone prove a good share; the rest need SCIP on a few leaves (sends
  # whose cost depends on the destination's candidate) or fit nowhere ("bound").
  assert methods.count("hub_dp") >= len(methods) // 5, methods


def test_hub_solves_t5_like_dag_without_scip():
  # Encoder blocks, then decoder blocks that all read the last encoder block; sends do
  # not depend on the destination's candidate, so the relaxation is exact.
  base = transformer_like(8, 3, 4, 1.2)
  layers = list(base.layers[:-1])
  layers += [solver.Layer(name=f"dec{i}", time=[1.2, 1.6, 2.4], memory=[6.5, 4.0, 2.5]) for i in range(4)]
  layers.append(base.layers[-1])
  names = [layer.name for layer in layers]
  counts = {layer.name: layer.num_candidates for layer in layers}
  edges = []
  for a, b in zip(names, names[1:]):
    reshard = np.full((counts[a], counts[b]), 0.2)
    reshard[np.arange(min(counts[a], counts[b])), np.arange(min(counts[a], counts[b]))] = 0.0
    edges.append(solver.Edge(src=a, dst=b, same_stage=reshard, cross_stage=reshard + 0.4))
  for i in range(1, 4):
    edges.append(solver.Edge(src="block7", dst=f"dec{i}", same_stage=np.full((3, 3), 0.05),
                             cross_stage=np.array([[0.3] * 3, [0.2] * 3, [0.25] * 3])))
  problem = solver.Problem(layers=layers, edges=edges, num_stages=3, num_microbatches=4,
                           memory_limit=base.memory_limit * 1.6)
  auto = solver.solve(problem)
  scip = solver.solve(problem, method="miqp")
  assert auto.method == "hub_dp" and auto.status == scip.status == "optimal"
  assert auto.objective == pytest.approx(scip.objective, rel=1e-7)
  assert independent_objective(problem, auto.choice, auto.stage) == (pytest.approx(auto.objective), True)


def test_random_problems_cover_the_cases():
  problems = [random_problem(seed) for seed in range(NUM_RANDOM)]
  statuses = [solver.brute_force(p).status for p in problems[:60]]
  assert "infeasible" in statuses and "optimal" in statuses
  assert any(p.edges and any(abs(int(e.dst[1:]) - int(e.src[1:])) > 1 for e in p.edges) for p in problems)
  assert any(l.memory_by_stage is not None for p in problems for l in p.layers)
  assert {p.num_stages for p in problems} == {1, 2, 3, 4}
  assert {len(p.layers) for p in problems} == set(range(2, 9))


def test_brute_force_objective_is_independent():
  for seed in range(40):
    problem = random_problem(seed)
    reference = solver.brute_force(problem)
    if reference.status == "optimal":
      assert independent_objective(problem, reference.choice, reference.stage) == (
          pytest.approx(reference.objective, rel=1e-12), True)


def test_lower_bounds_are_valid():
  # The bounds that prune the search never exceed the optimum (incumbent cutoffs rely on it).
  for seed in range(60):
    problem = random_problem(seed)
    reference = solver.brute_force(problem)
    if reference.status == "optimal":
      tables = _tables.build(problem)
      assert _tables.trivial_bound(tables) <= reference.objective * (1 + 1e-12)
      at_optimum = solver.solve(problem, incumbent=reference.objective)
      assert at_optimum.status == "cutoff" and at_optimum.bound <= reference.objective * (1 + 1e-9)


def transformer_like(num_blocks, num_stages, num_microbatches, limit_factor, *, by_stage=False,
                     diagonal=0.0):
  """embed + identical blocks (3 candidates, asymmetric resharding) + head."""
  time = [1.0, 1.4, 2.1]
  memory = np.array([6.0, 3.5, 2.0])
  reshard = np.array([[0.0, 0.3, 0.5], [0.2, 0.0, 0.25], [0.6, 0.1, 0.0]]) + diagonal * np.eye(3)
  send = [[0.4, 0.7, 0.9], [0.6, 0.3, 0.8], [1.0, 0.7, 0.2]]
  rows = (memory[None, :] * (1 + 0.25 * np.arange(num_stages)[::-1, None])).tolist() if by_stage else None
  layers = [solver.Layer(name="embed", time=[0.5, 0.9], memory=[3.0, 1.0])]
  layers += [solver.Layer(name=f"block{i}", time=time, memory=memory, memory_by_stage=rows)
             for i in range(num_blocks)]
  layers.append(solver.Layer(name="head", time=[0.7, 1.2], memory=[2.5, 1.5]))
  edges = [solver.Edge(src="embed", dst="block0", same_stage=[[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]],
                       cross_stage=[[0.5, 0.6, 0.7], [0.7, 0.6, 0.5]])]
  edges += [solver.Edge(src=f"block{i}", dst=f"block{i + 1}", same_stage=reshard, cross_stage=send)
            for i in range(num_blocks - 1)]
  edges.append(solver.Edge(src=f"block{num_blocks - 1}", dst="head",
                           same_stage=[[0.2, 0.0], [0.1, 0.1], [0.0, 0.3]],
                           cross_stage=[[0.6, 0.4], [0.5, 0.5], [0.4, 0.6]]))
  limit = limit_factor * (num_blocks * 3.5 + 6) / num_stages * (2.0 if by_stage else 1.0)
  return solver.Problem(layers=layers, edges=edges, num_stages=num_stages,
                        num_microbatches=num_microbatches, memory_limit=limit)


@pytest.mark.parametrize("num_stages,num_microbatches,by_stage", [
    (1, 4, False), (2, 1, False), (2, 8, True), (3, 4, False), (3, 16, True), (4, 8, False)])
def test_identical_blocks_match_brute_force(num_stages, num_microbatches, by_stage):
  problem = transformer_like(6, num_stages, num_microbatches, 1.1, by_stage=by_stage, diagonal=0.05)
  reference = solver.brute_force(problem)
  sol = solver.solve(problem)
  assert sol.status == reference.status == "optimal"
  assert sol.objective == pytest.approx(reference.objective, rel=1e-9)


def dp_agrees_with_scip(problem):
  """Solves a chain with the DP and with SCIP alone: both proven, same objective, and
  the DP's assignment re-evaluated independently. Returns the DP's solution."""
  dp = solver.solve(problem, method="dp")
  scip = solver.solve(problem, method="miqp")
  assert dp.method == "chain_dp" and scip.method == "miqp"
  assert dp.status == scip.status == "optimal"
  assert dp.objective == pytest.approx(scip.objective, rel=1e-7)
  assert independent_objective(problem, dp.choice, dp.stage) == (pytest.approx(dp.objective), True)
  return dp


@pytest.mark.parametrize("num_stages,num_microbatches,by_stage", [
    (1, 4, False), (2, 8, False), (3, 4, True), (4, 1, False), (4, 16, True)])
def test_twelve_identical_blocks_dp_matches_scip(num_stages, num_microbatches, by_stage):
  problem = transformer_like(12, num_stages, num_microbatches, 1.05, by_stage=by_stage)
  dp = dp_agrees_with_scip(problem)


def test_identical_blocks_mix_candidates_under_memory():
  # With a binding limit the optimum mixes candidates inside a run of identical blocks,
  # and resharding costs decide their order (not simply sorted).
  problem = transformer_like(12, 3, 8, 1.3)
  sol = solver.solve(problem)
  assert solver.solve(problem, method="miqp").objective == pytest.approx(sol.objective, rel=1e-7)
  for s in range(3):
    names = [f"block{i}" for i in range(12) if sol.stage[f"block{i}"] == s]
    assert len({sol.choice[name] for name in names}) > 1
    # Sorting a stage's candidates (ascending or descending) never helps, and here it
    # hurts in at least one direction: an aggregate model may not assume sorted runs.
    for reverse in (False, True):
      ordered = dict(sol.choice)
      ordered.update(zip(names, sorted((sol.choice[name] for name in names), reverse=reverse)))
      assert independent_objective(problem, ordered, sol.stage)[0] >= sol.objective - 1e-9
  sorted_up = dict(sol.choice)
  sorted_down = dict(sol.choice)
  for s in range(3):
    names = [f"block{i}" for i in range(12) if sol.stage[f"block{i}"] == s]
    sorted_up.update(zip(names, sorted(sol.choice[name] for name in names)))
    sorted_down.update(zip(names, sorted((sol.choice[name] for name in names), reverse=True)))
  assert independent_objective(problem, sorted_up, sol.stage)[0] > sol.objective + 1e-6
  assert independent_objective(problem, sorted_down, sol.stage)[0] > sol.objective + 1e-6


@pytest.mark.parametrize("group_scale", [1, 10 ** 15])  # the second forces the lexsort path
def test_pareto_keeps_exactly_the_undominated_labels(group_scale):
  rng = np.random.default_rng(group_scale % 97)
  for _ in range(20):
    size = int(rng.integers(1, 300))
    grp = rng.integers(0, 4, size) * group_scale
    time = rng.integers(0, 12, size).astype(float)  # small integers: many exact ties
    mem = rng.integers(0, 12, size).astype(float)
    labels = _labels.pareto(grp, time, mem, np.arange(size), np.zeros(size, dtype=np.int64))
    kept = {(int(g), float(t), float(m)) for g, t, m in zip(labels.grp, labels.time, labels.mem)}
    assert len(kept) == len(labels)  # exact duplicates kept once
    expected = {(int(g), float(t), float(m)) for g, t, m in zip(grp, time, mem)
                if not np.any((grp == g) & (time <= t) & (mem <= m) & ((time < t) | (mem < m)))}
    assert kept == expected
    order = np.lexsort((labels.mem, labels.grp))
    assert np.array_equal(order, np.arange(len(labels)))  # sorted by (group, memory)


NUM_ONE_F_ONE_B = 140


def one_f_one_b_problem(seed: int) -> solver.Problem:
  """1F1B-like: memory on stage i is static + min(S - i, c) x kept activations.

  Candidates share a few boundary layouts (resharding and sends depend on the layouts
  only), as the cost model's candidates do, and half the problems repeat one block
  between a first and a last layer. Chains only; 3-8 layers, 2-4 stages, 1-5 candidates.
  """
  rng = np.random.default_rng(50_000 + seed)
  n = int(rng.integers(3, 9))
  num_stages = int(rng.integers(2, min(4, n) + 1))
  num_microbatches = int(rng.choice([1, 2, 3, 4, 8]))
  counts = [int(rng.integers(1, 6)) for _ in range(n)]
  while math.prod(counts) * math.comb(n - 1, num_stages - 1) > 40_000:  # brute force budget
    counts[int(np.argmax(counts))] -= 1
  blocks = rng.random() < 0.5
  if blocks:
    counts[1:-1] = [min(counts[1:-1])] * (n - 2)
  integer = rng.random() < 0.3  # small integers make ties
  draw = (lambda lo, hi, size: rng.integers(lo, hi + 1, size).astype(float)) if integer else (
      lambda lo, hi, size: rng.uniform(lo, hi, size))
  num_layouts = int(rng.integers(1, 4))
  reshard = draw(0, 3, (num_layouts, num_layouts)) / 8 * (1 - np.eye(num_layouts))
  send = draw(1, 6, (num_layouts, num_layouts)) / 8
  kept = [min(num_stages - i, num_microbatches) for i in range(num_stages)]
  drawn = {}
  layers, layouts = [], []
  for u, k in enumerate(counts):
    key = "block" if blocks and 0 < u < n - 1 else u
    if key not in drawn:
      # Some candidates send a little more (their rows of cross_stage differ while
      # same_stage rows agree), so resharding and sending group candidates differently.
      extra = (rng.random(k) < 0.3) * 0.25
      drawn[key] = (draw(1, 9, k) / 4, draw(1, 6, k), draw(0, 4, k) / 2,
                    rng.integers(0, num_layouts, k), extra)
    time, static, activations, layout, extra = drawn[key]
    rows = [static + kept[i] * activations for i in range(num_stages)]
    layers.append(solver.Layer(name=f"l{u}", time=time, memory=rows[0], memory_by_stage=rows))
    layouts.append((layout, extra))
  edges = [solver.Edge(src=f"l{u}", dst=f"l{u + 1}",
                       same_stage=reshard[np.ix_(layouts[u][0], layouts[u + 1][0])],
                       cross_stage=send[np.ix_(layouts[u][0], layouts[u + 1][0])]
                       + layouts[u][1][:, None])
           for u in range(n - 1)]
  lean = sum(min(layer.memory_by_stage[0]) for layer in layers)
  fraction = rng.choice([0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 100.0])
  limit = max(lean / num_stages, max(min(layer.memory_by_stage[0]) for layer in layers)) * fraction
  return solver.Problem(layers=layers, edges=edges, num_stages=num_stages,
                        num_microbatches=num_microbatches, memory_limit=float(limit))


def test_one_f_one_b_problems_cover_the_cases():
  problems = [one_f_one_b_problem(seed) for seed in range(NUM_ONE_F_ONE_B)]
  statuses = [solver.brute_force(p).status for p in problems[:60]]
  assert "infeasible" in statuses and "optimal" in statuses
  assert {p.num_stages for p in problems} == {2, 3, 4}
  # Candidates share layouts: the DP's classes are coarser than the candidates.
  assert any(len({edge.same_stage[k] + edge.cross_stage[k] for k in range(len(edge.same_stage))})
             < len(edge.same_stage) for p in problems for edge in p.edges)
  # Stage memory decreases with the stage, as 1F1B keeps fewer micro-batches later.
  assert any(l.memory_by_stage[0] != l.memory_by_stage[-1] for p in problems for l in p.layers)


@pytest.mark.parametrize("seed", range(NUM_ONE_F_ONE_B))
def test_one_f_one_b_matches_brute_force(seed):
  problem = one_f_one_b_problem(seed)
  reference = solver.brute_force(problem)
  sol = solver.solve(problem)
  if reference.status == "infeasible":
    assert sol.status == "infeasible" and not sol.choice
    assert sol.min_peak_memory == pytest.approx(reference.min_peak_memory, rel=1e-9)
    return
  assert sol.status == "optimal", sol
  check_assignment_shape(problem, sol)
  objective, fits = independent_objective(problem, sol.choice, sol.stage)
  assert fits and objective == pytest.approx(sol.objective, rel=1e-9)
  assert sol.objective == pytest.approx(reference.objective, rel=1e-6)
  # The per-stage partition bound holds for the optimum: objective, peak and sum.
  bound = _tables.partition_bound(_tables.build(problem))
  assert bound.objective <= reference.objective * (1 + 1e-9)
  stage_times = reference.stage_times + reference.send_times
  assert bound.peak <= max(reference.stage_times) * (1 + 1e-9)
  assert bound.total <= sum(stage_times) * (1 + 1e-9)
  at_optimum = solver.solve(problem, incumbent=reference.objective)
  assert at_optimum.status == "cutoff" and at_optimum.bound <= reference.objective * (1 + 1e-9)
  # Where stages may start and end: the optimum's boundaries are never ruled out.
  tables = _tables.build(problem)
  before, after = _tables.stage_reach(tables)
  stage = [reference.stage[layer.name] for layer in problem.layers]
  starts = [stage.index(i) for i in range(problem.num_stages)]
  ends = starts[1:] + [len(stage)]
  p = reference.stage_times
  for i in range(problem.num_stages):
    assert before[i, starts[i]] <= max(p[:i], default=0.0) * (1 + 1e-9)
    assert after[i, ends[i]] <= max(p[i + 1:], default=0.0) * (1 + 1e-9)
  dp = _chain_sweeps.ChainDP(tables, upper_bound=reference.objective, deadline=math.inf)
  dp._reach()
  assert all(dp.start_ok[i, starts[i]] and dp.end_ok[i, ends[i]] for i in range(problem.num_stages))


@pytest.mark.parametrize("num_stages,num_microbatches", [(3, 2), (3, 8), (4, 4), (4, 16)])
def test_one_f_one_b_chain_dp_matches_scip(num_stages, num_microbatches):
  # Ten identical blocks with layouts (two candidates share one), 1F1B memory.
  kept = [min(num_stages - i, num_microbatches) for i in range(num_stages)]
  layout = np.array([0, 0, 1])
  reshard = np.array([[0.0, 0.35], [0.2, 0.0]])
  send = np.array([[0.4, 0.8], [0.7, 0.3]])
  static, activations = np.array([2.0, 1.0, 1.5]), np.array([1.5, 2.5, 0.5])
  rows = [(static + k * activations).tolist() for k in kept]
  layers = [solver.Layer(name="embed", time=[0.6], memory=[1.0], memory_by_stage=[[1.0]] * num_stages)]
  layers += [solver.Layer(name=f"block{i}", time=[1.0, 0.8, 1.7], memory=rows[0], memory_by_stage=rows)
             for i in range(10)]
  layers.append(solver.Layer(name="head", time=[0.9, 1.3], memory=[2.0, 1.0],
                             memory_by_stage=[[2.0, 1.0]] * num_stages))
  names = [layer.name for layer in layers]
  layouts = [np.array([0])] + [layout] * 10 + [np.array([0, 1])]
  edges = [solver.Edge(src=names[u], dst=names[u + 1],
                       same_stage=reshard[np.ix_(layouts[u], layouts[u + 1])],
                       cross_stage=send[np.ix_(layouts[u], layouts[u + 1])])
           for u in range(len(layers) - 1)]
  lean = sum(min(row) for row in rows[-1:]) * 10 / num_stages
  problem = solver.Problem(layers=layers, edges=edges, num_stages=num_stages,
                           num_microbatches=num_microbatches, memory_limit=1.3 * lean + 3.0)
  dp = dp_agrees_with_scip(problem)
  # The memory limit binds: stage 0 (most micro-batches kept) cannot take the fastest
  # candidate everywhere.
  assert max(dp.stage_memory) > 0.8 * problem.memory_limit


@pytest.mark.parametrize("method", ["auto", "miqp"])
def test_deterministic(method):
  problems = [random_problem(seed) for seed in (1, 6, 11, 12)] + [transformer_like(12, 3, 8, 1.05)]
  for problem in problems:
    first, again = (solver.solve(problem, method=method) for _ in range(2))
    assert (first.choice, first.stage, first.objective, first.status) == (
        again.choice, again.stage, again.objective, again.status)


def test_infeasible_reports_least_peak_memory():
  layers = [solver.Layer(name=f"l{i}", time=[1.0, 2.0], memory=[4.0, 3.0]) for i in range(4)]
  problem = solver.Problem(layers=layers, num_stages=2, num_microbatches=2, memory_limit=5.0)
  sol = solver.solve(problem)
  assert sol.status == "infeasible" and sol.objective == math.inf and sol.choice == {}
  assert sol.min_peak_memory == 6.0  # two leanest layers per stage
  assert "needs 6 on its fullest stage" in sol.message
  assert solver.brute_force(problem).min_peak_memory == 6.0
  feasible = solver.solve(solver.Problem(layers=layers, num_stages=2, num_microbatches=2, memory_limit=6.0))
  assert feasible.status == "optimal" and max(feasible.stage_memory) <= 6.0


def test_closed_form_optimum():
  # Four equal layers, fast candidate 1 s / 2 bytes, lean 2 s / 1 byte, limit 3 bytes per
  # stage: each stage holds one of each, p = 3 s, objective = 3 + 3 + (4 - 1) * 3 = 15.
  layers = [solver.Layer(name=f"l{i}", time=[1.0, 2.0], memory=[2.0, 1.0]) for i in range(4)]
  problem = solver.Problem(layers=layers, num_stages=2, num_microbatches=4, memory_limit=3.0)
  for method in ("auto", "miqp"):
    sol = solver.solve(problem, method=method)
    assert sol.objective == 15.0 and sol.stage_times == (3.0, 3.0) and sol.send_times == (0.0,)


def test_skip_edge_pays_every_boundary():
  layers = [solver.Layer(name=f"l{i}", time=[1.0], memory=[1.0]) for i in range(3)]
  edges = [solver.Edge(src="l0", dst="l2", same_stage=[[0.5]], cross_stage=[[2.0]])]
  problem = solver.Problem(layers=layers, edges=edges, num_stages=3, num_microbatches=1)
  sol = solver.solve(problem)
  assert sol.send_times == (2.0, 2.0) and sol.objective == 7.0
  assert solver.brute_force(problem).objective == 7.0


def test_incumbent_cutoff():
  problem = transformer_like(8, 2, 4, 1.1)
  best = solver.solve(problem)
  cut = solver.solve(problem, incumbent=best.objective)
  assert cut.status == "cutoff" and cut.choice == {} and cut.bound >= best.objective * (1 - 1e-9)
  assert "No assignment beats incumbent" in cut.message
  trivial = solver.solve(problem, incumbent=1e-3)
  assert trivial.status == "cutoff" and trivial.method == "bound"
  better = solver.solve(problem, incumbent=best.objective * 1.5)
  assert better.status == "optimal" and better.objective == pytest.approx(best.objective)
  dag = random_problem(1)
  reference = solver.brute_force(dag)
  assert solver.solve(dag, incumbent=reference.objective).status == "cutoff"
  assert solver.solve(dag, incumbent=reference.objective * 1.01).objective == pytest.approx(reference.objective)


def test_time_limit_chain_returns_assignment_with_gap():
  problem = transformer_like(24, 4, 16, 1.05)
  sol = solver.solve(problem, time_limit_s=1e-9)
  assert sol.status == "time_limit"
  assert 0 < sol.gap < math.inf and sol.bound < sol.objective
  assert independent_objective(problem, sol.choice, sol.stage)[1]
  assert "Time limit" in sol.message


def with_skip_edges(problem, pairs):
  names = [layer.name for layer in problem.layers]
  counts = {layer.name: layer.num_candidates for layer in problem.layers}
  edges = list(problem.edges)
  for u, v in pairs:
    src, dst = names[u], names[v]
    table = np.full((counts[src], counts[dst]), 0.3)
    table[0, :] = 0.05
    edges.append(solver.Edge(src=src, dst=dst, same_stage=table * 0.5, cross_stage=table))
  return solver.Problem(layers=problem.layers, edges=edges, num_stages=problem.num_stages,
                        num_microbatches=problem.num_microbatches, memory_limit=problem.memory_limit)


def test_dag_with_identical_blocks_matches_scip_without_dp_bound():
  problem = with_skip_edges(transformer_like(6, 3, 4, 1.1), [(1, 4), (1, 5), (1, 6)])
  auto = solver.solve(problem)
  plain = solver.solve(problem, method="miqp")
  reference = solver.brute_force(problem)
  assert auto.status == plain.status == "optimal"
  assert auto.objective == pytest.approx(reference.objective, rel=1e-9)
  assert plain.objective == pytest.approx(reference.objective, rel=1e-9)


def test_time_limit_dag_returns_assignment_with_gap():
  problem = with_skip_edges(transformer_like(12, 4, 8, 1.05), [(1, 6), (1, 9), (4, 12)])
  sol = solver.solve(problem, time_limit_s=1e-9)
  assert sol.status == "time_limit" and 0 < sol.gap < math.inf
  assert independent_objective(problem, sol.choice, sol.stage) == (pytest.approx(sol.objective), True)


def big_dag():
  """A DAG whose SCIP model takes visible time to build (tens of thousands of variables)."""
  pairs = [(1, v) for v in range(3, 42)] + [(20, v) for v in range(22, 42, 2)]
  return with_skip_edges(transformer_like(40, 4, 8, 1.05), pairs)


def test_miqp_stops_while_building_the_model():
  tables = _tables.prune(_tables.build(big_dag()))
  result = _miqp.solve_miqp(tables, objective_lb=1.5, deadline=time.perf_counter())
  assert (result.status, result.stages, result.nodes, result.bound) == ("time_limit", None, 0, 1.5)
  # A budget far too short for building and solving: it returns, with time_limit.
  result = _miqp.solve_miqp(tables, deadline=time.perf_counter() + 0.05)
  assert result.status == "time_limit"


def test_time_limit_miqp_returns_first_assignment():
  problem = big_dag()
  sol = solver.solve(problem, method="miqp", time_limit_s=0.05)
  assert sol.status == "time_limit" and sol.method in ("miqp", "chain_dp")
  assert sol.choice and 0 < sol.gap < math.inf and "Time limit" in sol.message
  assert independent_objective(problem, sol.choice, sol.stage) == (pytest.approx(sol.objective), True)


def test_scip_node_limit_maps_to_time_limit():
  # A node limit stops SCIP deterministically, like a time limit would.
  problem = transformer_like(12, 4, 8, 1.05)
  tables = _tables.prune(_tables.build(problem))
  result = _miqp.solve_miqp(tables, node_limit=1)
  full = solver.solve(problem)
  assert result.status in ("time_limit", "optimal")
  if result.status == "time_limit":
    assert result.bound <= full.objective * (1 + 1e-9)
  if result.stages is not None:
    assert _tables.evaluate(tables, result.stages, result.choice)[0] >= full.objective * (1 - 1e-9)


def test_dp_rejects_dags():
  with pytest.raises(ValueError, match="method='dp' solves chains only"):
    solver.solve(random_problem(1), method="dp")


def test_evaluate_matches_independent_evaluator():
  for seed in range(30):
    problem = random_problem(seed)
    rng = np.random.default_rng(seed)
    n, s = len(problem.layers), problem.num_stages
    cuts = sorted(rng.choice(np.arange(1, n), s - 1, replace=False)) if s > 1 else []
    stage = {l.name: int(np.searchsorted(cuts, u, side="right")) for u, l in enumerate(problem.layers)}
    choice = {l.name: int(rng.integers(l.num_candidates)) for l in problem.layers}
    evaluation = solver.evaluate(problem, choice, stage)
    objective, fits = independent_objective(problem, choice, stage)
    assert evaluation.objective == pytest.approx(objective, rel=1e-12) and evaluation.fits == fits


def test_dominated_candidates_are_pruned_exactly():
  # Candidate 1 is worse than candidate 0 everywhere, candidate 2 is a duplicate of 0.
  layers = [solver.Layer(name=f"l{i}", time=[1.0, 2.0, 1.0], memory=[1.0, 1.5, 1.0]) for i in range(3)]
  table = [[0.0, 0.1, 0.0], [0.1, 0.2, 0.1], [0.0, 0.1, 0.0]]
  edges = [solver.Edge(src=f"l{i}", dst=f"l{i + 1}", same_stage=table, cross_stage=table) for i in range(2)]
  problem = solver.Problem(layers=layers, edges=edges, num_stages=2, num_microbatches=2, memory_limit=10.0)
  tables = _tables.prune(_tables.build(problem))
  assert tables.num_candidates.tolist() == [1, 1, 1]
  assert solver.solve(problem).objective == solver.brute_force(problem).objective


VALIDATION = [
    (lambda: solver.Layer(name="a", time=[1, 2], memory=[1]), ValueError,
     "Layer 'a': memory has 1 entries but time has 2"),
    (lambda: solver.Layer(name="a", time=[1, -2], memory=[1, 1]), ValueError,
     "Layer 'a': time must be non-negative"),
    (lambda: solver.Layer(name="a", time=[1, float("nan")], memory=[1, 1]), ValueError,
     "Layer 'a': time must be finite"),
    (lambda: solver.Layer(name="a", time="12", memory=[1]), TypeError,
     "Layer 'a': time must be a sequence of numbers"),
    (lambda: solver.Layer(name="a", time=[], memory=[]), ValueError,
     "time must be a non-empty list of numbers"),
    (lambda: solver.Layer(name="", time=[1], memory=[1]), TypeError, "non-empty string"),
    (lambda: solver.Layer(name="a", time=[1, 2], memory=[1, 1], memory_by_stage=[[1, 1, 1]]),
     ValueError, r"memory_by_stage has shape \(1, 3\), expected \(num_stages, 2\)"),
    (lambda: solver.Edge(src="a", dst="b", same_stage=[[1, -1]], cross_stage=[[0, 0]]), ValueError,
     "Edge 'a' -> 'b': same_stage must be non-negative"),
]


def _layers(*counts):
  return [solver.Layer(name=f"l{i}", time=[1.0] * k, memory=[1.0] * k) for i, k in enumerate(counts)]


def _edge(src, dst, rows, cols, cols_cross=None):
  return solver.Edge(src=src, dst=dst, same_stage=np.zeros((rows, cols)),
                     cross_stage=np.zeros((rows, cols if cols_cross is None else cols_cross)))


VALIDATION += [
    (lambda: solver.Problem(layers=_layers(3, 5), edges=[_edge("l0", "l1", 3, 4)]), ValueError,
     r"Edge 'l0' -> 'l1': same_stage has shape \(3, 4\), expected \(3, 5\) for 3 and 5 candidates"),
    (lambda: solver.Problem(layers=_layers(3, 5), edges=[_edge("l0", "l1", 3, 5, 4)]), ValueError,
     r"cross_stage has shape \(3, 4\), expected \(3, 5\)"),
    (lambda: solver.Problem(layers=_layers(1, 1), edges=[_edge("l0", "l9", 1, 1)]), ValueError,
     "unknown dst layer 'l9'. Layers are 'l0', 'l1'"),
    (lambda: solver.Problem(layers=_layers(1, 1), edges=[_edge("l0", "L1", 1, 1)]), ValueError,
     "unknown dst layer 'L1'. Did you mean 'l1'"),
    (lambda: solver.Problem(layers=_layers(1, 1), edges=[_edge("l1", "l0", 1, 1)]), ValueError,
     "goes backwards: 'l0' is layer 0 but 'l1' is layer 1. List layers in a topological order"),
    (lambda: solver.Problem(layers=_layers(1, 1), edges=[_edge("l0", "l1", 1, 1)] * 2), ValueError,
     "appears twice"),
    (lambda: solver.Problem(layers=_layers(1, 1), num_stages=3), ValueError,
     "num_stages=3 exceeds the 2 layers; every stage needs a layer"),
    (lambda: solver.Problem(layers=_layers(1, 1), num_stages=0), ValueError,
     "num_stages must be at least 1, got 0"),
    (lambda: solver.Problem(layers=_layers(1, 1), num_stages=True), TypeError,
     "num_stages must be an int"),
    (lambda: solver.Problem(layers=_layers(1, 1), num_microbatches=2.5), TypeError,
     "num_microbatches must be an int"),
    (lambda: solver.Problem(layers=_layers(1, 1), memory_limit=-1), ValueError,
     "memory_limit must be positive"),
    (lambda: solver.Problem(layers=_layers(1) + _layers(1)), ValueError,
     "Layer name 'l0' appears twice"),
    (lambda: solver.Problem(layers=[]), ValueError, "Problem.layers is empty"),
    (lambda: solver.Problem(layers=[solver.Layer(name="a", time=[1], memory=[1],
                                                 memory_by_stage=[[1], [1]])], num_stages=1),
     ValueError, "memory_by_stage has 2 rows, expected num_stages=1"),
    (lambda: solver.solve(solver.Problem(layers=_layers(1)), time_limit_s=0), ValueError,
     "time_limit_s must be a positive number"),
    (lambda: solver.solve(solver.Problem(layers=_layers(1)), method="gurobi"), ValueError,
     "method='gurobi' is not one of"),
    (lambda: solver.solve(solver.Problem(layers=_layers(1)), incumbent="1"), TypeError,
     "incumbent must be a number"),
    (lambda: solver.brute_force(solver.Problem(layers=_layers(*[4] * 12), num_stages=3)), ValueError,
     "brute_force would enumerate"),
    (lambda: solver.evaluate(solver.Problem(layers=_layers(1, 1), num_stages=2),
                             {"l0": 0, "l1": 0}, {"l0": 1, "l1": 0}), ValueError,
     "Stages must be non-decreasing"),
]


@pytest.mark.parametrize("make,error,message", VALIDATION)
def test_validation_errors(make, error, message):
  with pytest.raises(error, match=message):
    make()


def test_contract_example_types():
  problem = solver.Problem(
      layers=[solver.Layer(name="l0", time=[1, 2], memory=[1e9, 5e8]),
              solver.Layer(name="l1", time=[1, 3], memory=[2e9, 1e9])],
      edges=[solver.Edge(src="l0", dst="l1", same_stage=[[0, 1], [1, 0]], cross_stage=[[1, 1], [1, 1]])],
      num_stages=2, num_microbatches=8, memory_limit=12e9)
  sol = solver.solve(problem, time_limit_s=30)
  assert isinstance(sol.choice, dict) and isinstance(sol.stage, dict)
  assert sol.stage == {"l0": 0, "l1": 1} and sol.status == "optimal"
  assert isinstance(sol.objective, float) and sol.gap == 0.0 and sol.time_s >= 0.0
  with pytest.raises(Exception):
    sol.objective = 1.0  # frozen


def test_solver_imports_only_numpy_pyscipopt_and_the_standard_library():
  import sys
  package = pathlib.Path(solver.__file__).parent
  allowed = {"numpy", "pyscipopt", "uniap_jax"} | set(sys.stdlib_module_names)
  for path in sorted(package.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        roots = [alias.name.split(".")[0] for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        roots = [(node.module or "").split(".")[0]]
        if node.module and node.module.startswith("uniap_jax"):
          assert node.module.startswith("uniap_jax.solver"), (path.name, node.module)
      else:
        continue
      assert set(roots) <= allowed, (path.name, roots)
