"""A layer's ops prepared for sharding: tensor dimensions grouped into labels.

Two dimensions get the same label when an op ties them: an elementwise op ties its
operands' dims to its result's, a matmul ties contracting dims together and batch
and free dims to its result's, a reshape ties a merged dim to its leading factor,
and so on. A strategy then splits labels, not single tensors: "split label F over
axis tp" shards the MLP's hidden dim in the up-projection kernel, its output, the
activation, the down-projection kernel and all their gradients alike, which is what
Megatron does by hand. Labels are local to a layer; whether a label is the batch is
decided over the whole graph (`batch_dims`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any

import numpy as np

from uniap_jax import graph as graph_lib
from uniap_jax.strategies._links import FAMILY_OF_PRIMITIVE as FAMILY_OF_PRIMITIVE
from uniap_jax.strategies._links import Node
from uniap_jax.strategies._links import UnionFind
from uniap_jax.strategies._links import conv_specs as conv_specs
from uniap_jax.strategies._links import dnum as dnum
from uniap_jax.strategies._links import dot_dims as dot_dims
from uniap_jax.strategies._links import family_of as family_of
from uniap_jax.strategies._links import field as field
from uniap_jax.strategies._links import links as links
from uniap_jax.strategies._links import reshape_groups as reshape_groups

@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GraphInfo:
  """What labelling one layer needs to know about the whole graph.

  Attributes:
    batch: (value, dim) pairs tied to the leading dim of a batch input.
    roles: value id -> role of the step's inputs ("param", "optimizer_state", ...).
    live: values that reach the step's results (the rest is dead code XLA drops).
    traced_batch: the batch size the graph was traced with.
    tied: parameters the forward ops of more than one layer read (a tied embedding:
      the token table and the LM head that reuses it): value id -> parameter path.
  """

  batch: frozenset[Node]
  roles: Mapping[int, str]
  live: frozenset[int]
  traced_batch: int
  tied: Mapping[int, str] = dataclasses.field(default_factory=dict)


def analyze(graph: graph_lib.LayerGraph) -> GraphInfo:
  """Batch dims, input roles and live values of a traced step."""
  producer: dict[int, graph_lib.Op] = {}
  for layer in graph.layers:
    for op in layer.ops:
      for v in op.out_ids:
        producer[v] = op
  roots = set(graph.output_ids) | {i.updated_id for i in graph.inputs if i.updated_id >= 0}
  if not roots:  # a graph without recorded results: keep everything
    roots = set(producer)
  live: set[int] = set()
  stack = list(roots)
  while stack:
    v = stack.pop()
    if v in live:
      continue
    live.add(v)
    op = producer.get(v)
    if op is not None:
      stack.extend(i for i in op.in_ids if i >= 0 and i not in live)
  roles = {i.value_id: i.role for i in graph.inputs}
  paths = {i.value_id: i.path for i in graph.inputs}
  readers: dict[int, set[str]] = {}
  for layer in graph.layers:
    for op in layer.ops:
      if op.phase == "forward":
        for v in op.in_ids:
          if roles.get(v) == "param":
            readers.setdefault(v, set()).add(layer.name)
  return GraphInfo(batch=batch_dims(graph), roles=roles, live=frozenset(live),
                   traced_batch=graph.batch_size,
                   tied={v: paths[v] for v, names in sorted(readers.items()) if len(names) > 1})


def batch_dims(graph: graph_lib.LayerGraph) -> frozenset[Node]:
  """Every (value, dim) of the graph tied to the leading dim of a batch input."""
  uf = UnionFind()
  for layer in graph.layers:
    for op in layer.ops:
      for a, b in links(op):
        uf.union(a, b)
  roots = {uf.find((inp.value_id, 0)) for inp in graph.inputs
           if inp.role == "batch" and inp.info.shape}
  return frozenset(n for n in list(uf.parent) if uf.find(n) in roots)


@dataclasses.dataclass(frozen=True, slots=True)
class Value:
  """One tensor of a layer, with its dims' labels (-1: size-1 dim, never split)."""

  id: int
  shape: tuple[int, ...]
  itemsize: int
  labels: tuple[int, ...]
  batched: bool  # some dim is the batch (its size follows the micro-batch)
  nbytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class OpIR:
  index: int
  op: graph_lib.Op
  family: str
  flops: float
  batched: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerIR:
  """A layer's values and ops at one micro-batch size, with labels and roles.

  Attributes:
    layer: the graph layer.
    values: value id -> Value, for everything the layer's ops read or write.
    ops: the layer's ops in program order.
    num_labels: labels are 0..num_labels-1, numbered by first appearance.
    label_names: a readable name per label, unique in the layer (`label_names`):
      "batch", "seq", "hidden", "c_fc:1" (dim 1 of the c_fc kernel), ...
    batch_labels / param_labels / boundary_labels: labels of batch dims, of parameter
      dims, of forward boundary activations' dims.
    cooccur: pairs of labels that appear in one tensor.
    param_ids / opt_state_ids / batch_ids: inputs by role.
    input_ids: forward boundary inputs (activations from earlier layers and batch leaves).
    output_ids: values later layers read.
    residual_ids: forward values the backward ops read.
    kept_ids: what is stored between the passes for them: XLA fuses cheap elementwise
      ops into their readers, so a residual made by such ops from other stored values
      is recomputed in the backward fusion instead of kept (transcendental ops, matmuls,
      reductions and gathers are kept); and several such residuals made from one value
      are recomputed from it when it is smaller than they are together.
    kept_for: kept values that no backward op reads, kept because residuals
      recomputed from them are: value id -> those residuals (whose last reader
      ends its life).
    grad_ids: gradients handed to the optimizer ops.
    grad_like_ids: values whose partial sums can wait for the per-step gradient sync.
    fused_ids: results of elementwise-like ops read by exactly one op: XLA fuses them
      into their reader, so they never occupy memory of their own.
    readers: value id -> how many of the layer's ops read it.
    constant_ids: values computed from constants alone (iota, masks): every device
      computes whatever part it needs, so resharding them is free.
    scale: micro-batch size / traced batch size.
    tied_ids: parameters this layer reads that other layers read too (`GraphInfo.tied`),
      whether it owns them (`param_ids`) or not. They have one stored layout, which
      the owner's candidate sets and every reader's forward must gather from.
    passed_ids: those of `tied_ids` that neither this layer nor its module owns (the
      parameter's path does not lie under the layer's module path): the model passes
      them to the call, as a tied head gets the token table; a second call of the
      owning module (T5's "shared@1") reads its own parameter.
  """

  layer: graph_lib.Layer
  values: Mapping[int, Value]
  ops: tuple[OpIR, ...]
  num_labels: int
  label_names: tuple[str, ...]
  batch_labels: frozenset[int]
  param_labels: frozenset[int]
  boundary_labels: frozenset[int]
  cooccur: frozenset[tuple[int, int]]
  param_ids: tuple[int, ...]
  opt_state_ids: tuple[int, ...]
  batch_ids: tuple[int, ...]
  input_ids: tuple[int, ...]
  output_ids: tuple[int, ...]
  residual_ids: tuple[int, ...]
  kept_ids: tuple[int, ...]
  kept_for: Mapping[int, tuple[int, ...]]
  grad_ids: tuple[int, ...]
  grad_like_ids: frozenset[int]
  fused_ids: frozenset[int]
  readers: Mapping[int, int]
  constant_ids: frozenset[int]
  scale: float
  tied_ids: frozenset[int] = frozenset()
  passed_ids: frozenset[int] = frozenset()


