"""Label-setting sweeps of the chain DP: least stage times per segment and boundary class.

What they compute, and the search over the bottleneck value that uses them, is in
`_chain_dp`; `ChainDP.g` evaluates G(T) from the sweeps' tables.

Why it is fast. Candidates are many (one per internal sharding of a layer) but their
boundary layouts are few, and only the layout matters across a boundary: labels are
grouped by classes of candidates whose rows (or columns) of the edge tables are equal,
not by candidates, so the alpha and beta of P_i (see `_chain_dp`) are classes
(`_boundary_classes`), and a label beats any other of its class pair. A layer is added
in two Pareto-pruned steps: the resharding into each class of the new layer's
candidates, then each candidate of that class. Identical layers (equal time and memory
tables, and equal tables on the edge from the previous layer) make equal sweep steps, so
sweeps from different start layers share a trie keyed by the sequence of layer kinds and
classes: a run of N equal blocks costs N sweep steps per kind of start, not N^2 / 2. The
first stage needs no alpha (nothing enters it) and the last no beta (nothing leaves it):
their labels carry one class, and the last stage is swept backwards from the final
layer. Labels that cannot be part of an assignment better than the upper bound are
dropped: any assignment costs at least c * p of a stage plus the time of every layer
outside it, and at least (1 + (c - 1) / S) times the total time (the slowest stage takes
at least its share); the first and last stages bound the time of the layers beyond them
by a Lagrangian relaxation of the memory those can still get. Middle stages are swept
only from the layers where they can start and to where they can end in such an
assignment: every stage time is then at most T = (upper bound - least sum) / (c - 1),
and the stages before and after must fit under T too (`_tables.stage_reach`, from
per-stage Lagrangian bounds; with 1F1B each stage has its own memory table and its own
sweep, and this keeps each one short). The same per-stage bounds give the search its
first lower bound (`_tables.partition_bound`), usually within about 1% of the optimum.
Upper bounds come first from cheap restrictions: shortest paths of time + w * memory
pick one candidate per layer for a range of w, and the DP over the union of those
candidates. Dominated candidates are removed before (see `_tables.prune`).
"""

from __future__ import annotations

import dataclasses
import time as time_lib

import numpy as np

from uniap_jax.solver import _labels
from uniap_jax.solver import _tables

# Relative slack in comparisons against the upper bound, so that float rounding never
# drops the assignment that attains it.
_REL_TOL = 1e-12


class Timeout(Exception):
  """Raised inside the DP when its deadline passes."""


@dataclasses.dataclass
class _Node:
  labels: _labels.Labels
  parent: int
  fastest: np.ndarray  # [C, C] least time per (alpha class, beta class)
  fastest_label: np.ndarray  # [C, C] label index attaining it, -1 if none


