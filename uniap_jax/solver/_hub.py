"""DAGs whose skip edges all leave a few source layers: chain DPs with fixed sources.

T5's encoder output feeds every decoder block. Fix the candidate of every source of a
skip edge (enumerate their combinations; candidates whose rows agree in all the
source's skip edge tables form one class, fixed together, the chain DP choosing within
it). What a skip edge s -> v then costs depends only on v's candidate l and on where
v sits: same_stage[k_s, l] on s's stage, or
cross_stage[k_s, l] at every boundary from s's stage to v's. Give each layer u a flag
in its candidate: the earliest source on u's stage with a skip edge to u or a later
layer (or none). Flags follow from where stages start, so chain edges carry them
(inside a stage a flag stays or moves to the next such source; across a boundary it
restarts), and same_stage costs become exact unary times. A cross_stage cost splits
into the least entry of the source's row, paid at every boundary the edge spans (a
constant per boundary position, exact), plus an excess that depends on v's candidate
and is left out. The chain DP on this expanded chain gives, per combination, an
assignment (evaluated exactly on the DAG) and a lower bound. When the best assignment
meets the least bound (always when no skip destination of the optimum takes a
candidate with excess), it is optimal. Otherwise the combinations whose bound is still
below it go to SCIP with their sources fixed: far easier than the whole DAG, since the
pairwise skip-edge terms become linear. Combinations are tried best bound first, and
a cheap bound (the chain relaxation's plus each skip edge's least entry) settles most.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time as time_lib

import numpy as np

from uniap_jax.solver import _chain_dp
from uniap_jax.solver import _miqp
from uniap_jax.solver import _tables

# Beyond these, enumerating source candidates costs more than SCIP.
MAX_SOURCES = 3
MAX_COMBINATIONS = 64
MAX_EXPANDED = 96  # candidates of one layer once flags are added
_REL_TOL = 1e-9


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result:
  """Best assignment found (tables' indices) or None, a lower bound (valid also when
  time ran out), whether time ran out, and whether SCIP was needed."""

  objective: float
  stages: np.ndarray | None
  choice: np.ndarray | None
  bound: float
  timed_out: bool
  combinations: int
  scip_used: bool = False


def _sources(tables: _tables.Tables) -> list[int]:
  return sorted({u for u, _, _, _ in tables.skips})


def _relevant(tables: _tables.Tables, u: int) -> list[int]:
  """Sources s <= u with a skip edge to u or a later layer: u's flag is one of them."""
  return sorted({s for s, v, _, _ in tables.skips if s <= u <= v})


def _classes(tables: _tables.Tables, source: int) -> list[tuple[int, ...]]:
  """The source's candidates grouped by equal rows in all its skip edges' tables.

  Candidates of one class cost the same on every skip edge, so fixing the class (not
  the candidate) is enough; the chain DP still picks the candidate within it.
  """
  edges = [(same[:, :tables.num_candidates[v]], cross[:, :tables.num_candidates[v]])
           for u, v, same, cross in tables.skips if u == source]
  groups: dict[bytes, list[int]] = {}
  for k in range(int(tables.num_candidates[source])):
    key = b"".join(same[k].tobytes() + cross[k].tobytes() for same, cross in edges)
    groups.setdefault(key, []).append(k)
  return [tuple(group) for group in groups.values()]


def supported(tables: _tables.Tables) -> bool:
  """Whether few enough sources and combinations make the enumeration worthwhile."""
  if not tables.skips or tables.num_stages == 1:
    return False
  sources = _sources(tables)
  if len(sources) > MAX_SOURCES:
    return False
  if math.prod(len(_classes(tables, s)) for s in sources) > MAX_COMBINATIONS:
    return False
  widest = max((len(_relevant(tables, u)) + 1) * int(tables.num_candidates[u])
               for u in range(tables.n))
  return widest <= MAX_EXPANDED


