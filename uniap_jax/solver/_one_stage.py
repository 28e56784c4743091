"""Exact dynamic program for one stage, any DAG: no boundaries, so every edge is local.

With num_stages = 1 the objective is c * (sum of layer times + every edge's same_stage
entry), under one memory limit. Sweeping the layers in order, a label (time, memory)
carries the candidates of the layers whose edges still point ahead (and of the last
layer); an edge's cost is paid when its destination is added. Labels with the same
carried candidates are Pareto-pruned in (time, memory): the rest of the sweep depends on
nothing else, so this is exact. It is cheap when few edges are pending at once (BERT's
heads: one or two; T5's encoder output: one, across the whole decoder).
"""

from __future__ import annotations

import time as time_lib

import numpy as np

from uniap_jax.solver import _labels
from uniap_jax.solver import _tables

# Carried candidates are packed into one int64 per label: at most this many digits.
_MAX_CARRIED = 3
# Label extensions one step may materialise before the sweep gives up (memory-bound
# problems whose Pareto fronts do not thin out: T5 on a 4x2 mesh reaches 1.9e8).
MAX_EXTENSIONS = 20_000_000


class TooLarge(Exception):
  """The sweep would outgrow MAX_EXTENSIONS; the caller goes on to another method."""


def supported(tables: _tables.Tables) -> bool:
  """Whether the sweep's carried state stays small enough to pack."""
  if tables.num_stages != 1:
    return False
  return max(len(_carried(tables, q)) for q in range(tables.n)) <= _MAX_CARRIED


def _carried(tables: _tables.Tables, q: int) -> list[int]:
  """Layers whose candidate labels carry after layer q: q and sources of edges past q."""
  pending = sorted({u for u, v, _, _ in tables.skips if u <= q < v and u != q})
  return pending + [q]


def _future_classes(tables: _tables.Tables) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per layer, each candidate's class (equal rows in every edge table leaving the
  layer) and one representative candidate per class."""
  outgoing = {u: [] for u in range(tables.n)}
  for u in range(tables.n - 1):
    outgoing[u].append(tables.chain_same[u])
  for u, _, same, _ in tables.skips:
    outgoing[u].append(same)
  cls, rep = [], []
  for u in range(tables.n):
    if not outgoing[u]:  # the last layer: nothing ahead
      cls.append(np.zeros(tables.kmax, dtype=np.int64))
      rep.append(np.zeros(1, dtype=np.int64))
      continue
    rows = np.hstack(outgoing[u])
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    cls.append(inverse.reshape(-1).astype(np.int64))
    rep.append(first.astype(np.int64))
  return cls, rep


def solve_one_stage(tables: _tables.Tables, *, upper_bound: float, incumbent, deadline: float):
  """Optimum of a one-stage problem as (objective, (stages, choice) or None, timed_out).

  Only assignments better than upper_bound are sought; when none exists (or time runs
  out) it returns upper_bound and `incumbent` unchanged.

  Raises:
    TooLarge: a step would materialise more than MAX_EXTENSIONS labels.
  """
  n, kmax, c = tables.n, tables.kmax, tables.num_microbatches
  memory = tables.memory[0]
  budget = tables.budget
  limit = upper_bound * (1 + 1e-12)
  incoming = {v: [] for v in range(n)}
  for u, v, same, _ in tables.skips:
    incoming[v].append((u, same))
  bounds = [_tables.time_bound(tables.time[q + 1:], memory[q + 1:], budget) for q in range(n)]
  # The most memory the layers after q can add: a label whose memory leaves that much
  # free fits whatever comes next, so it dominates every slower label of its group
  # whatever their memory.
  usable = np.isfinite(tables.time) & np.isfinite(memory)
  largest = np.where(usable, memory, 0.0).max(axis=1)
  rest_max = np.concatenate([np.cumsum(largest[::-1])[::-1][1:], [0.0]])

  def drop_dominated_by_safe(labels: _labels.Labels, q: int) -> _labels.Labels:
    """Within each group (sorted by memory, time falling), the labels that fit any
    completion form a prefix; only its last (fastest) one can matter."""
    if len(labels) == 0:
      return labels
    safe = labels.mem + rest_max[q] <= budget
    last_safe = safe.copy()
    last_safe[:-1] &= ~(safe[1:] & (labels.grp[1:] == labels.grp[:-1]))
    keep = ~safe | last_safe
    return _labels.Labels(*(x[keep] for x in labels))

  def prune(time, mem, q):
    rest = bounds[q]
    with np.errstate(invalid="ignore"):  # inf - inf where padding meets no limit
      left = np.where(mem <= budget, np.minimum(budget - mem, 1e300), 0.0)
    return (np.isfinite(time) & (mem <= budget) & (rest.lean <= left)
            & (c * (time + rest(left)) <= limit))

  # Labels carry each pending layer's candidate class, not the candidate: candidates
  # whose outgoing edge rows are equal leave the rest of the sweep the same future
  # (a decoder block's 324 candidates on a 4x2 mesh fall into a few output layouts).
  cls, rep = _future_classes(tables)
  base = max(int(r.size) for r in rep)
  steps = []
  cand = np.arange(kmax)
  ok = prune(tables.time[0], memory[0], 0)
  labels = (cls[0][cand[ok]], tables.time[0][ok], memory[0][ok],
            np.full(int(ok.sum()), -1), cand[ok])
  steps.append(labels)
  timed_out = False
  for q in range(1, n):
    if time_lib.perf_counter() > deadline:
      timed_out = True
      break
    grp, time, mem, _, _ = steps[-1]
    if len(grp) * kmax > MAX_EXTENSIONS:
      raise TooLarge(f"{len(grp)} labels x {kmax} candidates at layer {q}")
    before, after = _carried(tables, q - 1), _carried(tables, q)
    digits = (grp[:, None] // base ** np.arange(len(before))[None, :]) % base  # [L, carried]
    last = rep[q - 1][digits[:, before.index(q - 1)]]
    add = tables.chain_same[q - 1][last, :] + tables.time[q][None, :]  # [L, kmax]
    for u, same in incoming[q]:
      add = add + same[rep[u][digits[:, before.index(u)]], :]
    new_time = time[:, None] + add  # [L, kmax]
    new_mem = mem[:, None] + memory[q][None, :]
    # Only the extensions the bound keeps are materialised: most are cut here.
    parent, new_cand = np.nonzero(prune(new_time, new_mem, q))
    new_grp = np.zeros(len(parent), dtype=np.int64)
    for position, u in enumerate(after):
      digit = cls[q][new_cand] if u == q else digits[parent, before.index(u)]
      new_grp += digit * base ** position
    labels = drop_dominated_by_safe(_labels.pareto(
        new_grp, new_time[parent, new_cand], new_mem[parent, new_cand], parent, new_cand), q)
    steps.append(tuple(labels))
    if len(labels.time) == 0:
      break
  if timed_out or len(steps) < n or len(steps[-1][1]) == 0:
    return upper_bound, incumbent, timed_out
  final = steps[-1]
  j = int(np.argmin(final[1]))
  if c * float(final[1][j]) >= upper_bound:
    return upper_bound, incumbent, False
  choice = np.zeros(n, dtype=np.int64)
  for q in range(n - 1, -1, -1):
    choice[q] = steps[q][4][j]
    j = steps[q][3][j]
  stages = np.zeros(n, dtype=np.int64)
  return _tables.evaluate(tables, stages, choice)[0], (stages, choice), False
