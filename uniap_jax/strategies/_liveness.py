"""When a layer's values occupy memory, and the most they occupy at once.

XLA frees a buffer after its last reader, so a layer's peak is a sweep over its ops
with each value's live interval. The intervals depend on the layer only (which op
makes a value, which ops read it); the bytes depend on the candidate's layouts. The
model of what takes memory of its own follows XLA's fusion: values fused into their
one reader and residuals recomputed inside backward fusions take none (see
`_ir.LayerIR.fused_ids` and `kept_ids`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses

import numpy as np

from uniap_jax.strategies import _ir


@dataclasses.dataclass(frozen=True, slots=True)
class Intervals:
  """Values that take memory of their own, each live over ops [start, end)."""

  ids: tuple[int, ...]
  start: np.ndarray
  end: np.ndarray
  nbytes: np.ndarray  # unsharded bytes of each value


def intervals(ir: _ir.LayerIR) -> Intervals:
  """Each value's live interval, in op positions of `ir.ops`.

  A value lives from the op that makes it (inputs from the start; cotangents from
  later layers from the first backward op) to its last reader: a kept activation to
  its last backward reader, a gradient to the end (the optimizer reads it), a
  forward output to the end of the forward pass (the next layer holds it after
  that), a backward value read only by other layers to the end of the backward pass.
  Parameters, optimizer state and constants are counted elsewhere; values XLA fuses
  into their one reader, residuals it recomputes inside the backward fusions, batch
  leaves that are not kept and the optimizer's results (written into the donated
  state) never occupy memory of their own.
  """
  n = len(ir.ops)
  phases = [o.op.phase for o in ir.ops]
  backward = [k for k, ph in enumerate(phases) if ph == "backward"]
  forward = [k for k, ph in enumerate(phases) if ph == "forward"]
  first_backward = backward[0] if backward else n
  last_backward = backward[-1] if backward else -1
  last_forward = forward[-1] if forward else -1
  produced: dict[int, int] = {}
  first_read: dict[int, int] = {}
  last_read: dict[int, int] = {}
  last_forward_read: dict[int, int] = {}
  for k, o in enumerate(ir.ops):
    for v in o.op.in_ids:
      if v >= 0:
        first_read.setdefault(v, k)
        last_read[v] = k
        if phases[k] == "forward":
          last_forward_read[v] = k
    for v in o.op.out_ids:
      if v >= 0:
        produced.setdefault(v, k)
  kept = frozenset(ir.kept_ids)
  grads = frozenset(ir.grad_ids)
  outputs = frozenset(ir.output_ids)
  skip = frozenset((*ir.param_ids, *ir.opt_state_ids)) | ir.constant_ids
  ids, starts, ends = [], [], []
  for v in ir.values:
    if v in skip or (v not in kept and (v in ir.batch_ids or v in ir.fused_ids)):
      continue
    start = produced.get(v)
    if start is None:
      first = first_read.get(v, 0)
      start = 0 if phases[first] == "forward" else min(first, first_backward)
    elif phases[start] == "optimizer":
      continue
    if v in grads:
      end = n - 1
    elif v in kept:
      end = last_read.get(v, start)
    elif phases[start] != "forward" or phases[first_read.get(v, start)] != "forward":
      end = last_read.get(v, start)
      if v not in first_read:  # read by earlier layers' backward ops
        end = max(end, last_backward)
    else:  # a forward value, or a residual recomputed inside the backward fusions
      end = last_forward_read.get(v, start)
      if v in outputs or v not in first_read:
        end = max(end, last_forward)
    ids.append(v)
    starts.append(start)
    ends.append(max(end, start) + 1)
  return Intervals(ids=tuple(ids), start=np.array(starts, dtype=np.int64),
                   end=np.array(ends, dtype=np.int64),
                   nbytes=np.array([ir.values[v].nbytes for v in ids], dtype=np.float64))


def peak_bytes(live: Intervals, shards: Sequence[int],
               copies: Iterable[tuple[int, int, float]], transient: Sequence[float]) -> float:
  """The most bytes the layer's values occupy at once on one device.

  Args:
    live: the layer's intervals.
    shards: per value of `live`, the number of shards its layout cuts it into.
    copies: (first op, last op, bytes) of resharded copies (XLA keeps one copy for
      all readers of a value resharded alike).
    transient: per op, bytes alive only while it runs (unreduced partial results,
      buffers on the way of a reshard).
  """
  n = len(transient)
  if n == 0:
    return 0.0
  sizes = live.nbytes / np.asarray(shards, dtype=np.float64)
  delta = np.zeros(n + 1)
  np.add.at(delta, live.start, sizes)
  np.add.at(delta, live.end, -sizes)
  for first, last, nbytes in copies:
    if nbytes:
      delta[first] += nbytes
      delta[last + 1] -= nbytes
  return float(np.max(np.cumsum(delta[:n]) + np.asarray(transient)))