def _expand(tables: _tables.Tables, fixed: dict[int, tuple[int, ...]]):
  """The chain with each source limited to a class (`fixed`) and flags in the candidates.

  Returns (chain Tables, per layer the list of (candidate, flag) behind each index).
  A flag is the earliest source (see `_relevant`) on the layer's stage,
  or -1 for none.
  """
  n, num_stages = tables.n, tables.num_stages
  sources = set(fixed)
  relevant = [_relevant(tables, u) for u in range(n)]
  options = []
  for u in range(n):
    flags = [-1] + relevant[u]
    if u == 0:  # the first layer starts stage 0
      flags = [u if u in relevant[u] else -1]
    cands = list(fixed[u]) if u in sources else list(range(int(tables.num_candidates[u])))
    # A source is on its own stage: never flag -1.
    options.append([(l, f) for f in flags for l in cands if not (u in sources and f == -1)])
  kmax = max(len(o) for o in options)
  time = np.full((n, kmax), np.inf)
  memory = np.full((num_stages, n, kmax), np.inf)
  incoming = {v: [] for v in range(n)}
  for s, v, same, cross in tables.skips:
    incoming[v].append((s, same, cross))
  # Least cross_stage entry of each skip edge given the fixed source: paid at every
  # boundary it spans.
  flat = np.zeros(n + 1)  # flat[q]: at the boundary before layer q
  for s, v, same, cross in tables.skips:
    columns = list(fixed[v]) if v in sources else slice(0, int(tables.num_candidates[v]))
    flat[s + 1:v + 1] += float(cross[fixed[s][0], columns].min())
  for u, opts in enumerate(options):
    for j, (l, f) in enumerate(opts):
      extra = 0.0
      for s, same, _ in incoming[u]:
        if f != -1 and s >= f:  # s is on u's stage
          extra += same[fixed[s][0], l]
      time[u, j] = tables.time[u, l] + extra
      memory[:, u, j] = tables.memory[:, u, l]
  chain_same = np.full((max(n - 1, 0), kmax, kmax), np.inf)
  chain_cross = np.full_like(chain_same, np.inf)
  for u in range(n - 1):
    w = u + 1
    restart = w if w in relevant[w] else -1
    for a, (l, f) in enumerate(options[u]):
      # Inside a stage every layer from f to w shares it: the earliest relevant one.
      on_stage = [s for s in relevant[w] if s >= f] if f != -1 else []
      stay = on_stage[0] if on_stage else restart
      for b, (m, g) in enumerate(options[w]):
        if g == stay:
          chain_same[u, a, b] = tables.chain_same[u, l, m]
        if g == restart:
          chain_cross[u, a, b] = tables.chain_cross[u, l, m] + flat[w]
  counts = np.array([len(o) for o in options])
  chain = dataclasses.replace(
      tables, num_candidates=counts, candidates=tuple(np.arange(k) for k in counts),
      time=time, memory=memory, chain_same=chain_same, chain_cross=chain_cross,
      chain_edge=np.ones(max(n - 1, 0), dtype=bool), skips=())
  return chain, options


