"""Exact dynamic program for chains: every edge joins neighbours in the layer order.

Why it is exact. Fix the stage boundaries and the candidates of the layers next to them
(they decide the send times o_j). The objective sum_i p_i + sum_j o_j + (c - 1) max(p, o)
does not decrease when any p_i grows, and stage i's inner candidates touch nothing but
p_i and stage i's memory. So each stage may take, independently, its fastest inner
candidates within the memory limit: P_i(a, b, alpha, beta) = least time of a stage on
layers [a, b) whose first layer takes alpha and last takes beta. A label-setting sweep
computes it exactly for any resharding tables: labels (time, memory) per (alpha, beta),
Pareto-pruned, grown one layer at a time. No order of candidates inside a run of equal
blocks is assumed: with asymmetric resharding neither ascending nor descending order is
optimal in general (tests/test_solver.py has an instance). For a bottleneck value T,
G(T) = least sum_i p_i + sum_j o_j over assignments whose every p_i and o_j is at most
T: a shortest path over (boundary, stage, candidate) through segments with P_i <= T.
The optimum is min over T of G(T) + (c - 1) T, with T among the finitely many maxima
assignments have; `_Search` finds it by branch and bound over intervals of T, using that
an assignment with max in [lo, hi] costs at least G(hi) + (c - 1) lo, and that
evaluating G at T settles [max of its argmin, T].

The sweeps that make G cheap to evaluate (labels grouped by boundary class, a trie
shared by identical layers, reach and Lagrangian pruning) are in `_chain_sweeps`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uniap_jax.solver import _chain_sweeps
from uniap_jax.solver import _tables

# Relative slack in comparisons against the upper bound, so that float rounding never
# drops the assignment that attains it.
_REL_TOL = 1e-12


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result:
  """The DP's answer. `stages`/`choice` are None when nothing beat the upper bound."""

  objective: float
  stages: np.ndarray | None
  choice: np.ndarray | None
  bound: float
  timed_out: bool
  evaluations: int


def solve_chain(tables: _tables.Tables, *, upper_bound: float = np.inf, incumbent=None,
                deadline: float = np.inf, heuristics: bool = True, bounds: bool = True,
                partition: _tables.PartitionBound | None = None) -> Result:
  """Exact optimum of a chain `tables` (its skip edges, if any, are ignored).

  Args:
    tables: the problem.
    upper_bound: only assignments with a smaller objective are sought.
    incumbent: (stages, choice) attaining upper_bound, returned if nothing beats it.
    deadline: time.perf_counter() value after which the search stops.
    heuristics: first solve a few one-candidate-per-layer restrictions (cheap) for an
      upper bound that prunes the sweeps.
    bounds: use the per-stage partition bounds (`_tables.partition_bound`); the cheap
      restrictions above skip them, their sweeps are short anyway.
    partition: those bounds if already computed for these time and memory tables.
  Returns:
    The best assignment found (choice in `tables`' candidate indices), a proven lower
    bound on the chain's optimum (at least upper_bound when nothing beat it), and
    whether time ran out.
  """
  relaxed = tables.chain_relaxation()
  search = _Search(relaxed, upper_bound, incumbent, bounds=bounds, partition=partition)
  try:
    if heuristics and int(relaxed.num_candidates.max()) > 1:
      # Upper bounds, cheap first: one candidate per layer along the time-memory
      # trade-off, then the exact optimum over the union of those candidates.
      choices = _trade_off_choices(relaxed)
      # Every other selection (and the leanest) alone: the union below needs them all,
      # but one-candidate solves of neighbouring weights mostly repeat each other.
      for keep in choices[::2] + choices[-1:]:
        sub = relaxed.restrict([np.array([k]) for k in keep])
        result = solve_chain(sub, upper_bound=search.best[0], deadline=deadline, heuristics=False,
                             bounds=False)
        if result.choice is not None:
          search.offer(result.objective, result.stages, np.asarray(keep))
      union = [np.unique([keep[u] for keep in choices]) for u in range(relaxed.n)]
      if 1 < max(len(k) for k in union) and any(len(k) < c for k, c in zip(union, relaxed.num_candidates)):
        sub = relaxed.restrict(union)
        result = solve_chain(sub, upper_bound=search.best[0], deadline=deadline, heuristics=False,
                             bounds=False)
        if result.choice is not None:
          choice = np.array([union[u][k] for u, k in enumerate(result.choice)])
          search.offer(result.objective, result.stages, choice)
    dp = _chain_sweeps.ChainDP(relaxed, upper_bound=search.best[0], deadline=deadline,
                               partition=search.partition)
    dp.prepare()
    search.run(dp)
  except _chain_sweeps.Timeout:
    search.timed_out = True
  objective, solution = search.best
  bound = search.lower_bound()
  if solution is None:
    return Result(objective=np.inf, stages=None, choice=None, bound=bound,
                  timed_out=search.timed_out, evaluations=search.evaluations)
  return Result(objective=objective, stages=solution[0], choice=solution[1], bound=bound,
                timed_out=search.timed_out, evaluations=search.evaluations)


