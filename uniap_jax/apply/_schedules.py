"""Pipeline schedule tables: which micro-batch each stage runs forward and backward per tick.

One SPMD program runs every table (reference/pipelines.md, section 3): in tick t,
stage s runs the forward of micro-batch `forward[t, s]` (-1: idle), then the backward
(a `jax.vjp` that recomputes the stage from its stashed input) of `backward[t, s]`,
then activations move one stage down and cotangents one stage up. Lockstep: a tick
lasts as long as the slowest stage's work in it (an idle entry runs masked work, or
none where `cluster.skips_idle_work` lets the executors skip it).

| table | ticks | stage inputs stashed per stage |
|---|---|---|
| gpipe (forward, then backward) | 2 (M + S - 1) | M |
| fused (F of mb t-s, B of mb t-2S+2+s) | M + 2S - 2 | 2S - 1 |
| 1f1b (PipeDream-flush) | 2 (M + S - 1) | S |
"""

from __future__ import annotations

import dataclasses

import numpy as np

IDLE = -1
TABLES = ("gpipe", "fused", "1f1b")

@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Table:
  """A schedule: micro-batch indices per (tick, stage), and the buffers it needs.

  Attributes:
    name: "gpipe", "fused", "1f1b", or "forward" (forward ticks only).
    forward: int array [ticks, stages]; the micro-batch whose forward runs, or -1.
    backward: int array [ticks, stages]; the micro-batch whose backward runs, or -1.
    stash_slots: stage inputs each stage keeps (slot = micro-batch % stash_slots).
    cotangent_slots: arrived cotangents each stage keeps until its backward.
  """

  name: str
  forward: np.ndarray
  backward: np.ndarray
  stash_slots: int
  cotangent_slots: int

  def __post_init__(self):
    if self.forward.shape != self.backward.shape or self.forward.ndim != 2:
      raise ValueError(f"forward {self.forward.shape} and backward {self.backward.shape} must "
                       "be equal [ticks, stages] arrays")

  @property
  def ticks(self) -> int:
    return int(self.forward.shape[0])

  @property
  def has_forward(self) -> bool:
    return bool((self.forward >= 0).any())

  @property
  def has_backward(self) -> bool:
    return bool((self.backward >= 0).any())


def _ticks_of(table: np.ndarray, num_microbatches: int) -> np.ndarray:
  """[stages, micro-batches] -> the tick of each entry (-1 when absent)."""
  stages = table.shape[1]
  out = np.full((stages, num_microbatches), -1, dtype=np.int64)
  for t, s in zip(*np.nonzero(table >= 0)):
    m = table[t, s]
    if out[s, m] != -1:
      raise ValueError(f"micro-batch {m} runs twice on stage {s}")
    out[s, m] = t
  return out


def _slots_needed(intervals: list[list[tuple[int, int]]]) -> int:
  """Smallest K such that micro-batches m, m' with m = m' (mod K) never need a slot at once.

  An interval (a, r) is filed at the end of tick a and read (for the last time) in
  tick r, before that tick's arrivals are filed: (a, r] and (a2, r2] clash iff
  a2 < r and a < r2.
  """
  num_mb = max((len(iv) for iv in intervals), default=0)
  for k in range(1, num_mb + 1):
    ok = True
    for per_stage in intervals:
      for m, (a, r) in enumerate(per_stage):
        for m2 in range(m + k, len(per_stage), k):
          a2, r2 = per_stage[m2]
          if a2 < r and a < r2:
            ok = False
            break
        if not ok:
          break
      if not ok:
        break
    if ok:
      return k
  return max(num_mb, 1)


def _finish(name: str, fwd: np.ndarray, bwd: np.ndarray, num_microbatches: int,
            keep_all: bool = False) -> Table:
  """Checks the dependencies of a table and sizes its stash and cotangent buffers."""
  stages = fwd.shape[1]
  ft = _ticks_of(fwd, num_microbatches)
  bt = _ticks_of(bwd, num_microbatches)
  has_f, has_b = (fwd >= 0).any(), (bwd >= 0).any()
  stash, cots = [], []
  for s in range(stages):
    st, ct = [], []
    for m in range(num_microbatches):
      if has_f:
        if ft[s, m] < 0:
          raise ValueError(f"{name}: micro-batch {m} never runs forward on stage {s}")
        if s > 0 and not ft[s - 1, m] < ft[s, m]:
          raise ValueError(f"{name}: forward of micro-batch {m} on stage {s} before stage {s-1}")
      if has_b:
        if bt[s, m] < 0:
          raise ValueError(f"{name}: micro-batch {m} never runs backward on stage {s}")
        if s < stages - 1 and not bt[s + 1, m] < bt[s, m]:
          raise ValueError(f"{name}: backward of micro-batch {m} on stage {s} before stage {s+1}")
        if has_f and not ft[s, m] <= bt[s, m]:
          raise ValueError(f"{name}: backward of micro-batch {m} on stage {s} before its forward")
      if s > 0:  # stage 0 reads its input from the batch, not from a stash
        arrive = ft[s - 1, m] if has_f else -1
        release = bt[s, m] if has_b else ft[s, m]
        st.append((int(arrive), int(release)))
      if has_b and s < stages - 1:
        ct.append((int(bt[s + 1, m]), int(bt[s, m])))
    stash.append(st)
    cots.append(ct)
  k = num_microbatches if keep_all else _slots_needed(stash)
  kc = _slots_needed(cots) if has_b else 1
  return Table(name=name, forward=fwd.astype(np.int32), backward=bwd.astype(np.int32),
               stash_slots=k, cotangent_slots=kc)


