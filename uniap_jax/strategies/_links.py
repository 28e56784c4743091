"""How each primitive ties tensor dimensions together, and which rule family it has.

`links(op)` lists the (value, dim) pairs an op ties: an elementwise op ties its
operands' dims to its result's, a matmul ties contracting dims together and batch
and free dims to its result's, a reshape ties a merged dim to its leading factor, a
gather ties the table's sliced dims and the indices' batch dims to the result. The
labels of `_ir` are the connected components.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
from typing import Any

from uniap_jax import graph as graph_lib

Node = tuple[int, int]  # (value id, dim)

# Rule family of each primitive; unknown primitives fall back on Op.kind, then "other".
_ELEMENTWISE = (
    "abs add add_any and atan2 cbrt ceil clamp convert_element_type copy copy_p cos cosh "
    "digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag integer_pow "
    "is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow "
    "real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh "
    "xor shift_left shift_right_logical shift_right_arithmetic population_count "
    "bitcast_convert_type optimization_barrier").split()
FAMILY_OF_PRIMITIVE: dict[str, str] = {p: "elementwise" for p in _ELEMENTWISE}
FAMILY_OF_PRIMITIVE.update({
    "dot_general": "dot", "conv_general_dilated": "conv",
    "reduce_sum": "reduction", "reduce_max": "reduction", "reduce_min": "reduction",
    "reduce_prod": "reduction", "reduce_and": "reduction", "reduce_or": "reduction",
    "reduce_xor": "reduction", "argmax": "arg_reduction", "argmin": "arg_reduction",
    "broadcast_in_dim": "broadcast", "reshape": "reshape", "squeeze": "squeeze",
    "expand_dims": "reshape", "transpose": "transpose", "gather": "gather",
    "scatter": "scatter", "scatter-add": "scatter", "scatter_add": "scatter",
    "scatter_mul": "scatter", "scatter_min": "scatter", "scatter_max": "scatter",
    "concatenate": "concatenate", "pad": "slice", "slice": "slice",
    "dynamic_slice": "slice", "dynamic_update_slice": "update_slice", "split": "split",
    "iota": "source",
})
_FAMILY_OF_KIND = {
    "dot_general": "dot", "conv": "conv", "elementwise": "elementwise",
    "reduction": "reduction", "gather": "gather", "scatter": "scatter",
    "reshape": "reshape", "transpose": "transpose", "broadcast": "broadcast",
    "slice": "slice", "concatenate": "concatenate", "convert": "elementwise",
}


def family_of(op: graph_lib.Op) -> str:
  if op.primitive in FAMILY_OF_PRIMITIVE:
    return FAMILY_OF_PRIMITIVE[op.primitive]
  if not op.in_ids and op.out_ids:
    return "source"
  return _FAMILY_OF_KIND.get(op.kind, "other")


def field(obj: Any, name: str, default: Any = ()) -> Any:
  """A field of a dimension-numbers object, dict, or its printed form."""
  if obj is None:
    return default
  if hasattr(obj, name):
    return getattr(obj, name)
  if isinstance(obj, Mapping):
    return obj.get(name, default)
  if isinstance(obj, Sequence) and not isinstance(obj, str):
    for item in obj:
      if isinstance(item, Sequence) and len(item) == 2 and item[0] == name:
        return item[1]
    return default
  m = re.search(rf"\b{name}=\(([\d,\s]*)\)", str(obj))
  if m:
    return tuple(int(x) for x in m.group(1).replace(" ", "").split(",") if x)
  return default


def dnum(op: graph_lib.Op, name: str) -> tuple[int, ...]:
  """A gather/scatter dimension-number field: a param of its own or inside
  "dimension_numbers" (an object, mapping or its printed form)."""
  value = op.param(name)
  if value is None:
    value = field(op.param("dimension_numbers"), name, ())
  return tuple(value)


def dot_dims(op: graph_lib.Op) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(lhs contracting, rhs contracting, lhs batch, rhs batch) of a dot_general."""
  (lc, rc), (lb, rb) = op.param("dimension_numbers")
  return tuple(lc), tuple(rc), tuple(lb), tuple(rb)


