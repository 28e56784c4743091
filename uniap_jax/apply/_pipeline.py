"""The SPMD pipeline: per-stage parameter stacks and the executors that run a schedule.

Layout (reference/pipelines.md, section 3). Calls of the recorded forward are grouped
into kinds (same module structure, method, parameter shapes, intra-stage specs and
activation recomputation: a call the plan recomputes never shares a kind, hence a
uniform position or a stack, with a plain one; `cost._predict` groups them alike); each
kind keeps one stack per parameter leaf, `[S, C, ...]` sharded `P('pp', None, *spec)`,
where C is the most calls of that kind any stage runs. Stage s finds its calls of the
kind in row s, slots 0..n-1, so stages may hold different numbers of layers; a
parameter the forward passes to two calls (a tied embedding) gets a slot in each, and
autodiff adds their gradients.

Execution: one `jax.shard_map`, manual over `pp` and the data-parallel axes that no
pipelined parameter is sharded over; tensor-parallel axes stay automatic. The stage
body for one micro-batch comes from `_stages.py` ("uniform": the same masked layer
sequence on every device; "switch": a `lax.switch` branch per stage plus an idle one).
Activations move by `ppermute` outside any stage-dependent code. Micro-batches are cut
from each device's share of the batch, so data parallelism stays on the per-micro-batch
batch dim.

Executors:
  - "gpipe": autodiff through a `fori_loop` of M + S - 1 forward ticks; the gradient
    oracle. With "uniform" stage bodies it keeps every tick's residuals (no
    recomputation, but every position's residuals in every tick, idle ones included:
    `cost.runtime_memory_bytes`); "switch" branches are rematerialised, since a
    linearised switch would keep the residuals of every branch. Plans run GPipe's
    order as "gpipe-remat" instead (`plans.runtime_executor`).
  - "gpipe-remat", "fused", "1f1b": a `custom_vjp` whose forward rule runs the forward
    ticks and whose backward rule runs a schedule table (_schedules.py) with one
    `jax.vjp` per stage and micro-batch, recomputing the stage from its stashed input.
    The model's output cotangents exist only after the user's loss has seen every
    micro-batch, so "fused" and "1f1b" run their whole table (forward and backward
    entries) in the backward rule: one extra forward per micro-batch, for a stash of
    2S-3 (fused) or S (1f1b) stage inputs instead of M.

Idle ticks ("uniform" dispatch, more than one stage; `skip_idle`): where
`cluster.skips_idle_work` allows it, the custom_vjp executors run a tick's forward
and backward stage work under `lax.cond` on whether this device has a micro-batch
for it, with an idle branch that returns zeros, so that a device runs M forwards per
pass and M table forwards and backward runs, not one per tick. The ppermutes stay
outside the conditional, on every device in every tick. Lockstep still holds: a tick
lasts as long as its busiest device. Autodiff "gpipe" always runs every tick (a
linearised `cond` would keep the residuals of both branches).

In every executor, the calls of a recomputing kind run under `jax.checkpoint`
(`_program.invoke`): each backward run (a backward tick of the autodiff loop, or the
`jax.vjp` of a table's backward entry) runs their forward once more.

What each executor compiles, collective by collective, is what
`uniap_jax.cost.collectives_by_stage(..., executor=...)` counts (tests/test_apply.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uniap_jax.apply import _mesh
from uniap_jax.apply import _program
from uniap_jax.apply import _schedules
from uniap_jax.apply import _stages

EXECUTORS = ("gpipe", "gpipe-remat", "fused", "1f1b")
PP = _mesh.PIPELINE_AXIS


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Kind:
  """Calls that share one set of stacks: module structure, method, leaf shapes, specs,
  argument signature (so that the uniform dispatch can run them at one position) and
  whether they recompute their activations (`remat`: the plan's per-layer choice, so a
  recomputing call never shares a position with a plain one)."""

  graphdef: Any
  method: str
  state_treedef: Any
  num_state_leaves: int
  leaf_avals: tuple[jax.ShapeDtypeStruct, ...]
  leaf_specs: tuple[P, ...]
  capacity: int
  remat: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
  """Where every call's parameters live and what crosses each stage boundary.

  Attributes:
    stage_of_call / kind_of_call / slot_of_call: per call of the program.
    kinds: the parameter stacks.
    boundaries: per boundary b (stage b -> b+1): (value, slot) pairs it carries.
    slot_avals: the slots sent every tick, per micro-batch (local shapes).
    final_avals: the forward's returned leaves, per micro-batch (local shapes).
  """

  program: _program.Program
  num_stages: int
  stage_of_call: tuple[int, ...]
  kind_of_call: tuple[int, ...]
  slot_of_call: tuple[int, ...]
  kinds: tuple[Kind, ...]
  boundaries: tuple[tuple[tuple[_program.ValueRef, int], ...], ...]
  slot_avals: tuple[jax.ShapeDtypeStruct, ...]
  final_avals: tuple[jax.ShapeDtypeStruct, ...]


def build_layout(program: _program.Program, stage_of_call: Sequence[int], num_stages: int,
                 call_leaves: Sequence[tuple[Any, Any, list[Any], list[str]]],
                 spec_of: Callable[[str], P],
                 remat_of_call: Sequence[bool] | None = None) -> Layout:
  """Groups calls into kinds and assigns slots; sizes the boundary buffers.

  Args:
    call_leaves: per call: (graphdef, state treedef, leaves incl. referenced params, their
      paths from the root).
    spec_of: root path -> intra-stage spec of that parameter.
    remat_of_call: per call, whether it recomputes its activations (default: none).
  """
  if remat_of_call is None:
    remat_of_call = [False] * len(program.calls)
  kinds: list[dict] = []
  index: dict[Any, int] = {}
  kind_of_call, slot_of_call = [], []
  used: dict[tuple[int, int], int] = {}
  for call, (graphdef, treedef, leaves, paths) in zip(program.calls, call_leaves):
    for leaf, path in zip(leaves, paths):
      if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        raise NotImplementedError(
            f"Layer {call.name!r} holds non-floating state {path!r} ({leaf.dtype}); pipelined "
            "layers may only hold floating-point parameters and buffers.")
    specs = tuple(spec_of(p) for p in paths)
    avals = tuple(jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in leaves)
    remat = bool(remat_of_call[call.index])
    key = (graphdef, call.method, treedef, len(leaves) - len(call.param_refs),
           tuple((a.shape, str(a.dtype)) for a in avals), specs, call.signature(), remat)
    if key not in index:
      index[key] = len(kinds)
      kinds.append(dict(graphdef=graphdef, method=call.method, state_treedef=treedef,
                        num_state_leaves=len(leaves) - len(call.param_refs), leaf_avals=avals,
                        leaf_specs=specs, remat=remat))
    k = index[key]
    s = stage_of_call[call.index]
    slot = used.get((s, k), 0)
    used[(s, k)] = slot + 1
    kind_of_call.append(k)
    slot_of_call.append(slot)
  kinds_t = tuple(
      Kind(capacity=max(n for (s, k), n in used.items() if k == i), **kw)
      for i, kw in enumerate(kinds))

  # Values live across each boundary: produced at or before it, read after it.
  live: list[list[_program.ValueRef]] = [[] for _ in range(max(num_stages - 1, 0))]
  avals: dict[_program.ValueRef, jax.ShapeDtypeStruct] = {}
  for call in program.calls:
    avals.update(zip(call.outputs(), call.out_avals))
  for ref, readers in sorted(program.consumers().items()):
    produced = stage_of_call[ref.call]
    stages = [stage_of_call[r] if r < len(program.calls) else num_stages - 1 for r in readers]
    if min(stages) < produced:
      raise ValueError(f"The plan puts a reader of layer "
                       f"{program.calls[ref.call].name!r}'s output on an earlier stage.")
    for b in range(produced, max(stages)):
      live[b].append(ref)
  slot_avals: list[jax.ShapeDtypeStruct] = []
  boundaries = []
  for refs in live:
    taken: set[int] = set()
    pairs = []
    for ref in refs:
      aval = avals[ref]
      j = next((j for j, a in enumerate(slot_avals)
                if j not in taken and a.shape == aval.shape and a.dtype == aval.dtype), None)
      if j is None:
        j = len(slot_avals)
        slot_avals.append(aval)
      taken.add(j)
      pairs.append((ref, j))
    boundaries.append(tuple(pairs))
  final_avals = tuple(avals[leaf] if isinstance(leaf, _program.ValueRef) else leaf
                      for leaf in program.ret_leaves)
  return Layout(program=program, num_stages=num_stages, stage_of_call=tuple(stage_of_call),
                kind_of_call=tuple(kind_of_call), slot_of_call=tuple(slot_of_call), kinds=kinds_t,
                boundaries=tuple(boundaries), slot_avals=tuple(slot_avals), final_avals=final_avals)


def stack_params(layout: Layout, call_leaves: Sequence[Sequence[Any]], mesh: Mesh | None,
                 ) -> list[list[jax.Array]]:
  """Per kind and leaf, the `[S, C, ...]` stack of the calls' arrays (zeros in free slots)."""
  stacks = []
  for k, kind in enumerate(layout.kinds):
    per_leaf = []
    for j, aval in enumerate(kind.leaf_avals):
      rows = [[None] * kind.capacity for _ in range(layout.num_stages)]
      for c, leaves in enumerate(call_leaves):
        if layout.kind_of_call[c] == k:
          rows[layout.stage_of_call[c]][layout.slot_of_call[c]] = leaves[j]
      zero = jnp.zeros(aval.shape, aval.dtype)
      x = jnp.stack([jnp.stack([v if v is not None else zero for v in row]) for row in rows])
      if mesh is not None:
        lead = PP if layout.num_stages > 1 else None
        x = jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, P(lead, None, *kind.leaf_specs[j])))
      per_leaf.append(x)
    stacks.append(per_leaf)
  return stacks


