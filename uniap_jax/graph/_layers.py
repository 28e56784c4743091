"""Equations grouped into layers: phases, ownership, signatures, edges."""

from __future__ import annotations

import collections
from collections.abc import Sequence
import hashlib

from uniap_jax.graph._types import Edge
from uniap_jax.graph._types import InputInfo
from uniap_jax.graph._types import Layer
from uniap_jax.graph._types import LayerGraph
from uniap_jax.graph._types import Op
from uniap_jax.graph._types import ParamInfo
from uniap_jax.graph._types import _PHASES
from uniap_jax.graph._args import _Leaf
from uniap_jax.graph._modules import _MARK
from uniap_jax.graph._modules import _Modules
from uniap_jax.graph._program import _Eqn
from uniap_jax.graph._program import _Program
from uniap_jax.graph._program import _REMAT_SCOPE

_PHASE_RANK = {"forward": 0, "backward": 1, "optimizer": 2}


def _phases(eqns: Sequence[_Eqn], producer: Sequence[int],
            consumers: Sequence[Sequence[int]]) -> list[str]:
  """forward / backward / optimizer per equation (see the module docstring, step 3)."""
  bwd = [any(t and n == "transpose" for t, n in e.stack) for e in eqns]
  if not any(bwd):
    return ["forward"] * len(eqns)
  jvp = [not b and any(t and n == "jvp" for t, n in e.stack) for e, b in zip(eqns, bwd)]
  differentiated = [b or j for b, j in zip(bwd, jvp)]
  feeds = [False] * len(eqns)  # an untransformed equation the differentiated function reads
  for k in range(len(eqns) - 1, -1, -1):
    if not differentiated[k]:
      feeds[k] = any(differentiated[c] or feeds[c] for o in eqns[k].out_ids for c in consumers[o])
  after_bwd, after_fwd = [False] * len(eqns), [False] * len(eqns)
  for k, e in enumerate(eqns):
    prods = [producer[i] for i in e.in_ids if i >= 0 and producer[i] >= 0]
    after_bwd[k] = bwd[k] or any(after_bwd[p] for p in prods)
    after_fwd[k] = jvp[k] or any(after_fwd[p] for p in prods)
  phases = []
  for k in range(len(eqns)):
    if bwd[k]:
      phases.append("backward")
    elif jvp[k] or feeds[k] or (after_fwd[k] and not after_bwd[k]):
      phases.append("forward")
    else:
      phases.append("optimizer")
  return phases


def _split_call(name: str) -> str:
  """"embed@1" -> "embed": the module path of a call."""
  head, sep, tail = name.rpartition("@")
  return head if sep and tail.isdigit() else name


def _layer_keys(eqns: Sequence[_Eqn], modules: _Modules, fn_name: str,
                notes: list[str]) -> tuple[list[str | None], list[str]]:
  """Per equation: its layer name or None (outside layers), and its innermost module."""
  markers = [[n[len(_MARK):] for t, n in e.stack if not t and n.startswith(_MARK)] for e in eqns]
  if any(markers):
    frontier = modules.frontier()
    while True:
      keys = [next((m for m in ms if _split_call(m) in frontier), None) for ms in markers]
      used = {_split_call(k) for k in keys if k is not None}
      kids = modules.expand_name(next(iter(used))) if len(used) == 1 else set()
      if not kids:
        break
      frontier = (frontier - used) | kids
    return keys, [ms[-1] if ms else "" for ms in markers]
  scopes = [tuple(n for t, n in e.stack if not t and n != _REMAT_SCOPE) for e in eqns]
  distinct = set(scopes)
  frontier = {s[:1] for s in distinct if s}
  expanded = set()
  while True:  # expand the one scope that has sub-scopes (Linen's root module, say)
    parents = [f for f in frontier if any(len(s) > len(f) and s[:len(f)] == f for s in distinct)]
    if len(parents) != 1:
      break
    f = parents[0]
    expanded.add(f)
    frontier = (frontier - {f}) | {s[:len(f) + 1] for s in distinct
                                   if len(s) > len(f) and s[:len(f)] == f}
  tops = {s[:1] for s in distinct if s}
  strip = len(tops) == 1 and tops <= expanded  # a single root scope: leave it out of names
  name_of = {f: "/".join(f[1:] if strip and len(f) > 1 else f) for f in frontier}
  key_of = {s: next((name_of[s[:n]] for n in range(1, len(s) + 1) if s[:n] in frontier), None)
            for s in distinct}
  keys = [key_of[s] for s in scopes]
  if not any(k is not None for k in keys):
    notes.append(
        f"trace: {fn_name} calls no Flax submodule and opens no jax.named_scope, so the whole "
        "step is one layer and cannot be pipelined. Use Flax modules, or wrap the parts in "
        "`with jax.named_scope('name'):` to get layers.")
    keys = [fn_name] * len(eqns)
  return keys, ["/".join(s) for s in scopes]


