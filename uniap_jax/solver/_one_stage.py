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


def supported(tables: _tables.Tables) -> bool:
  """Whether the sweep's carried state stays small enough to pack."""
  if tables.num_stages != 1:
    return False
  return max(len(_carried(tables, q)) for q in range(tables.n)) <= _MAX_CARRIED


def _carried(tables: _tables.Tables, q: int) -> list[int]:
  """Layers whose candidate labels carry after layer q: q and sources of edges past q."""
  pending = sorted({u for u, v, _, _ in tables.skips if u <= q < v and u != q})
  return pending + [q]


def solve_one_stage(tables: _tables.Tables, *, upper_bound: float, incumbent, deadline: float):
  """Optimum of a one-stage problem as (objective, (stages, choice) or None, timed_out).

  Only assignments better than upper_bound are sought; when none exists (or time runs
  out) it returns upper_bound and `incumbent` unchanged.
  """
  n, kmax, c = tables.n, tables.kmax, tables.num_microbatches
  memory = tables.memory[0]
  budget = tables.budget
  limit = upper_bound * (1 + 1e-12)
  incoming = {v: [] for v in range(n)}
  for u, v, same, _ in tables.skips:
    incoming[v].append((u, same))
  bounds = [_tables.time_bound(tables.time[q + 1:], memory[q + 1:], budget) for q in range(n)]

  def prune(time, mem, q):
    rest = bounds[q]
    with np.errstate(invalid="ignore"):  # inf - inf where padding meets no limit
      left = np.where(mem <= budget, np.minimum(budget - mem, 1e300), 0.0)
    return (np.isfinite(time) & (mem <= budget) & (rest.lean <= left)
            & (c * (time + rest(left)) <= limit))

  steps = []
  cand = np.arange(kmax)
  ok = prune(tables.time[0], memory[0], 0)
  labels = (cand[ok].astype(np.int64), tables.time[0][ok], memory[0][ok],
            np.full(int(ok.sum()), -1), cand[ok])
  steps.append(labels)
  timed_out = False
  for q in range(1, n):
    if time_lib.perf_counter() > deadline:
      timed_out = True
      break
    grp, time, mem, _, _ = steps[-1]
    before, after = _carried(tables, q - 1), _carried(tables, q)
    digits = (grp[:, None] // kmax ** np.arange(len(before))[None, :]) % kmax  # [L, carried]
    last = digits[:, before.index(q - 1)]
    add = tables.chain_same[q - 1][last, :] + tables.time[q][None, :]  # [L, kmax]
    for u, same in incoming[q]:
      add = add + same[digits[:, before.index(u)], :]
    new_time = time[:, None] + add  # [L, kmax]
    new_mem = mem[:, None] + memory[q][None, :]
    # Only the extensions the bound keeps are materialised: most are cut here.
    parent, new_cand = np.nonzero(prune(new_time, new_mem, q))
    new_grp = np.zeros(len(parent), dtype=np.int64)
    for position, u in enumerate(after):
      digit = new_cand if u == q else digits[parent, before.index(u)]
      new_grp += digit * kmax ** position
    labels = _labels.pareto(new_grp, new_time[parent, new_cand], new_mem[parent, new_cand],
                            parent, new_cand)
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