def solve_hub(tables: _tables.Tables, *, upper_bound: float, incumbent=None,
              deadline: float, chain_bound: float = 0.0, scip: bool = True) -> Result:
  """Best assignment over all source combinations and the least bound (see module doc).

  Only assignments better than upper_bound are sought; `incumbent` (stages, choice)
  attains it, and its sources' candidates are tried first. `chain_bound` is a lower
  bound on the problem without its skip edges: with the sources fixed, each skip edge
  adds at least its row's least entry, which settles many combinations at once. With
  `scip`, combinations whose chain DP bound stays below the best assignment go to SCIP
  with their sources fixed (a far easier model than the whole DAG). The returned bound
  is the least over combinations (at least upper_bound when nothing beats it).
  """
  sources = _sources(tables)
  classes = [_classes(tables, s) for s in sources]
  combos = list(itertools.product(*classes))  # one class per source
  position = {s: j for j, s in enumerate(sources)}

  def cheap_bound(combo):
    least = 0.0
    for s, v, same, cross in tables.skips:
      k, width = combo[position[s]][0], int(tables.num_candidates[v])
      least += float(min(same[k, :width].min(), cross[k, :width].min()))
    return chain_bound + least

  def combo_of(assignment):
    return tuple(next(c for c in options if int(assignment[1][s]) in c)
                 for s, options in zip(sources, classes))

  first = combo_of(incumbent) if incumbent is not None else None
  bounds = {combo: cheap_bound(combo) for combo in combos}  # valid per combination
  combos.sort(key=lambda combo: (combo != first, bounds[combo]))
  best_objective, best = upper_bound, incumbent
  done = 0
  timed_out = scip_used = False

  def offer(stages, choice):
    nonlocal best_objective, best
    objective, _, _, memory = _tables.evaluate(tables, stages, choice)
    if objective < best_objective and (memory <= tables.budget).all():
      best_objective, best = objective, (stages, choice)

  for combo in combos:
    if time_lib.perf_counter() > deadline:
      timed_out = True
      break
    done += 1
    if bounds[combo] >= best_objective * (1 - _REL_TOL):
      continue
    chain, options = _expand(tables, dict(zip(sources, combo)))
    chain = _tables.prune(chain, deadline)
    bounds[combo] = max(bounds[combo], _tables.trivial_bound(chain))
    if bounds[combo] >= best_objective * (1 - _REL_TOL):
      continue
    # Once an assignment is known, its objective prunes the sweeps better than the
    # chain DP's own cheap upper bounds would.
    result = _chain_dp.solve_chain(chain, upper_bound=best_objective, deadline=deadline,
                                   heuristics=best is None)
    if result.timed_out:
      timed_out = True
      break
    bounds[combo] = max(bounds[combo], result.bound)
    if result.choice is not None:
      offer(result.stages, np.array([options[u][int(chain.candidates[u][k])][0]
                                     for u, k in enumerate(result.choice)]))
  if scip and not timed_out:
    # SCIP per candidate combination (not per class): with single source candidates the
    # pairwise skip-edge terms collapse, which is what makes these models easy.
    for combo in sorted(combos, key=lambda combo: bounds[combo]):
      for members in itertools.product(*combo):
        if bounds[combo] >= best_objective * (1 - _REL_TOL):
          break
        if time_lib.perf_counter() > deadline:
          timed_out = True
          break
        lower = bounds[combo]
        if any(len(c) > 1 for c in combo):  # the class's DP bound, member by member
          chain, options = _expand(tables, {s: (k,) for s, k in zip(sources, members)})
          chain = _tables.prune(chain, deadline)
          result = _chain_dp.solve_chain(chain, upper_bound=best_objective, deadline=deadline,
                                         heuristics=False)
          if result.timed_out:
            timed_out = True
            break
          if result.choice is not None:
            offer(result.stages, np.array([options[u][int(chain.candidates[u][k])][0]
                                           for u, k in enumerate(result.choice)]))
          lower = max(lower, result.bound)
          if lower >= best_objective * (1 - _REL_TOL):
            continue
        scip_used = True
        keep = [np.arange(int(k)) for k in tables.num_candidates]
        for s, k in zip(sources, members):
          keep[s] = np.array([k])
        warm = None
        if best is not None and all(int(best[1][s]) == k for s, k in zip(sources, members)):
          warm = (best[0], np.where(np.isin(np.arange(tables.n), sources), 0, best[1]))
        result = _miqp.solve_miqp(tables.restrict(keep), warm=warm, objective_lb=lower,
                                  cutoff=best_objective, deadline=deadline)
        if result.stages is not None:
          offer(result.stages, np.array([keep[u][k] for u, k in enumerate(result.choice)]))
        if result.status not in ("cutoff", "optimal"):  # time ran out inside SCIP
          timed_out = True
          break
      else:  # every member proven: SCIP's proof, as on the whole DAG
        bounds[combo] = max(bounds[combo], best_objective)
      if timed_out:
        break
  bound = min(min(bounds.values()), best_objective)
  if best_objective >= upper_bound:
    return Result(objective=math.inf, stages=None, choice=None, bound=bound,
                  timed_out=timed_out, combinations=done, scip_used=scip_used)
  return Result(objective=best_objective, stages=best[0], choice=best[1], bound=bound,
                timed_out=timed_out, combinations=done, scip_used=scip_used)
