"""DAGs whose skip edges leave a few source layers: chain DPs over source classes.

T5's encoder output feeds every decoder block, and its position biases and shared
embedding feed several layers more. Group each source's candidates into classes whose
rows agree in all the source's skip edge tables. Restrict every source to a set of its
classes (a node of a branch and bound; the root allows all). What a skip edge s -> v
then costs is at least what the cheapest allowed row of s charges v's candidate l, and
depends on where v sits: same_stage on s's stage, or cross_stage at every boundary from
s's stage to v's. Give each layer u a flag in its candidate: the earliest source on u's
stage with a skip edge to u or a later layer (or none). Flags follow from where stages
start, so chain edges carry them (inside a stage a flag stays or moves to the next such
source; across a boundary it restarts), and the least same_stage costs become unary
times. A cross_stage cost splits into the least entry of the allowed rows, paid at every
boundary the edge spans (a constant per boundary position), plus an excess that depends
on the candidates and is left out. The chain DP on this expanded chain gives an
assignment (evaluated exactly on the DAG) and a lower bound for every assignment whose
sources keep to the node's classes. Nodes are solved best bound first; a node whose
bound stays below the best assignment is split by the classes of one source (the one
whose relaxation was loosest on the node's assignment). With one class per source the
same_stage costs are exact, and the bound meets the best assignment unless a skip
destination takes a candidate with cross_stage excess; such leaves go to SCIP with their
sources fixed: far easier than the whole DAG, since the pairwise skip-edge terms become
linear. A source whose rows all agree (a constant table, or one replicated layout) has
one class and costs nothing to enumerate, so what limits the method is the width of the
expanded chain (flags times candidates), not the number of sources.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time as time_lib

import numpy as np

from uniap_jax.solver import _chain_dp
from uniap_jax.solver import _miqp
from uniap_jax.solver import _tables

# Beyond this width (candidates of one layer once flags are added) the chain DPs cost
# more than SCIP. T5-Large on 4 devices a stage (dp4): 80 to 120.
MAX_EXPANDED = 128
_REL_TOL = 1e-9


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result:
  """Best assignment found (tables' indices) or None, a lower bound (valid also when
  time ran out), whether time ran out, the branch and bound nodes solved, and whether
  SCIP was needed."""

  objective: float
  stages: np.ndarray | None
  choice: np.ndarray | None
  bound: float
  timed_out: bool
  nodes: int
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
  """Whether the expanded chains are narrow enough for the chain DP to beat SCIP."""
  if not tables.skips or tables.num_stages == 1:
    return False
  widest = max((len(_relevant(tables, u)) + 1) * int(tables.num_candidates[u])
               for u in range(tables.n))
  return widest <= MAX_EXPANDED


def _expand(tables: _tables.Tables, fixed: dict[int, tuple[int, ...]]):
  """The chain with each source limited to candidates `fixed[s]` and flags in the candidates.

  A skip edge's same_stage cost is the least over the source's allowed rows (exact when
  they form one class). Returns (chain Tables, per layer the list of (candidate, flag)
  behind each index). A flag is the earliest source (see `_relevant`) on the layer's
  stage, or -1 for none.
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
  for s, v, same, _ in tables.skips:
    incoming[v].append((s, same[list(fixed[s])].min(axis=0)))
  # Least cross_stage entry of each skip edge given the allowed source rows: paid at
  # every boundary it spans.
  flat = np.zeros(n + 1)  # flat[q]: at the boundary before layer q
  for s, v, same, cross in tables.skips:
    columns = list(fixed[v]) if v in sources else list(range(int(tables.num_candidates[v])))
    flat[s + 1:v + 1] += float(cross[np.ix_(list(fixed[s]), columns)].min())
  for u, opts in enumerate(options):
    for j, (l, f) in enumerate(opts):
      extra = 0.0
      for s, least in incoming[u]:
        if f != -1 and s >= f:  # s is on u's stage
          extra += least[l]
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
  """Best assignment over all source classes and the least bound (see module doc).

  Only assignments better than upper_bound are sought; `incumbent` (stages, choice)
  attains it. `chain_bound` is a lower bound on the problem without its skip edges:
  with the sources' classes restricted, each skip edge adds at least the least entry of
  the allowed rows, which settles many nodes at once. With `scip`, leaves (one class
  per source) whose chain DP bound stays below the best assignment go to SCIP with
  their sources fixed (a far easier model than the whole DAG). The returned bound is
  the least over open nodes (at least upper_bound when nothing beats it).
  """
  sources = _sources(tables)
  classes = [_classes(tables, s) for s in sources]
  edges_of = [[(v, same, cross) for u, v, same, cross in tables.skips if u == s] for s in sources]

  def members(node):  # per source, its candidates allowed by the node's classes
    return {s: tuple(sorted(k for j in node[i] for k in classes[i][j]))
            for i, s in enumerate(sources)}

  def cheap_bound(node):
    allowed, least = members(node), 0.0
    for i, s in enumerate(sources):
      rows = list(allowed[s])
      for v, same, cross in edges_of[i]:
        width = int(tables.num_candidates[v])
        least += float(min(same[rows, :width].min(), cross[rows, :width].min()))
    return chain_bound + least

  def looseness(node, stages, choice, i):
    """How much more source i's skip edges cost on this assignment than relaxed."""
    s, rows = sources[i], list(members(node)[sources[i]])
    extra = 0.0
    for v, same, cross in edges_of[i]:
      l = int(choice[v])
      if stages[s] == stages[v]:
        extra += same[choice[s], l] - same[rows, l].min()
      else:
        extra += (stages[v] - stages[s]) * (cross[choice[s], l] - cross[rows, l].min())
    return extra

  best_objective, best = upper_bound, incumbent
  nodes = 0
  timed_out = scip_used = False

  def offer(stages, choice):
    nonlocal best_objective, best
    objective, _, _, memory = _tables.evaluate(tables, stages, choice)
    if objective < best_objective and (memory <= tables.budget).all():
      best_objective, best = objective, (stages, choice)

  root = tuple(tuple(range(len(c))) for c in classes)
  heap = [(cheap_bound(root), 0, root)]
  counter = 1
  leaves = {}  # node with one class per source -> its bound, for SCIP
  while heap:
    bound, _, node = heap[0]
    if bound >= best_objective * (1 - _REL_TOL):
      heap = []
      break
    if time_lib.perf_counter() > deadline:
      timed_out = True
      break
    heapq.heappop(heap)
    nodes += 1
    chain, options = _expand(tables, members(node))
    chain = _tables.prune(chain, deadline)
    bound = max(bound, _tables.trivial_bound(chain))
    if bound >= best_objective * (1 - _REL_TOL):
      continue
    # Once an assignment is known, its objective prunes the sweeps better than the
    # chain DP's own cheap upper bounds would.
    result = _chain_dp.solve_chain(chain, upper_bound=best_objective, deadline=deadline,
                                   heuristics=best is None)
    if result.timed_out:
      heapq.heappush(heap, (max(bound, result.bound), 0, node))
      timed_out = True
      break
    bound = max(bound, result.bound)
    found = None
    if result.choice is not None:
      found = (result.stages, np.array([options[u][int(chain.candidates[u][k])][0]
                                        for u, k in enumerate(result.choice)]))
      offer(*found)
    if bound >= best_objective * (1 - _REL_TOL):
      continue
    split = [i for i, allowed in enumerate(node) if len(allowed) > 1]
    if not split:
      leaves[node] = bound
      continue
    # Split the source whose relaxation was loosest on the node's assignment (without
    # one, or when none was loose: the one with the most skip edges, then classes).
    if found is not None:
      score = {i: looseness(node, *found, i) for i in split}
      if max(score.values()) > 0:
        split = [max(split, key=lambda i: score[i])]
    i = max(split, key=lambda i: (len(edges_of[i]), len(node[i])))
    for j in node[i]:
      child = node[:i] + ((j,),) + node[i + 1:]
      heapq.heappush(heap, (max(bound, cheap_bound(child)), counter, child))
      counter += 1
  if scip and not timed_out:
    # SCIP per candidate combination (not per class): with single source candidates the
    # pairwise skip-edge terms collapse, which is what makes these models easy.
    for node in sorted(leaves, key=lambda node: leaves[node]):
      combo = [classes[i][j[0]] for i, j in enumerate(node)]
      for members_ in itertools.product(*combo):
        if leaves[node] >= best_objective * (1 - _REL_TOL):
          break
        if time_lib.perf_counter() > deadline:
          timed_out = True
          break
        lower = leaves[node]
        if any(len(c) > 1 for c in combo):  # the class's DP bound, member by member
          chain, options = _expand(tables, {s: (k,) for s, k in zip(sources, members_)})
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
        for s, k in zip(sources, members_):
          keep[s] = np.array([k])
        warm = None
        if best is not None and all(int(best[1][s]) == k for s, k in zip(sources, members_)):
          warm = (best[0], np.where(np.isin(np.arange(tables.n), sources), 0, best[1]))
        result = _miqp.solve_miqp(tables.restrict(keep), warm=warm, objective_lb=lower,
                                  cutoff=best_objective, deadline=deadline)
        if result.stages is not None:
          offer(result.stages, np.array([keep[u][k] for u, k in enumerate(result.choice)]))
        if result.status not in ("cutoff", "optimal"):  # time ran out inside SCIP
          timed_out = True
          break
      else:  # every member proven: SCIP's proof, as on the whole DAG
        leaves[node] = max(leaves[node], best_objective)
      if timed_out:
        break
  bound = min([best_objective] + list(leaves.values()) + [b for b, _, _ in heap])
  if best_objective >= upper_bound:
    return Result(objective=math.inf, stages=None, choice=None, bound=bound,
                  timed_out=timed_out, nodes=nodes, scip_used=scip_used)
  return Result(objective=best_objective, stages=best[0], choice=best[1], bound=bound,
                timed_out=timed_out, nodes=nodes, scip_used=scip_used)