def build(layer: graph_lib.Layer, info: GraphInfo | None = None, *,
          microbatch: int | None = None) -> LayerIR:
  """Labels a layer's dims and scales its batch dims to `microbatch` samples.

  Dead ops (whose results reach nothing the step returns) are dropped, as XLA does.

  Args:
    layer: the layer.
    info: the graph-wide facts (`analyze(graph)`); without it nothing is batch and
      every op is live.
    microbatch: the micro-batch size to cost; default the traced batch.
  Raises:
    ValueError: a batch dim does not scale to a whole size.
  """
  batch = info.batch if info else frozenset()
  roles = dict(info.roles) if info else {}
  traced_batch = info.traced_batch if info else 1
  live_ops = [op for op in layer.ops
              if info is None or any(v in info.live for v in op.out_ids)]
  for p in layer.params:
    roles[p.value_id] = "param"
  microbatch = traced_batch if microbatch is None else microbatch
  scale = microbatch / traced_batch
  uf = UnionFind()
  types: dict[int, graph_lib.TensorInfo] = {}
  produced: dict[int, str] = {}
  consumers: dict[int, list[str]] = {}
  for op in live_ops:
    for i, t in zip(op.in_ids, op.in_types):
      if i >= 0:
        types.setdefault(i, t)
        consumers.setdefault(i, []).append(op.phase)
    for o, t in zip(op.out_ids, op.out_types):
      if o >= 0:
        types[o] = t
        produced[o] = op.phase
    for a, b in links(op):
      uf.union(a, b)
  label_of: dict[Any, int] = {}
  values: dict[int, Value] = {}
  batch_roots = {uf.find(n) for n in batch if n[0] in types}
  batch_labels = set()
  order = []
  seen = set()
  for op in live_ops:
    for v in (*op.in_ids, *op.out_ids):
      if v >= 0 and v not in seen:
        seen.add(v)
        order.append(v)
  for vid in order:
    t = types[vid]
    labels = []
    shape = list(t.shape)
    batched = False
    for d, size in enumerate(t.shape):
      if size <= 1:
        labels.append(-1)
        continue
      root = uf.find((vid, d))
      if root not in label_of:
        label_of[root] = len(label_of)
      lab = label_of[root]
      labels.append(lab)
      if root in batch_roots or (vid, d) in batch:
        batch_labels.add(lab)
        batched = True
        scaled = size * scale
        if abs(scaled - round(scaled)) > 1e-9 or round(scaled) < 1:
          raise ValueError(
              f"Layer {layer.name!r}: a batch dim of size {size} (traced batch "
              f"{traced_batch}) does not scale to micro-batch {microbatch}; choose a "
              f"micro-batch size that divides evenly.")
        shape[d] = int(round(scaled))
    itemsize = np.dtype(t.dtype).itemsize
    values[vid] = Value(id=vid, shape=tuple(shape), itemsize=itemsize, labels=tuple(labels),
                        batched=batched, nbytes=math.prod(shape) * itemsize)
  ops = []
  for index, op in enumerate(live_ops):
    batched = any(values[v].batched for v in (*op.in_ids, *op.out_ids) if v >= 0)
    ops.append(OpIR(index=index, op=op, family=family_of(op),
                    flops=op.flops * (scale if batched else 1.0), batched=batched))
  param_ids = tuple(p.value_id for p in layer.params if p.value_id in values)
  opt_state_ids = tuple(v for v in order if roles.get(v) == "optimizer_state")
  batch_ids = tuple(v for v in order if roles.get(v) == "batch")
  forward_consumed = {v for op in live_ops if op.phase == "forward" for v in op.in_ids
                      if v >= 0}
  input_ids = tuple(v for v in order if v in forward_consumed and v not in produced
                    and roles.get(v) not in ("param", "optimizer_state"))
  output_ids = tuple(v for v in layer.output_ids
                     if v in values and produced.get(v) == "forward")
  residual_ids = tuple(
      v for v in order if "backward" in consumers.get(v, ()) and
      (produced.get(v) == "forward" or v in input_ids))
  kept_ids, kept_for = _kept(live_ops, residual_ids, set(param_ids) | set(roles))
  grad_ids = tuple(v for v in order if produced.get(v) == "backward"
                   and "optimizer" in consumers.get(v, ()))
  grad_like = _grad_like(live_ops, set(grad_ids), produced)
  param_labels = {l for v in param_ids for l in values[v].labels if l >= 0}
  boundary_labels = {l for v in (*input_ids, *output_ids) for l in values[v].labels if l >= 0}
  cooccur = set()
  for v in values.values():
    labs = sorted({l for l in v.labels if l >= 0})
    for a in range(len(labs)):
      for b in range(a + 1, len(labs)):
        cooccur.add((labs[a], labs[b]))
  names = label_names(
      num_labels=len(label_of), batch_labels=batch_labels, values=values,
      params=[(p.path, p.value_id) for p in layer.params if p.value_id in values],
      input_ids=input_ids, output_ids=output_ids, layer_name=layer.name,
      integer_ids={v for v in (*input_ids, *output_ids) if np.dtype(types[v].dtype).kind in "biu"})
  return LayerIR(
      layer=layer, values=values, ops=tuple(ops), num_labels=len(label_of),
      label_names=tuple(names), batch_labels=frozenset(batch_labels),
      param_labels=frozenset(param_labels), boundary_labels=frozenset(boundary_labels),
      cooccur=frozenset(cooccur), param_ids=param_ids, opt_state_ids=opt_state_ids,
      batch_ids=batch_ids, input_ids=input_ids, output_ids=output_ids,
      residual_ids=residual_ids, kept_ids=kept_ids, kept_for=kept_for, grad_ids=grad_ids,
      grad_like_ids=grad_like,
      fused_ids=_fused(live_ops, layer.output_ids), readers=_readers(live_ops),
      constant_ids=_constants(live_ops), scale=scale,
      tied_ids=frozenset(v for v in values if info is not None and v in info.tied),
      passed_ids=frozenset(
          v for v in values if info is not None and v in info.tied and v not in param_ids
          and not info.tied[v].startswith(layer.name.split("@")[0] + "/")))


