"""Exact reference by enumeration, for checking the solver on small problems.

It reads the Problem directly (not the solver's compiled tables) so that it shares no
code with the methods it checks.
"""

from __future__ import annotations

import itertools
import math
import time as time_lib

import numpy as np

from uniap_jax.solver import _problem

# Default ceiling on (stage splits) x (candidate combinations) that brute_force enumerates;
# about a second of numpy work.
MAX_ASSIGNMENTS = 2_000_000


def brute_force(problem: _problem.Problem, *, max_assignments: int = MAX_ASSIGNMENTS) -> _problem.Solution:
  """Solves `problem` by trying every stage split and every candidate combination.

  Ties go to the first assignment in enumeration order (stage splits, then candidate
  combinations, both lexicographic).

  Args:
    problem: a small problem.
    max_assignments: refuse problems with more assignments than this.
  Returns:
    A Solution with status "optimal" or "infeasible" and method "brute_force".
  Raises:
    ValueError: the problem has more than max_assignments assignments.
  """
  start = time_lib.perf_counter()
  layers = problem.layers
  n, num_stages, c = len(layers), problem.num_stages, problem.num_microbatches
  counts = [layer.num_candidates for layer in layers]
  combinations = math.prod(counts)
  splits = math.comb(n - 1, num_stages - 1)
  if combinations * splits > max_assignments:
    raise ValueError(
        f"brute_force would enumerate {splits} stage splits x {combinations} candidate "
        f"combinations = {splits * combinations} assignments, more than "
        f"max_assignments={max_assignments}. Use solve(), or raise max_assignments.")
  combos = np.indices(counts).reshape(n, -1).T  # [combinations, n], lexicographic
  position = {layer.name: u for u, layer in enumerate(layers)}
  layer_time = [np.asarray(layer.time)[combos[:, u]] for u, layer in enumerate(layers)]
  layer_memory = [np.asarray(problem.stage_memory_table(u))[:, combos[:, u]] for u in range(n)]
  edges = []
  for edge in problem.edges:
    u, v = position[edge.src], position[edge.dst]
    same = np.asarray(edge.same_stage)[combos[:, u], combos[:, v]]
    cross = np.asarray(edge.cross_stage)[combos[:, u], combos[:, v]]
    edges.append((u, v, same, cross))
  limit = problem.memory_limit * (1 + _problem.MEMORY_RTOL)
  best = (math.inf, None, None)
  least_peak = math.inf
  for cuts in itertools.combinations(range(1, n), num_stages - 1):
    stage = np.zeros(n, dtype=np.int64)
    for cut in cuts:
      stage[cut:] += 1
    p = np.zeros((num_stages, len(combos)))
    o = np.zeros((max(num_stages - 1, 1), len(combos)))
    memory = np.zeros((num_stages, len(combos)))
    for u in range(n):
      p[stage[u]] += layer_time[u]
      memory[stage[u]] += layer_memory[u][stage[u]]
    for u, v, same, cross in edges:
      if stage[u] == stage[v]:
        p[stage[u]] += same
      else:
        o[stage[u]:stage[v]] += cross
    peak = memory.max(axis=0)
    least_peak = min(least_peak, float(peak.min()))
    objective = p.sum(axis=0) + o.sum(axis=0) + (c - 1) * np.maximum(p.max(axis=0), o.max(axis=0))
    objective[peak > limit] = np.inf
    j = int(np.argmin(objective))
    if objective[j] < best[0]:
      best = (float(objective[j]), stage.copy(), combos[j].copy())
  elapsed = time_lib.perf_counter() - start
  if best[1] is None:
    return _problem.Solution(
        choice={}, stage={}, objective=math.inf, status="infeasible", gap=math.inf,
        time_s=elapsed, bound=math.inf, method="brute_force", min_peak_memory=least_peak,
        message=(f"No assignment fits memory_limit={problem.memory_limit:.6g}: the leanest "
                 f"needs {least_peak:.6g} on its fullest stage."))
  choice = {layer.name: int(best[2][u]) for u, layer in enumerate(layers)}
  stage = {layer.name: int(best[1][u]) for u, layer in enumerate(layers)}
  evaluation = _problem.evaluate(problem, choice, stage)
  return _problem.Solution(
      choice=choice, stage=stage, objective=evaluation.objective, status="optimal", gap=0.0,
      time_s=elapsed, bound=evaluation.objective, method="brute_force",
      min_peak_memory=least_peak, stage_times=evaluation.stage_times,
      send_times=evaluation.send_times, stage_memory=evaluation.stage_memory)
