"""Sharding rules, one per primitive family: how an op computes under given layouts.

A rule sees the layouts its operands arrive in and the layout its result should
have (both decided by the candidate's labels) and answers how the op runs: the
layout each operand must be resharded to first, the layout each result comes out in
locally, the mesh axes over which a result is only a partial sum, and the fraction
of the op's FLOPs one device performs. The evaluator turns that into collectives
(`_layout.reshard`, `_layout.finish`). Where XLA's partitioner has a fixed preference
(gathers and scatters keep the table's sliced-through splits first), the rule
follows it; the comparison tests against compiled HLO hold the rules to it.

To add a family: write `def rule_x(ctx) -> Plan`, register it in `RULES`, and map its
primitives in `_links.FAMILY_OF_PRIMITIVE` (and their dimension ties in `_links.links`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math

from uniap_jax.strategies import _ir
from uniap_jax.strategies import _layout
from uniap_jax.strategies._layout import Layout


Partial = tuple[frozenset[int], ...]  # groups of summed mesh axes, one per summed dim
NONE: Partial = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
  """How one op runs: operands' layouts, results' local layouts and partial sums.

  `predictable` is False where XLA's partitioner is known to choose collectives these
  rules do not model; a candidate with such an op is not offered (its cost would be
  a guess). `combine` says how XLA combines the partial sums (`_layout.finish`): a
  contraction by the result dims they are scattered over, a reduction dim by dim.
  `pipeline_gathers`: inside a pipeline's shard_map (these axes automatic), XLA
  gathers the operands at `pipeline_operands` over these axes and runs the op
  without the result's collectives (`rule_scatter`).
  """

  in_targets: tuple[Layout | None, ...]
  out_natural: tuple[Layout, ...]
  out_partial: tuple[Partial, ...]
  frac: float
  predictable: bool = True
  combine: str = "scatter-first"
  pipeline_gathers: frozenset[int] = frozenset()
  pipeline_operands: tuple[int, ...] = ()


def _groups(axes_per_dim: Sequence[Sequence[int]]) -> Partial:
  return tuple(frozenset(a) for a in axes_per_dim if a)


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
  """What a rule sees: the op, its operands' and results' layouts and shapes, the mesh."""

  op: _ir.OpIR
  ins: tuple[Layout | None, ...]  # literals and captured constants arrive replicated
  outs: tuple[Layout, ...]
  in_shapes: tuple[tuple[int, ...] | None, ...]  # every operand's, constants' too
  out_shapes: tuple[tuple[int, ...], ...]
  sizes: tuple[int, ...]


def _count(layout: Layout, sizes: Sequence[int]) -> int:
  return _layout.shard_count(layout, sizes)


def _fits(size: int, axes: Sequence[int], sizes: Sequence[int]) -> bool:
  return size % math.prod(sizes[a] for a in axes) == 0


def _restrict(layout: Layout, shape: Sequence[int], target_shape: Sequence[int]) -> Layout:
  """`layout` (of `target_shape`) for an operand of `shape`: broadcast dims stay whole."""
  if shape == target_shape:
    return layout
  if len(shape) != len(target_shape):
    return tuple(() for _ in shape)
  return tuple(axes if s == t else () for axes, s, t in zip(layout, shape, target_shape))


def _drop(layout: Layout, axes: frozenset[int]) -> Layout:
  return tuple(tuple(a for a in dim if a not in axes) for dim in layout)


def _replicated(shape: Sequence[int] | None) -> Layout | None:
  return None if shape is None else tuple(() for _ in shape)


def rule_elementwise(ctx: Context) -> Plan:
  out, out_shape = ctx.outs[0], ctx.out_shapes[0]
  targets = tuple(None if s is None else _restrict(out, s, out_shape) for s in ctx.in_shapes)
  return Plan(targets, ctx.outs, tuple(NONE for _ in ctx.outs),
              1.0 / _count(out, ctx.sizes))


def rule_source(ctx: Context) -> Plan:
  """Ops with no array operands (iota, constants, random bits): made in place, sharded."""
  return Plan(tuple(_replicated(s) for s in ctx.in_shapes), ctx.outs,
              tuple(NONE for _ in ctx.outs), 1.0 / _count(ctx.outs[0], ctx.sizes))


def rule_other(ctx: Context) -> Plan:
  """No rule: gather every operand and compute replicated (the result is then sliced)."""
  return Plan(tuple(_replicated(s) for s in ctx.in_shapes),
              tuple(tuple(() for _ in s) for s in ctx.out_shapes),
              tuple(NONE for _ in ctx.outs), 1.0)


def rule_broadcast(ctx: Context) -> Plan:
  bd = ctx.op.op.param("broadcast_dimensions", ())
  out, out_shape, in_shape = ctx.outs[0], ctx.out_shapes[0], ctx.in_shapes[0]
  target = tuple(out[od] if in_shape[d] == out_shape[od] else () for d, od in enumerate(bd))
  return Plan((target,) + tuple(_replicated(s) for s in ctx.in_shapes[1:]), ctx.outs,
              (NONE,), 1.0 / _count(out, ctx.sizes))


def rule_transpose(ctx: Context) -> Plan:
  perm = ctx.op.op.param("permutation", ())
  src = ctx.ins[0]
  return Plan((src,), (tuple(src[d] for d in perm),), (NONE,),
              1.0 / _count(src, ctx.sizes))


def rule_reshape(ctx: Context) -> Plan:
  """Carries each group's leading split across the reshape; other splits are gathered."""
  src, in_shape, out_shape = ctx.ins[0], ctx.in_shapes[0], ctx.out_shapes[0]
  target = [list(axes) for axes in src]
  natural: list[tuple[int, ...]] = [() for _ in out_shape]
  covered = set()
  for gs, gd in _ir.reshape_groups(in_shape, out_shape):
    covered.update(gs)
    lead_axes = src[gs[0]]
    if lead_axes and _fits(out_shape[gd[0]], lead_axes, ctx.sizes):
      natural[gd[0]] = lead_axes
    else:
      target[gs[0]] = []
    for d in gs[1:]:
      target[d] = []
  for d in range(len(in_shape)):
    if d not in covered:
      target[d] = []
  extra = tuple(_replicated(s) for s in ctx.in_shapes[1:])
  return Plan((tuple(tuple(t) for t in target),) + extra, (tuple(natural),), (NONE,),
              1.0)