# What the dims of a boundary activation [batch, ...] are called, by its rank after the
# batch dim: the layouts JAX users pass between Flax layers (tokens, features, NHWC).
_ROLES = {1: ("hidden",), 2: ("seq", "hidden"), 3: ("height", "width", "channel")}
# Parameter leaves that say nothing beyond their module's name.
_GENERIC_LEAVES = frozenset({"kernel", "embedding", "weight", "w"})
# Module names this short ("q", "wi", "o") read better with their parent ("attn.q").
_SHORT_NAME = 2


def label_names(*, num_labels: int, batch_labels: set[int] | frozenset[int],
                values: Mapping[int, Value], params: Sequence[tuple[str, int]],
                input_ids: Sequence[int], output_ids: Sequence[int], layer_name: str,
                integer_ids: set[int] | frozenset[int] = frozenset()) -> tuple[str, ...]:
  """A short name per label that says what splitting it splits, unique in the layer.

  In order of precedence: the batch ("batch"; "batch#7" per label when a layer has
  several, which `describe` writes as one "batch"); a dim of a boundary activation
  [batch, ...] by position ("seq", "hidden"; "height", "width", "channel" for NHWC;
  integer [batch, n] inputs are tokens: "seq"); a parameter dim, as the parameter's
  module and dim ("c_fc:1": dim 1 of `<layer>/c_fc/kernel`), taken from the
  parameter of highest rank that carries the label, then the first in the layer's
  parameter order; another boundary dim as its position ("out0:2"); anything else
  "act#<label>" (never in a candidate's menu). A name already taken grows: a
  parameter's by the path components before it ("attn.output:0"); a role another
  label holds yields to the label's parameter name, else gets "#<label>" ("seq#8":
  the encoder's sequence in a T5 decoder block). Names never hold " ", ",", "=" or
  "+", so that candidate names built from them read back unambiguously.

  Args:
    num_labels: labels are 0..num_labels-1.
    batch_labels: labels of batch dims.
    values: the layer's values, by id.
    params: (path, value id) of the layer's parameters, in the layer's order.
    input_ids / output_ids: the layer's boundary activations.
    layer_name: stripped from parameter paths, so that layers of one signature agree.
    integer_ids: boundary values of integer dtype (token ids).
  """
  names: dict[int, str] = {}
  taken: set[str] = set()

  def claim(lab: int, name: str) -> bool:
    if lab in names or name in taken:
      return False
    names[lab] = name
    taken.add(name)
    return True

  batch = sorted(batch_labels)
  for lab in batch:
    claim(lab, "batch" if len(batch) == 1 else f"batch#{lab}")
  # Boundary roles: higher-rank values first, so [batch, seq, hidden] names "seq"
  # before a [batch, seq] of token ids or labels does.
  boundary = [(v, "in", i) for i, v in enumerate(input_ids)]
  boundary += [(v, "out", i) for i, v in enumerate(output_ids)]
  boundary.sort(key=lambda t: -len(values[t[0]].shape))  # stable: inputs before outputs
  clashed: dict[int, str] = {}  # label -> the role another label took first
  for vid, _, _ in boundary:
    labels = values[vid].labels
    if not labels or labels[0] not in batch_labels:
      continue
    roles = _ROLES.get(len(labels) - 1)
    if roles is None:
      continue
    if vid in integer_ids and len(labels) == 2:
      roles = ("seq",)
    for lab, role in zip(labels[1:], roles):
      if lab >= 0 and lab not in names and not claim(lab, role):
        clashed.setdefault(lab, role)
  # Parameter dims: the highest-rank parameter carrying the label, then param order.
  carriers: dict[int, tuple[int, int, str, int]] = {}
  for order, (path, vid) in enumerate(params):
    labels = values[vid].labels
    for d, lab in enumerate(labels):
      key = (-len(labels), order, path, d)
      if lab >= 0 and (lab not in carriers or key < carriers[lab]):
        carriers[lab] = key
  prefix = layer_name + "/"
  for lab in sorted(carriers):
    if lab in names:
      continue
    _, _, path, d = carriers[lab]
    local = path[len(prefix):] if path.startswith(prefix) else path
    parts = [_clean(p) for p in local.split("/")]
    if len(parts) > 1 and parts[-1] in _GENERIC_LEAVES:
      parts = parts[:-1]
    depth = 2 if len(parts) > 1 and len(parts[-1]) <= _SHORT_NAME else 1
    while depth <= len(parts) and not claim(lab, f"{'.'.join(parts[-depth:])}:{d}"):
      depth += 1
  # A role another label took keeps its role, marked with the label; other boundary
  # dims are named by position.
  for lab, role in sorted(clashed.items()):
    claim(lab, f"{role}#{lab}")
  for vid, io, i in boundary:
    for d, lab in enumerate(values[vid].labels):
      if lab >= 0:
        claim(lab, f"{io}{i}:{d}")
  for lab in range(num_labels):
    claim(lab, f"act#{lab}")  # never taken: only this rule writes "act#"
  return tuple(names[lab] for lab in range(num_labels))


