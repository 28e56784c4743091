"""A layer's candidate shardings: which labels each mesh axis splits, and what follows.

A candidate gives every mesh axis an ordered tuple of labels (`Assignment`). A tensor
is split over the axis along its dim with the first of those labels it has (and whose
size the axis divides). Everything else follows from the rules: which operands are
gathered, which results are partial sums, which collectives run, how many FLOPs each
device does, and what each device holds. The axis roles people know are special cases:

  (b,)        data parallel: the batch label; parameters replicated, gradients reduced.
  (b, p)      FSDP / ZeRO-3: the batch, and parameters split along label p (gathered
              before use, gradients reduce-scattered).
  (F, N)      Megatron tensor parallel: the MLP's hidden and the attention heads.
  (F, N, S)   Megatron with sequence parallelism: where neither F nor N is present
              (norms, residual adds, the boundary activation) split the sequence.
  (S,)        sequence (context) parallel: everything split along the sequence.

The menus below enumerate such tuples from the layer's own labels, not from a fixed
list of named strategies. Candidate names spell them out with the labels' names
(`_ir.label_names`): in a GPT-2 block "dp=batch" is data parallel, "dp=batch,hidden"
FSDP, "dp=batch tp=c_attn:1,attn_proj:0,c_fc:1" Megatron, and a trailing ",seq"
adds sequence parallelism.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import itertools
import math

import numpy as np

from uniap_jax.strategies import _ir
from uniap_jax.strategies import _mesh
from uniap_jax.strategies._layout import Comm, Layout

Assignment = tuple[tuple[int, ...], ...]  # per mesh axis: label ids, highest priority first
PLATFORMS = ("cpu", "gpu", "tpu")  # XLA backends, as `Cluster.platform` names them


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParamGather:
  """The forward pass resharding a parameter before use (ZeRO / FSDP gathers).

  Attributes:
    param: the parameter's position in `LayerIR.param_ids` (and `param_specs`).
    comms: its collectives (phase "forward", once per micro-batch each), also counted
      in the candidate's `comms`.
    backward_reads: whether a backward op reads the gathered copy (a matmul kernel,
      for the input's gradient; not a bias, nor an embedding table, whose gradients
      do not need their values). Where the backward cannot keep the forward's copy
      (autodiff through a pipeline's tick loop) it gathers these again.
    recomputed: whether a recomputation of the layer's forward gathers it again
      (a forward op it reruns, or its backward, reads the copy): then its comms are
      among `Candidate.rerun_comms` too.
  """

  param: int
  comms: tuple[Comm, ...]
  backward_reads: bool
  recomputed: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Candidate:
  """One way to shard one layer on one mesh, with everything the cost model needs.

  Attributes:
    name: what each mesh axis splits, e.g. "dp=batch tp=c_fc:1,attn_proj:0": the
      batch, a boundary activation's dim ("seq", "hidden") or a parameter's dim
      ("c_fc:1": dim 1 of the layer's c_fc kernel); " +remat" with recomputation.
      Unique among one layer's candidates on one mesh (`describe`).
    assignment: per mesh axis, the label names it splits, highest priority first.
    recompute: the forward runs again in the backward pass instead of keeping
      activations (only the layer's inputs are kept, and what ops outside its module
      calls, such as a loss, keep), as far as the backward reads it (`op_rerun`).
    param_specs: PartitionSpec entries per parameter, in the order of
      `LayerIR.param_ids`; optimizer-state leaves of a parameter take its spec.
    input_specs / output_specs: PartitionSpec entries of the boundary activations,
      in the order of `LayerIR.input_ids` / `output_ids` (inputs include batch leaves).
      Positions, not value ids, so that layers with one signature share candidates.
    input_layouts / output_layouts: the same as Layouts, for resharding costs.
    comms: collectives one device issues (per micro-batch, or per step when per_step).
    op_flops / op_bytes: per op of the layer, FLOPs and bytes one device handles, per
      micro-batch (forward and backward) or per step (optimizer).
    op_phase: per op, "forward" / "backward" / "optimizer".
    op_dtype: per op, the dtype name whose peak FLOP/s applies: a matmul's operand
      dtype ("tfloat32" for fp32 at default precision), else its first result's.
    op_rerun: per op, whether a recomputation of the layer's forward runs it again:
      the forward ops whose results the backward reads, directly or through other
      forward ops. XLA drops the rest as dead code (the matmul that closes the layer's
      output and its all-reduce, e.g.). The same for every candidate of a layer.
    rerun_comms: the forward collectives such a recomputation issues again (those of
      the ops it reruns, and the gathers of operands the backward reads), phase
      "forward"; a candidate that recomputes lists them again in `comms` with phase
      "recompute". Also what a recomputation of a whole pipeline stage issues for a
      layer whose output no other layer reads.
    param_gathers: one `ParamGather` per forward reshard of a parameter.
    op_outside: per op, whether it lies outside the layer's module calls (a loss the
      train step computes on the model's output, which the graph puts into the last
      layer). The same for every candidate of a layer. A pipelined runtime runs these
      ops once per step, outside the pipeline, on the whole batch.
    outside_comms: the collectives of those ops, among `comms` (phase "forward" or
      "backward", per micro-batch), and `outside_scales` per collective whether its
      value has a batch dim (run on the whole batch, it moves that many times the
      bytes; a scalar loss's all-reduce does not).
    outside_batch_sums: per reduction among those ops that sums over a batch dim (a
      loss's mean): the bytes of its result on one device and the mesh axes that
      split the batch dim there. Outside a pipeline whose shard_map makes further
      batch axes manual, the batch arrives split over those too, and XLA all-reduces
      the result over them (once per step).
    model_outputs: (full bytes, bytes per device) per micro-batch of each value the
      layer's module calls produce and the ops outside them read (the logits a loss
      reads). A pipeline returns these from its last stage: made on an earlier stage,
      they ride buffer slots across the later stage boundaries in every forward run.
    outside_outputs: per boundary output (`output_ids`), whether the ops outside the
      module calls make it (a part of the loss another layer's loss ops add to): a
      pipeline computes it outside, so it crosses no stage boundary.
    pipeline_comms: `comms` as XLA compiles them when the layer runs inside a
      pipeline's shard_map, with the axes concerned automatic: the gradient of a table
      split over every mesh axis along its rows, with the ids split along one dim, is
      formed there by gathering the ids and the cotangents in every backward run
      (phase "backward", not per step), where a plain jit reduce-scatters it (see
      `_rules.rule_scatter`). Equal to `comms` for every other layer.
    param_bytes / grad_bytes / optimizer_bytes: per device, for the whole step.
    param_elements: parameter elements per device (for optimizer states that are not
      traced, see `cost.model_state_bytes`).
    splits_new_dims: whether a boundary output is split along a dim that is neither
      the batch nor a dim of any boundary input: a split the layer takes from a
      parameter (an embedding or patch projection whose output is split over hidden,
      "dp=hidden"). Inside a pipeline XLA reshards such an output more often than
      one edge reshard per forward run (again at the transposes of the boundary's
      sharding constraints in the backward, once per block position that can read
      the stage input, or with all-to-alls into a batch-split consumer), so the cost
      tables of a pipelined configuration do not offer these candidates
      (`cost.build_cost_tables`).
    tied_bytes: per tied parameter the model passes to the layer's call
      (`LayerIR.passed_ids`; a tied LM head's token table), its bytes per device. A
      pipeline gives it a slot in the layer's parameter stacks, whose gradient
      autodiff adds to the owner's.
    activation_bytes: per device and micro-batch, kept from forward to backward.
    batch_bytes: per device and micro-batch, the batch leaves this layer reads (not
      already counted as activations).
    temp_bytes: per device, what the layer needs at its peak beyond the larger of
      its activations and its gradients: the most bytes its own values occupy at once
      (a sweep over its ops with each value's live interval, resharded copies and
      unreduced partial results included; see `_liveness`), minus that
      larger figure. While a layer's backward pass runs, earlier layers hold their
      activations and later ones their gradients, so a stage's peak is at most the
      sum over its layers of max(activations, gradients) plus the largest
      temp_bytes; with recomputation the forward runs again inside the backward
      pass, so the peak is the same over less memory held in between.
  """

  name: str
  assignment: tuple[tuple[str, ...], ...]
  recompute: bool
  param_specs: tuple[tuple, ...]
  input_specs: tuple[tuple, ...]
  output_specs: tuple[tuple, ...]
  input_layouts: tuple[Layout, ...]
  output_layouts: tuple[Layout, ...]
  comms: tuple[Comm, ...]
  op_flops: np.ndarray
  op_bytes: np.ndarray
  op_phase: tuple[str, ...]
  op_dtype: tuple[str, ...]
  op_rerun: np.ndarray
  rerun_comms: tuple[Comm, ...]
  param_gathers: tuple[ParamGather, ...]
  op_outside: np.ndarray
  outside_comms: tuple[Comm, ...]
  outside_scales: tuple[bool, ...]
  outside_batch_sums: tuple[tuple[float, tuple[str, ...]], ...]
  model_outputs: tuple[tuple[float, float], ...]
  outside_outputs: tuple[bool, ...]
  pipeline_comms: tuple[Comm, ...]
  param_bytes: float
  grad_bytes: float
  optimizer_bytes: float
  param_elements: float
  tied_bytes: tuple[float, ...]
  splits_new_dims: bool
  activation_bytes: float
  batch_bytes: float
  temp_bytes: float

  @property
  def boundary_key(self) -> tuple:
    """Equal for candidates whose boundary activations are laid out alike."""
    return (self.input_layouts, self.output_layouts)


def tensor_layout(value: _ir.Value, assignment: Assignment, sizes: Sequence[int]) -> Layout:
  """The layout a candidate gives one tensor (see the module docstring)."""
  dims: list[list[int]] = [[] for _ in value.shape]
  labels = value.labels
  for ax, prefs in enumerate(assignment):
    for lab in prefs:
      if lab not in labels:
        continue
      placed = False
      for d, l in enumerate(labels):
        if l == lab:
          split = math.prod(sizes[a] for a in dims[d]) * sizes[ax]
          if value.shape[d] % split == 0:
            dims[d].append(ax)
            placed = True
            break
      if placed:
        break
  return tuple(tuple(d) for d in dims)


def _menus(ir: _ir.LayerIR, mesh: _mesh.MeshShape) -> list[list[tuple[int, ...]]]:
  """Per mesh axis, the label tuples it may take."""
  batch = tuple(sorted(ir.batch_labels))  # all batch labels move together
  params = sorted(ir.param_labels - ir.batch_labels)
  seq = sorted(ir.boundary_labels - ir.batch_labels - ir.param_labels)
  param_bytes = {l: 0 for l in params}
  for v in ir.param_ids:
    val = ir.values[v]
    for l in set(val.labels):
      if l in param_bytes:
        param_bytes[l] += val.nbytes
  tp_sets = _independent_sets(params, ir.cooccur)
  menu: list[tuple[int, ...]] = [()]
  if batch:
    menu.append(batch)
    menu += [batch + (p,) for p in params]
  menu += [tuple(s) for s in tp_sets]
  menu += [tuple(s) + (q,) for s in tp_sets for q in seq if q not in s]
  menu += [(q,) for q in seq]  # sequence (context) parallel alone
  if mesh.kind == "fine":
    # The fine view multiplies menus across many small axes: keep the roles that
    # cover the most parameter bytes.
    by_bytes = sorted(params, key=lambda l: (-param_bytes[l], l))
    best_tp = max(tp_sets, key=lambda s: (sum(param_bytes[l] for l in s), tuple(-l for l in s)),
                  default=())
    menu = [()]
    if batch:
      menu.append(batch)
      if by_bytes:
        menu.append(batch + (by_bytes[0],))
    if best_tp:
      menu.append(tuple(best_tp))
      menu += [tuple(best_tp) + (q,) for q in seq[:1]]
  menu = list(dict.fromkeys(menu))
  return [menu if ax.size > 1 else [()] for ax in mesh.axes]


def _independent_sets(labels: Sequence[int],
                      cooccur: frozenset[tuple[int, int]]) -> list[tuple[int, ...]]:
  """Maximal sets of labels that never share a tensor (so one axis can split them all)."""
  def clash(a: int, b: int) -> bool:
    return (min(a, b), max(a, b)) in cooccur
  out: list[tuple[int, ...]] = []
  labels = list(labels)
  # Bron-Kerbosch on the complement graph; layers have a handful of param labels.
  def extend(current: list[int], candidates: list[int], excluded: list[int]) -> None:
    if not candidates and not excluded:
      out.append(tuple(sorted(current)))
      return
    for v in list(candidates):
      extend(current + [v], [u for u in candidates if u != v and not clash(u, v)],
             [u for u in excluded if not clash(u, v)])
      candidates.remove(v)
      excluded.append(v)
  if len(labels) <= 16:
    extend([], labels, [])
  else:
    out = [(l,) for l in labels]
  return sorted(set(out))


def assignments(ir: _ir.LayerIR, mesh: _mesh.MeshShape) -> list[Assignment]:
  """Every assignment to cost: the product of per-axis menus, up to interchangeable axes.

  Axes of equal size that sit in the same topology levels are interchangeable, so
  only one ordering of their roles is kept.
  """
  menus = _menus(ir, mesh)
  classes: dict[tuple, list[int]] = {}
  for i, ax in enumerate(mesh.axes):
    classes.setdefault((ax.size, mesh.level_factors((i,))), []).append(i)
  per_class = []
  for key, axes in classes.items():
    options = list(itertools.combinations_with_replacement(range(len(menus[axes[0]])), len(axes)))
    per_class.append((axes, options))
  out: list[Assignment] = []
  for combo in itertools.product(*(opts for _, opts in per_class)):
    assignment: list[tuple[int, ...]] = [()] * len(mesh.axes)
    for (axes, _), choice in zip(per_class, combo):
      for ax, k in zip(axes, choice):
        assignment[ax] = menus[ax][k]
    out.append(tuple(assignment))
  return out


def describe(assignment: Assignment, axis_names: Sequence[str], label_names: Sequence[str],
             batch_labels: frozenset[int] | set[int] = frozenset()) -> str:
  """A candidate's name: per mesh axis, what it splits, e.g. "dp=batch tp=c_fc:1,seq".

  Label names come from `_ir.label_names`; a layer's batch labels, all in a row in
  sorted order, read as one "batch". Distinct assignments get distinct names (label
  names are unique in a layer and hold no separator), so a name identifies its
  candidate within the layer, apart from the " +remat" suffix `evaluate` adds.
  """
  batch = tuple(sorted(batch_labels))
  parts = []
  for i, prefs in enumerate(assignment):
    if not prefs:
      continue
    words = []
    k = 0
    while k < len(prefs):
      if len(batch) > 1 and tuple(prefs[k:k + len(batch)]) == batch:
        words.append("batch")
        k += len(batch)
      else:
        words.append(label_names[prefs[k]])
        k += 1
    parts.append(f"{axis_names[i]}={','.join(words)}")
  return " ".join(parts) or "replicated"