class _Search:
  """Branch and bound over the bottleneck value T (see the module docstring)."""

  def __init__(self, tables, upper_bound, incumbent, *, bounds=True, partition=None):
    self.tables = tables
    self.best = (upper_bound, incumbent)
    self.c1 = tables.num_microbatches - 1
    self.evaluations = 0
    self.timed_out = False
    # Unexplored bottleneck ranges as (lo, hi, least total there); None: not started.
    self.intervals = None
    if partition is None:
      partition = _tables.partition_bound(tables) if bounds else _tables.NO_PARTITION_BOUND
    self.partition = partition
    self.trivial = _tables.trivial_bound(tables, self.partition)

  def offer(self, objective, stages, choice):
    if objective < self.best[0]:
      self.best = (objective, (stages, choice))

  def lower_bound(self) -> float:
    if self.intervals is None:
      return min(self.trivial, self.best[0])
    return min([self.best[0]] + [lo * self.c1 + total for lo, _, total in self.intervals])

  def _evaluate(self, dp, limit):
    self.evaluations += 1
    found = dp.g(limit)
    if found is None:
      return None
    stages, choice, total, peak = found
    objective, _, _, _ = _tables.evaluate(self.tables, stages, choice)
    self.offer(objective, stages, choice)
    # The DP's own sums (not the evaluator's, which may round differently) keep peak
    # <= limit, so the search always moves down.
    return total, peak

  def run(self, dp):
    fastest = self.tables.time.min(axis=1)
    peak_lo = max(float(fastest.max()), float(fastest.sum()) / self.tables.num_stages,
                  self.partition.peak)
    # Every assignment's sum of stage and send times is at least the partition bound's.
    self.intervals = [(peak_lo, np.inf, self.partition.total)]
    if not np.isfinite(peak_lo + self.partition.total):  # nothing fits: no assignment
      self.intervals = []
    while self.intervals:
      self.intervals.sort(key=lambda iv: iv[2] + self.c1 * iv[0])
      lo, hi, total_lo = self.intervals[0]
      if total_lo + self.c1 * lo >= self.best[0] * (1 - _REL_TOL):
        self.intervals = []
        break
      if self.c1 > 0:
        hi = min(hi, (self.best[0] - total_lo) / self.c1)
      if hi < lo:
        self.intervals.pop(0)
        continue
      found = self._evaluate(dp, hi)
      self.intervals.pop(0)
      if found is None:
        continue
      total, peak = found
      if self.c1 > 0 and peak > lo:
        self.intervals.append((lo, float(np.nextafter(peak, -np.inf)), total))


def _trade_off_choices(tables: _tables.Tables) -> list[np.ndarray]:
  """Candidate selections minimising time + resharding + w * memory along the chain.

  One shortest path over (layer, candidate) per weight w, for w = 0 (fastest), a
  geometric grid around the ratio of the layers' time and memory spreads, and w large
  (leanest); memory is averaged over stages. These only seed upper bounds.
  """
  time = tables.time
  memory = tables.memory.mean(axis=0)  # [n, kmax], inf for padding
  finite = np.isfinite(time)
  span_time = np.where(finite, time, -np.inf).max(axis=1) - time.min(axis=1)
  span_memory = np.where(finite, memory, -np.inf).max(axis=1) - memory.min(axis=1)
  scale = float(span_time.sum()) / max(float(span_memory.sum()), 1e-300)
  weights = [0.0] + list(scale * 2.0 ** np.arange(-8, 9)) + [scale * 1e6]
  memory = np.where(finite, memory, 0.0)
  choices = []
  for weight in weights:
    cost = np.where(finite, time + weight * memory, np.inf)
    best = cost[0]
    back = np.zeros((tables.n, tables.kmax), dtype=np.int64)
    for u in range(1, tables.n):
      total = best[:, None] + tables.chain_same[u - 1]  # [previous, next]
      back[u] = np.argmin(total, axis=0)
      best = total[back[u], np.arange(tables.kmax)] + cost[u]
    choice = np.zeros(tables.n, dtype=np.int64)
    choice[-1] = int(np.argmin(best))
    for u in range(tables.n - 1, 0, -1):
      choice[u - 1] = back[u, choice[u]]
    if not any(np.array_equal(choice, other) for other in choices):
      choices.append(choice)
  return choices
