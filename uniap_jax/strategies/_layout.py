"""Layouts of tensors over a mesh, and the collectives that convert between them.

A layout says, per tensor dimension, which mesh axes (by index, in mesh order) split
it: `((0,), (), (1,))` is PartitionSpec("dp", None, "tp") on a ("dp", "tp") mesh.
Resharding follows XLA's SPMD partitioner: an axis that only the target uses is a
local slice (free), one that only the source uses is an all-gather, one that moves
to another dimension is an all-to-all. Partial sums (a contraction over a split
dimension) are resolved by an all-reduce, or by a reduce-scatter when the target
splits the result over all the summed axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

Layout = tuple[tuple[int, ...], ...]
CommKind = Literal["all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Comm:
  """One collective a candidate issues, per device.

  Attributes:
    kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or "send".
    axes: mesh axis names of its device groups.
    bytes: the larger of its operand and result on one device, per execution.
    phase: "forward", "backward", "optimizer", or "recompute" (the forward's
      collectives again, for a candidate that recomputes its activations).
    per_step: True for gradient synchronisation, issued once per training step after
      micro-batch gradients are accumulated locally; False for once per micro-batch.
    count: executions per micro-batch (or per step when per_step).
  """

  kind: str
  axes: tuple[str, ...]
  bytes: float
  phase: str
  per_step: bool = False
  count: int = 1


def shard_count(layout: Layout, sizes: Sequence[int]) -> int:
  return math.prod(sizes[a] for axes in layout for a in axes)


def used_axes(layout: Layout) -> frozenset[int]:
  return frozenset(a for axes in layout for a in axes)


def reshard(src: Layout, dst: Layout, total_bytes: float,
            sizes: Sequence[int]) -> tuple[list[tuple[str, tuple[int, ...], float]], float]:
  """Collectives that turn layout `src` into `dst` for a tensor of `total_bytes`.

  Returns ([(kind, axes, bytes per device)], bytes per device of the largest buffer
  on the way), in XLA's order: all-to-alls for axes that change dimension, then one
  all-gather per dimension for the axes the target drops, last dimension first (so a
  P("dp", "tp") kernel gathers its tp half first, on the smaller buffer); axes only
  the target adds are sliced locally for free.
  """
  if src == dst:
    return [], total_bytes / shard_count(src, sizes)
  comms: list[tuple[str, tuple[int, ...], float]] = []
  cur = [list(axes) for axes in src]
  where_dst = {a: j for j, axes in enumerate(dst) for a in axes}
  peak = total_bytes / shard_count(src, sizes)
  moves: dict[tuple[int, int], list[int]] = {}
  for i, axes in enumerate(src):
    for a in axes:
      j = where_dst.get(a)
      if j is not None and j != i:
        moves.setdefault((i, j), []).append(a)
  for (i, j), axes in sorted(moves.items()):
    # Axes that move between the same two dims go in one all-to-all.
    local = total_bytes / math.prod(sizes[b] for c in cur for b in c)
    comms.append(("all-to-all", tuple(sorted(axes)), local))
    for a in axes:
      cur[i].remove(a)
      cur[j].append(a)
  for i in reversed(range(len(cur))):
    drop = tuple(sorted(a for a in cur[i] if a not in dst[i]))
    if drop:
      cur[i] = [a for a in cur[i] if a in dst[i]]
      local = total_bytes / math.prod(sizes[b] for c in cur for b in c)
      comms.append(("all-gather", drop, local))
      peak = max(peak, local)
  return comms, peak


def to_spec(layout: Layout, names: Sequence[str]) -> tuple[tuple[str, ...] | str | None, ...]:
  """A layout as the entries of a PartitionSpec: None, "dp" or ("dp", "tp") per dim."""
  out = []
  for axes in layout:
    if not axes:
      out.append(None)
    elif len(axes) == 1:
      out.append(names[axes[0]])
    else:
      out.append(tuple(names[a] for a in axes))
  while out and out[-1] is None:
    out.pop()
  return tuple(out)


def drop(layout: Layout, axes: frozenset[int]) -> Layout:
  return tuple(tuple(a for a in dim if a not in axes) for dim in layout)


COMBINE = ("scatter-first", "contraction", "reduction")


def finish(natural: Layout, partial: Sequence[frozenset[int]], target: Layout,
           total_bytes: float, sizes: Sequence[int], *, combine: str = "scatter-first"
           ) -> tuple[list[tuple[str, tuple[int, ...], float]], float]:
  """Collectives from an op's local result to the layout its consumers expect.

  `natural` is how the result comes out on each device; `partial` lists groups of
  mesh axes over which it is still a partial sum, one group per summed dim (XLA
  combines each summed dim separately). Groups the target splits the result over are
  reduce-scattered first, then the rest is all-reduced on what is left, then
  whatever `reshard` needs. Returns (collectives, bytes per device of the largest
  buffer on the way).

  That is `combine="scatter-first"` (gathers and scatters). With "contraction" (a
  dot or convolution), XLA's partitioner regroups the summed
  axes by the result dims the target splits over them, whatever contracting dims
  they split: over one such dim it reduce-scatters the summed axes of that dim
  (one collective, even across contracting dims) and all-reduces each group's
  remaining axes on the shard; over several dims it all-reduces each dim's summed
  axes at full size, slices, and all-reduces the remaining axes on the shard.
  Measured on XLA:CPU for kernels split over one and two dims, batch split over one
  and two dims, and 2- and 3-axis meshes. With "reduction" (reduce_sum and kin),
  each summed dim's group is all-reduced at full size, the last summed dim first;
  the last of them (the first summed dim's) is a reduce-scatter when the target adds
  exactly its axes (a bias gradient summed over a batch split over dp and a
  sequence split over tp, laid out P("dp"): an all-reduce over tp, then a
  reduce-scatter over dp, both of the whole bias).
  """
  if combine not in COMBINE:
    raise ValueError(f"combine={combine!r}; allowed: {', '.join(COMBINE)}.")
  groups = [g for g in partial if g]
  if not groups:
    return reshard(natural, target, total_bytes, sizes)
  comms: list[tuple[str, tuple[int, ...], float]] = []
  cur = natural
  peak = total_bytes / shard_count(cur, sizes)
  if combine == "reduction":
    full = total_bytes / shard_count(cur, sizes)
    added = used_axes(target) - used_axes(cur)
    for g in reversed(groups[1:]):
      comms.append(("all-reduce", tuple(sorted(g)), full))
    last = groups[0]
    if added == last:
      comms.append(("reduce-scatter", tuple(sorted(last)), full))
    else:
      comms.append(("all-reduce", tuple(sorted(last)), full))
    rest, rest_peak = reshard(cur, target, total_bytes, sizes)
    return comms + rest, max(peak, rest_peak)
  if combine == "contraction":
    summed = frozenset().union(*groups)
    dims = [d for d, axes in enumerate(target) if summed & set(axes)]
    if len(dims) == 1:
      scattered = summed & set(target[dims[0]])
      groups = [scattered] + [g - scattered for g in groups if g - scattered]
    elif len(dims) > 1:
      for d in dims:
        axes = tuple(a for a in target[d] if a in summed)
        comms.append(("all-reduce", tuple(sorted(axes)), total_bytes / shard_count(cur, sizes)))
      done = summed & frozenset(a for d in dims for a in target[d])
      cur = tuple(tuple(a for a in t if a in done or a in c) + tuple(a for a in c if a not in t)
                  if d in dims else tuple(c) for d, (c, t) in enumerate(zip(cur, target)))
      groups = [g - done for g in groups if g - done]
  used = used_axes(target)
  for g in sorted(groups, key=lambda g: (not g <= used, sorted(g))):
    unreduced = total_bytes / shard_count(cur, sizes)
    if g <= used:
      scattered = tuple(
          tuple(a for a in t if a in g or a in c) if set(c) <= set(t) else c
          for c, t in zip(cur, target))
      if used_axes(scattered) - used_axes(cur) >= g:
        comms.append(("reduce-scatter", tuple(sorted(g)), unreduced))
        cur = scattered
        continue
    comms.append(("all-reduce", tuple(sorted(g)), unreduced))
  rest, rest_peak = reshard(cur, target, total_bytes, sizes)
  return comms + rest, max(peak, rest_peak)