def _clean(part: str) -> str:
  """A path component with the characters candidate names reserve replaced."""
  return "".join(c if c.isalnum() or c in "_-." else "_" for c in part) or "_"


# Elementwise primitives XLA's fusion duplicates freely into their readers (cheap;
# transcendental ones like exp and tanh are not duplicated, so their results are kept).
_CHEAP = frozenset({
    "add", "add_any", "sub", "mul", "neg", "max", "min", "select_n", "convert_element_type",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "abs", "sign", "integer_pow",
    "square", "copy", "copy_p", "broadcast_in_dim", "reshape", "squeeze", "transpose",
    "expand_dims", "clamp"})


def _kept(ops: Sequence[graph_lib.Op], residuals: Sequence[int],
          inputs: set[int]) -> tuple[tuple[int, ...], dict[int, tuple[int, ...]]]:
  """The values stored for the backward pass (see LayerIR.kept_ids and kept_for).

  A residual made by cheap elementwise ops (a chain of them, e.g. GELU's
  0.5 * (1 + tanh(.))) from values that are stored anyway (or are parameters, step
  inputs, constants) is recomputed inside the backward fusions that read it; dropping
  it never adds memory. Only fusions can do that: a residual that a matmul, reduction
  or gather of the backward pass reads needs a buffer, and XLA's CSE makes that the
  forward pass's (e.g. a layer norm's output, which the next matmul's weight gradient
  reads). Latest residuals are tried first, so a chain collapses onto the value it
  starts from.

  Then the cheap residuals that are left are recomputed from the values their chains
  start from when those are smaller together: a layer norm's `x - mean` and its
  variance's `2 * x` (two [b, s, h] residuals) from `x` and the [b, s] mean, as
  XLA's fusions do by reading `x` in the backward pass. Returns (kept values,
  {value kept only for recomputation: the residuals recomputed from it}).
  """
  producer = {v: op for op in ops if op.phase == "forward" for v in op.out_ids}
  unfused_reader = {v for op in ops if op.phase == "backward" and family_of(op) not in FUSIBLE
                    for v in op.in_ids}
  nbytes: dict[int, int] = {}
  for op in ops:
    for v, t in zip((*op.in_ids, *op.out_ids), (*op.in_types, *op.out_types)):
      if v >= 0:
        nbytes.setdefault(v, t.nbytes)
  kept = set(residuals)
  order = {v: i for i, v in enumerate(producer)}

  def free(v: int) -> bool:
    return v in kept or v in inputs

  def recomputable(v: int, memo: dict[int, bool], depth: int) -> bool:
    if free(v):
      return True
    if v not in producer:  # an activation from an earlier layer that is not kept
      return False
    if v not in memo:
      op = producer[v]
      memo[v] = depth < _RECOMPUTE_DEPTH and op.primitive in _CHEAP and all(
          recomputable(i, memo, depth + 1) for i in op.in_ids if i >= 0)
    return memo[v]

  def droppable(v: int) -> bool:
    op = producer.get(v)
    return op is not None and op.primitive in _CHEAP and v not in unfused_reader

  changed = True
  while changed:
    changed = False
    for v in sorted(kept, key=lambda v: -order.get(v, -1)):
      if not droppable(v):
        continue
      memo: dict[int, bool] = {}
      if all(recomputable(i, memo, 1) for i in producer[v].in_ids if i >= 0):
        kept.discard(v)
        changed = True

  def leaves(v: int, depth: int, out: set[int]) -> bool:
    """Collects the values v's chain starts from that are not stored; False if the
    chain is longer than a fusion recomputes."""
    if free(v):
      return True
    op = producer.get(v)
    if op is None or op.primitive not in _CHEAP:
      out.add(v)
      return True
    return depth < _RECOMPUTE_DEPTH and all(
        leaves(i, depth + 1, out) for i in op.in_ids if i >= 0)

  changed = True
  while changed:
    changed = False
    starts: dict[int, set[int]] = {}
    for v in sorted(kept, key=lambda v: (order.get(v, -1), v)):
      found: set[int] = set()
      if droppable(v) and all(leaves(i, 1, found) for i in producer[v].in_ids if i >= 0):
        starts[v] = found
    # Residuals that share a start are decided together.
    uf = UnionFind()
    for v, found in starts.items():
      uf.find(("r", v))
      for w in found:
        uf.union(("r", v), ("s", w))
    groups: dict[Any, list[int]] = {}
    for v in starts:
      groups.setdefault(uf.find(("r", v)), []).append(v)
    for group in sorted(groups.values(), key=lambda g: order.get(g[0], -1)):
      needed = set().union(*(starts[v] for v in group))
      if sum(nbytes[w] for w in needed) < sum(nbytes[v] for v in group):
        kept.difference_update(group)
        kept.update(needed)
        changed = True
        break
  # Which recomputed residuals read each value kept only for them (through chains
  # of recomputed residuals too): the last of their readers ends its life.
  residual_set = set(residuals)
  added = {v for v in kept if v not in residual_set}
  kept_for: dict[int, list[int]] = {}

  def sources(v: int, depth: int, out: set[int], seen: set[int]) -> None:
    if v in seen:
      return
    seen.add(v)
    if v in added:
      out.add(v)
    op = producer.get(v)
    if v in kept or v in inputs or op is None or depth > 2 * _RECOMPUTE_DEPTH:
      return
    for i in op.in_ids:
      if i >= 0:
        sources(i, depth + 1, out, seen)

  for r in residuals:
    if r in kept or r not in producer:
      continue
    found: set[int] = set()
    seen: set[int] = set()
    for i in producer[r].in_ids:
      if i >= 0:
        sources(i, 1, found, seen)
    for w in sorted(found):
      kept_for.setdefault(w, []).append(r)
  out = [v for v in residuals if v in kept]
  out += sorted(added, key=lambda v: (order.get(v, -1), v))
  return tuple(out), {w: tuple(kept_for.get(w, ())) for w in sorted(added)}