def rule_squeeze(ctx: Context) -> Plan:
  src, in_shape = ctx.ins[0], ctx.in_shapes[0]
  dims = set(d % max(len(in_shape), 1) for d in ctx.op.op.param("dimensions", ()))
  natural = tuple(src[d] for d in range(len(in_shape)) if d not in dims)
  return Plan((src,), (natural,), (NONE,), 1.0)


def rule_reduction(ctx: Context) -> Plan:
  """Reduces locally; axes that split a reduced dim leave partial results to combine."""
  axes = set(ctx.op.op.param("axes", ()))
  src = ctx.ins[0]
  kept = [d for d in range(len(src)) if d not in axes]
  partial = _groups([src[d] for d in sorted(axes) if d < len(src)])
  natural = tuple(src[d] for d in kept)
  n_out = len(ctx.outs)
  return Plan(tuple(src if s is not None and len(s) == len(src) else _replicated(s)
                    for s in ctx.in_shapes),
              tuple(natural if len(o) == len(natural) else tuple(() for _ in o)
                    for o in ctx.out_shapes),
              tuple(partial for _ in range(n_out)), 1.0 / _count(src, ctx.sizes),
              combine="reduction")


def rule_arg_reduction(ctx: Context) -> Plan:
  """argmax/argmin: the reduced dim is gathered first (no partial form)."""
  axes = set(ctx.op.op.param("axes", ()))
  src = ctx.ins[0]
  target = tuple(() if d in axes else a for d, a in enumerate(src))
  natural = tuple(a for d, a in enumerate(src) if d not in axes)
  return Plan((target,), (natural,), (NONE,), 1.0 / _count(target, ctx.sizes))


