"""A Problem as dense arrays, with dominated candidates removed, plus memory bounds.

Every method (chain DP, MIQP) works on `Tables`; answers are mapped back to the user's
candidate indices through `Tables.candidates`.
"""

from __future__ import annotations

import dataclasses
import math
import time as time_lib
from typing import NamedTuple

import numpy as np

from uniap_jax.solver import _problem


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Tables:
  """Dense arrays of one Problem. Padding candidates have infinite time and memory.

  Attributes:
    n, num_stages, num_microbatches: sizes.
    budget: memory_limit * (1 + MEMORY_RTOL), the largest memory a stage may hold.
    num_candidates: [n] candidates kept per layer.
    candidates: per layer, the user's index of each kept candidate.
    time: [n, kmax] seconds.
    memory: [num_stages, n, kmax] bytes.
    chain_same, chain_cross: [n - 1, kmax, kmax] tables of the edge u -> u + 1 (zeros
      when there is none).
    chain_edge: [n - 1] whether that edge exists.
    skips: edges u -> v with v > u + 1, as (u, v, same [kmax, kmax], cross [kmax, kmax]).
  """

  n: int
  num_stages: int
  num_microbatches: int
  budget: float
  num_candidates: np.ndarray
  candidates: tuple[np.ndarray, ...]
  time: np.ndarray
  memory: np.ndarray
  chain_same: np.ndarray
  chain_cross: np.ndarray
  chain_edge: np.ndarray
  skips: tuple[tuple[int, int, np.ndarray, np.ndarray], ...]

  @property
  def kmax(self) -> int:
    return self.time.shape[1]

  @property
  def is_chain(self) -> bool:
    return not self.skips

  def restrict(self, keep: list[np.ndarray]) -> Tables:
    """The same problem with layer u limited to its candidates keep[u] (indices here)."""
    kmax = max(len(k) for k in keep)
    n = self.n
    num_candidates = np.array([len(k) for k in keep])
    time = np.full((n, kmax), np.inf)
    memory = np.full((self.num_stages, n, kmax), np.inf)
    for u, k in enumerate(keep):
      time[u, :len(k)] = self.time[u, k]
      memory[:, u, :len(k)] = self.memory[:, u, k]

    def sub(table, u, v):
      out = np.zeros((kmax, kmax))
      out[:len(keep[u]), :len(keep[v])] = table[np.ix_(keep[u], keep[v])]
      return out

    chain_same = np.zeros((max(n - 1, 0), kmax, kmax))
    chain_cross = np.zeros_like(chain_same)
    for u in range(n - 1):
      chain_same[u] = sub(self.chain_same[u], u, u + 1)
      chain_cross[u] = sub(self.chain_cross[u], u, u + 1)
    skips = tuple((u, v, sub(same, u, v), sub(cross, u, v)) for u, v, same, cross in self.skips)
    return dataclasses.replace(
        self, num_candidates=num_candidates,
        candidates=tuple(self.candidates[u][k] for u, k in enumerate(keep)),
        time=time, memory=memory, chain_same=chain_same, chain_cross=chain_cross, skips=skips)

  def chain_relaxation(self) -> Tables:
    """The same problem without its skip edges: a chain whose optimum bounds this one's."""
    return dataclasses.replace(self, skips=())


def _incident(tables: Tables):
  """Per layer, (table, is_source, other layer) of every incident edge table."""
  incident = [[] for _ in range(tables.n)]
  edges = [(u, u + 1, tables.chain_same[u], tables.chain_cross[u])
           for u in range(tables.n - 1) if tables.chain_edge[u]]
  for u, v, same, cross in edges + list(tables.skips):
    for table in (same, cross):
      incident[u].append((table, True, v))
      incident[v].append((table, False, u))
  return incident