class ChainDP:
  """The DP over one chain Problem (as Tables). See the module docstring."""

  def __init__(self, tables: _tables.Tables, *, upper_bound: float, deadline: float,
               partition: _tables.PartitionBound | None = None):
    self.tables = tables
    self.partition = _tables.partition_bound(tables) if partition is None else partition
    self.n, self.num_stages = tables.n, tables.num_stages
    self.c = tables.num_microbatches
    self.kmax = tables.kmax
    self.deadline = deadline
    self.upper_bound = upper_bound
    fastest = tables.time.min(axis=1)
    self.fastest_prefix = np.concatenate([[0.0], np.cumsum(fastest)])
    self.total_fastest = float(self.fastest_prefix[-1])
    # Stage -> memory table index (equal tables are shared).
    table_ids = {}
    self.stage_table = []
    for i in range(self.num_stages):
      self.stage_table.append(table_ids.setdefault(tables.memory[i].tobytes(), len(table_ids)))
    # Layer kinds and in-segment edge kinds for the trie.
    kinds = {}
    self.layer_kind = [
        kinds.setdefault((tables.time[u].tobytes(), tables.memory[:, u].tobytes()), len(kinds))
        for u in range(self.n)]
    self._rest_cache = {}
    self._member_cache = {}
    edge_kinds = {}
    self.edge_kind = [
        edge_kinds.setdefault(tables.chain_same[u].tobytes(), len(edge_kinds))
        for u in range(self.n - 1)]
    self._boundary_classes()

  def _boundary_classes(self):
    """Classes of candidates that look alike across each boundary b (between b - 1, b).

    out_cls[b][k]: class of layer b - 1's candidate k, equal when its rows of the edge
    b - 1 -> b (same_stage and cross_stage) are equal; in_cls[b][k]: class of layer b's
    candidate k by its columns. Labels are grouped by class instead of candidate: two
    labels whose boundary candidates share a class face the same future costs, so the
    one with more time and memory is dominated. out_rep / in_rep [n + 1, C] give a
    representative candidate per class (0 for unused slots, whose values stay inf).
    """
    tables, n, kmax = self.tables, self.n, self.kmax
    finite = np.isfinite(tables.time).astype(np.float64)[:, :, None]  # [n, kmax, 1]
    out_cls = np.zeros((n + 1, kmax), dtype=np.int64)
    in_cls = np.zeros((n + 1, kmax), dtype=np.int64)
    out_rep, in_rep = [[0]] * (n + 1), [[0]] * (n + 1)
    cache = {}

    def classes(key):
      token = (key.shape, key.tobytes())
      if token not in cache:
        _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
        # Classes numbered by their first candidate, so that equal groupings of
        # different tables (the first block after the embedding, and the next) get
        # equal numbers and share trie nodes.
        order = np.argsort(first)
        number = np.empty(len(first), dtype=np.int64)
        number[order] = np.arange(len(first))
        cache[token] = (number[inverse.ravel()], first[order])
      return cache[token]

    in_cls[0], in_rep[0] = classes(finite[0])
    out_cls[n], out_rep[n] = classes(finite[n - 1])
    for b in range(1, n):
      same, cross = tables.chain_same[b - 1], tables.chain_cross[b - 1]
      out_cls[b], out_rep[b] = classes(np.concatenate([same, cross, finite[b - 1]], axis=1))
      in_cls[b], in_rep[b] = classes(np.concatenate([same.T, cross.T, finite[b]], axis=1))
    self.num_classes = max(max(len(r) for r in out_rep), max(len(r) for r in in_rep))
    pad = lambda reps: np.array([list(r) + [0] * (self.num_classes - len(r)) for r in reps],
                                dtype=np.int64)
    self.out_cls, self.in_cls = out_cls, in_cls
    self.out_rep, self.in_rep = pad(out_rep), pad(in_rep)
    self.out_kind = [row.tobytes() for row in out_cls]
    self.in_kind = [row.tobytes() for row in in_cls]

  # ---- sweeps -------------------------------------------------------------------------

  def _check_deadline(self):
    if time_lib.perf_counter() > self.deadline:
      raise Timeout

  def _ok(self, time, mem, fastest_sum, rest=None):
    """Which labels may still be part of an assignment better than the upper bound.

    Any assignment costs at least c * p of a stage plus the time of every layer outside
    it. That time is at least their fastest candidates' (fastest_sum is the stage's
    share of those), or, with `rest` = (rest, same_stage), a Lagrangian bound for the
    layers on the far side of the label within the memory they can still get: what is
    left on this stage plus, unless same_stage (one stage only), all other stages.
    """
    tables = self.tables
    ok = np.isfinite(time) & (mem <= tables.budget)
    limit = self.upper_bound * (1 + _REL_TOL)
    # The slowest stage also takes at least its share of all time: max >= total / S.
    share = 1 + (self.c - 1) / self.num_stages
    if rest is None:
      outside = self.total_fastest - fastest_sum
      return ok & (self.c * time + outside <= limit) & ((time + outside) * share <= limit)
    bound, same_stage = rest
    with np.errstate(invalid="ignore"):  # inf - inf where padding meets no limit
      left = np.where(mem <= tables.budget, np.minimum(tables.budget - mem, 1e300), 0.0)
    if not same_stage:
      left = left + (self.num_stages - 1) * min(tables.budget, 1e300)
    ok &= bound.lean <= left
    rest_time = np.interp(left, bound.points, bound.envelope)
    if same_stage:
      return ok & (self.c * (time + rest_time) <= limit)
    return ok & (self.c * time + rest_time <= limit) & ((time + rest_time) * share <= limit)

  def _seed(self, u, stage, kind, rest=None, enterable=None) -> _labels.Labels:
    """Labels of layer u alone; kind "first" groups them by the class leaving u,
    "last" by the class entering u, "middle" by both (alpha class * C + beta class)."""
    memory = self.tables.memory[stage, u]
    time = self.tables.time[u]
    cand = np.arange(self.kmax)
    ok = self._ok(time, memory, self.fastest_prefix[u + 1] - self.fastest_prefix[u], rest)
    if enterable is not None:  # candidates a stage may start with
      ok &= enterable
    cand = cand[ok]
    if kind == "first":
      grp = self.out_cls[u + 1][cand]
    elif kind == "last":
      grp = self.in_cls[u][cand]
    else:
      grp = self.in_cls[u][cand] * self.num_classes + self.out_cls[u + 1][cand]
    return _labels.pareto(grp, time[cand], memory[cand], np.full(len(cand), -1), cand)

  def _members(self, u, stage, backward):
    """Layer u's usable candidates on `stage`, by the class that faces its labels.

    Forward, that is the class entering u (in_cls[u]); backward, the class leaving u
    (out_cls[u + 1]). Returns (classes, start, count, candidates sorted by class, least
    time and least memory per class, resharding [class of the labels, class of u]).
    """
    key = (u, stage, backward)
    if key not in self._member_cache:
      cls = self.out_cls[u + 1] if backward else self.in_cls[u]
      time, memory = self.tables.time[u], self.tables.memory[stage, u]
      cand = np.flatnonzero(np.isfinite(time) & (memory <= self.tables.budget))
      cand = cand[np.argsort(cls[cand], kind="stable")]
      classes, start, count = np.unique(cls[cand], return_index=True, return_counts=True)
      least_time = np.minimum.reduceat(time[cand], start) if len(cand) else start
      least_mem = np.minimum.reduceat(memory[cand], start) if len(cand) else start
      # Resharding from each class the labels are grouped by into each of these classes.
      if backward:  # labels grouped by the class of layer u + 1's candidate (their first)
        rows = np.ix_(self.out_rep[u + 1][classes], self.in_rep[u + 1])
        table = self.tables.chain_same[u][rows].T
      else:  # by the class of layer u - 1's candidate (their last)
        table = self.tables.chain_same[u - 1][np.ix_(self.out_rep[u], self.in_rep[u][classes])]
      self._member_cache[key] = (classes, start, count, cand, least_time, least_mem, table)
    return self._member_cache[key]

  def _extend(self, labels: _labels.Labels, u, stage, backward, fastest_sum,
              rest=None) -> _labels.Labels:
    """Labels with layer u added after (or, backward, before) the labels' layers.

    In two steps, each Pareto-pruned: first the resharding to each class of u's
    candidates (labels that will take a candidate of one class face the same future,
    so only the undominated go on), then each candidate of that class.
    """
    self._check_deadline()
    classes_n = self.num_classes
    if len(labels) == 0:
      return labels
    via, start, count, members, least_time, least_mem, table = self._members(u, stage, backward)
    if len(via) == 0:
      return _labels.Labels(*(x[:0] for x in labels))
    last = labels.grp % classes_n
    base = labels.grp - last
    add = table[last]  # [labels, classes of u]
    width = len(via)
    time = (labels.time[:, None] + add).ravel()
    mem = np.repeat(labels.mem, width)
    step = np.tile(np.arange(width), len(labels))
    # Lower bounds on what the second step gives: the check is monotone in both.
    ok = self._ok(time + least_time[step], mem + least_mem[step], fastest_sum, rest)
    grp = (base[:, None] + np.arange(width)[None, :]).ravel()
    parent = np.repeat(np.arange(len(labels)), width)
    first = _labels.pareto(grp[ok], time[ok], mem[ok], parent[ok], step[ok])
    if len(first) == 0:
      return first
    # Second step: every candidate of the class.
    v = first.cand
    repeat = count[v]
    idx = np.repeat(np.arange(len(first)), repeat)
    offset = np.arange(len(idx)) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    cand = members[start[v][idx] + offset]
    new_class = self.in_cls[u] if backward else self.out_cls[u + 1]
    grp = first.grp[idx] - v[idx] + new_class[cand]
    time = first.time[idx] + self.tables.time[u][cand]
    mem = first.mem[idx] + self.tables.memory[stage, u][cand]
    ok = self._ok(time, mem, fastest_sum, rest)
    return _labels.pareto(grp[ok], time[ok], mem[ok], first.parent[idx][ok], cand[ok])

  def _sweep_first(self, length):
    """Labels of stage 0 on [0, b) for b = 1..length, grouped by the last layer's class."""
    single = self.num_stages == 1  # then the stage must take every layer

    def rest(u):
      return (self._rest_bound(u + 1, self.n, 0 if single else None), single)

    steps = [self._seed(0, 0, "first", rest(0))]
    for u in range(1, length):
      steps.append(self._extend(steps[-1], u, 0, False, self.fastest_prefix[u + 1], rest(u)))
      if len(steps[-1]) == 0:
        break
    return steps

  def _rest_bound(self, a, b, stage):
    """`_tables.TimeBound` of layers [a, b) on stage `stage` (None: least over stages)."""
    key = (a, b, stage)
    if key not in self._rest_cache:
      memory = self.tables.memory[stage, a:b] if stage is not None else self.tables.memory[:, a:b].min(axis=0)
      self._rest_cache[key] = _tables.time_bound(self.tables.time[a:b], memory, self.tables.budget)
    return self._rest_cache[key]

  def _sweep_last(self, length):
    """Labels of the last stage on [a, n) for n - a = 1..length, by the first layer's class."""
    stage, n = self.num_stages - 1, self.n
    steps = [self._seed(n - 1, stage, "last", (self._rest_bound(0, n - 1, None), False))]
    for u in range(n - 2, n - 1 - length, -1):
      fastest = self.fastest_prefix[n] - self.fastest_prefix[u]
      steps.append(self._extend(steps[-1], u, stage, True, fastest, (self._rest_bound(0, u, None), False)))
      if len(steps[-1]) == 0:
        break
    return steps

  def _middle(self, table, stages):
    """Least times of middle stages using memory table `table`, for all segments.

    Returns (fastest [A, Lmax, C, C], node ids [A, Lmax], first start a0, nodes), by
    the classes of the first and last layer's candidates.
    """
    n, num_stages, num_classes = self.n, self.num_stages, self.num_classes
    stage = stages[0]
    a0 = min(stages)
    a1 = n - num_stages + max(stages)  # last possible start
    lmax = n - num_stages + 1
    count = a1 - a0 + 1
    fastest = np.full((count, lmax, num_classes, num_classes), np.inf)
    node_of = np.full((count, lmax), -1, dtype=np.int64)
    nodes: list[_Node] = []
    children: dict[tuple[int, object], int] = {}

    def make(labels, parent):
      best = np.full(num_classes * num_classes, np.inf)
      best_label = np.full(num_classes * num_classes, -1, dtype=np.int64)
      idx = _labels.group_last(labels)
      best[labels.grp[idx]] = labels.time[idx]
      best_label[labels.grp[idx]] = idx
      shape = (num_classes, num_classes)
      nodes.append(_Node(labels, parent, best.reshape(shape), best_label.reshape(shape)))
      return len(nodes) - 1

    # Where these stages may start and end in an assignment better than the upper
    # bound (see `_reach`); other segments keep infinite times.
    start_ok = np.logical_or.reduce([self.start_ok[i] for i in stages])
    end_ok = np.logical_or.reduce([self.end_ok[i] for i in stages])
    end_max = min(n - num_stages + max(stages) + 1, n - 1)  # leave the last stage a layer
    for a in range(a0, a1 + 1):
      ends = np.flatnonzero(end_ok[a + 1:end_max + 1]) + a + 1
      if not start_ok[a] or not len(ends):
        continue
      # A stage starts with a candidate that some send from the previous layer reaches
      # (an infinite cross_stage column forbids it, as in `_hub`'s expanded chains).
      enterable = np.isfinite(self.tables.chain_cross[a - 1]).any(axis=0)
      key = (-1, self.layer_kind[a], enterable.tobytes(), self.in_kind[a], self.out_kind[a + 1])
      if key not in children:
        children[key] = make(self._seed(a, stage, "middle", enterable=enterable), -1)
      node = children[key]
      for length in range(1, min(lmax, int(ends[-1]) - a) + 1):
        if length > 1:
          u = a + length - 1
          key = (node, (self.edge_kind[u - 1], self.layer_kind[u], self.out_kind[u + 1]))
          if key not in children:
            fastest_sum = self.fastest_prefix[u + 1] - self.fastest_prefix[a]
            children[key] = make(self._extend(nodes[node].labels, u, stage, False, fastest_sum), node)
          node = children[key]
        if len(nodes[node].labels) == 0:
          break
        if not end_ok[a + length]:
          continue
        fastest[a - a0, length - 1] = nodes[node].fastest
        node_of[a - a0, length - 1] = node
    return fastest, node_of, a0, nodes

  def _reach(self):
    """start_ok[i, a], end_ok[i, b]: whether stage i may start at a, end at b.

    Any assignment better than the upper bound has every stage time at most
    T = (upper bound - least sum of stage and send times) / (c - 1), and the stages
    before stage i (on [0, a)) and after it (on [b, n)) can then not be slower:
    `_tables.stage_reach` bounds how slow they must be.
    """
    n, num_stages = self.n, self.num_stages
    self.start_ok = np.ones((num_stages, n + 1), dtype=bool)
    self.end_ok = np.ones((num_stages, n + 1), dtype=bool)
    if self.c <= 1 or not np.isfinite(self.upper_bound) or self.partition.segments is None:
      return
    total = self.partition.total
    limit = (self.upper_bound * (1 + _REL_TOL) - total) / (self.c - 1)
    before, after = _tables.stage_reach(self.tables, self.partition.segments)
    self.start_ok = before <= limit
    self.end_ok = after <= limit

  # ---- assembling --------------------------------------------------------------------

  def prepare(self):
    """Runs the sweeps and lays out the segment tables used by `g`."""
    n, num_stages, num_classes = self.n, self.num_stages, self.num_classes
    lmax = n - num_stages + 1
    self.first = self._sweep_first(lmax)
    self.p_first = np.full((n + 1, num_classes), np.inf)  # [end b, beta]
    for s, labels in enumerate(self.first):
      idx = _labels.group_last(labels)
      self.p_first[s + 1, labels.grp[idx]] = labels.time[idx]
    if num_stages == 1:
      return
    self.last = self._sweep_last(lmax)
    self.p_last = np.full((n + 1, num_classes), np.inf)  # [start a, alpha]
    for s, labels in enumerate(self.last):
      idx = _labels.group_last(labels)
      self.p_last[n - 1 - s, labels.grp[idx]] = labels.time[idx]
    self.cross = np.zeros((n + 1, num_classes, num_classes))  # [cut b, beta class, alpha class]
    for b in range(1, n):
      self.cross[b] = self.tables.chain_cross[b - 1][np.ix_(self.out_rep[b], self.in_rep[b])]
    self._reach()
    self.middle = {}
    groups: dict[int, list[int]] = {}
    for i in range(1, num_stages - 1):
      groups.setdefault(self.stage_table[i], []).append(i)
    for table, stages in groups.items():
      self.middle[table] = self._middle(table, stages)

  def g(self, limit: float):
    """G(limit) and its argmin as (stages, choice, G, max of its p and o), or None."""
    n, num_stages, num_classes = self.n, self.num_stages, self.num_classes
    inf = np.inf
    p_first = np.where(self.p_first <= limit, self.p_first, inf)
    if num_stages == 1:
      beta = int(np.argmin(p_first[n]))
      if not np.isfinite(p_first[n, beta]):
        return None
      value = float(p_first[n, beta])
      return self._assemble([(0, n, -1, beta)]) + (value, value)
    cross = np.where(self.cross <= limit, self.cross, inf)
    p_last = np.where(self.p_last <= limit, self.p_last, inf)
    values = [p_first]  # values[i][b, beta]: stages 0..i end at b with beta
    entries = []  # entries[i][b, alpha]: stage i + 1 starts at b with alpha
    masked = {}
    for i in range(1, num_stages - 1):
      self._check_deadline()
      entry = np.min(values[-1][:, :, None] + cross, axis=1)
      entries.append(entry)
      table = self.stage_table[i]
      fastest, _, a0, _ = self.middle[table]
      if table not in masked:
        seg = np.where(fastest <= limit, fastest, inf)
        usable = np.flatnonzero(np.isfinite(seg).any(axis=(0, 2, 3)))
        masked[table] = seg[:, :usable[-1] + 1 if usable.size else 1]  # drop too-long segments
      seg = masked[table]
      lo, hi = i, n - num_stages + i  # starts of stage i; its end is at most hi + 1
      starts = np.arange(lo, hi + 1)
      # best[a, length - 1, beta] = min over alpha of entry + segment time.
      best = (entry[lo:hi + 1, :, None, None] + seg[lo - a0:hi - a0 + 1].transpose(0, 2, 1, 3)).min(axis=1)
      ends = starts[:, None] + np.arange(1, seg.shape[1] + 1)[None, :]
      valid = ends <= hi + 1
      spread = np.full((len(starts), n + 1, num_classes), inf)  # [start, end, beta]
      rows = np.broadcast_to(np.arange(len(starts))[:, None], ends.shape)
      spread[rows[valid], ends[valid]] = best[valid]
      values.append(spread.min(axis=0))
    entry = np.min(values[-1][:, :, None] + cross, axis=1)
    entries.append(entry)
    total = entry + p_last  # [b, alpha]
    flat = int(np.argmin(total))
    b, alpha = divmod(flat, num_classes)
    if not np.isfinite(total[b, alpha]):
      return None
    # Walk back through the stages, collecting the stage and send times used.
    value = float(total[b, alpha])
    used = [p_last[b, alpha]]
    segments = [(b, n, alpha, -1)]
    for i in range(num_stages - 2, -1, -1):
      beta = int(np.argmin(values[i][b] + cross[b, :, alpha]))
      used.append(cross[b, beta, alpha])
      if i == 0:
        used.append(p_first[b, beta])
        segments.append((0, b, -1, beta))
        break
      table = self.stage_table[i]
      _, _, a0, _ = self.middle[table]
      seg = masked[table]
      starts = np.arange(i, b)
      lengths = b - starts
      ok = lengths <= seg.shape[1]
      starts, lengths = starts[ok], lengths[ok]
      cand = entries[i - 1][starts, :] + seg[starts - a0, lengths - 1, :, beta]
      flat = int(np.argmin(cand))
      row, alpha_i = divmod(flat, num_classes)
      used.append(seg[starts[row] - a0, lengths[row] - 1, alpha_i, beta])
      segments.append((int(starts[row]), b, int(alpha_i), beta))
      b, alpha = int(starts[row]), int(alpha_i)
    segments.reverse()
    return self._assemble(segments) + (value, float(max(used)))

  def _assemble(self, segments):
    """Stage and candidate per layer from (start, end, alpha, beta) per stage."""
    n, kmax = self.n, self.kmax
    stages = np.zeros(n, dtype=np.int64)
    choice = np.zeros(n, dtype=np.int64)
    last_stage = len(segments) - 1
    for i, (a, b, alpha, beta) in enumerate(segments):
      stages[a:b] = i
      if i == 0:
        steps = self.first
        s = b - 1
        labels = steps[s]
        fastest = _labels.group_last(labels)
        j = fastest[np.searchsorted(labels.grp[fastest], beta)]
        for u in range(b - 1, -1, -1):
          labels = steps[u]
          choice[u] = labels.cand[j]
          j = labels.parent[j]
      elif i == last_stage:
        steps = self.last
        s = n - 1 - a
        labels = steps[s]
        fastest = _labels.group_last(labels)
        j = fastest[np.searchsorted(labels.grp[fastest], alpha)]
        for u in range(a, n):
          labels = steps[n - 1 - u]
          choice[u] = labels.cand[j]
          j = labels.parent[j]
      else:
        table = self.stage_table[i]
        _, node_of, a0, nodes = self.middle[table]
        node = int(node_of[a - a0, b - a - 1])
        j = int(nodes[node].fastest_label[alpha, beta])
        for u in range(b - 1, a - 1, -1):
          labels = nodes[node].labels
          choice[u] = labels.cand[j]
          j = labels.parent[j]
          node = nodes[node].parent
    return stages, choice