def _matmul(ctx: Context, l_layout: Layout, r_layout: Layout, out: Layout,
            lb: Sequence[int], rb: Sequence[int], lc: Sequence[int], rc: Sequence[int],
            lf: Sequence[int], rf: Sequence[int], out_b: Sequence[int],
            out_lf: Sequence[int], out_rf: Sequence[int]) -> Plan:
  """How XLA runs a contraction whose result layout is known: output-driven.

  Operands are resharded so that batch and free dims match the result; contracting
  dims keep the axes both operands split them on, and those axes leave partial sums,
  combined as `_layout.finish` says for contractions (a kernel split P("dp", "tp")
  whose gradient sums a batch split over both: two full all-reduces, no
  reduce-scatter). A result dim split over summed axes and kept ones (a weight
  gradient under ZeRO over tensor parallelism) is reduce-scattered within the kept
  shard: the parameter's spec lists the kept axes first (`_evaluate`), as XLA
  needs for that; listed the other way round, XLA reduce-scatters over another group
  and permutes the shards.
  (When the result's layout is pinned, as a plan pins it, XLA's partitioner does
  this; an operand-driven alternative, keeping operands and resharding the result,
  is what its propagation picks when nothing is pinned and layouts conflict.)
  """
  l_shape, r_shape = ctx.in_shapes[0], ctx.in_shapes[1]
  contracting = []
  for a, b in zip(lc, rc):
    common = tuple(x for x in l_layout[a] if x in r_layout[b])
    contracting.append(common)
  flat = [x for c in contracting for x in c]
  if len(set(flat)) != len(flat):
    contracting = [() for _ in contracting]
  cset = frozenset(x for c in contracting for x in c)

  def make(batch: Sequence[tuple[int, ...]], lfree: Sequence[tuple[int, ...]],
           rfree: Sequence[tuple[int, ...]], contr: Sequence[tuple[int, ...]]) -> Plan:
    lt = [()] * len(l_shape)
    rt = [()] * len(r_shape)
    nat = [()] * len(out)
    for k, axes in enumerate(batch):
      lt[lb[k]] = rt[rb[k]] = nat[out_b[k]] = axes
    for k, axes in enumerate(lfree):
      lt[lf[k]] = nat[out_lf[k]] = axes
    for k, axes in enumerate(rfree):
      rt[rf[k]] = nat[out_rf[k]] = axes
    for k, axes in enumerate(contr):
      lt[lc[k]] = rt[rc[k]] = axes
    partial = _groups(contr)
    used = {x for t in (lt, rt) for axes in t for x in axes}
    return Plan((tuple(lt), tuple(rt)) + tuple(_replicated(s) for s in ctx.in_shapes[2:]),
                (tuple(nat),), (partial,), 1.0 / math.prod(ctx.sizes[x] for x in used),
                combine="contraction")

  # Output-driven: operands resharded to the result's split; summed axes stay split.
  o = _drop(out, cset)
  return make([o[d] for d in out_b], [o[d] for d in out_lf], [o[d] for d in out_rf],
              contracting)


def rule_dot(ctx: Context) -> Plan:
  lc, rc, lb, rb = _ir.dot_dims(ctx.op.op)
  l_shape, r_shape = ctx.in_shapes[0], ctx.in_shapes[1]
  lf = [d for d in range(len(l_shape)) if d not in lc and d not in lb]
  rf = [d for d in range(len(r_shape)) if d not in rc and d not in rb]
  nb = len(lb)
  out_b = list(range(nb))
  out_lf = list(range(nb, nb + len(lf)))
  out_rf = list(range(nb + len(lf), nb + len(lf) + len(rf)))
  l_layout = ctx.ins[0] if ctx.ins[0] is not None else _replicated(l_shape)
  r_layout = ctx.ins[1] if ctx.ins[1] is not None else _replicated(r_shape)
  return _matmul(ctx, l_layout, r_layout, ctx.outs[0], lb, rb, lc, rc, lf, rf,
                 out_b, out_lf, out_rf)