_vary = _stages.vary


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pipeline:
  """Everything static about one pipelined forward; call `run(stacks, args)`.

  Attributes:
    layout: calls, stacks and boundaries.
    stage_fns: "switch" dispatch: per stage, fn(rows, recv, mb_args) -> (send, final).
    uniform: "uniform" dispatch (used when given): fn(rows, recv, mb_args, stage, active).
    mesh: the mesh (None: no shard_map, one stage and no manual data parallelism).
    num_microbatches: M.
    dp_manual: data-parallel axes made manual (the batch is split over them).
    dp_auto: the product of the batch's automatic data-parallel axes.
    executor: one of EXECUTORS.
    bubble_value: what idle buffers hold before anything arrives (NaN in tests).
    skip_idle: the table executors run a tick's stage work under `lax.cond` on whether
      this device has a micro-batch in it, so that idle devices compute nothing; only
      where `cluster.skips_idle_work` says it is safe ("uniform" dispatch only: the
      "switch" dispatch has an idle branch of its own).
  """

  layout: Layout
  stage_fns: tuple[Callable[..., Any], ...]
  uniform: Callable[..., Any] | None
  mesh: Mesh | None
  num_microbatches: int
  dp_manual: tuple[str, ...]
  dp_auto: int
  executor: str
  bubble_value: float = 0.0
  skip_idle: bool = False

  @property
  def num_stages(self) -> int:
    return self.layout.num_stages

  @property
  def manual(self) -> tuple[str, ...]:
    return ((PP,) if self.num_stages > 1 else ()) + self.dp_manual

  # --- helpers used inside the shard_map ------------------------------------------------

  def _stage_index(self):
    return lax.axis_index(PP) if self.num_stages > 1 else 0

  def _split(self, x):
    m = self.num_microbatches
    if self.dp_auto == 1:
      return x.reshape((m, x.shape[0] // m) + x.shape[1:])
    d = self.dp_auto
    y = x.reshape((d, m, x.shape[0] // (d * m)) + x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape((m, x.shape[0] // m) + x.shape[1:])

  def _merge(self, x):
    m = self.num_microbatches
    if self.dp_auto == 1:
      return x.reshape((m * x.shape[1],) + x.shape[2:])
    d = self.dp_auto
    y = x.reshape((m, d, x.shape[1] // d) + x.shape[2:])
    return jnp.swapaxes(y, 0, 1).reshape((m * x.shape[1],) + x.shape[2:])

  def _full(self, shape, dtype, value):
    return _vary(jnp.full(shape, value, dtype), self.manual)

  def _branches(self, remat: bool):
    def make(i):
      fn = lambda rows, recv, args: _vary(self.stage_fns[i](rows, recv, args), self.manual)
      return jax.checkpoint(fn) if remat else fn

    def idle(rows, recv, args):
      return ([self._full(a.shape, a.dtype, 0) for a in self.layout.slot_avals],
              [self._full(a.shape, a.dtype, 0) for a in self.layout.final_avals])
    return [make(i) for i in range(self.num_stages)] + [idle]

  def _backward_branches(self):
    s_last = self.num_stages - 1

    def make(i):
      def bwd(rows, inp, args, cot, g):
        (send, fin), vjp = jax.vjp(
            lambda r, x: _vary(self.stage_fns[i](r, x, args), self.manual), rows, inp)
        ct_send = cot if i < s_last else [jnp.zeros_like(x) for x in send]
        ct_fin = g if i == s_last else [jnp.zeros_like(x) for x in fin]
        d_rows, d_inp = vjp((_vary(ct_send, self.manual), _vary(ct_fin, self.manual)))
        return _vary(d_rows, self.manual), _vary(d_inp, self.manual)
      return bwd

    def idle(rows, inp, args, cot, g):
      return (jax.tree.map(lambda x: self._full(x.shape, x.dtype, 0), rows),
              [self._full(a.shape, a.dtype, 0) for a in self.layout.slot_avals])
    return [make(i) for i in range(self.num_stages)] + [idle]

  def _forward_stage(self, rows, recv, args, stage, active, *, remat: bool,
                     skip: bool = False, want_final: bool = True):
    """The stage's (send, final) for one micro-batch; zeros when not `active`.

    skip: run the uniform body under `lax.cond(active, ...)`, so that an idle device
    computes nothing (see `cluster.skips_idle_work`). want_final: False returns `final` as []
    (a table's forward inside the backward rule only feeds the sends: the branch then
    holds no dead outputs for XLA to keep).
    """
    if self.uniform is None:
      send, fin = lax.switch(jnp.where(active, stage, self.num_stages), self._branches(remat),
                             rows, recv, args)
      return send, fin if want_final else []

    def busy(r, x, a, on):
      send, fin = _vary(self.uniform(r, x, a, stage, on), self.manual)
      return send, fin if want_final else []
    if not skip:
      fn = lambda r, x, a: busy(r, x, a, active)
      return (jax.checkpoint(fn) if remat else fn)(rows, recv, args)

    def idle(r, x, a):
      return ([self._full(v.shape, v.dtype, 0) for v in self.layout.slot_avals],
              [self._full(v.shape, v.dtype, 0) for v in self.layout.final_avals]
              if want_final else [])
    return lax.cond(active, lambda r, x, a: busy(r, x, a, True), idle, rows, recv, args)

  def _backward_stage(self, rows, inp, args, cot, g, stage, active, *, skip: bool = False):
    """Gradients of the stage's rows and input for one micro-batch (recomputing it);
    under `lax.cond(active, ...)` with `skip`, as `_forward_stage`."""
    if self.uniform is None:
      return lax.switch(jnp.where(active, stage, self.num_stages), self._backward_branches(),
                        rows, inp, args, cot, g)
    last = stage == self.num_stages - 1

    def busy(rows, inp, args, cot, g, on):
      (send, fin), vjp = jax.vjp(
          lambda r, x: _vary(self.uniform(r, x, args, stage, on), self.manual), rows, inp)
      ct_send = [jnp.where(last, jnp.zeros_like(c), c) for c in cot]
      ct_fin = [jnp.where(last, x, jnp.zeros_like(x)) for x in g]
      d_rows, d_inp = vjp((_vary(ct_send, self.manual), _vary(ct_fin, self.manual)))
      return _vary(d_rows, self.manual), _vary(d_inp, self.manual)
    if not skip:
      return busy(rows, inp, args, cot, g, active)
    idle = self._backward_branches()[-1]
    return lax.cond(active, lambda *xs: busy(*xs, True), idle, rows, inp, args, cot, g)

  def _ppermute(self, xs, shift: int):
    n = self.num_stages
    perm = [(i, i + shift) for i in range(n) if 0 <= i + shift < n]
    return [lax.ppermute(x, PP, perm) for x in xs]

  def _rows(self, stacks):
    return [[_vary(x[0], self.dp_manual) for x in kind] for kind in stacks]

  # --- shard_map wrapping -------------------------------------------------------------

  def _batch_spec(self):
    return P(self.dp_manual) if self.dp_manual else P()

  def _shard(self, body, in_specs, out_specs):
    if not self.manual:
      return body
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(self.manual))

  def _stack_spec(self):
    return P(PP) if self.num_stages > 1 else P()

  # --- executors ----------------------------------------------------------------------

  def run(self, stacks, args):
    """The forward's returned leaves for the whole batch; differentiable in `stacks`."""
    if self.executor == "gpipe":
      return self._autodiff(stacks, args)
    return self._custom(stacks, args)

  def _autodiff(self, stacks, args):
    s_count, m_count = self.num_stages, self.num_microbatches
    lay = self.layout

    def body(stacks, args):
      rows = self._rows(stacks)
      xs = [self._split(a) for a in args]
      s = self._stage_index()
      recv0 = [self._full(a.shape, a.dtype, self.bubble_value) for a in lay.slot_avals]
      outs0 = [self._full((m_count,) + a.shape, a.dtype, 0) for a in lay.final_avals]

      def tick(t, carry):
        recv, outs = carry
        f = t - s
        valid = (f >= 0) & (f < m_count)
        mb = jnp.clip(f, 0, m_count - 1)
        send, fin = self._forward_stage(rows, recv, [x[mb] for x in xs], s, valid,
                                        remat=self.uniform is None)
        write = valid & (s == s_count - 1)
        outs = [lax.dynamic_update_index_in_dim(o, jnp.where(write, v, o[mb]), mb, 0)
                for o, v in zip(outs, fin)]
        if s_count > 1:
          recv = self._ppermute(send, 1)
        return recv, outs

      _, outs = lax.fori_loop(0, m_count + s_count - 1, tick, (recv0, outs0))
      if s_count > 1:
        outs = [lax.psum(o, PP) for o in outs]
      return [self._merge(o) for o in outs]

    fn = self._shard(body, in_specs=(self._stack_spec(), self._batch_spec()),
                     out_specs=self._batch_spec())
    return fn(stacks, list(args))

  def _table_pass(self, table: _schedules.Table, stacks, args, g_outs, stash_in):
    """Runs `table` inside shard_map; returns (outputs, stash, gradients) as requested."""
    s_count, m_count = self.num_stages, self.num_microbatches
    lay = self.layout
    want_outs = table.has_forward and not table.has_backward
    want_stash = want_outs and table.stash_slots == m_count and s_count > 1
    k_slots, kc_slots = table.stash_slots, table.cotangent_slots
    skip_f = skip_b = self.skip_idle

    def body(stacks, args, g_outs, stash_in):
      rows = self._rows(stacks)
      xs = [self._split(a) for a in args]
      gs = [_vary(self._split(g), self.manual) for g in g_outs]
      s = self._stage_index()
      ft = jnp.asarray(table.forward)
      bt = jnp.asarray(table.backward)
      if stash_in is not None:
        stash = [x[0] for x in stash_in]
      else:
        stash = [self._full((k_slots,) + a.shape, a.dtype, self.bubble_value)
                 for a in lay.slot_avals]
      cstash = [self._full((kc_slots,) + a.shape, a.dtype, 0) for a in lay.slot_avals]
      grads = jax.tree.map(lambda x: self._full(x.shape, x.dtype, 0), rows)
      outs = [self._full((m_count,) + a.shape, a.dtype, 0) for a in lay.final_avals]

      def file(buf, value, src, slots):
        idx = jnp.maximum(src, 0) % slots
        return [lax.dynamic_update_index_in_dim(b, jnp.where(src >= 0, v, b[idx]), idx, 0)
                for b, v in zip(buf, value)]

      def tick(t, carry):
        stash, cstash, grads, outs = carry
        if table.has_forward:
          f = ft[t, s]
          fm = jnp.maximum(f, 0)
          inp = [b[fm % k_slots] for b in stash]
          send_f, fin = self._forward_stage(rows, inp, [x[fm] for x in xs], s, f >= 0,
                                            remat=False, skip=skip_f, want_final=want_outs)
          if want_outs:
            write = (f >= 0) & (s == s_count - 1)
            outs = [lax.dynamic_update_index_in_dim(o, jnp.where(write, v, o[fm]), fm, 0)
                    for o, v in zip(outs, fin)]
        if table.has_backward:
          b = bt[t, s]
          bm = jnp.maximum(b, 0)
          d_rows, send_b = self._backward_stage(
              rows, [x[bm % k_slots] for x in stash], [x[bm] for x in xs],
              [x[bm % kc_slots] for x in cstash], [g[bm] for g in gs], s, b >= 0, skip=skip_b)
          grads = jax.tree.map(jnp.add, grads, d_rows)
        if s_count > 1 and table.has_forward:
          arrived = self._ppermute(send_f, 1)
          src = jnp.where(s > 0, ft[t, jnp.maximum(s - 1, 0)], -1)
          stash = file(stash, arrived, src, k_slots)
        if s_count > 1 and table.has_backward:
          arrived = self._ppermute(send_b, -1)
          src = jnp.where(s < s_count - 1, bt[t, jnp.minimum(s + 1, s_count - 1)], -1)
          cstash = file(cstash, arrived, src, kc_slots)
        return stash, cstash, grads, outs

      stash, cstash, grads, outs = lax.fori_loop(0, table.ticks, tick,
                                                 (stash, cstash, grads, outs))
      result = []
      if want_outs:
        if s_count > 1:
          outs = [lax.psum(o, PP) for o in outs]
        result.append([self._merge(o) for o in outs])
        result.append([x[None] for x in stash] if want_stash else [])
      if table.has_backward:
        if self.dp_manual:
          grads = jax.tree.map(lambda x: lax.psum(x, self.dp_manual), grads)
        result.append([[x[None] for x in kind] for kind in grads])
      return tuple(result)

    lead = PP if s_count > 1 else None
    stash_spec = P(lead, None, self.dp_manual) if self.dp_manual else P(lead)
    out_specs = []
    if want_outs:
      out_specs += [self._batch_spec(), stash_spec]
    if table.has_backward:
      out_specs.append(self._stack_spec())
    if stash_in is None:
      fn = self._shard(lambda st, a, g: body(st, a, g, None),
                       in_specs=(self._stack_spec(), self._batch_spec(), self._batch_spec()),
                       out_specs=tuple(out_specs))
      return fn(stacks, list(args), list(g_outs))
    fn = self._shard(body, in_specs=(self._stack_spec(), self._batch_spec(), self._batch_spec(),
                                     stash_spec), out_specs=tuple(out_specs))
    return fn(stacks, list(args), list(g_outs), list(stash_in))

  def _custom(self, stacks, args):
    s_count, m_count = self.num_stages, self.num_microbatches
    remat = self.executor == "gpipe-remat"
    forward_table = _schedules.forward_only(s_count, m_count, keep_all=remat)
    if remat:
      backward_table = _schedules.backward_only(s_count, m_count)
    else:
      backward_table = _schedules.table(self.executor, s_count, m_count)

    @jax.custom_vjp
    def pipe(stacks, args):
      return self._table_pass(forward_table, stacks, args, [], None)[0]

    def fwd(stacks, args):
      for a in args:
        if a.perturbed and jnp.issubdtype(a.value.dtype, jnp.inexact):
          raise NotImplementedError(
              "The model's inputs are differentiated (they depend on parameters) but the "
              f"{self.executor!r} schedule does not propagate gradients to the model's inputs; "
              "use schedule='gpipe' or pass the inputs as data.")
      stacks_v = jax.tree.map(lambda p: p.value, stacks)
      args_v = [a.value for a in args]
      outs, stash = self._table_pass(forward_table, stacks_v, args_v, [], None)
      return outs, (stacks_v, args_v, stash if remat and s_count > 1 else None)

    def bwd(res, g_outs):
      stacks_v, args_v, stash = res
      g_outs = [jnp.zeros(a.shape, a.dtype)
                if isinstance(g, jax.custom_derivatives.SymbolicZero) else g
                for g, a in zip(g_outs, self._global_final_avals(args_v))]
      (grads,) = self._table_pass(backward_table, stacks_v, args_v, g_outs, stash)
      zeros = [np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.inexact)
               else jnp.zeros_like(a) for a in args_v]
      return grads, zeros

    pipe.defvjp(fwd, bwd, symbolic_zeros=True)
    return pipe(stacks, list(args))

  def _global_final_avals(self, args):
    batch = args[0].shape[0]
    return [jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype) for a in self.layout.final_avals]