def _undominated(tables: Tables, deadline: float = math.inf) -> list[np.ndarray]:
  """Per layer, the candidates no other candidate dominates.

  Candidate k' dominates k when its time, its memory on every stage (memory over the
  budget counts as infinite) and every entry of every incident edge table are no larger;
  between equal candidates the lower index stays. Replacing k by k' in any assignment
  then raises no stage time, send time or memory, so removing k keeps an optimum.
  Removal can expose more dominance through the edge tables, hence the loop. Past
  `deadline` it stops early: every removal so far is exact on its own.
  """
  memory = np.where(tables.memory <= tables.budget, tables.memory, np.inf)
  incident = _incident(tables)
  keep = [np.arange(k) for k in tables.num_candidates]
  verdicts = {}  # identical layers (same tables, same neighbours' candidates) agree
  changed = True
  while changed:
    changed = False
    for u in range(tables.n):
      if time_lib.perf_counter() > deadline:
        return keep
      if len(keep[u]) == 1:
        continue
      fits = memory[:, u, keep[u]].T  # [candidates, stages]
      columns = [tables.time[u][keep[u], None], fits]
      for table, is_source, w in incident[u]:
        if is_source:
          columns.append(table[np.ix_(keep[u], keep[w])])
        else:
          columns.append(table[np.ix_(keep[w], keep[u])].T)
      features = np.concatenate(columns, axis=1)  # [candidates, features]
      key = (features.shape, features.tobytes())
      if key not in verdicts:
        verdicts[key] = _dominated(features, ~np.isfinite(fits).any(axis=1))
      drop = verdicts[key]
      if drop.any():
        keep[u] = keep[u][~drop]
        changed = True
  return keep


def _dominated(features: np.ndarray, unusable: np.ndarray) -> np.ndarray:
  """Which rows another row dominates (<= everywhere; equal rows: the later), or unusable."""
  dominated = np.zeros(len(features), dtype=bool)
  for a in range(len(features)):  # row by row: K^2 features of memory at most at once
    le = np.all(features[a][None, :] <= features, axis=1)
    lt = np.any(features[a][None, :] < features, axis=1)
    index = np.arange(len(features))
    hit = le & (lt | (a < index))
    hit[a] = False
    dominated |= hit
  drop = dominated | unusable
  return dominated if drop.all() else drop  # nothing fits anywhere: memory decides later


def build(problem: _problem.Problem) -> Tables:
  """Dense arrays of `problem`, every candidate kept."""
  n, num_stages = len(problem.layers), problem.num_stages
  counts = np.array([layer.num_candidates for layer in problem.layers])
  kmax = int(counts.max())
  time = np.full((n, kmax), np.inf)
  memory = np.full((num_stages, n, kmax), np.inf)
  for u, layer in enumerate(problem.layers):
    time[u, :counts[u]] = layer.time
    memory[:, u, :counts[u]] = np.asarray(problem.stage_memory_table(u))
  chain_same = np.zeros((max(n - 1, 0), kmax, kmax))
  chain_cross = np.zeros_like(chain_same)
  chain_edge = np.zeros(max(n - 1, 0), dtype=bool)
  position = {layer.name: u for u, layer in enumerate(problem.layers)}
  skips = []
  for edge in problem.edges:
    u, v = position[edge.src], position[edge.dst]
    same = np.zeros((kmax, kmax))
    cross = np.zeros((kmax, kmax))
    same[:counts[u], :counts[v]] = edge.same_stage
    cross[:counts[u], :counts[v]] = edge.cross_stage
    if v == u + 1:
      chain_same[u], chain_cross[u], chain_edge[u] = same, cross, True
    else:
      skips.append((u, v, same, cross))
  skips.sort(key=lambda s: (s[0], s[1]))
  tables = Tables(
      n=n, num_stages=num_stages, num_microbatches=problem.num_microbatches,
      budget=problem.memory_limit * (1 + _problem.MEMORY_RTOL), num_candidates=counts,
      candidates=tuple(np.arange(k) for k in counts), time=time, memory=memory,
      chain_same=chain_same, chain_cross=chain_cross, chain_edge=chain_edge,
      skips=tuple(skips))
  return tables


def prune(tables: Tables, deadline: float = math.inf) -> Tables:
  """`tables` without dominated candidates and candidates that fit on no stage.

  Past `deadline` (a time.perf_counter() value) fewer are removed, never a wrong one.
  """
  keep = _undominated(tables, deadline)
  if all(len(k) == c for k, c in zip(keep, tables.num_candidates)):
    return tables
  return tables.restrict(keep)