def rule_conv(ctx: Context) -> Plan:
  """Convolution as a matmul: batch x out-features, contracting in-features.

  Spatial dims are windows and stay whole (no halo exchange is modelled); grouped
  convolutions are gathered and run replicated.
  """
  if ctx.op.op.param("feature_group_count", 1) != 1 or ctx.op.op.param(
      "batch_group_count", 1) != 1:
    return rule_other(ctx)
  lhs_spec, rhs_spec, out_spec = _ir.conv_specs(ctx.op.op)
  l_layout = ctx.ins[0] if ctx.ins[0] is not None else _replicated(ctx.in_shapes[0])
  r_layout = ctx.ins[1] if ctx.ins[1] is not None else _replicated(ctx.in_shapes[1])
  spatial = set(out_spec[2:])
  out = tuple(() if d in spatial else a for d, a in enumerate(ctx.outs[0]))
  return _matmul(ctx, l_layout, r_layout, out, (), (), (lhs_spec[1],), (rhs_spec[1],),
                 (lhs_spec[0],), (rhs_spec[0],), (), (out_spec[0],), (out_spec[1],))


def rule_gather(ctx: Context) -> Plan:
  """Gather (embedding lookup, take_along_axis), as XLA's partitioner runs it.

  XLA's preference, in order: a split of a sliced-through (offset) dim of the table
  passes through to the result (the indices are gathered over its axes); then the
  indices keep their splits (batching dims of the table follow them); last, a split
  of an indexed (collapsed) dim of the table on axes still free becomes a masked
  local lookup completed by a partial sum. Anything else is gathered first.

  When the indices take an axis that also splits an indexed dim of the table (a
  vocabulary split on the axis that splits the token ids' sequence, or the batch on
  part of the mesh), gathering the table first is what these rules say, but XLA's
  partitioner groups the devices instead and moves the shards with collective-permutes
  and all-to-alls, or all-reduces the gradient before slicing it: the plan is marked
  unpredictable. Only a table split over every mesh axis (FSDP over the vocabulary)
  compiles as predicted when the token ids are split along one dim (all batch, or
  all sequence): an all-gather, and a reduce-scatter of its gradient. Ids split along
  both make XLA all-reduce the whole gradient over each axis instead.
  """
  op = ctx.op.op
  table, indices = ctx.ins[0], ctx.ins[1]
  t_shape, i_shape = ctx.in_shapes[0], ctx.in_shapes[1]
  if table is None or indices is None:
    return rule_other(ctx)
  collapsed = _ir.dnum(op, "collapsed_slice_dims")
  op_batch = _ir.dnum(op, "operand_batching_dims")
  idx_batch = _ir.dnum(op, "start_indices_batching_dims")
  offset = _ir.dnum(op, "offset_dims")
  slice_sizes = tuple(op.param("slice_sizes", t_shape))
  out_shape = ctx.out_shapes[0]
  kept = [d for d in range(len(t_shape)) if d not in collapsed and d not in op_batch]
  tt: list[tuple[int, ...]] = [() for _ in t_shape]
  used: set[int] = set()
  for d in kept:
    # Partial windows stay whole. The window is the traced one: scaled to a
    # micro-batch, a window over the whole batch is at least the batch.
    if slice_sizes[d] >= t_shape[d]:
      tt[d] = tuple(table[d])
      used.update(tt[d])
  # Ids split over an axis that also splits the table's rows (the hidden dim over tp,
  # the sequence over tp too): the rules gather the ids. XLA does so only where the
  # ids are split along one dim over exactly the rows' axes, and those are the whole
  # mesh (FSDP over the hidden dim and the batch); otherwise it gathers the table,
  # all-reduces its whole gradient and moves results with all-to-alls, or moves
  # shards onto the axes left idle with collective-permutes. Not predictable then.
  index_dims = [set(axes) for axes in indices[:-1] if axes]
  every = {a for a, n in enumerate(ctx.sizes) if n > 1}
  shared = any(x in used for axes in indices for x in axes) and not (
      len(index_dims) == 1 and index_dims[0] == used == every)
  it = [tuple(x for x in axes if x not in used) for axes in indices]
  it[-1] = ()  # the index vector
  used.update(x for axes in it for x in axes)
  for a, b in zip(op_batch, idx_batch):
    tt[a] = it[b]
  clash = {x for d in collapsed for x in table[d] if x in used}
  for d in collapsed:
    tt[d] = tuple(x for x in table[d] if x not in used)
    used.update(tt[d])
  natural: list[tuple[int, ...]] = [() for _ in out_shape]
  batch_out = [d for d in range(len(out_shape)) if d not in offset]
  for od, d in zip(batch_out, range(len(i_shape) - 1)):
    natural[od] = it[d]
  for od, d in zip(offset, kept):
    natural[od] = tt[d]
  partial = _groups([tt[d] for d in collapsed])
  index_splits = [axes for axes in it[:-1] if axes]
  return Plan((tuple(tt), tuple(it)), (tuple(natural),), (partial,),
              1.0 / _count(tuple(natural), ctx.sizes),
              predictable=not shared and _predictable_clash(clash, table, index_splits,
                                                            ctx.sizes))