_RECOMPUTE_DEPTH = 8  # the longest chain of cheap ops recomputed into a fusion


def _constants(ops: Sequence[graph_lib.Op]) -> frozenset[int]:
  """Values computed from literals and inputs-free ops alone, in any phase (the zeros
  a gather's gradient scatters into are made in the backward pass)."""
  const: set[int] = set()
  for op in ops:
    if all(v < 0 or v in const for v in op.in_ids):
      const.update(v for v in op.out_ids if v >= 0)
  return frozenset(const)


# Families whose results XLA fuses into their readers (and whose readers can fuse
# the recomputation of a cheap residual).
FUSIBLE = frozenset({"elementwise", "broadcast", "source", "reshape", "squeeze", "transpose"})


def _readers(ops: Sequence[graph_lib.Op]) -> dict[int, int]:
  """Value id -> number of ops of the layer that read it."""
  readers: dict[int, int] = {}
  for op in ops:
    for v in set(op.in_ids):
      if v >= 0:
        readers[v] = readers.get(v, 0) + 1
  return readers


def _fused(ops: Sequence[graph_lib.Op], outputs: Sequence[int]) -> frozenset[int]:
  readers = _readers(ops)
  out = set(outputs)
  return frozenset(v for op in ops if family_of(op) in FUSIBLE for v in op.out_ids
                   if readers.get(v, 0) == 1 and v not in out)