def min_peak_memory(tables: Tables) -> tuple[float, np.ndarray]:
  """The least memory any assignment puts on its fullest stage, and that assignment's stages.

  Memory does not depend on edges, so each layer takes its leanest candidate on its
  stage, and a min-max partition DP over the layer order places the stage boundaries.
  """
  n, num_stages = tables.n, tables.num_stages
  lean = tables.memory.min(axis=2)  # [stages, n]
  prefix = np.concatenate([np.zeros((num_stages, 1)), np.cumsum(lean, axis=1)], axis=1)
  best = np.full((num_stages, n + 1), np.inf)  # best[i, b]: stages 0..i hold layers [0, b)
  arg = np.zeros((num_stages, n + 1), dtype=np.int64)
  best[0, 1:] = prefix[0, 1:]
  a = np.arange(n + 1)
  for i in range(1, num_stages):
    segment = prefix[i][None, :] - prefix[i][:, None]  # [a, b]
    peak = np.maximum(best[i - 1][:, None], segment)
    peak[a[:, None] >= a[None, :]] = np.inf
    arg[i] = np.argmin(peak, axis=0)
    best[i] = peak[arg[i], a]
  stages = np.zeros(n, dtype=np.int64)
  b = n
  for i in range(num_stages - 1, 0, -1):
    start = arg[i, b]
    stages[start:b] = i
    b = start
  return float(best[num_stages - 1, n]), stages


def leanest_choice(tables: Tables, stages: np.ndarray) -> np.ndarray:
  """Per layer the candidate with least memory on its stage (ties: least time)."""
  memory = tables.memory[stages, np.arange(tables.n)]  # [n, kmax]
  order = np.lexsort((tables.time.T, memory.T), axis=0)
  return order[0]


class TimeBound(NamedTuple):
  """A lower bound on some layers' total time as a function B -> f(B) of their memory."""

  lean: float  # least memory the layers need
  points: np.ndarray  # memory budgets B, ascending, from 0
  envelope: np.ndarray  # f at those points

  def __call__(self, memory):
    """f at `memory` (array): exact between the points, smaller (still a bound) below."""
    return np.interp(memory, self.points, self.envelope)


def time_bound(time: np.ndarray, memory: np.ndarray, budget: float) -> TimeBound:
  """Lagrangian bound on the total time of layers with tables time, memory [layers, k].

  For any w >= 0 and memory budget B, their total time is at least
  sum_u min_k (t + w m) - w B; f(B) is the best over a geometric grid of w around the
  ratio of the time and memory spreads (w = 0 gives the fastest candidates' sum).
  """
  finite = np.isfinite(time) & np.isfinite(memory)
  weights = np.zeros(1)
  if np.isfinite(budget) and finite.any() and np.ptp(memory[finite]) > 0:
    scale = np.ptp(time[finite]) / np.ptp(memory[finite])
    weights = np.concatenate([[0.0], scale * 2.0 ** np.arange(-12, 13)])
  safe_memory = np.where(finite, memory, 0.0)
  cost = np.where(finite[None], time[None] + weights[:, None, None] * safe_memory[None], np.inf)
  values = cost.min(axis=2).sum(axis=1)
  lean = float(np.where(finite, memory, np.inf).min(axis=1).sum()) if len(time) else 0.0
  # f(B) = max_w (values_w - w B) is convex and piecewise linear: evaluated at every
  # crossing of two of its lines (its breakpoints among them), interpolation is exact.
  with np.errstate(divide="ignore", invalid="ignore"):
    cross = (values[:, None] - values[None, :]) / (weights[:, None] - weights[None, :])
  points = np.unique(np.concatenate([[0.0], cross[np.isfinite(cross) & (cross > 0)]]))
  envelope = (values[None, :] - points[:, None] * weights[None, :]).max(axis=1)
  return TimeBound(lean=lean, points=points, envelope=envelope)


def trivial_bound(tables: Tables, partition: PartitionBound | None = None) -> float:
  """A lower bound on the objective from per-layer times and memory.

  All layers' time is at least their Lagrangian bound within num_stages * budget of
  memory (at least the fastest candidates' sum), the slowest stage takes at least its
  1 / num_stages share and at least the slowest layer's fastest time; and at least
  `partition_bound`, which bounds each stage within its own memory.
  """
  fastest = tables.time.min(axis=1)
  total = float(fastest.sum())
  if np.isfinite(tables.budget):
    bound = time_bound(tables.time, tables.memory.min(axis=0), tables.budget)
    total = max(total, float(bound(np.array([tables.num_stages * tables.budget]))[0]))
  bottleneck = max(float(fastest.max()), total / tables.num_stages)
  simple = total + (tables.num_microbatches - 1) * bottleneck
  if partition is None:
    partition = partition_bound(tables)
  return max(simple, partition.objective)