def _predictable_clash(clash: set[int], table: Layout, index_splits: Sequence[Sequence[int]],
                       sizes: Sequence[int]) -> bool:
  """Whether XLA gathers (or scatters into) a table whose indexed dims lose axes
  `clash` to the indices as the rules say: no clash, or a table split over every mesh
  axis along its indexed dims, with indices split along one dim (see `rule_gather`)."""
  if not clash:
    return True
  every = {a for a, n in enumerate(sizes) if n > 1}
  return ({a for axes in table for a in axes} == every == clash and len(index_splits) == 1)


def rule_scatter(ctx: Context) -> Plan:
  """Scatter-add (the gradient of a gather), mirroring `rule_gather`.

  In the same order: the result's sliced-through dims pass their splits to the
  updates; the updates keep their other splits (over batching dims each device
  scatters into its own rows, over indexed positions they leave partial sums: tokens
  on different devices add into the same row); last, the result's indexed rows are
  split on axes still free (each device keeps the rows it owns). An axis of the
  updates that the result's indexed rows also want makes the plan unpredictable,
  as in `rule_gather`, unless the result is split over every mesh axis and the
  updates along one scatter dim.
  """
  op = ctx.op.op
  if len(ctx.ins) < 3 or any(x is None for x in ctx.ins[:3]):
    return rule_other(ctx)
  operand_shape, i_shape, u_shape = ctx.in_shapes[0], ctx.in_shapes[1], ctx.in_shapes[2]
  updates = ctx.ins[2]
  window = _ir.dnum(op, "update_window_dims")
  inserted = _ir.dnum(op, "inserted_window_dims")
  op_batch = _ir.dnum(op, "operand_batching_dims")
  idx_batch = _ir.dnum(op, "scatter_indices_batching_dims")
  out = ctx.outs[0]
  kept = [d for d in range(len(operand_shape)) if d not in inserted and d not in op_batch]
  scatter_dims = [d for d in range(len(u_shape)) if d not in window]
  natural: list[tuple[int, ...]] = [() for _ in operand_shape]
  ut: list[tuple[int, ...]] = [() for _ in u_shape]
  used: set[int] = set()
  for ud, d in zip(window, kept):
    if u_shape[ud] == operand_shape[d]:
      natural[d] = ut[ud] = tuple(out[d])
      used.update(out[d])
  for ud in scatter_dims:
    ut[ud] = tuple(x for x in updates[ud] if x not in used)
    used.update(ut[ud])
  clash = {x for d in inserted for x in out[d] if x in used}
  for d in inserted:
    natural[d] = tuple(x for x in out[d] if x not in used)
    used.update(natural[d])
  it: list[tuple[int, ...]] = [() for _ in i_shape]
  partial: list[tuple[int, ...]] = []
  for ud, d in zip(scatter_dims, range(len(i_shape) - 1)):
    it[d] = ut[ud]
    if d in idx_batch:
      natural[op_batch[idx_batch.index(d)]] = ut[ud]
    else:
      partial.append(ut[ud])
  natural_t = _drop(tuple(natural), frozenset(x for p in partial for x in p))
  targets = (natural_t, tuple(it), tuple(ut))
  predictable = _predictable_clash(clash, out, [ut[ud] for ud in scatter_dims if ut[ud]],
                                   ctx.sizes)
  # The predictable clash (rows split over every axis, updates along one scatter dim):
  # a plain jit reduce-scatters the result; inside a pipeline's shard_map XLA gathers
  # the indices and the updates over those axes in every run instead, and each device
  # scatters into the rows it owns.
  pipeline = frozenset(clash) if clash and predictable else frozenset()
  return Plan(targets + tuple(_replicated(s) for s in ctx.in_shapes[3:]), (natural_t,),
              (_groups(partial),), 1.0 / _count(tuple(ut), ctx.sizes),
              predictable=predictable, pipeline_gathers=pipeline,
              pipeline_operands=(1, 2) if pipeline else ())


