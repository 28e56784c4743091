"""Evaluating a layer's candidates: what each assignment costs one device.

`layer_candidates` is the entry point: for every assignment (`_candidates.assignments`)
the `_Evaluator` walks the layer's ops once, applying each primitive family's rule
(`_rules`) to the layouts the assignment gives its operands and results. It sums the
collectives one device issues (reshards before an op, partial sums finished after
it), the FLOPs and bytes of each op, what recomputation reissues, what the ops outside
the model (the loss) and inside a pipeline do differently, and the memory held (the
peak from the values' live intervals, `_liveness`). Per-op results are memoised on the
op's operand and result layouts, so layers with many candidates cost each distinct
op/layout pair once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
import warnings

import numpy as np

from uniap_jax.strategies import _ir
from uniap_jax.strategies import _layout
from uniap_jax.strategies import _liveness
from uniap_jax.strategies import _mesh
from uniap_jax.strategies import _rules
from uniap_jax.strategies._candidates import PLATFORMS
from uniap_jax.strategies._candidates import Assignment
from uniap_jax.strategies._candidates import Candidate
from uniap_jax.strategies._candidates import ParamGather
from uniap_jax.strategies._candidates import assignments
from uniap_jax.strategies._candidates import describe
from uniap_jax.strategies._candidates import tensor_layout
from uniap_jax.strategies._layout import Comm, Layout

_MISSING = object()


class _Evaluator:
  """Evaluates assignments of one LayerIR on one mesh, memoising per-op results."""

  def __init__(self, ir: _ir.LayerIR, mesh: _mesh.MeshShape, platform: str = "gpu"):
    self.ir = ir
    self.mesh = mesh
    self.sizes = mesh.sizes
    self.names = mesh.names
    self._plans: dict[tuple, _rules.Plan] = {}
    self._reshard: dict[tuple, tuple] = {}
    self._finish: dict[tuple, tuple] = {}
    ops = ir.ops
    self.op_phase = tuple(o.op.phase for o in ops)
    # The peak FLOP/s that applies: a matmul runs at its operands' dtype (bf16 in, fp32
    # accumulated out runs at the bf16 rate), an fp32 matmul at default precision at
    # the TF32 rate (XLA's default on Ampere and later); other ops at their result's.
    def rate(o: _ir.OpIR) -> str:
      if o.family in ("dot", "conv") and o.op.in_types:
        dtype = o.op.in_types[0].dtype
        if dtype == "float32" and o.op.param("precision") is None:
          return "tfloat32"
        return dtype
      return o.op.out_types[0].dtype if o.op.out_types else "float32"
    self.op_dtype = tuple(rate(o) for o in ops)
    self.op_flops = np.array([o.flops for o in ops], dtype=np.float64)
    self.param_set = frozenset(ir.param_ids)
    # The forward ops a recomputation runs again: those whose results the backward
    # reads, directly or through other forward ops. XLA drops the rest of a
    # rematerialised forward as dead code (e.g. a row-parallel matmul that closes the
    # layer's output, and its all-reduce). Ops outside the layer's module calls (a
    # loss the train step computes on the model's output) run outside those calls,
    # hence outside their recomputation, and so does the backward that reads them.
    producer = {v: k for k, o in enumerate(ops) if o.op.phase == "forward"
                for v in o.op.out_ids}
    in_modules = any(o.op.module for o in ops)
    rerun = [False] * len(ops)
    stack = [producer[v] for o in ops if o.op.phase == "backward"
             and (o.op.module or not in_modules) for v in o.op.in_ids if v in producer]
    while stack:
      k = stack.pop()
      if rerun[k]:
        continue
      rerun[k] = True
      if ops[k].op.module or not in_modules:
        stack.extend(producer[v] for v in ops[k].op.in_ids if v in producer)
    self.op_rerun = np.array(rerun, dtype=bool)
    self.op_outside = np.array([in_modules and not o.op.module for o in ops], dtype=bool)
    # Reductions outside the module calls that sum over a batch dim (a loss's mean).
    self.outside_sums = tuple(
        k for k, o in enumerate(ops) if self.op_outside[k] and o.family == "reduction"
        and o.op.in_ids and o.op.in_ids[0] >= 0 and any(
            d < len(ir.values[o.op.in_ids[0]].labels)
            and ir.values[o.op.in_ids[0]].labels[d] in ir.batch_labels
            for d in o.op.param("axes", ())))
    self.batch_valued = frozenset(vid for vid, v in ir.values.items()
                                  if set(v.labels) & set(ir.batch_labels))
    # What the ops outside the module calls keep for their backward: kept whether or
    # not the layer recomputes (the recomputation covers the module calls only).
    self.batch_only = frozenset(ir.batch_ids) - frozenset(ir.kept_ids)
    # Values the module calls produce and the ops outside them read (the logits a
    # loss reads): a pipeline returns them, so they cross every later stage boundary.
    self.model_output_ids = tuple(sorted(
        {v for k, o in enumerate(ops) if self.op_outside[k] and o.op.phase == "forward"
         for v in o.op.in_ids if v in producer and ops[producer[v]].op.module}))
    self.outside_outputs = tuple(
        in_modules and v in producer and not ops[producer[v]].op.module for v in ir.output_ids)
    self.outside_kept = tuple(v for v in ir.kept_ids if v not in ir.constant_ids
                              and v in producer and in_modules
                              and not ops[producer[v]].op.module)
    # Values that are a parameter under another dtype or shape (a convert, a reshape
    # that adds unit dims): what reshards them reshards the parameter (see the parameter
    # specs in `evaluate`). Value id -> (parameter id, per dim: the parameter's dim).
    self.param_root: dict[int, tuple[int, tuple[int | None, ...]]] = {
        v: (v, tuple(range(len(ir.values[v].shape)))) for v in ir.param_ids}
    for o in ops:
      ins = [v for v in o.op.in_ids if v >= 0]
      if (o.op.phase != "forward" or o.family not in ("elementwise", "reshape") or len(ins) != 1
          or ins[0] not in self.param_root or len(o.op.out_ids) != 1):
        continue
      src, dst = ir.values[ins[0]], ir.values[o.op.out_ids[0]]
      keep = [d for d, n in enumerate(dst.shape) if n != 1]
      src_keep = [d for d, n in enumerate(src.shape) if n != 1]
      if ([dst.shape[d] for d in keep] != [src.shape[d] for d in src_keep]
          or [dst.labels[d] for d in keep] != [src.labels[d] for d in src_keep]):
        continue
      root, dims = self.param_root[ins[0]]
      to_src = dict(zip(keep, src_keep))
      self.param_root[o.op.out_ids[0]] = (
          root, tuple(dims[to_src[d]] if d in to_src else None for d in range(len(dst.shape))))
    self.nbytes = {vid: v.nbytes for vid, v in ir.values.items()}
    self._counts: dict[Layout, int] = {}
    self.op_info = []
    for o in ops:
      out0 = ir.values[o.op.out_ids[0]].shape if o.op.out_ids else ()
      implicit = tuple(o.family == "elementwise" and v >= 0 and ir.values[v].shape != out0
                       for v in o.op.in_ids)
      # Literals and captured constants (id -1, e.g. a numpy table closed over by the
      # model) have their shape in the op's types; every device holds them whole, so
      # they arrive replicated and any slice of them is free.
      in_shapes = tuple(ir.values[v].shape if v >= 0 else tuple(t.shape)
                        for v, t in zip(o.op.in_ids, o.op.in_types))
      literal = tuple(None if v >= 0 else tuple(() for _ in s)
                      for v, s in zip(o.op.in_ids, in_shapes))
      self.op_info.append((o, o.op.in_ids, o.op.out_ids, implicit, in_shapes, literal))
    # Per op: keys into the layouts of `_layouts` (operands, literals with keys of
    # their own, -1 - position, then results), the operand count, phase, operand ids.
    self.literal_layouts: dict[int, Layout] = {}
    self.op_keys = []
    for k, (o, in_ids, out_ids, _, _, literal) in enumerate(self.op_info):
      keys = []
      for v, lit in zip(in_ids, literal):
        if v < 0:
          v = -1 - len(self.literal_layouts)
          self.literal_layouts[v] = lit
        keys.append(v)
      self.op_keys.append((tuple(keys) + tuple(out_ids), len(keys), o.op.phase, in_ids))
    # What a rule reads of an op besides layouts: family, parameters, shapes.
    signatures: dict[tuple, int] = {}
    self.op_sig = []
    for o, _, out_ids, _, in_shapes, _ in self.op_info:
      try:
        params = o.op.params
        hash(params)
      except TypeError:
        params = repr(o.op.params)
      sig = (o.family, o.op.primitive, params, in_shapes,
             tuple(ir.values[v].shape for v in out_ids))
      self.op_sig.append(signatures.setdefault(sig, len(signatures)))
    # What an op's effect reads besides layouts: the plan's signature, the phase, the
    # operands' and results' sizes and roles. Ops alike in these share effects.
    effect_sigs: dict[tuple, int] = {}
    self.effect_sig = []
    for k, (o, in_ids, out_ids, implicit, _, _) in enumerate(self.op_info):
      sig = (self.op_sig[k], o.op.phase, implicit,
             tuple(-1 if v < 0 else (self.nbytes[v], v in ir.constant_ids) for v in in_ids),
             tuple((self.nbytes[v], v in ir.grad_like_ids) for v in out_ids))
      self.effect_sig.append(effect_sigs.setdefault(sig, len(effect_sigs)))
    self._effects: dict[tuple, tuple] = {}
    self._layout_ids: dict[Layout, int] = {}
    self._specs: dict[Layout, tuple] = {}
    self._layout_list: list[Layout] = []
    self._comms: dict[tuple, Comm] = {}
    self._groups: list[tuple[_ir.Value, list[int]]] | None = None
    self.live = _liveness.intervals(ir, materialise_broadcasts=platform == "cpu")

  def _layouts(self, assignment: Assignment) -> dict[int, Layout]:
    """Value id (and literal key) -> layout; values alike in labels and shape share one."""
    if self._groups is None:
      groups: dict[tuple, list[int]] = {}
      for vid, v in self.ir.values.items():
        groups.setdefault((v.labels, v.shape), []).append(vid)
      self._groups = [(self.ir.values[vids[0]], vids) for vids in groups.values()]
    out = dict(self.literal_layouts)
    ids = self._layout_ids
    out_ids = {v: ids.setdefault(lay, len(ids)) for v, lay in out.items()}
    sizes = self.sizes
    for value, vids in self._groups:
      lay = tensor_layout(value, assignment, sizes)
      out.update(dict.fromkeys(vids, lay))
      out_ids.update(dict.fromkeys(vids, ids.setdefault(lay, len(ids))))
    self._last_ids = out_ids
    return out

  def _valid(self, assignment: Assignment, layouts: Mapping[int, Layout]) -> bool:
    """False when an axis cannot split a parameter or boundary tensor it should split,
    or splits a tied parameter.

    A parameter several layers read (`LayerIR.tied_ids`) has one stored layout, set by
    its owner's candidate, while each reader's candidate assumes its own: a reader
    whose layout differs gathers the stored one (XLA all-gathers a hidden-split token
    table for a tied LM head once per step, or contracts over the split and
    all-reduces the logits), which no candidate can charge, as it depends on another
    layer's choice. Only layouts that agree whatever the other layers choose are
    offered: the tied parameter kept whole in every reader.
    """
    ir = self.ir
    for vid in ir.tied_ids:
      if any(layouts[vid]):
        return False
    for vid in (*ir.param_ids, *ir.input_ids, *ir.output_ids):
      v = ir.values[vid]
      used = _layout.used_axes(layouts[vid])
      for ax, prefs in enumerate(assignment):
        if ax not in used and any(l in v.labels for l in prefs):
          return False
    return True

  def _splits_new_dims(self, layouts: Mapping[int, Layout]) -> bool:
    """`Candidate.splits_new_dims` under these layouts."""
    ir = self.ir
    input_labels = {l for v in ir.input_ids for l in ir.values[v].labels}
    for v in ir.output_ids:
      for lab, axes in zip(ir.values[v].labels, layouts[v]):
        if axes and lab not in ir.batch_labels and lab not in input_labels:
          return True
    return False

  def _idle_devices(self, layouts: Mapping[int, Layout]) -> int:
    """The product of the sizes of the mesh axes that split no value of the layer."""
    used = set()
    for lay in set(layouts.values()):
      used.update(_layout.used_axes(lay))
    return math.prod(n for a, n in enumerate(self.sizes) if a not in used)

  def _count(self, layout: Layout) -> int:
    n = self._counts.get(layout)
    if n is None:
      n = self._counts[layout] = _layout.shard_count(layout, self.sizes)
    return n

  def evaluate(self, assignment: Assignment,
               flags: Sequence[bool] = (False,)) -> list[Candidate]:
    """The candidates of one assignment, without and/or with recomputation."""
    ir, sizes, count = self.ir, self.sizes, self._count
    layouts = self._layouts(assignment)
    if not self._valid(assignment, layouts):
      return []
    nbytes_of = self.nbytes
    comms: dict[tuple, tuple[float, int]] = {}
    n_ops = len(ir.ops)
    op_bytes = [0.0] * n_ops
    op_frac = [1.0] * n_ops
    transient = [0.0] * n_ops  # bytes alive only while op k runs
    seen_reshards: dict[tuple, set[str]] = {}
    reshard_span: dict[tuple, list] = {}  # rkey -> [first op, last op, bytes of the copy]
    # Layouts as small integers, so that an op's memo key is a flat tuple.
    ids = self._layout_ids
    layout_id = self._last_ids
    if len(self._layout_list) < len(ids):
      self._layout_list.extend(sorted(ids, key=ids.__getitem__)[len(self._layout_list):])
    get_id = layout_id.__getitem__
    effects, effect_sig = self._effects, self.effect_sig
    gathered: set[tuple[int, int]] | None = set() if self.live.broadcast_readers else None
    op_rerun = self.op_rerun
    rerun_comms: dict[tuple, tuple[float, int]] = {}  # forward ones a recomputation reissues
    outside: dict[tuple, tuple[float, int]] = {}  # (key, batch-valued) -> of outside ops
    in_pipeline: dict[tuple, tuple[float, int]] = {}  # changes inside a pipeline
    op_outside, batch_valued = self.op_outside, self.batch_valued

    def count_in(table: dict, key: tuple, b: float, n: int = 1) -> None:
      total, m = table.get(key, (0.0, 0))
      table[key] = (total + b, m + n)
    reshard_comms: dict[tuple, tuple] = {}  # rkey -> its collectives, when forward
    reshard_rerun: set[tuple] = set()  # rkeys a recomputation (or the backward) needs
    for k, (keys, n_in, phase, in_ids) in enumerate(self.op_keys):
      key = (effect_sig[k], *map(get_id, keys))
      effect = effects.get(key, _MISSING)
      if effect is _MISSING:
        lays = self._layout_list
        effect = effects[key] = self._effect(k, tuple(lays[i] for i in key[1:n_in + 1]),
                                             tuple(lays[i] for i in key[n_in + 1:]))
      if effect is None:  # XLA's collectives for this op are not predictable
        return []
      op_frac[k], op_bytes[k], reshards, finishes, transient[k], swap, _ = effect
      if swap is not None and not op_outside[k]:
        removed, added = swap
        for ckey, b in removed:
          count_in(in_pipeline, ckey, -b, -1)
        for ckey, b in added:
          count_in(in_pipeline, ckey, b)
      for pos, dst, bcast, copy, rextra, rcomms in reshards:
        if gathered is not None and rcomms:
          gathered.add((k, pos))
        # XLA reshards a value once for all its readers (its partitioner caches the
        # reshard), except an operand an elementwise op broadcasts implicitly: the
        # lowering makes a broadcast per reader, and each is resharded on its own.
        # The copy lives from its first reader to its last.
        rkey = (in_ids[pos], dst, k) if bcast else (in_ids[pos], dst)
        if phase == "backward" or op_rerun[k]:
          reshard_rerun.add(rkey)
        phases = seen_reshards.get(rkey)
        if phases is not None:
          phases.add(phase)
          reshard_span[rkey][1] = k
          continue
        seen_reshards[rkey] = {phase}
        reshard_span[rkey] = [k, k, copy]
        transient[k] += rextra
        if phase == "forward":
          reshard_comms[rkey] = rcomms
        for ckey, b in rcomms:
          total, n = comms.get(ckey, (0.0, 0))
          comms[ckey] = (total + b, n + 1)
          if op_outside[k]:
            count_in(outside, (ckey, in_ids[pos] in batch_valued), b)
      out_ids = self.op_info[k][2]
      for (ckey, b), j in zip(finishes, effect[6]):
        v = out_ids[j]
        total, n = comms.get(ckey, (0.0, 0))
        comms[ckey] = (total + b, n + 1)
        if op_outside[k]:
          count_in(outside, (ckey, v in batch_valued), b)
        if phase == "forward" and op_rerun[k]:
          total, n = rerun_comms.get(ckey, (0.0, 0))
          rerun_comms[ckey] = (total + b, n + 1)
    for rkey, rcomms in reshard_comms.items():
      if rkey in reshard_rerun:
        for ckey, b in rcomms:
          total, n = rerun_comms.get(ckey, (0.0, 0))
          rerun_comms[ckey] = (total + b, n + 1)
    scattered = [math.prod(sizes[a] for a in key[1]) for key in comms
                 if key[0] == "reduce-scatter"]
    if scattered and min(scattered) <= self._idle_devices(layouts):
      # Mesh axes that split nothing in the layer, at least as many devices as a
      # gradient is reduce-scattered over (ZeRO / FSDP): XLA's partitioner moves the
      # parameter's shards onto the idle axes with collective-permutes, and gathers and
      # reduces over other groups than the plan's (on 4x2 meshes: FSDP over the 2-way
      # axis beside an idle 4-way one, not over the 4-way one beside an idle 2-way).
      # Not predictable, so not offered.
      return []
    op_bytes = np.array(op_bytes)
    op_frac = np.array(op_frac)
    local = lambda v: nbytes_of[v] / count(layouts[v])
    count_of = self._count
    live = self.live
    live_shards = [count_of(layouts[v]) for v in live.ids]
    # Broadcasts the backend keeps from the forward to the backward pass (XLA:CPU),
    # unless a reader gathers the broadcast operand first (then each pass has its own).
    kept_broadcasts = 0.0
    for i, readers in enumerate(live.broadcast_readers, live.num_values):
      if gathered and any(r in gathered for r in readers):
        live_shards[i] = math.inf
      else:
        kept_broadcasts += live.nbytes[i] / live_shards[i]
    peak_bytes = _liveness.peak_bytes(live, live_shards, reshard_span.values(), transient)
    param_bytes = sum(local(v) for v in ir.param_ids)
    optimizer_bytes = sum(local(v) for v in ir.opt_state_ids)
    grad_bytes = sum(local(v) for v in ir.grad_ids) if ir.grad_ids else param_bytes
    param_elements = sum(math.prod(ir.values[v].shape) / count(layouts[v]) for v in ir.param_ids)
    comm_list = [self._comm(key, total, n) for key, (total, n) in sorted(comms.items())]
    pipeline_list = comm_list
    if in_pipeline:
      merged = dict(comms)
      for key, (b, n) in in_pipeline.items():
        total, m = merged.get(key, (0.0, 0))
        merged[key] = (total + b, m + n)
      pipeline_list = [self._comm(key, total, n) for key, (total, n) in sorted(merged.items())
                       if n > 0]
    outside_list = sorted(outside.items())
    batch_sums = []
    for k in self.outside_sums:
      o = ir.ops[k]
      src = ir.values[o.op.in_ids[0]]
      reduced = set(o.op.param("axes", ()))
      lay = layouts[o.op.in_ids[0]]
      split = {a for d in reduced if d < len(lay) for a in lay[d]
               if src.labels[d] in ir.batch_labels}
      out = o.op.out_ids[0]
      batch_sums.append((nbytes_of[out] / count(layouts[out]),
                         tuple(self.names[a] for a in sorted(split))))
    param_index = {v: i for i, v in enumerate(ir.param_ids)}
    param_gathers = []
    for rkey, rcomms in reshard_comms.items():
      root = self.param_root.get(rkey[0])
      if root is not None and rcomms:
        param_gathers.append(ParamGather(
            param=param_index[root[0]], backward_reads="backward" in seen_reshards[rkey],
            recomputed=rkey in reshard_rerun,
            comms=tuple(self._comm(ckey, b, 1) for ckey, b in rcomms)))
    rerun_list = tuple(self._comm(key, total, n) for key, (total, n) in sorted(rerun_comms.items()))
    flops = self.op_flops * op_frac
    names = ir.label_names
    specs = self._specs

    def to_spec(lay: Layout) -> tuple:
      spec = specs.get(lay)
      if spec is None:
        spec = specs[lay] = _layout.to_spec(lay, self.names)
      return spec

    # A parameter dim split over an axis the layer keeps (tensor parallel) and one it
    # gathers before use (ZeRO) lists the kept axis first: gathering the other then
    # leaves each device a contiguous shard of the kept split. In mesh order, XLA
    # gathers over both axes and runs the layer data parallel.
    gathered_axes: dict[int, list[set[int]]] = {}
    for key in reshard_span:
      root = self.param_root.get(key[0])
      if root is None:
        continue
      vid, dims = root
      per_dim = gathered_axes.setdefault(vid, [set() for _ in layouts[vid]])
      for d, src_axes, dst_axes in zip(dims, layouts[key[0]], key[1]):
        if d is not None:
          per_dim[d].update(a for a in src_axes if a not in dst_axes)

    def param_spec(vid: int) -> tuple:
      lay = layouts[vid]
      drop = gathered_axes.get(vid)
      if drop is not None:
        lay = tuple(tuple(sorted(axes, key=lambda a: (a in g, a))) for axes, g in zip(lay, drop))
      return to_spec(lay)

    common = dict(
        assignment=tuple(tuple(names[l] for l in prefs) for prefs in assignment),
        param_specs=tuple(param_spec(v) for v in ir.param_ids),
        input_specs=tuple(to_spec(layouts[v]) for v in ir.input_ids),
        output_specs=tuple(to_spec(layouts[v]) for v in ir.output_ids),
        input_layouts=tuple(layouts[v] for v in ir.input_ids),
        output_layouts=tuple(layouts[v] for v in ir.output_ids),
        op_flops=flops, op_bytes=op_bytes, op_phase=self.op_phase, op_dtype=self.op_dtype,
        op_rerun=self.op_rerun, rerun_comms=rerun_list, param_gathers=tuple(param_gathers),
        op_outside=self.op_outside,
        outside_comms=tuple(self._comm(key, total, n) for (key, _), (total, n) in outside_list),
        outside_scales=tuple(scaled for (_, scaled), _ in outside_list),
        outside_batch_sums=tuple(batch_sums),
        model_outputs=tuple((float(nbytes_of[v]), local(v)) for v in self.model_output_ids),
        outside_outputs=self.outside_outputs,
        param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes,
        tied_bytes=tuple(local(v) for v in sorted(ir.passed_ids)),
        splits_new_dims=self._splits_new_dims(layouts),
        param_elements=param_elements,
        batch_bytes=sum(local(v) for v in ir.batch_ids if v not in ir.kept_ids))
    name = describe(assignment, self.names, names, ir.batch_labels)
    out = []
    for recompute in flags:
      if recompute:
        # (Batch leaves not kept anyway are `batch_bytes`.)
        activation = sum(local(v) for v in (*ir.input_ids, *self.outside_kept)
                         if v not in self.batch_only)
        recomputed = [dataclasses.replace(c, phase="recompute") for c in rerun_list]
        cands_comms = tuple(comm_list + recomputed)
        pipe_comms = tuple(pipeline_list + recomputed)
        # The forward runs again inside the backward pass: the same peak as without
        # recomputation, over less memory held in between.
        temp = max(0.0, peak_bytes - max(activation, grad_bytes))
      else:
        activation = sum(local(v) for v in ir.kept_ids if v not in ir.constant_ids)
        activation += kept_broadcasts
        # Parameters gathered in the forward pass and read again by the backward pass
        # stay alive in between (XLA reuses the gathered copy).
        activation += sum(span[2] for key, span in reshard_span.items()
                          if key[0] in self.param_set
                          and {"forward", "backward"} <= seen_reshards[key])
        cands_comms = tuple(comm_list)
        pipe_comms = tuple(pipeline_list)
        temp = max(0.0, peak_bytes - max(activation, grad_bytes))
      out.append(Candidate(name=name + (" +remat" if recompute else ""), recompute=recompute,
                           comms=cands_comms, pipeline_comms=pipe_comms,
                           activation_bytes=activation, temp_bytes=temp,
                           **common))
    return out

  def _comm(self, key: tuple, total: float, n: int) -> Comm:
    """The Comm of `n` collectives of one (kind, axes, phase, per_step), shared."""
    comm = self._comms.get((key, total, n))
    if comm is None:
      kind, axes, phase, per_step = key
      comm = self._comms[(key, total, n)] = Comm(
          kind=kind, axes=tuple(self.names[a] for a in axes), bytes=total / n, phase=phase,
          per_step=per_step, count=n)
    return comm

  def _effect(self, k: int, ins: tuple[Layout, ...], outs: tuple[Layout, ...]) -> tuple:
    """What op k does under the given operand and result layouts, for `evaluate`.

    Returns (FLOP fraction, local bytes, reshards, finishing collectives, transient
    bytes, pipeline swap, result position of each finishing collective): reshards as
    (operand position, target layout, implicitly broadcast, bytes of the copy, bytes
    on the way, collectives); collectives as ((kind, axes, phase, per_step), bytes);
    the swap None, or (collectives removed, collectives added) inside a pipeline
    (`_rules.Plan.pipeline_gathers`). Shared by ops with the same `effect_sig`. None
    where the rule says XLA's collectives are not predictable
    (`_rules.Plan.predictable`).
    """
    ir, sizes, count, nbytes_of = self.ir, self.sizes, self._count, self.nbytes
    o, in_ids, out_ids, implicit, in_shapes, _ = self.op_info[k]
    phase = o.op.phase
    plan_key = (self.op_sig[k], ins, outs)  # ops alike in all a rule reads share plans
    plan = self._plans.get(plan_key)
    if plan is None:
      ctx = _rules.Context(
          op=o, ins=ins, outs=outs, in_shapes=in_shapes,
          out_shapes=tuple(ir.values[v].shape for v in out_ids), sizes=sizes)
      plan = self._plans[plan_key] = _rules.RULES.get(o.family, _rules.rule_other)(ctx)
    if not plan.predictable:
      return None
    local_in = 0.0
    reshards = []
    for pos, (v, src, dst, bcast) in enumerate(zip(in_ids, ins, plan.in_targets, implicit)):
      if v < 0 or dst is None:
        continue
      nbytes = nbytes_of[v]
      here = nbytes / count(dst)
      local_in += here
      if src == dst or v in ir.constant_ids:
        continue
      result = self._reshard.get((src, dst, nbytes))
      if result is None:
        result = self._reshard[(src, dst, nbytes)] = _layout.reshard(src, dst, nbytes, sizes)
      rcomms, peak = result
      # A pure slice is fused into its reader; buffers on the way (all-to-alls) live
      # while the op runs.
      copy = here if rcomms else 0.0
      reshards.append((pos, dst, bcast, copy, max(0.0, peak - copy) if rcomms else 0.0,
                       tuple(((kind, axes, phase, False), b) for kind, axes, b in rcomms)))
    local_out = extra = 0.0
    finishes = []
    finish_pos = []
    for j, (v, natural, partial, target) in enumerate(zip(out_ids, plan.out_natural,
                                                          plan.out_partial, outs)):
      nbytes = nbytes_of[v]
      local_out += nbytes / count(target)
      if natural == target and not partial:
        continue
      fkey = (natural, partial, target, nbytes, plan.combine)
      result = self._finish.get(fkey)
      if result is None:
        result = self._finish[fkey] = _layout.finish(natural, partial, target, nbytes, sizes,
                                                     combine=plan.combine)
      fcomms, peak = result
      extra += peak  # the unreduced or not yet resharded result
      per_step = phase == "optimizer" or (phase == "backward" and v in ir.grad_like_ids)
      finishes.extend(((kind, axes, phase, per_step), b) for kind, axes, b in fcomms)
      finish_pos.extend(j for _ in fcomms)
    swap = None
    if plan.pipeline_gathers:
      # Inside a pipeline: the operands named are gathered over those axes instead.
      axes = plan.pipeline_gathers
      added = []
      for pos in plan.pipeline_operands:
        src, v = ins[pos], in_ids[pos]
        gcomms, _ = _layout.reshard(src, _layout.drop(src, axes), nbytes_of[v], sizes)
        added.extend(((kind, a, phase, False), b) for kind, a, b in gcomms)
      swap = (tuple(finishes), tuple(added))
    return (plan.frac, local_in + local_out, tuple(reshards), tuple(finishes), extra, swap,
            tuple(finish_pos))

def value_layouts(ir: _ir.LayerIR, mesh: _mesh.MeshShape,
                  candidate: Candidate) -> dict[int, Layout]:
  """The layout a candidate gives every value of the layer (by this IR's value ids).

  A plan pins parameters and boundary activations; XLA's propagation decides the rest
  and can resolve a conflict differently (e.g. keep a sequence split where the
  candidate splits heads). Constraining the values listed here reproduces the
  candidate exactly; `apply` may pin the outputs of contractions with them.
  """
  index = {name: i for i, name in enumerate(ir.label_names)}
  assignment = tuple(tuple(index[n] for n in prefs) for prefs in candidate.assignment)
  return {vid: tensor_layout(v, assignment, mesh.sizes) for vid, v in ir.values.items()}


def unsupported(ir: _ir.LayerIR) -> dict[str, str]:
  """Primitives of the layer without a sharding rule -> the source line of the first."""
  out: dict[str, str] = {}
  for o in ir.ops:
    if o.family == "other":
      out.setdefault(o.op.primitive, o.op.source)
  return out


def layer_candidates(ir: _ir.LayerIR, mesh: _mesh.MeshShape, *,
                     recompute: bool | None = None,
                     assignments_: Sequence[Assignment] | None = None,
                     warn: bool = True, platform: str = "gpu") -> tuple[Candidate, ...]:
  """Every candidate of one layer on one mesh (before Pareto pruning).

  Args:
    ir: the layer, labelled and scaled to the micro-batch (`_ir.build`).
    mesh: the stage's mesh.
    recompute: None costs both with and without activation recomputation; True or
      False pins it.
    assignments_: the assignments to cost; default `assignments(ir, mesh)`.
    warn: warn once per primitive that has no rule (it is kept replicated).
    platform: the backend XLA compiles for, as `Cluster.platform` says ("gpu",
      "tpu" or "cpu"); decides what its fusions keep in memory (`_liveness`).
  Returns:
    Candidates in a deterministic order; assignments that cannot split a parameter
    or boundary tensor (a mesh axis that does not divide it) are left out.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}; allowed: {', '.join(PLATFORMS)} "
                     "(Cluster.platform gives it).")
  ev = _Evaluator(ir, mesh, platform)
  for primitive, source in sorted(unsupported(ir).items() if warn else ()):
    warnings.warn(
        f"No sharding rule for {primitive!r} at {source or 'unknown source'} (layer "
        f"{ir.layer.name!r}): kept replicated; add one in uniap_jax/strategies/_rules.py.",
        stacklevel=2)
  has_backward = any(o.op.phase == "backward" for o in ir.ops)
  flags = (False, True) if recompute is None else (recompute,)
  if not has_backward:
    flags = (False,)
  out = []
  for assignment in (assignments(ir, mesh) if assignments_ is None else assignments_):
    out.extend(ev.evaluate(assignment, flags))
  return tuple(out)