def _own(eqns: Sequence[_Eqn], phases: Sequence[str], owner: list[int],
         producer: Sequence[int], consumers: Sequence[Sequence[int]],
         param_ids: Sequence[int], updates: dict[int, int]) -> None:
  """Gives every equation outside a layer the nearest layer by dataflow, in place."""
  param_owner: dict[int, int] = {}
  update_of = {u: j for j, u in updates.items() if j in set(param_ids)}

  def recompute_params():
    for j in param_ids:
      fw = [owner[c] for c in consumers[j] if phases[c] == "forward" and owner[c] >= 0]
      param_owner[j] = min(fw) if fw else -1

  def val_owner(i):
    if i < 0:
      return -1
    p = producer[i]
    return owner[p] if p >= 0 else param_owner.get(i, -1)

  def prods(k, forward_only=False):
    return {val_owner(i) for i in eqns[k].in_ids
            if not forward_only or (i >= 0 and producer[i] >= 0
                                    and phases[producer[i]] == "forward")} - {-1}

  def users(k):
    out = {owner[c] for o in eqns[k].out_ids for c in consumers[o]}
    out |= {param_owner.get(update_of[o], -1) for o in eqns[k].out_ids if o in update_of}
    return out - {-1}

  def unique(applies, backwards, candidates):
    def sweep(todo):
      progress = False
      for k in (reversed(todo) if backwards else todo):
        if owner[k] < 0 and phases[k] in applies:
          c = candidates(k)
          if len(c) == 1:
            owner[k], progress = c.pop(), True
      return progress
    return sweep

  def joins(todo):  # a join of several layers' values: the latest layer it reads from
    progress = False
    for k in todo:
      c = prods(k)
      if c and owner[k] < 0:
        owner[k], progress = max(c), True
    return progress

  def shared(todo):  # read by several layers: the earliest, or the layer that ran just before
    last_forward, prev = -1, [-1] * len(eqns)
    for k in range(len(eqns)):
      prev[k] = last_forward
      if phases[k] == "forward" and owner[k] >= 0:
        last_forward = owner[k]
    progress = False
    for k in reversed(todo):
      c = users(k)
      if c and owner[k] < 0:
        if phases[k] == "forward" and prev[k] >= 0:
          c.add(prev[k])
        owner[k], progress = min(c), True
    return progress

  def unconnected(todo):  # dead code: the layer of the nearest equation before it
    last = next((o for o in owner if o >= 0), 0)
    for k in range(len(eqns)):
      if owner[k] < 0:
        owner[k] = last
      last = owner[k]
    return bool(todo)

  # Stages, most certain first; after any progress, start again from the first.
  stages = (
      (unique({"optimizer"}, True, users),  # optimizer ops follow the update they feed
       unique({"backward"}, False, lambda k: prods(k, forward_only=True)),  # residuals
       unique({"forward", "optimizer"}, False, prods),
       unique(set(_PHASES), True, users)),
      (unique({"backward"}, False, prods),),  # cotangents
      (joins,), (shared,), (unconnected,))
  todo = [k for k in range(len(eqns)) if owner[k] < 0]
  while todo:
    for sweeps in stages:
      recompute_params()
      progress = False
      for sweep in sweeps:
        progress |= sweep(todo)
      todo = [k for k in todo if owner[k] < 0]
      if progress:
        break


def _signature(eqns: Sequence[_Eqn], ks: Sequence[int], phases: Sequence[str]) -> str:
  canon: dict[int, int] = {}

  def c(i):
    if i < 0:
      return -1
    if i not in canon:
      canon[i] = len(canon)
    return canon[i]

  items = []
  for k in ks:
    e = eqns[k]
    items.append((e.prim, phases[k], tuple(c(i) for i in e.in_ids),
                  tuple((t.shape, t.dtype) for t in e.in_types), e.lits,
                  tuple(c(o) for o in e.out_ids), tuple((t.shape, t.dtype) for t in e.out_types),
                  e.params))
  return hashlib.blake2b(repr(items).encode(), digest_size=16).hexdigest()


