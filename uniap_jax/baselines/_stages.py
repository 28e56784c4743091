"""Restricted problems, per-stage solves and stage splits shared by the baselines."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import time

from uniap_jax import graph as graph_lib
from uniap_jax import solver
from uniap_jax.baselines import _candidates
from uniap_jax.baselines import _loop


def restricted(problem: solver.Problem, allowed: _candidates.Allowed) -> solver.Problem:
  """The same problem with each layer's candidates limited to `allowed` (in that order)."""
  layers = []
  for u, layer in enumerate(problem.layers):
    ks = allowed[layer.name]
    rows = problem.stage_memory_table(u)
    layers.append(solver.Layer(
        name=layer.name, time=[layer.time[k] for k in ks], memory=[rows[0][k] for k in ks],
        memory_by_stage=[[row[k] for k in ks] for row in rows]))
  return dataclasses.replace(problem, layers=layers,
                             edges=_restricted_edges(problem, allowed, None))


def _restricted_edges(problem: solver.Problem, allowed: _candidates.Allowed,
                      names: set[str] | None) -> list[solver.Edge]:
  out = []
  for e in problem.edges:
    if names is not None and not (e.src in names and e.dst in names):
      continue
    a, b = allowed[e.src], allowed[e.dst]
    out.append(solver.Edge(src=e.src, dst=e.dst,
                           same_stage=[[e.same_stage[i][j] for j in b] for i in a],
                           cross_stage=[[e.cross_stage[i][j] for j in b] for i in a]))
  return out


def stage_problem(problem: solver.Problem, stage: int, members: Sequence[int],
                  allowed: _candidates.Allowed) -> solver.Problem:
  """One stage's layers alone, as a one-stage problem whose objective is the stage time."""
  layers = []
  for u in members:
    layer = problem.layers[u]
    ks = allowed[layer.name]
    row = problem.stage_memory_table(u)[stage]
    layers.append(solver.Layer(name=layer.name, time=[layer.time[k] for k in ks],
                               memory=[row[k] for k in ks]))
  names = {problem.layers[u].name for u in members}
  return solver.Problem(layers=layers, edges=_restricted_edges(problem, allowed, names),
                        num_stages=1, num_microbatches=1, memory_limit=problem.memory_limit)


def all_candidates(problem: solver.Problem) -> dict[str, tuple[int, ...]]:
  return {l.name: tuple(range(l.num_candidates)) for l in problem.layers}


def solve_fixed_stages(problem: solver.Problem, stage_of: Mapping[str, int],
                       allowed: _candidates.Allowed, deadline: float) -> _loop.Attempt:
  """Per stage, the fastest choice within `allowed` under the memory limit.

  Each stage is solved exactly on its own (edges inside it included), as Alpa's
  intra-op pass and Galvatron's per-stage dynamic program do; sends between stages
  are left to the joint evaluation.
  """
  start = time.perf_counter()
  choice: dict[str, int] = {}
  exact = True
  for s in range(problem.num_stages):
    members = [u for u, l in enumerate(problem.layers) if stage_of[l.name] == s]
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
      return _loop.Attempt(reason="time limit", time_s=time.perf_counter() - start)
    sol = solver.solve(stage_problem(problem, s, members, allowed), time_limit_s=remaining)
    if not sol.choice:
      if sol.status == "infeasible":
        return _loop.Attempt(exact=True, needed_bytes=sol.min_peak_memory,
                             reason=f"stage {s} does not fit in memory",
                             time_s=time.perf_counter() - start)
      return _loop.Attempt(reason="time limit", time_s=time.perf_counter() - start)
    exact &= sol.status == "optimal"
    for name, j in sol.choice.items():
      choice[name] = allowed[name][j]
  return _loop.Attempt(choice=choice, stage=dict(stage_of), exact=exact,
                       time_s=time.perf_counter() - start)


def min_max_split(num_layers: int, num_stages: int,
                  stage_cost: Callable[[int, int, int], float]) -> tuple[float, list[int]]:
  """Contiguous split of layers 0..n-1 into non-empty stages, least largest stage cost.

  `stage_cost(a, b, s)` is the cost of layers a..b-1 on stage s (math.inf: not
  allowed). Among splits with the least largest cost, the one with the least sum of
  squared stage costs (the most even) is returned; remaining ties keep the earliest
  boundaries, so the result is deterministic.

  Returns:
    (the largest stage cost, per layer its stage), or (math.inf, []) when no split
    is allowed.
  """
  worst, _ = _split_dp(num_layers, num_stages, stage_cost, lambda acc, c: max(acc, c))
  if worst == math.inf:
    return math.inf, []

  def capped(a: int, b: int, s: int) -> float:
    c = stage_cost(a, b, s)
    return c if c <= worst else math.inf

  _, stage_of = _split_dp(num_layers, num_stages, capped, lambda acc, c: acc + c * c)
  return worst, stage_of


def _split_dp(n: int, k: int, stage_cost: Callable[[int, int, int], float],
              combine: Callable[[float, float], float]) -> tuple[float, list[int]]:
  """Best contiguous split of n layers into k stages under an objective that `combine`
  accumulates stage by stage (monotone in its first argument)."""
  best = [[math.inf] * (n + 1) for _ in range(k + 1)]
  cut = [[-1] * (n + 1) for _ in range(k + 1)]
  best[0][0] = 0.0
  for s in range(1, k + 1):
    for b in range(s, n - (k - s) + 1):
      for a in range(s - 1, b):
        if best[s - 1][a] == math.inf:
          continue
        c = stage_cost(a, b, s - 1)
        if c == math.inf:
          continue
        value = combine(best[s - 1][a], c)
        if value < best[s][b]:
          best[s][b], cut[s][b] = value, a
  if best[k][n] == math.inf:
    return math.inf, []
  stage_of = [0] * n
  b = n
  for s in range(k, 0, -1):
    a = cut[s][b]
    for u in range(a, b):
      stage_of[u] = s - 1
    b = a
  return best[k][n], stage_of


def uniform_stages(graph: graph_lib.LayerGraph, num_stages: int) -> dict[str, int]:
  """Megatron's split: the repeated blocks as evenly as possible, contiguous.

  Blocks are the layers whose signature repeats (all layers when fewer than
  `num_stages` repeat); the others (embedding, norms, heads) join the stage of the
  block before them, or the first stage before the first block.
  """
  counts = collections.Counter(l.signature for l in graph.layers)
  blocks = [i for i, l in enumerate(graph.layers) if counts[l.signature] > 1]
  if len(blocks) < num_stages:
    blocks = list(range(len(graph.layers)))
  block_stage = {i: j * num_stages // len(blocks) for j, i in enumerate(blocks)}
  out, current = {}, 0
  for i, layer in enumerate(graph.layers):
    current = block_stage.get(i, current)
    out[layer.name] = current
  return out


def prefix(values: Sequence[float]) -> list[float]:
  """Prefix sums: prefix(v)[b] - prefix(v)[a] = sum(v[a:b])."""
  out = [0.0]
  for v in values:
    out.append(out[-1] + v)
  return out