def conv_specs(op: graph_lib.Op) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(lhs_spec, rhs_spec, out_spec): (batch, feature, spatial...), (out, in, spatial...)."""
  dn = op.param("dimension_numbers")
  if dn is None:
    rank = len(op.in_types[0].shape)
    spec = tuple(range(rank))
    return spec, spec, spec
  return tuple(field(dn, "lhs_spec", dn[0] if isinstance(dn, tuple) else ())), tuple(
      field(dn, "rhs_spec", dn[1] if isinstance(dn, tuple) else ())), tuple(
          field(dn, "out_spec", dn[2] if isinstance(dn, tuple) else ()))


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
  """Groups of source and destination dims with equal products (size-1 dims dropped)."""
  groups: list[tuple[list[int], list[int]]] = []
  i = j = 0
  src_dims = [d for d in range(len(src)) if src[d] != 1]
  dst_dims = [d for d in range(len(dst)) if dst[d] != 1]
  while i < len(src_dims) and j < len(dst_dims):
    gs, gd = [src_dims[i]], [dst_dims[j]]
    ps, pd = src[src_dims[i]], dst[dst_dims[j]]
    i += 1
    j += 1
    while ps != pd:
      if ps < pd:
        if i >= len(src_dims):
          break
        gs.append(src_dims[i])
        ps *= src[src_dims[i]]
        i += 1
      else:
        if j >= len(dst_dims):
          break
        gd.append(dst_dims[j])
        pd *= dst[dst_dims[j]]
        j += 1
    groups.append((gs, gd))
  return groups


def _gather_out_batch_dims(op: graph_lib.Op) -> list[int]:
  offset = set(dnum(op, "offset_dims"))
  return [d for d in range(len(op.out_types[0].shape)) if d not in offset]


def links(op: graph_lib.Op) -> list[tuple[Node, Node]]:
  """Pairs of (value, dim) that an op ties together (same label)."""
  fam = family_of(op)
  ins, outs = op.in_ids, op.out_ids
  in_shapes = [t.shape for t in op.in_types]
  out_shapes = [t.shape for t in op.out_types]
  pairs: list[tuple[Node, Node]] = []

  def tie(a: int, da: int, sa: Sequence[int], b: int, db: int, sb: Sequence[int]) -> None:
    if a >= 0 and b >= 0 and sa[da] == sb[db] and sa[da] > 1:
      pairs.append(((a, da), (b, db)))

  if fam in ("elementwise",) and outs:
    for o, so in zip(outs, out_shapes):
      for i, si in zip(ins, in_shapes):
        if len(si) == len(so):
          for d in range(len(so)):
            tie(i, d, si, o, d, so)
  elif fam == "broadcast":
    bd = op.param("broadcast_dimensions", ())
    for d, od in enumerate(bd):
      tie(ins[0], d, in_shapes[0], outs[0], od, out_shapes[0])
  elif fam == "reshape":
    for gs, gd in reshape_groups(in_shapes[0], out_shapes[0]):
      if ins[0] >= 0 and in_shapes[0][gs[0]] > 1 and out_shapes[0][gd[0]] > 1:
        pairs.append(((ins[0], gs[0]), (outs[0], gd[0])))
  elif fam == "squeeze":
    dims = set(d % max(len(in_shapes[0]), 1) for d in op.param("dimensions", ()))
    kept = [d for d in range(len(in_shapes[0])) if d not in dims]
    for od, d in enumerate(kept):
      tie(ins[0], d, in_shapes[0], outs[0], od, out_shapes[0])
  elif fam == "transpose":
    perm = op.param("permutation", ())
    for od, d in enumerate(perm):
      tie(ins[0], d, in_shapes[0], outs[0], od, out_shapes[0])
  elif fam in ("reduction", "arg_reduction"):
    axes = set(op.param("axes", ()))
    kept = [d for d in range(len(in_shapes[0])) if d not in axes]
    for o, so in zip(outs, out_shapes):
      for od, d in enumerate(kept):
        if od < len(so):
          for i, si in zip(ins, in_shapes):
            if len(si) == len(in_shapes[0]):
              tie(i, d, si, o, od, so)
  elif fam == "dot":
    lc, rc, lb, rb = dot_dims(op)
    l, r, o = ins[0], ins[1], outs[0]
    sl, sr, so = in_shapes[0], in_shapes[1], out_shapes[0]
    for a, b in zip(lc, rc):
      tie(l, a, sl, r, b, sr)
    for k, (a, b) in enumerate(zip(lb, rb)):
      tie(l, a, sl, r, b, sr)
      tie(l, a, sl, o, k, so)
    lfree = [d for d in range(len(sl)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(sr)) if d not in rc and d not in rb]
    for k, d in enumerate(lfree):
      tie(l, d, sl, o, len(lb) + k, so)
    for k, d in enumerate(rfree):
      tie(r, d, sr, o, len(lb) + len(lfree) + k, so)
  elif fam == "conv":
    lhs_spec, rhs_spec, out_spec = conv_specs(op)
    l, r, o = ins[0], ins[1], outs[0]
    sl, sr, so = in_shapes[0], in_shapes[1], out_shapes[0]
    tie(l, lhs_spec[0], sl, o, out_spec[0], so)
    if op.param("feature_group_count", 1) == 1:
      tie(l, lhs_spec[1], sl, r, rhs_spec[1], sr)
    tie(r, rhs_spec[0], sr, o, out_spec[1], so)
  elif fam == "gather":
    operand, indices, o = ins[0], ins[1], outs[0]
    so, si, sout = in_shapes[0], in_shapes[1], out_shapes[0]
    collapsed = set(dnum(op, "collapsed_slice_dims"))
    op_batch = dnum(op, "operand_batching_dims")
    idx_batch = dnum(op, "start_indices_batching_dims")
    offset = dnum(op, "offset_dims")
    kept = [d for d in range(len(so)) if d not in collapsed and d not in op_batch]
    for od, d in zip(offset, kept):
      tie(operand, d, so, o, od, sout)
    idx_dims = list(range(len(si) - 1))  # jax puts the index vector last
    for od, d in zip(_gather_out_batch_dims(op), idx_dims):
      tie(indices, d, si, o, od, sout)
    for a, b in zip(op_batch, idx_batch):
      tie(operand, a, so, indices, b, si)
  elif fam == "scatter":
    operand, indices, updates = ins[0], ins[1], ins[2]
    so, si, su = in_shapes[0], in_shapes[1], in_shapes[2]
    o, sout = outs[0], out_shapes[0]
    for d in range(len(so)):
      tie(operand, d, so, o, d, sout)
    window = dnum(op, "update_window_dims")
    inserted = set(dnum(op, "inserted_window_dims"))
    op_batch = dnum(op, "operand_batching_dims")
    idx_batch = dnum(op, "scatter_indices_batching_dims")
    for a, b in zip(op_batch, idx_batch):
      tie(operand, a, so, indices, b, si)
    kept = [d for d in range(len(so)) if d not in inserted and d not in op_batch]
    for ud, d in zip(window, kept):
      tie(updates, ud, su, operand, d, so)
    scatter_dims = [d for d in range(len(su)) if d not in window]
    for ud, d in zip(scatter_dims, range(len(si) - 1)):
      tie(updates, ud, su, indices, d, si)
  elif fam in ("concatenate", "slice", "update_slice", "split"):
    for o, so in zip(outs, out_shapes):
      for i, si in zip(ins, in_shapes):
        if len(si) == len(so):
          for d in range(len(so)):
            tie(i, d, si, o, d, so)
  return pairs


class UnionFind:
  """Union-find over hashable nodes, with path halving."""

  def __init__(self):
    self.parent: dict[Any, Any] = {}

  def find(self, x: Any) -> Any:
    parent = self.parent
    parent.setdefault(x, x)
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  def union(self, a: Any, b: Any) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[rb] = ra