def _assemble(program: _Program, leaves: Sequence[_Leaf], batch_argnums: tuple[int, ...],
              batch_size: int, modules: _Modules, num_out: int, written: dict[int, int],
              fn_name: str, notes: list[str]) -> LayerGraph:
  eqns, types = program.eqns, program.types
  num_values = len(types)
  producer = [-1] * num_values
  consumers: list[list[int]] = [[] for _ in range(num_values)]
  for k, e in enumerate(eqns):
    for i in dict.fromkeys(e.in_ids):
      if i >= 0:
        consumers[i].append(k)
    for o in e.out_ids:
      producer[o] = k
  phases = _phases(eqns, producer, consumers)

  step_outputs = tuple(program.out_ids[:num_out])
  updates = {j: program.out_ids[k] for j, k in written.items()
             if program.out_ids[k] >= 0 and program.out_ids[k] != j}
  roles = []
  for j, leaf in enumerate(leaves):
    if leaf.role is not None:
      roles.append(leaf.role)
    else:
      seen = {phases[c] for c in consumers[j]}
      roles.append("param" if "forward" in seen else
                   "optimizer_state" if "optimizer" in seen else "other")

  keys, module_of = _layer_keys(eqns, modules, fn_name, notes)
  first: dict[str, tuple[int, int]] = {}
  for k, key in enumerate(keys):
    if key is not None:
      rank = (0 if phases[k] == "forward" else 1, k)
      first[key] = min(first.get(key, rank), rank)
  names = sorted(first, key=first.__getitem__)
  index = {n: i for i, n in enumerate(names)}
  owner = [index[key] if key is not None else -1 for key in keys]
  param_ids = [j for j, r in enumerate(roles) if r == "param"]
  if names:
    _own(eqns, phases, owner, producer, consumers, param_ids, updates)

  def first_user(j, forward_only):
    us = [owner[c] for c in consumers[j] if not forward_only or phases[c] == "forward"]
    return min(us) if us else -1

  held: dict[int, list[int]] = collections.defaultdict(list)
  held_state: dict[int, list[int]] = collections.defaultdict(list)
  for j, role in enumerate(roles):
    if role == "param":
      o = first_user(j, True)
      held[o if o >= 0 else first_user(j, False)].append(j)
    elif role == "optimizer_state":
      held_state[first_user(j, False)].append(j)

  def param_info(j):
    return ParamInfo(path=leaves[j].path, arg_index=leaves[j].arg_index, value_id=j,
                     info=types[j], updated_id=updates.get(j, -1))

  per_layer: list[list[int]] = [[] for _ in names]
  for k in range(len(eqns)):
    per_layer[owner[k]].append(k)
  outputs = set(program.out_ids)
  edges: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
  layers = []
  for li, name in enumerate(names):
    ks = sorted(per_layer[li], key=lambda k: (_PHASE_RANK[phases[k]], k))
    ins, outs, act = set(), set(), set()
    flops = dict.fromkeys(_PHASES, 0.0)
    nbytes = dict.fromkeys(_PHASES, 0.0)
    ops = []
    for k in ks:
      e, ph = eqns[k], phases[k]
      flops[ph] += e.flops
      nbytes[ph] += e.nbytes
      for i in e.in_ids:
        if i < 0:
          continue
        p = producer[i]
        if p < 0:
          if i < len(roles) and roles[i] in ("batch", "other"):
            ins.add(i)
            if ph == "backward" and roles[i] == "batch":
              act.add(i)
        elif phases[p] == "forward":
          if owner[p] != li:
            ins.add(i)
            edges[(owner[p], li)].add(i)
          if ph == "backward":
            act.add(i)
      if ph == "forward":
        outs.update(o for o in e.out_ids
                    if o in outputs or any(owner[c] != li for c in consumers[o]))
      ops.append(Op(primitive=e.prim, kind=e.kind, phase=ph, in_ids=e.in_ids, out_ids=e.out_ids,
                    in_types=e.in_types, out_types=e.out_types, params=e.params, flops=e.flops,
                    bytes_accessed=e.nbytes, source=e.source, transcendentals=e.trans,
                    module=module_of[k], index=k))
    params = tuple(param_info(j) for j in sorted(held.get(li, ())))
    state = tuple(param_info(j) for j in sorted(held_state.get(li, ())))
    layers.append(Layer(
        name=name, index=li, signature=_signature(eqns, ks, phases), ops=tuple(ops),
        params=params, input_ids=tuple(sorted(ins)), output_ids=tuple(sorted(outs)),
        flops=flops["forward"], backward_flops=flops["backward"],
        optimizer_flops=flops["optimizer"], bytes_accessed=nbytes["forward"],
        param_bytes=sum(p.info.nbytes for p in params),
        activation_bytes=sum(types[i].nbytes for i in act),
        module_type=modules.types.get(_split_call(name), ""),
        backward_bytes_accessed=nbytes["backward"], optimizer_bytes_accessed=nbytes["optimizer"],
        activation_ids=tuple(sorted(act)), optimizer_state=state,
        optimizer_state_bytes=sum(p.info.nbytes for p in state)))

  for src, dst in edges:
    if src > dst:
      notes.append(f"trace: forward data flows from layer {names[src]!r} back to the earlier "
                   f"layer {names[dst]!r}; pipeline stages assume edges go forward.")
  inputs = tuple(
      InputInfo(path=l.path, arg_index=l.arg_index, value_id=j, info=types[j], role=roles[j],
                updated_id=updates.get(j, -1)) for j, l in enumerate(leaves))
  return LayerGraph(
      layers=tuple(layers),
      edges=tuple(Edge(src=names[s], dst=names[d], value_ids=tuple(sorted(ids)),
                       tensors=tuple(types[i] for i in sorted(ids)))
                  for (s, d), ids in sorted(edges.items())),
      inputs=inputs, batch_argnums=batch_argnums, batch_size=batch_size, tensors=tuple(types),
      output_ids=step_outputs)
