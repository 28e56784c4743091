"""What a chosen plan's collectives add up to, counted as XLA's HLO shows them.

Kinds "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send"; bytes are
the larger of a collective's operand and result on one device, summed over one step
(`uniap_jax.hlo` counts compiled programs the same way, so the two compare directly).

Two counts:
  - executor=None: the paper's view, which the solver's objective prices: every layer's
    collectives once per micro-batch, gradient synchronisation once per step, and one
    send per micro-batch and stage boundary in each direction.
  - executor="gpipe" | "gpipe-remat" | "fused" | "1f1b": what `uniap_jax.apply` runs
    for a pipelined plan (pp > 1 or more than one micro-batch), tick by tick:
      * lockstep SPMD with "uniform" stage bodies: every device runs the layer
        positions of every stage (a common supersequence of the stages' layers) in
        every tick, masked where the stage holds no such layer;
      * a forward run per forward tick; a backward run per backward tick, which
        recomputes the stage from its stashed input first, except with "gpipe"
        (autodiff through the loop keeps every tick's residuals, the activations the
        tables charge for GPipe); "fused" and "1f1b" run a forward pass and then their
        whole table, a forward and a backward run per tick, in the backward rule
        (`runtime_runs`);
      * a layer whose candidate recomputes its activations (" +remat") runs under
        `jax.checkpoint` in every executor: each backward run first runs that layer's
        forward once more, so its "recompute"-phase collectives (the forward's, as
        the candidate declares them) execute once per backward run; positions of
        recomputing and plain layers are separate kinds, with separate stacks;
      * activations and cotangents move by one collective-permute per buffer slot and
        tick and direction, whether or not the tick carries data;
      * the shard_map is manual over "pp" and the batch axes no parameter is sharded
        over (`manual_axes`): the body runs on this device's share of the batch, so
        layers issue no collectives and edges no resharding over those axes, and every
        stacked gradient is all-reduced over them once per step;
      * gradient synchronisation over automatic axes (FSDP, or an axis that splits
        the sequence) happens inside every backward run: XLA reduces each run's
        gradients before they are accumulated;
      * the state is stored split over "pp" (so that a device holds a 1/pp share of
        every leaf) and gathered into per-stage stacks each step by one all-to-all per
        parameter leaf, whose gradients go back the same way.
    Not counted here (the tables do not know it): the psum over "pp" of the model's
    returned arrays, once per step (M micro-batches of the last call's outputs), and
    that the loss, which the graph puts into the last layer, is reduced once per step
    outside the pipeline rather than once per run. Counted but not always compiled:
    a recomputation runs only the part of the layer's forward its backward reads, so
    a forward collective whose result feeds nothing but the layer's output (the
    all-reduce closing a row-parallel matmul) is not issued again, although the
    candidate declares it among its "recompute" collectives (and its forward FLOPs
    among the recomputed ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from uniap_jax import strategies
from uniap_jax import supersequence
from uniap_jax.cost import _formulas
from uniap_jax.cost import _tables

Summary = dict[tuple[str, tuple[str, ...]], dict[str, float]]
EXECUTORS = ("gpipe", "gpipe-remat", "fused", "1f1b")
PIPELINE_AXIS = "pp"


def _add(out: Summary, kind: str, axes: tuple[str, ...], nbytes: float, count: float) -> None:
  if count <= 0:
    return
  entry = out.setdefault((kind, axes), {"count": 0, "bytes": 0.0})
  entry["count"] += count
  entry["bytes"] += nbytes * count


def _reshard_into(out: Summary, src: strategies.Layout, dst: strategies.Layout, nbytes: float,
                  mesh: strategies.MeshShape, count: float) -> None:
  comms, _ = strategies.reshard(src, dst, nbytes, mesh.sizes)
  for kind, axes, b in comms:
    _add(out, kind, tuple(mesh.names[a] for a in axes), b, count)


def runtime_runs(executor: str, num_stages: int, num_microbatches: int) -> tuple[int, int, int]:
  """(forward runs, backward runs, permutes per buffer slot) one device executes per step.

  A forward run is one execution of the stage body (a tick's forward, or the
  recomputation inside a backward run); every tick runs it on every device, busy or
  idle (lockstep). Permutes count both directions. Mirrors `uniap_jax.apply`'s
  executors and `apply._schedules` tables:

  | executor | forward runs | backward runs | permutes |
  |---|---|---|---|
  | gpipe | M + S - 1 | M + S - 1 | 2 (M + S - 1) |
  | gpipe-remat | 2 (M + S - 1) | M + S - 1 | 2 (M + S - 1) |
  | fused (T = M + 2S - 2) | M + S - 1 + 2T | T | M + S - 1 + 2T |
  | 1f1b (T = 2 (M + S - 1)) | M + S - 1 + 2T | T | M + S - 1 + 2T |

  With one stage and one micro-batch nothing is pipelined: (1, 1, 0). Layers that
  recompute their activations run their own forward once more inside every backward
  run, on top of these forward runs (`runtime_step_time_s`, `collectives_by_stage`).
  """
  if executor not in EXECUTORS:
    raise ValueError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}.")
  s, m = num_stages, num_microbatches
  if s == 1 and m == 1:
    return 1, 1, 0
  fill = m + s - 1
  if executor == "gpipe":  # autodiff keeps every tick's residuals: no recomputation
    forward, backward, permutes = fill, fill, 2 * fill
  elif executor == "gpipe-remat":
    forward, backward, permutes = 2 * fill, fill, 2 * fill
  else:
    ticks = m + 2 * s - 2 if executor == "fused" else 2 * fill
    forward, backward, permutes = fill + 2 * ticks, ticks, fill + 2 * ticks
  return forward, backward, permutes if s > 1 else 0


def _batch_axes(tables: _tables.CostTables, choice: Mapping[str, int]) -> tuple[str, ...]:
  """Axes that split the batch dim of the first step input a layer reads (as apply sees it)."""
  produced = {v for l in tables.layers for v in l.output_ids}
  for layer in tables.layers:
    cand = layer.candidates[choice[layer.name]]
    for v, spec in zip(layer.input_ids, cand.input_specs):
      if v in produced:
        continue
      if spec and spec[0]:
        first = spec[0]
        return tuple(first) if isinstance(first, tuple) else (first,)
  return ()


def manual_axes(tables: _tables.CostTables, choice: Mapping[str, int]) -> tuple[str, ...]:
  """Mesh axes the pipeline's shard_map makes manual: "pp" (with more than one stage) and
  the batch axes that no parameter is sharded over (apply's `dp_manual`)."""
  param_axes = set()
  for layer in tables.layers:
    for spec in layer.candidates[choice[layer.name]].param_specs:
      for entry in spec:
        if entry:
          param_axes.update(entry if isinstance(entry, tuple) else (entry,))
  lead = (PIPELINE_AXIS,) if tables.num_stages > 1 else ()
  return lead + tuple(a for a in _batch_axes(tables, choice) if a not in param_axes)


def _edge_values(tables, choice, stage_of):
  """Per value an edge carries: (value id, source stage, destination stage, output index
  at the source, input index at the destination, full bytes, source and destination
  layouts under `choice`)."""
  layers = {l.name: l for l in tables.layers}
  for edge in tables.edges:
    src, dst = layers[edge.src], layers[edge.dst]
    cs, cd = src.candidates[choice[src.name]], dst.candidates[choice[dst.name]]
    for v in edge.value_ids:
      if v not in src.output_ids or v not in dst.input_ids:
        continue
      i, j = src.output_ids.index(v), dst.input_ids.index(v)
      yield (v, stage_of[src.name], stage_of[dst.name], src.name, dst.name, i, j,
             src.output_nbytes[i], cs.output_layouts[i], cd.input_layouts[j])


def _paper_by_stage(tables, choice, stage_of) -> tuple[Summary, ...]:
  c = tables.num_microbatches
  out: list[Summary] = [{} for _ in range(tables.num_stages)]
  for layer in tables.layers:
    cand = layer.candidates[choice[layer.name]]
    stage = out[stage_of[layer.name]]
    for comm in cand.comms:
      _add(stage, comm.kind, comm.axes, comm.bytes, comm.count * (1 if comm.per_step else c))
  sizes = tables.mesh.sizes
  for _, s_src, s_dst, _, _, _, _, nbytes, ls, ld in _edge_values(tables, choice, stage_of):
    if s_src == s_dst:
      _reshard_into(out[s_src], ls, ld, nbytes, tables.mesh, c)  # the activation
      _reshard_into(out[s_src], ld, ls, nbytes, tables.mesh, c)  # its cotangent
      continue
    hops = s_dst - s_src
    _add(out[s_src], "send", (PIPELINE_AXIS,), nbytes / strategies.shard_count(ls, sizes),
         c * hops)
    _add(out[s_dst], "send", (PIPELINE_AXIS,), nbytes / strategies.shard_count(ld, sizes),
         c * hops)
    _reshard_into(out[s_dst], ls, ld, nbytes, tables.mesh, c)
    _reshard_into(out[s_src], ld, ls, nbytes, tables.mesh, c)
  return tuple(out)


def _runtime(tables, choice, stage_of, executor: str) -> Summary:
  """What one device of the pipelined runtime issues in one step (the same on every device)."""
  num_stages, m = tables.num_stages, tables.num_microbatches
  forward_runs, backward_runs, permutes = runtime_runs(executor, num_stages, m)
  manual = set(manual_axes(tables, choice))
  sizes = tables.mesh.sizes
  out: Summary = {}
  program = _program(tables, choice, stage_of)
  data = tuple(a for a in tables.mesh.names if a in manual)  # manual data-parallel axes
  for layer in program.positions:
    for comm in layer.candidates[choice[layer.name]].comms:
      if set(comm.axes) & manual:
        continue  # the body runs on this device's batch share: see the psum below
      runs = _comm_runs(comm, manual, forward_runs, backward_runs)
      _add(out, comm.kind, comm.axes, comm.bytes, comm.count * runs)
  for ls, ld, nbytes in program.reshards:
    for a, b, runs in ((ls, ld, forward_runs), (ld, ls, backward_runs)):
      comms, _ = strategies.reshard(a, b, nbytes, tables.mesh.sizes)
      for kind, axes, x in comms:
        names = tuple(tables.mesh.names[i] for i in axes)
        if not set(names) & manual:
          _add(out, kind, names, x, runs)
  for local in program.slot_bytes:
    _add(out, "send", (PIPELINE_AXIS,), local, permutes)
  for layer, n in program.stacks:
    leaves = len(layer.param_paths)
    if not leaves:
      continue
    cand = layer.candidates[choice[layer.name]]
    if data:  # every stacked gradient, summed over the manual data axes once per step
      _add(out, "all-reduce", data, n * cand.param_bytes / leaves, leaves)
    if num_stages > 1:  # the state's leaves into per-stage stacks and their gradients back
      _add(out, "all-to-all", (PIPELINE_AXIS,), n * cand.param_bytes / leaves, 2 * leaves)
  return out


def _comm_runs(comm: strategies.Comm, manual: set[str], forward_runs: int,
               backward_runs: int) -> int:
  """Executions per step of one of a layer position's collectives in the runtime."""
  if comm.per_step:
    return 1 if (set(comm.axes) <= manual or comm.phase == "optimizer") else backward_runs
  if comm.phase == "forward":
    return forward_runs
  if comm.phase in ("backward", "recompute"):
    return backward_runs  # "recompute": the checkpointed layer's forward, again
  return 0


class _Program:
  """The lockstep program of the uniform runtime, from the tables' point of view.

  Attributes:
    positions: one layer standing for each position of the common layer sequence.
    stacks: (a layer of each kind, its slots per stage) for the parameter stacks.
    reshards: (source layout, destination layout, bytes) of each edge inside the body.
    slot_bytes: local bytes of each activation buffer slot sent between stages.
  """

  def __init__(self, positions, stacks, reshards, slot_bytes):
    self.positions, self.stacks = positions, stacks
    self.reshards, self.slot_bytes = reshards, slot_bytes


def _program(tables: _tables.CostTables, choice: Mapping[str, int],
             stage_of: Mapping[str, int]) -> _Program:
  num_stages, sizes = tables.num_stages, tables.mesh.sizes
  # One stack (and one kind of layer position) per computation, parameter layout and
  # recomputation flag, as the runtime groups calls: candidates that differ only in
  # activation layouts share it.
  def key(l):
    cand = l.candidates[choice[l.name]]
    return (l.signature, tuple(cand.param_specs), cand.recompute)
  per_stage = [[l for l in tables.layers if stage_of[l.name] == s] for s in range(num_stages)]
  aligned = supersequence.align([[key(l) for l in layers] for layers in per_stage])
  positions = [per_stage[s][i] for s, i in (next(iter(w.items())) for w in aligned)]
  capacity: dict[tuple, int] = {}
  for layers in per_stage:
    counts: dict[tuple, int] = {}
    for l in layers:
      counts[key(l)] = counts.get(key(l), 0) + 1
    for k, n in counts.items():
      capacity[k] = max(capacity.get(k, 0), n)
  stacks = [(next(l for l in tables.layers if key(l) == k), n) for k, n in capacity.items()]
  # Edges: resharding inside the stage body, once per pair of positions (stages that
  # share both positions run one program); buffer slots across stage boundaries.
  position_of = {per_stage[s][i].name: p for p, where in enumerate(aligned)
                 for s, i in where.items()}
  live: list[list[tuple[float, float]]] = [[] for _ in range(num_stages - 1)]
  seen: set[int] = set()
  pairs: dict[tuple, tuple] = {}
  for v, s_src, s_dst, src, dst, i, j, nbytes, ls, ld in _edge_values(tables, choice,
                                                                      stage_of):
    pairs.setdefault((position_of[src], position_of[dst], i, j, ls, ld), (ls, ld, nbytes))
    if s_dst > s_src and v not in seen:
      seen.add(v)
      local = nbytes / strategies.shard_count(ls, sizes)
      for b in range(s_src, s_dst):
        live[b].append((nbytes, local))
  slots: list[tuple[float, float]] = []  # (full bytes, local bytes), shared by equal sizes
  for values in live:
    taken: set[int] = set()
    for nbytes, local in values:
      j = next((j for j, got in enumerate(slots) if j not in taken and got[0] == nbytes), None)
      if j is None:
        j = len(slots)
        slots.append((nbytes, local))
      taken.add(j)
  return _Program(positions, stacks, list(pairs.values()), [local for _, local in slots])


def runtime_step_time_s(tables: _tables.CostTables, choice: Mapping[str, int],
                        stage_of: Mapping[str, int] | None = None, *,
                        executor: str) -> float:
  """Seconds per step of the lockstep runtime that runs `executor`, priced like the tables.

  Every tick of the uniform runtime runs every layer position on every device, so a
  forward run costs the sum over positions of their forward compute and collectives
  (F), a backward run the sum of their backward compute and the collectives XLA issues
  per run (B; the recomputation of the stage before it is among the forward runs of
  `runtime_runs`), plus, for every position whose candidate recomputes its
  activations, that layer's forward compute and "recompute" collectives once more
  (the `jax.checkpoint` apply wraps it in), and each tick moves its buffers (one send
  per slot and direction); the collectives are those
  `collectives_by_stage(..., executor=)` counts.
  Once per step: gradient synchronisation over manual axes, the optimizer
  (each device updates its 1/pp share of every leaf) and the all-to-alls between the
  stored state and the stacks. With one stage and one micro-batch this is the sum of
  the layers' per-micro-batch and per-step times (what the solver's objective gives).

  Compare `solver.Solution.objective` (the paper's GPipe time, sum of stage times +
  sends + (c - 1) x the slowest): the runtime's figure is larger by the recomputation,
  by the idle positions every stage runs, and, for "fused" and "1f1b", by the forward
  pass before the table and a forward and a backward run in every table tick.
  """
  stage_of = stage_of or {l.name: 0 for l in tables.layers}
  mesh, cluster = tables.mesh, tables.cluster
  num_stages, m = tables.num_stages, tables.num_microbatches
  forward_runs, backward_runs, permutes = runtime_runs(executor, num_stages, m)
  if num_stages == 1 and m == 1:
    return float(sum(tables.solver_time_s(l.name)[choice[l.name]] for l in tables.layers))
  manual = set(manual_axes(tables, choice))
  program = _program(tables, choice, stage_of)
  forward = backward = once = 0.0
  for layer in program.positions:
    cand = layer.candidates[choice[layer.name]]
    per_op = _formulas.roofline_time_s(cand.op_flops, cand.op_bytes, cand.op_dtype, cluster)
    phase = np.array(cand.op_phase)
    forward += float(per_op[phase == "forward"].sum())
    backward += float(per_op[phase == "backward"].sum())
    if cand.recompute:  # its forward again, inside every backward run
      backward += float(per_op[phase == "forward"].sum())
    for comm in cand.comms:
      if set(comm.axes) & manual or not _comm_runs(comm, manual, 1, 1):
        continue  # over manual axes: the psum of the stacked gradients below
      t = _formulas.comm_time_s(comm, mesh, cluster) * comm.count
      if comm.per_step and comm.phase == "optimizer":
        once += t
      elif comm.phase == "forward" and not comm.per_step:
        forward += t
      else:  # backward, per-step gradient synchronisation, and recomputation
        backward += t
  for ls, ld, nbytes in program.reshards:
    for a, b, phase in ((ls, ld, "forward"), (ld, ls, "backward")):
      comms, _ = strategies.reshard(a, b, nbytes, mesh.sizes)
      t = sum(_formulas.collective_time_s(kind, x, mesh.level_factors(axes), cluster.levels)
              for kind, axes, x in comms
              if not {mesh.names[i] for i in axes} & manual)
      if phase == "forward":
        forward += t
      else:
        backward += t
  data = tuple(mesh.index(a) for a in mesh.names if a in manual)
  if data:
    for layer, n in program.stacks:
      cand = layer.candidates[choice[layer.name]]
      if layer.param_paths:
        once += _formulas.collective_time_s("all-reduce", n * cand.param_bytes,
                                            mesh.level_factors(data), cluster.levels)
  send = sum(_formulas.send_time_s(local, mesh.num_devices, cluster)
             for local in program.slot_bytes) if num_stages > 1 else 0.0
  for layer in tables.layers:
    cand = layer.candidates[choice[layer.name]]
    per_op = _formulas.roofline_time_s(cand.op_flops, cand.op_bytes, cand.op_dtype, cluster)
    once += float(per_op[np.array(cand.op_phase) == "optimizer"].sum()) / num_stages
  if num_stages > 1:
    for layer, n in program.stacks:
      cand = layer.candidates[choice[layer.name]]
      once += 2 * _formulas.send_time_s(n * cand.param_bytes, mesh.num_devices, cluster)
  return (forward_runs * forward + backward_runs * backward + permutes * send + once)


def collectives_by_stage(tables: _tables.CostTables, choice: Mapping[str, int],
                         stage_of: Mapping[str, int] | None = None, *,
                         executor: str | None = None) -> tuple[Summary, ...]:
  """Per stage: (kind, mesh axes) -> {"count", "bytes"} one device of the stage issues
  in one step. Sends carry the pipeline axis "pp".

  Args:
    tables / choice / stage_of: as for `predicted_collectives`.
    executor: None for the paper's per-micro-batch count; else the runtime's executor,
      whose lockstep program is the same on every stage (see the module docstring).
  """
  stage_of = stage_of or {l.name: 0 for l in tables.layers}
  if executor is None:
    return _paper_by_stage(tables, choice, stage_of)
  if executor not in EXECUTORS:
    raise ValueError(f"executor={executor!r}; allowed: None, {', '.join(EXECUTORS)}.")
  if tables.num_stages == 1 and tables.num_microbatches == 1:
    return _paper_by_stage(tables, choice, stage_of)
  summary = _runtime(tables, choice, stage_of, executor)
  return tuple({k: dict(v) for k, v in summary.items()} for _ in range(tables.num_stages))


def predicted_collectives(tables: _tables.CostTables, choice: Mapping[str, int],
                          stage_of: Mapping[str, int] | None = None, *,
                          executor: str | None = None) -> dict[str, float]:
  """kind -> bytes one device moves in one step (the busiest stage's device per kind).

  Args:
    tables: the configuration's cost tables.
    choice: layer name -> index into its `LayerCosts.candidates`.
    stage_of: layer name -> stage; default everything on stage 0.
    executor: None: the paper's count (per micro-batch and stage boundary). The name of
      `uniap_jax.apply`'s executor ("gpipe", "gpipe-remat", "fused", "1f1b"; a plan's
      schedule "gpipe" runs as "gpipe", "1f1b" as "1f1b"): what that runtime compiles.
  Returns:
    DESIGN.md's `predicted.collectives`: kinds with nonzero bytes only.
  """
  out: dict[str, float] = {}
  for stage in collectives_by_stage(tables, choice, stage_of, executor=executor):
    per_kind: dict[str, float] = {}
    for (kind, _), entry in stage.items():
      per_kind[kind] = per_kind.get(kind, 0.0) + entry["bytes"]
    for kind, b in per_kind.items():
      out[kind] = max(out.get(kind, 0.0), b)
  return {k: v for k, v in sorted(out.items()) if v > 0}