def forward_only(stages: int, num_microbatches: int, *, keep_all: bool = False) -> Table:
  """M + S - 1 forward ticks; `keep_all` keeps every stage input (for a later backward)."""
  ticks = num_microbatches + stages - 1
  fwd = np.full((ticks, stages), IDLE)
  for t in range(ticks):
    for s in range(stages):
      if 0 <= t - s < num_microbatches:
        fwd[t, s] = t - s
  return _finish("forward", fwd, np.full_like(fwd, IDLE), num_microbatches, keep_all)


def backward_only(stages: int, num_microbatches: int) -> Table:
  """GPipe's backward half: M + S - 1 ticks, the last stage first, inputs all stashed."""
  ticks = num_microbatches + stages - 1
  bwd = np.full((ticks, stages), IDLE)
  for t in range(ticks):
    for s in range(stages):
      m = t - (stages - 1 - s)
      if 0 <= m < num_microbatches:
        bwd[t, s] = m
  table = _finish("gpipe", np.full_like(bwd, IDLE), bwd, num_microbatches)
  return dataclasses.replace(table, stash_slots=num_microbatches)


def fused(stages: int, num_microbatches: int) -> Table:
  """Forward of micro-batch t-s and backward of t-2S+2+s in tick t: GPipe's time, 2S-1 stashed."""
  ticks = num_microbatches + 2 * stages - 2
  fwd = np.full((ticks, stages), IDLE)
  bwd = np.full((ticks, stages), IDLE)
  for t in range(ticks):
    for s in range(stages):
      if 0 <= t - s < num_microbatches:
        fwd[t, s] = t - s
      m = t - (2 * stages - 2 - s)
      if 0 <= m < num_microbatches:
        bwd[t, s] = m
  return _finish("fused", fwd, bwd, num_microbatches)


def one_f_one_b(stages: int, num_microbatches: int) -> Table:
  """PipeDream-flush: S-1-s warm-up forwards, then one forward, one backward; one op per tick."""
  order = []
  for s in range(stages):
    warm = min(stages - 1 - s, num_microbatches)
    ops = [("F", m) for m in range(warm)]
    nf, nb = warm, 0
    while nb < num_microbatches:
      if nf < num_microbatches:
        ops.append(("F", nf))
        nf += 1
      ops.append(("B", nb))
      nb += 1
    order.append(ops)
  done: dict[tuple[str, int, int], int] = {}
  pos = [0] * stages
  rows_f, rows_b = [], []
  t = 0
  limit = 4 * (num_microbatches + stages) + 4
  while any(pos[s] < len(order[s]) for s in range(stages)):
    if t > limit:
      raise RuntimeError("1f1b table did not converge")  # a bug, not bad input
    rf, rb = [IDLE] * stages, [IDLE] * stages
    ran = []
    for s in range(stages):
      if pos[s] >= len(order[s]):
        continue
      op, m = order[s][pos[s]]
      if op == "F":
        ready = s == 0 or done.get(("F", s - 1, m), t) < t
      else:
        ready = (done.get(("F", s, m), t) < t) if s == stages - 1 else (
            done.get(("B", s + 1, m), t) < t)
      if ready:
        (rf if op == "F" else rb)[s] = m
        ran.append((op, s, m))
        pos[s] += 1
    for key in ran:
      done[key] = t
    rows_f.append(rf)
    rows_b.append(rb)
    t += 1
  return _finish("1f1b", np.array(rows_f), np.array(rows_b), num_microbatches)


def table(name: str, stages: int, num_microbatches: int) -> Table:
  """The named table with both forward and backward entries."""
  if name == "fused":
    return fused(stages, num_microbatches)
  if name == "1f1b":
    return one_f_one_b(stages, num_microbatches)
  raise ValueError(f"Unknown schedule table {name!r}; tables are 'fused', '1f1b' "
                   "(and 'gpipe', run as a forward pass and a backward pass).")
