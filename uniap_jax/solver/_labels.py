"""Labels of the label-setting sweeps: (time, memory) per group, Pareto-pruned.

A label is a partial stage (a run of layers with chosen candidates): its time, its
memory, the label it grew from and the candidate it added, grouped by what its future
depends on (see `_chain_dp` and `_one_stage`). Within a group, a label with no less
time and no less memory than another is dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Labels(NamedTuple):
  """Labels of one sweep step, as parallel arrays."""

  grp: np.ndarray  # group id, e.g. alpha class * C + last class (see _chain_dp)
  time: np.ndarray
  mem: np.ndarray
  parent: np.ndarray  # index into the previous step's labels, -1 for the first layer
  cand: np.ndarray  # candidate of the layer this step added

  def __len__(self):
    return len(self.time)


def dense_rank(values: np.ndarray) -> tuple[np.ndarray, int]:
  """Rank of each value among the distinct values (equal values, equal rank), and their count."""
  order = np.argsort(values)
  ordered = values[order]
  step = np.empty(len(values), dtype=np.int64)
  step[0] = 0
  np.not_equal(ordered[1:], ordered[:-1], out=step[1:])
  rank = np.empty(len(values), dtype=np.int64)
  rank[order] = np.cumsum(step)
  return rank, int(rank[order[-1]]) + 1


def pareto(grp, time, mem, parent, cand) -> Labels:
  """Labels not dominated in (time, memory) within their group, sorted by (group, memory)."""
  if len(time) == 0:
    return Labels(grp, time, mem, parent, cand)
  # One stable integer sort by (group, memory rank, time rank) instead of a three-key
  # lexsort: ranks are exact, so ties stay ties.
  t_rank, num_times = dense_rank(time)
  m_rank, num_mems = dense_rank(mem)
  g = grp.astype(np.int64)
  num_groups = int(g.max()) + 1
  if num_groups * num_mems * num_times < 2 ** 62:
    order = np.argsort((g * num_mems + m_rank) * num_times + t_rank, kind="stable")
  else:
    order = np.lexsort((t_rank, m_rank, g))
  g = g[order]
  # Ranks offset so that each later group lies below every earlier one: one running
  # minimum then restarts at every group, and a label stays when it beats the group's
  # earlier (less memory) labels strictly.
  key = t_rank[order] + (num_groups - 1 - g) * num_times
  running = np.minimum.accumulate(key)
  keep = np.ones(len(key), dtype=bool)
  keep[1:] = key[1:] < running[:-1]
  idx = order[keep]
  return Labels(grp[idx], time[idx], mem[idx], parent[idx], cand[idx])


def group_last(labels: Labels) -> np.ndarray:
  """Index of the fastest label of each group (the last one, given the sort order)."""
  if len(labels) == 0:
    return np.zeros(0, dtype=np.int64)
  return np.flatnonzero(np.r_[labels.grp[1:] != labels.grp[:-1], True])
