"""Stage bodies: what one device computes for one micro-batch in one tick.

Two ways to make stages that hold different layers run as one SPMD program:

- "uniform" (default): every device runs the same sequence of layer calls, a shortest
  common supersequence of the stages' call kinds (aligned pairwise), and each position
  picks its parameters (a slot of that kind's stack) and inputs by the stage index; a
  position the stage does not run is computed and masked. No control flow depends on
  the stage, so the collectives XLA inserts for tensor-parallel axes run on every device
  alike. Cost: a tick computes every position, so every stage pays for the layers of
  all kinds it might run (an embedding or a head on every stage, say).
- "switch": `lax.switch` on the stage index, one branch per stage running exactly its
  layers. A tick costs the slowest stage only, but XLA's collectives inside a branch run
  on that stage's devices only: on CPU a collective-permute there waits for all devices
  and hangs (reference/pipelines.md, section 6). Use it when the stages need no
  intra-stage resharding, e.g. pure data parallelism inside stages.

Calls of a kind that recomputes its activations run under `jax.checkpoint` in both
dispatches (`_program.invoke`).

Both dispatches lay values out as the plan pins them (`Hooks`, from the plan's
`activation_specs`, manual axes left out): each call's output, each argument a call
takes from another layer in the layout its layer's candidate takes it (the boundary's
resharding then happens at the consumer, as the cost model charges it), and the
outputs and arguments of submodule calls inside a layer. A uniform position applies
a pin only where the calls it runs on every stage pin alike.

A masked position feeds its layer inputs through `where(active, x, stop_gradient(x))`,
so NaN or inf computed on bubble data never reaches a gradient (0 x inf stays out of the
chain rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from uniap_jax import supersequence
from uniap_jax.apply import _program

DISPATCHES = ("uniform", "switch")


def vary(tree, axes: Sequence[str]):
  """pcasts every leaf to varying over `axes` (those it does not vary over already)."""
  def one(x):
    have = jax.typeof(x).manual_axis_type.varying
    missing = tuple(a for a in axes if a not in have)
    return lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(one, tree) if axes else tree


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Hooks:
  """How stage bodies lay out values (see the module docstring). Names are layer names
  (`_program.Program.layer_names`).

  Attributes:
    output: (names, out) -> out laid out as the layer(s) `names` pin their output, when
      they agree.
    input_spec: [(consumer, producer), ...] -> the layout in which every consumer takes
      its producer's value, when they agree; else None.
    constrain: (x, spec) -> x laid out by `spec` (where it fits).
    before_call: (name, args, kwargs, producer) -> (args, kwargs), for one call of
      layer `name` (switch dispatch; `_program.run_stage`'s `before_call`).
    runner: names -> an `invoke` runner that runs a call of layers `names` (one per
      stage running it; the first names the module) with its submodule calls pinned,
      or None when nothing inside them is pinned.
  """

  output: Callable[[Sequence[str], Any], Any]
  input_spec: Callable[[Sequence[tuple[str, str]]], Any]
  constrain: Callable[[Any, Any], Any]
  before_call: Callable[..., Any]
  runner: Callable[[Sequence[str]], Any]


def _module(layout, kind_index: int, leaves: Sequence[Any]):
  kind = layout.kinds[kind_index]
  state = jax.tree.unflatten(kind.state_treedef, list(leaves[:kind.num_state_leaves]))
  return nnx.merge(kind.graphdef, state), list(leaves[kind.num_state_leaves:])


# --- switch: one branch per stage --------------------------------------------------------


def switch_stage_fns(layout, model, forward: Callable[..., Any], rebuild, hooks: Hooks,
                     ) -> tuple[Callable[..., Any], ...]:
  """Per stage, fn(rows, recv, mb_args) -> (send, final) running exactly its calls."""
  return tuple(_switch_stage_fn(layout, model, forward, rebuild, hooks, s)
               for s in range(layout.num_stages))


def _switch_stage_fn(layout, model, forward, rebuild, hooks, stage):
  program = layout.program
  names = program.layer_names()
  last = layout.num_stages - 1

  def fn(rows, recv, mb_arrays):
    env = {}
    if stage > 0:
      for ref, j in layout.boundaries[stage - 1]:
        # In the layout it was sent in, so that its cotangent goes back so too.
        env[ref] = hooks.output([names[ref.call]], recv[j])

    def module_for(c):
      k, slot = layout.kind_of_call[c], layout.slot_of_call[c]
      return _module(layout, k, [leaf[slot] for leaf in rows[k]])

    a, kw = rebuild(mb_arrays)
    ret = _program.run_stage(program, model, forward, a, kw,
                             runs=lambda c: layout.stage_of_call[c] == stage,
                             module_for=module_for, env=env,
                             after_call=lambda call, out: hooks.output([names[call.index]], out),
                             remat=lambda c: layout.kinds[layout.kind_of_call[c]].remat,
                             before_call=lambda call, a, kw, producer: hooks.before_call(
                                 names[call.index], a, kw, producer),
                             runner=lambda call: hooks.runner([names[call.index]]))
    final = list(ret) if stage == last else [jnp.zeros(v.shape, v.dtype)
                                             for v in layout.final_avals]
    send = [jnp.zeros(v.shape, v.dtype) for v in layout.slot_avals]
    if stage < last:
      for ref, j in layout.boundaries[stage]:
        send[j] = env[ref]
    return send, final
  return fn


# --- uniform: one sequence of positions for all stages ------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Position:
  kind: int
  calls: tuple[int | None, ...]  # per stage: the call run here, or None
  slots: np.ndarray  # per stage: the slot of the kind's stack (0 when idle)
  active: np.ndarray  # per stage: bool


class UniformStage:
  """fn(rows, recv, mb_args, stage, active) -> (send, final), the same program everywhere."""

  def __init__(self, layout, model, forward, rebuild, hooks: Hooks, manual: Sequence[str]):
    self.layout, self.model, self.forward = layout, model, forward
    self.rebuild, self.hooks, self.manual = rebuild, hooks, tuple(manual)
    program, num_stages = layout.program, layout.num_stages
    self.names = program.layer_names()
    # Per buffer slot, the layers whose outputs travel in it over all stage boundaries.
    self.slot_names = [sorted({self.names[r.call] for b in layout.boundaries
                               for r, jj in b if jj == j})
                       for j in range(len(layout.slot_avals))]
    per_stage = [[c.index for c in program.calls if layout.stage_of_call[c.index] == s]
                 for s in range(num_stages)]
    placed = supersequence.align([[layout.kind_of_call[c] for c in calls]
                                  for calls in per_stage])
    self.positions = []
    self.position_of_call: dict[int, int] = {}
    for p, where in enumerate(placed):
      calls = tuple(per_stage[s][where[s]] if s in where else None for s in range(num_stages))
      kind = layout.kind_of_call[next(c for c in calls if c is not None)]
      slots = np.array([layout.slot_of_call[c] if c is not None else 0 for c in calls], np.int32)
      active = np.array([c is not None for c in calls])
      self.positions.append(_Position(kind=kind, calls=calls, slots=slots, active=active))
      for c in calls:
        if c is not None:
          self.position_of_call[c] = p

  @property
  def num_positions(self) -> int:
    return len(self.positions)

  def _source(self, ref: _program.ValueRef, stage: int):
    """Where `ref` is on `stage`: ("pos", position, leaf) or ("recv", slot)."""
    if self.layout.stage_of_call[ref.call] == stage:
      return ("pos", self.position_of_call[ref.call], ref.leaf)
    for r, j in self.layout.boundaries[stage - 1]:
      if r == ref:
        return ("recv", j)
    raise AssertionError(f"{ref} is not available on stage {stage}")

  def __call__(self, rows, recv, mb_arrays, stage, active):
    layout, num_stages = self.layout, self.layout.num_stages
    program = layout.program
    a, kw = self.rebuild(mb_arrays)
    extras, ret_leaves = _program.collect_extras(program, self.model, self.forward, a, kw)
    outs: dict[int, list[Any]] = {}
    # Received buffers keep the layout they were sent in (their producers' outputs), so
    # that the consumer's resharding happens after the receive and the cotangent goes
    # back in that layout too, as the cost model sends both.
    recv = [self.hooks.output(names, x) if names else x
            for names, x in zip(self.slot_names, recv)]

    def value(src):
      if src[0] == "pos":
        return outs[src[1]][src[2]]
      return recv[src[1]]

    def pick(cands, aval):
      cands = [jnp.zeros(aval.shape, aval.dtype) if c is None else c for c in cands]
      if num_stages == 1:
        return cands[0]
      return lax.select_n(stage, *vary(cands, self.manual))

    for p, pos in enumerate(self.positions):
      on = jnp.logical_and(active, jnp.asarray(pos.active)[stage])
      gate = lambda x: jnp.where(on, x, lax.stop_gradient(x))
      rows_k = rows[pos.kind]
      slot = jnp.asarray(pos.slots)[stage] if num_stages > 1 else int(pos.slots[0])
      leaves = [gate(x[slot]) for x in rows_k]
      module, refs = _module(layout, pos.kind, leaves)
      template = program.calls[next(c for c in pos.calls if c is not None)]
      refs_iter, extra_index, arg_leaves = iter(refs), 0, []
      for i, entry in enumerate(template.arg_leaves):
        if entry[0] == "static":
          arg_leaves.append(entry[1])
        elif entry[0] == "param":
          arg_leaves.append(next(refs_iter))
        elif entry[0] == "extra":
          cands = [None if c is None else extras[c][extra_index] for c in pos.calls]
          arg_leaves.append(gate(pick(cands, entry[1])))
          extra_index += 1
        else:
          refs_here = [None if c is None else program.calls[c].arg_leaves[i][1]
                       for c in pos.calls]
          cands = [None if r is None else value(self._source(r, s))
                   for s, r in enumerate(refs_here)]
          # The layout the consumers' candidates take the value in (the boundary's
          # resharding, at the consumer, as the cost model charges it).
          spec = self.hooks.input_spec([(self.names[c], self.names[r.call])
                                        for c, r in zip(pos.calls, refs_here) if c is not None])
          x = gate(pick(cands, entry[2]))
          arg_leaves.append(x if spec is None else self.hooks.constrain(x, spec))
      args, kwargs = jax.tree.unflatten(template.arg_treedef, arg_leaves)
      kind = layout.kinds[pos.kind]
      names = [self.names[c] for c in pos.calls if c is not None]
      out = _program.invoke(module, kind.method, args, kwargs, remat=kind.remat,
                            runner=self.hooks.runner(names))
      names = sorted(set(names))
      out = self.hooks.output(names, out)
      # Again after the mask: the masked value is what later positions and the send
      # buffers read, and XLA would otherwise lay it out for one of its readers.
      outs[p] = self.hooks.output(names, [jnp.where(on, o, jnp.zeros_like(o))
                                          for o in jax.tree.leaves(out)])

    send = []
    for j, aval in enumerate(layout.slot_avals):
      cands = []
      for s in range(num_stages):
        src = next((self._source(r, s) for r, jj in layout.boundaries[s] if jj == j), None) if (
            s < num_stages - 1) else None
        cands.append(None if src is None else value(src))
      # The buffer keeps the layout its values have where they are made, the one the
      # cost model sends (XLA would otherwise pick one, e.g. split over an automatic axis).
      names, x = self.slot_names[j], pick(cands, aval)
      send.append(self.hooks.output(names, x) if names else x)
    last = num_stages - 1
    final = []
    for leaf, real, aval in zip(program.ret_leaves, ret_leaves, layout.final_avals):
      if isinstance(leaf, _program.ValueRef):
        got = value(self._source(leaf, last))
      else:
        got = real
      final.append(pick([None] * last + [got], aval))
    return send, final