class PartitionBound(NamedTuple):
  """Lower bounds that hold for every assignment (see `partition_bound`)."""

  objective: float
  peak: float  # on the slowest stage's time, max_i p_i
  total: float  # on sum_i p_i + sum_j o_j
  segments: tuple[np.ndarray, ...] | None  # per stage, its `segment_bounds` (shared when equal)


# What `trivial_bound` and the chain DP use when the partition bound is skipped.
NO_PARTITION_BOUND = PartitionBound(objective=0.0, peak=0.0, total=0.0, segments=None)

# Relative slack taken off the partition bound: its prefix sums round differently from
# the sums an assignment's evaluation takes.
_BOUND_SLACK = 1e-11
# Segments ([n + 1, n + 1] entries) up to which segment bounds use the fine weight grid;
# also the most entries one vectorised pass over weights holds.
_GRID_WORK = 300 ** 2


def segment_bounds(tables: Tables, stage: int) -> np.ndarray:
  """f[a, b]: a lower bound on stage `stage`'s time p if it holds layers [a, b).

  f = max over w >= 0 of sum_u min_k (t + w m) - w * budget (its memory on that stage
  is at most budget; w = 0 gives the fastest candidates), infinite when the layers'
  leanest candidates overflow the budget, and for empty segments (b <= a).
  """
  n, budget = tables.n, tables.budget
  time = tables.time
  fastest = time.min(axis=1)
  fastest_prefix = np.concatenate([[0.0], np.cumsum(fastest)])
  index = np.arange(n + 1)
  memory = tables.memory[stage]
  usable = np.isfinite(time) & (memory <= budget)
  f = fastest_prefix[None, :] - fastest_prefix[:, None]
  if np.isfinite(budget) and usable.any():
    span = np.ptp(memory[usable])
    scale = np.ptp(time[usable]) / span if span > 0 else 0.0
    # A geometric grid around the ratio of the time and memory spreads, finer while
    # the work (one pass over [n + 1, n + 1] per weight) stays small.
    step = 0.25 if n * n <= _GRID_WORK else 1.0
    weights = scale * 2.0 ** np.arange(-16, 16 + step / 2, step) if scale > 0 else np.zeros(0)
    if usable.sum(axis=1).max() <= 1:  # one candidate per layer: the weight changes nothing
      weights = np.zeros(0)
    fits = usable.any(axis=1)  # layers with a candidate within the budget here
    misfit_prefix = np.concatenate([[0], np.cumsum(~fits)])
    lean = np.where(usable, memory, np.inf).min(axis=1)
    lean_prefix = np.concatenate([[0.0], np.cumsum(np.where(fits, lean, 0.0))])
    safe_memory = np.where(usable, memory, 0.0)
    chunk = max(1, _GRID_WORK // ((n + 1) * (n + 1)))  # weights per vectorised pass
    for lo in range(0, len(weights), chunk):
      w = weights[lo:lo + chunk]
      cost = np.where(usable[None], time[None] + w[:, None, None] * safe_memory[None], np.inf)
      cost = np.where(fits[None], cost.min(axis=2), 0.0)  # [weights, n]
      prefix = np.concatenate([np.zeros((len(w), 1)), np.cumsum(cost, axis=1)], axis=1)
      # Less a bound on the rounding of these sums, which cancel when w is large.
      error = 4 * np.finfo(np.float64).eps * (n + 2) * (prefix[:, -1] + w * budget)
      dual = prefix[:, None, :] - prefix[:, :, None] - (w * budget + error)[:, None, None]
      np.maximum(f, dual.max(axis=0), out=f)
    infeasible = misfit_prefix[None, :] - misfit_prefix[:, None] > 0
    infeasible |= lean_prefix[None, :] - lean_prefix[:, None] > budget * (1 + _BOUND_SLACK)
    f[infeasible] = np.inf
  empty = index[:, None] >= index[None, :]
  return np.where(empty, np.inf, np.maximum(f, 0.0) * (1 - _BOUND_SLACK))


def partition_bound(tables: Tables) -> PartitionBound:
  """Bounds from stage-by-stage Lagrangian bounds and the best contiguous partition.

  If stage i holds layers [a, b), its time p_i is at least f_i(a, b) of
  `segment_bounds` (its memory on stage i is bounded on its own). So over every
  partition into contiguous stages, max_i p_i >= min over partitions of max_i f_i and
  sum_i p_i >= min over partitions of sum_i f_i (two O(S n^2) dynamic programs), and
  the objective is at least the second plus (c - 1) times the first. Unlike
  `time_bound` over all layers, each stage's memory is bounded on its own, which is
  what binds when stages hold different amounts (1F1B) or memory is tight.
  """
  n = tables.n
  segments = all_segment_bounds(tables)
  best_max = best_sum = None  # [b]: stages 0..i on layers [0, b)
  for i, f in enumerate(segments):
    if i == 0:
      best_max, best_sum = f[0].copy(), f[0].copy()
    else:
      best_max = np.maximum(best_max[:, None], f).min(axis=0)
      best_sum = (best_sum[:, None] + f).min(axis=0)
  peak, total = float(best_max[n]), float(best_sum[n])
  if not (np.isfinite(peak) and np.isfinite(total)):
    return PartitionBound(objective=np.inf, peak=np.inf, total=np.inf, segments=segments)
  return PartitionBound(objective=total + (tables.num_microbatches - 1) * peak, peak=peak,
                        total=total, segments=segments)


def all_segment_bounds(tables: Tables) -> tuple[np.ndarray, ...]:
  """`segment_bounds` of every stage, computed once per distinct memory table."""
  done: dict[bytes, np.ndarray] = {}
  out = []
  for i in range(tables.num_stages):
    key = tables.memory[i].tobytes()
    if key not in done:
      done[key] = segment_bounds(tables, i)
    out.append(done[key])
  return tuple(out)


def stage_reach(tables: Tables, segments: tuple[np.ndarray, ...] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """How slow the stages around stage i must be, by where stage i starts and ends.

  before[i, a]: a lower bound on max_{j < i} p_j when stage i starts at layer a (stages
  0..i-1 hold [0, a)); after[i, b]: on max_{j > i} p_j when stage i ends at b. Both
  from `segment_bounds` (`segments`, if already computed) by min-max partition DPs;
  inf where no partition exists.
  """
  n, num_stages = tables.n, tables.num_stages
  if segments is None:
    segments = all_segment_bounds(tables)
  before = np.full((num_stages, n + 1), np.inf)
  after = np.full((num_stages, n + 1), np.inf)
  before[0, 0] = 0.0
  after[num_stages - 1, n] = 0.0
  for i in range(1, num_stages):
    before[i] = np.maximum(before[i - 1][:, None], segments[i - 1]).min(axis=0)
  for i in range(num_stages - 2, -1, -1):
    after[i] = np.maximum(segments[i + 1], after[i + 1][None, :]).min(axis=1)
  return before, after


def evaluate(tables: Tables, stages: np.ndarray, choice: np.ndarray):
  """(objective, stage times, send times, stage memory) of an assignment of `tables`."""
  num_stages = tables.num_stages
  layers = np.arange(tables.n)
  p = np.zeros(num_stages)
  o = np.zeros(max(num_stages - 1, 0))
  np.add.at(p, stages, tables.time[layers, choice])
  memory = np.zeros(num_stages)
  np.add.at(memory, stages, tables.memory[stages, layers, choice])
  edges = [(u, u + 1, tables.chain_same[u], tables.chain_cross[u]) for u in range(tables.n - 1)]
  for u, v, same, cross in edges + list(tables.skips):
    if stages[u] == stages[v]:
      p[stages[u]] += same[choice[u], choice[v]]
    else:
      o[stages[u]:stages[v]] += cross[choice[u], choice[v]]
  objective = p.sum() + o.sum() + (tables.num_microbatches - 1) * max(p.max(), o.max(initial=0.0))
  return float(objective), p, o, memory