def rule_concatenate(ctx: Context) -> Plan:
  dim = ctx.op.op.param("dimension", 0)
  out = ctx.outs[0]
  whole = tuple(() if d == dim else a for d, a in enumerate(out))
  return Plan(tuple(None if s is None else _restrict(whole, s, ctx.out_shapes[0])
                    if len(s) == len(whole) else _replicated(s) for s in ctx.in_shapes),
              (whole,), (NONE,), 1.0 / _count(whole, ctx.sizes))


def rule_slice(ctx: Context) -> Plan:
  """slice / dynamic_slice / pad: dims whose size changes are gathered first."""
  src, in_shape, out_shape = ctx.ins[0], ctx.in_shapes[0], ctx.out_shapes[0]
  if len(in_shape) != len(out_shape):
    return rule_other(ctx)
  target = tuple(a if in_shape[d] == out_shape[d] else () for d, a in enumerate(src))
  return Plan((target,) + tuple(_replicated(s) for s in ctx.in_shapes[1:]), (target,),
              (NONE,), 1.0 / _count(target, ctx.sizes))


def rule_update_slice(ctx: Context) -> Plan:
  out, out_shape = ctx.outs[0], ctx.out_shapes[0]
  update_shape = ctx.in_shapes[1]
  whole = tuple(a if update_shape is not None and len(update_shape) == len(out_shape)
                and update_shape[d] == out_shape[d] else () for d, a in enumerate(out))
  targets = [whole, whole if update_shape is not None else None]
  targets += [_replicated(s) for s in ctx.in_shapes[2:]]
  return Plan(tuple(targets), (whole,), (NONE,), 1.0 / _count(whole, ctx.sizes))


def rule_split(ctx: Context) -> Plan:
  axis = ctx.op.op.param("axis", 0)
  src = ctx.ins[0]
  target = tuple(() if d == axis else a for d, a in enumerate(src))
  return Plan((target,), tuple(target for _ in ctx.outs), tuple(NONE for _ in ctx.outs),
              1.0 / _count(target, ctx.sizes))


Rule = Callable[[Context], Plan]

# The registry: family -> rule. `_ir.FAMILY_OF_PRIMITIVE` maps primitives to families.
RULES: Mapping[str, Rule] = {
    "elementwise": rule_elementwise,
    "source": rule_source,
    "broadcast": rule_broadcast,
    "reshape": rule_reshape,
    "squeeze": rule_squeeze,
    "transpose": rule_transpose,
    "reduction": rule_reduction,
    "arg_reduction": rule_arg_reduction,
    "dot": rule_dot,
    "conv": rule_conv,
    "gather": rule_gather,
    "scatter": rule_scatter,
    "concatenate": rule_concatenate,
    "slice": rule_slice,
    "update_slice": rule_update_slice,
    "split": rule_split,
    "other": rule_other,
}