# Ops through which a partial sum stays a partial sum of the same gradient.
_LINEAR = frozenset({"add", "add_any", "sub", "neg", "convert_element_type", "reshape",
                     "transpose", "copy", "copy_p", "squeeze", "mul", "div"})


def _grad_like(ops: Sequence[graph_lib.Op], grads: set[int],
               produced: Mapping[int, str]) -> frozenset[int]:
  """Backward values whose every use leads, through linear ops, only to gradients.

  Their partial sums can be accumulated over micro-batches and synchronised once per
  step, as gradient synchronisation is.
  """
  users: dict[int, list[graph_lib.Op]] = {}
  for op in ops:
    for v in op.in_ids:
      if v >= 0:
        users.setdefault(v, []).append(op)
  like = set(grads)
  for op in reversed(ops):
    if op.phase != "backward":
      continue
    for v in op.out_ids:
      if v in like or v not in users:
        continue
      if all(u.primitive in _LINEAR and u.phase == "backward" and
             all(o in like for o in u.out_ids) for u in users[v]):
        like.add(v)
  return frozenset(like)


def rebind(ir: LayerIR, layer: graph_lib.Layer) -> dict[int, int]:
  """Maps the value ids of `ir`'s layer to those of `layer`, a layer with its signature.

  Identical layers are labelled and costed once; their candidates name values by
  position, and this mapping finds the other layer's parameters and boundary values.
  Raises:
    ValueError: the layers' op sequences differ.
  """
  mine = ir.layer.ops
  if len(mine) != len(layer.ops):
    raise ValueError(f"Layers {ir.layer.name!r} and {layer.name!r} share a signature but "
                     f"have {len(mine)} and {len(layer.ops)} ops.")
  mapping: dict[int, int] = {}
  for a, b in zip(mine, layer.ops):
    if a.primitive != b.primitive or len(a.in_ids) != len(b.in_ids):
      raise ValueError(f"Layers {ir.layer.name!r} and {layer.name!r} share a signature but "
                       f"differ at {a.primitive!r} / {b.primitive!r}.")
    for x, y in zip((*a.in_ids, *a.out_ids), (*b.in_ids, *b.out_ids)):
      if x >= 0:
        mapping[x] = y
  return mapping
