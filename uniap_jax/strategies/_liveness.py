"""When a layer's values occupy memory, and the most they occupy at once.

XLA frees a buffer after its last reader, so a layer's peak is a sweep over its ops
with each value's live interval. The intervals depend on the layer only (which op
makes a value, which ops read it); the bytes depend on the candidate's layouts. The
model of what takes memory of its own follows XLA's fusion: values fused into their
one reader and residuals recomputed inside backward fusions take none (see
`_ir.LayerIR.fused_ids` and `kept_ids`).

One thing depends on the backend. When both passes broadcast the same value to the
same shape (a layer norm's statistics and scale: the forward normalises with them,
the backward's weight and input gradients reduce over products with them), common-
subexpression elimination makes the two one broadcast with readers in both passes.
XLA:CPU's reduction fusions (XNNPACK) do not take such a broadcast in, so it is
materialised at full size and lives from the forward pass to the backward pass
(`shared_broadcasts`), as compiled.memory_analysis() on the CPU devices shows.
XLA:GPU and XLA:TPU are assumed to fuse it into their reductions (not measured here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import math

import numpy as np

from uniap_jax.strategies import _ir


@dataclasses.dataclass(frozen=True, slots=True)
class Intervals:
  """Values that take memory of their own, each live over ops [start, end).

  The first `num_values` entries are the layer's values; the rest are broadcasts
  materialised at full size and kept from the forward to the backward pass
  (`shared_broadcasts`), each entry named by a value of its shape and layout (the
  result of the op that first reads the broadcast).
  """

  ids: tuple[int, ...]
  start: np.ndarray
  end: np.ndarray
  nbytes: np.ndarray  # unsharded bytes of each entry
  num_values: int
  # Per broadcast entry: (op, operand position) of each op that reads it.
  broadcast_readers: tuple[tuple[tuple[int, int], ...], ...] = ()


def intervals(ir: _ir.LayerIR, *, materialise_broadcasts: bool = False) -> Intervals:
  """Each value's live interval, in op positions of `ir.ops`.

  A value lives from the op that makes it (inputs from the start; cotangents from
  later layers from the first backward op) to its last reader: a kept activation to
  its last backward reader, a gradient to the end (the optimizer reads it), a
  forward output to the end of the forward pass (the next layer holds it after
  that), a backward value read only by other layers to the end of the backward pass.
  Parameters, optimizer state and constants are counted elsewhere; values XLA fuses
  into their one reader, residuals it recomputes inside the backward fusions, batch
  leaves that are not kept and the optimizer's results (written into the donated
  state) never occupy memory of their own. With `materialise_broadcasts` (XLA:CPU)
  the broadcasts of `shared_broadcasts` follow as entries of their own.
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
      end = max(last_read.get(w, start) for w in (v, *ir.kept_for.get(v, ())))
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
  nbytes = [float(ir.values[v].nbytes) for v in ids]
  num_values = len(ids)
  readers = []
  if materialise_broadcasts:
    for reader_out, found, size in shared_broadcasts(ir):
      ids.append(reader_out)
      starts.append(found[0][0])
      ends.append(found[-1][0] + 1)
      nbytes.append(size)
      readers.append(found)
  return Intervals(ids=tuple(ids), start=np.array(starts, dtype=np.int64),
                   end=np.array(ends, dtype=np.int64),
                   nbytes=np.array(nbytes, dtype=np.float64), num_values=num_values,
                   broadcast_readers=tuple(readers))


# Ops a reduction fusion absorbs between a broadcast's reader and the reduction.
_INTO_REDUCTION = frozenset({"elementwise", "reshape", "squeeze"})
_CHAIN_DEPTH = 8


def shared_broadcasts(ir: _ir.LayerIR
                      ) -> list[tuple[int, tuple[tuple[int, int], ...], float]]:
  """Broadcasts that XLA:CPU keeps from the forward to the backward pass.

  An elementwise op broadcasts an operand of smaller shape implicitly (`x * scale`
  with scale [1, 1, h]); XLA's lowering makes that a broadcast instruction, and
  identical broadcasts (same value, same shape) become one. It is kept as a buffer
  when a backward reader leads, through elementwise ops, to a reduction (a
  reduction fusion on XLA:CPU does not fuse broadcasts) and a forward op reads it
  too (so the buffer is the forward's, kept until the backward's last reader).
  Constants and literals are left out (every reader makes its own). Whether it is
  one buffer also depends on the candidate: an operand that a reader gathers first
  (an FSDP-sharded norm scale) is gathered anew by each pass, so the broadcasts
  differ and each fuses into its one reader; `peak_bytes`' caller drops those.

  Returns:
    (result of the first reader, its readers as (op, operand position) in program
    order, unsharded bytes) per broadcast, in program order.
  """
  readers: dict[int, list[int]] = {}
  for k, o in enumerate(ir.ops):
    for v in set(o.op.in_ids):
      if v >= 0:
        readers.setdefault(v, []).append(k)

  memo: dict[int, bool] = {}

  def feeds_reduction(v: int, depth: int) -> bool:
    if v not in memo:
      memo[v] = False  # a chain longer than a fusion's, or a cycle, does not count
      memo[v] = any(
          ir.ops[k].family == "reduction" or (
              ir.ops[k].family in _INTO_REDUCTION and depth < _CHAIN_DEPTH and any(
                  feeds_reduction(w, depth + 1) for w in ir.ops[k].op.out_ids if w >= 0))
          for k in readers.get(v, ()))
    return memo[v]

  groups: dict[tuple[int, tuple[int, ...]], list[tuple[int, int]]] = {}
  for k, o in enumerate(ir.ops):
    if o.family != "elementwise" or not o.op.out_ids or o.op.phase == "optimizer":
      continue
    shape = ir.values[o.op.out_ids[0]].shape
    for pos, v in enumerate(o.op.in_ids):
      if v >= 0 and v not in ir.constant_ids and ir.values[v].shape != shape:
        groups.setdefault((v, shape), []).append((k, pos))
  out = []
  for (v, shape), found in groups.items():
    phases = [ir.ops[k].op.phase for k, _ in found]
    if "forward" not in phases or not any(
        ph == "backward" and feeds_reduction(ir.ops[k].op.out_ids[0], 1)
        for (k, _), ph in zip(found, phases)):
      continue
    out.append((ir.ops[found[0][0]].op.out_ids[0], tuple(found),
                float(math.prod(shape) * ir.values[v].itemsize)))
  return sorted(out, key=lambda t: t[1][0])


def peak_bytes(live: Intervals, shards: Sequence[float],
               copies: Iterable[tuple[int, int, float]], transient: Sequence[float]) -> float:
  """The most bytes the layer's values occupy at once on one device.

  Args:
    live: the layer's intervals.
    shards: per entry of `live`, the number of shards its layout cuts it into
      (infinite: an entry the candidate does not hold).
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
