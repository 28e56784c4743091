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
      * lockstep SPMD with "uniform" stage bodies: every busy device runs the layer
        positions of every stage (a common supersequence of the stages' layers),
        masked where the stage holds no such layer;
      * a forward run per forward tick; a backward run per backward tick, which
        recomputes the stage from its stashed input first, except with "gpipe"
        (autodiff through the loop keeps every tick's residuals, the activations the
        tables charge for GPipe); "fused" and "1f1b" run a forward pass and then their
        whole table, a forward and a backward run per tick, in the backward rule
        (`runtime_runs`);
      * idle entries: with more than one stage, the explicit executors skip a tick's
        work on a device that has no micro-batch in it (`lax.cond`) where
        `cluster.skips_idle_work` allows it (GPU, TPU; CPU without automatic axes of size
        > 1), so each device runs M entries of each kind per loop; otherwise every
        device runs every tick's entries. Collectives inside a skipped branch run on
        active ticks only, and parameter gathers there are not hoisted out of the
        loops (not checked on compiled HLO: CPU skips only without them; `hlo`
        counts a conditional's branches as if each ran). The time is lockstep: a
        tick costs its busiest device's work (`runtime_ticks`);
      * what XLA keeps of those runs (each checked on compiled HLO): the forward runs
        of a table, inside the backward rule, feed only the activations sent on, so
        the positions that lead to no send (on any stage) are dead code there, and
        with one stage the whole table forward is; a recomputation is the forward
        half of a `jax.vjp` whose outputs are discarded, so a position whose output
        no layer reads (the last layer) runs there only what its backward reads, the
        collectives its candidate declares in `rerun_comms`
        (`runtime_run_split`, `_Program.live`, `_Program.terminal`);
      * a layer whose candidate recomputes its activations (" +remat") runs under
        `jax.checkpoint` in every executor: each backward run first runs that layer's
        forward once more, as far as its backward reads it, so its "recompute"-phase
        collectives (declared by the candidate: not the all-reduce that closes a
        row-parallel output, which no backward reads) execute once per backward run;
        positions of recomputing and plain layers are separate kinds, with separate
        stacks;
      * parameter all-gathers over automatic axes (FSDP / ZeRO-3) are loop-invariant:
        XLA hoists them out of the tick loops (when no conditional holds them), so
        each runs once per step for every loop that reads it (the forward pass, a
        table's forward, the recomputation);
        autodiff GPipe's backward loop, though, gathers again in every backward run
        the parameters whose gathered copy the backward reads (the matmul kernels,
        not the biases nor an embedding table: `Candidate.param_gathers`);
      * activations and cotangents move by one collective-permute per buffer slot and
        tick and direction, whether or not the tick carries data (outside any
        conditional);
      * the shard_map is manual over "pp" and the batch axes no parameter is sharded
        over (`manual_axes`): the body runs on this device's share of the batch, so
        layers issue no collectives and edges no resharding over those axes, and every
        stacked gradient is all-reduced over them once per step;
      * gradient synchronisation over automatic axes (FSDP, or an axis that splits
        the sequence) happens inside every backward run: XLA reduces each run's
        gradients before they are accumulated;
      * the state is stored split over "pp" (so that a device holds a 1/pp share of
        every leaf) and gathered into per-stage stacks each step by one all-to-all per
        parameter leaf, whose gradients go back the same way. Layers share stacks as
        apply's calls share kinds (`LayerCosts.stack_key`); a tied parameter the model
        passes to a call (a tied head's token table) is a leaf of that call's stacks
        too (`Candidate.tied_bytes`).
      * model outputs made before the last stage (`Candidate.model_outputs`: the
        logits a loss reads) ride buffer slots to the last stage; a slot only they
        ride moves in the forward pass and table forwards under "fused" and "1f1b",
        both ways under autodiff "gpipe". Values the loss's ops make
        (`Candidate.outside_outputs`) cross no stage boundary.
      * the loss, which the graph puts into the last layer (ops outside its module
        calls, `Candidate.op_outside`), runs once per step outside the pipeline on the
        whole batch: its compute and collectives (`Candidate.outside_comms`) once, M
        times the bytes of a micro-batch for values with a batch dim;
      * inside the shard_map a layer's collectives are its candidate's
        `pipeline_comms` (an embedding table split over every axis along its rows
        has its gradient formed by gathering ids and cotangents in every backward
        run, where a plain jit reduce-scatters it).
    Not counted here (the tables do not know it): the psum over "pp" of the model's
    returned arrays, once per step (M micro-batches of the last call's outputs). Not
    modelled, because the candidates do not say how XLA partitions their ops: with
    small micro-batches XLA gathers the activations rather than the ZeRO weights.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping, Sequence

import numpy as np

from uniap_jax import cluster as cluster_lib
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


def runtime_skips_idle(tables: _tables.CostTables, choice: Mapping[str, int],
                       executor: str) -> bool:
  """Whether the runtime that runs `executor` for this plan skips idle ticks' work:
  an explicit table executor over more than one stage (with one, the tables have
  no idle entries worth a conditional, which would keep XLA from hoisting parameter
  gathers out of the loops), and `cluster.skips_idle_work` for the tables' cluster and the
  axes `manual_axes` leaves automatic."""
  if executor == "gpipe" or tables.num_stages == 1:
    return False
  manual = set(manual_axes(tables, choice))
  return cluster_lib.skips_idle_work(tables.cluster.platform,
                         [n for a, n in zip(tables.mesh.names, tables.mesh.sizes)
                          if a not in manual])


def runtime_runs(executor: str, num_stages: int, num_microbatches: int, *,
                 skip_idle: bool = False) -> tuple[int, int, int]:
  """(forward runs, backward runs, permutes per buffer slot) one device executes per step.

  A forward run is one execution of the stage body (a tick's forward, or the
  recomputation inside a backward run). Without `skip_idle` every tick runs it on
  every device, busy or idle (lockstep); with it (`cluster.skips_idle_work`; never under
  "gpipe"), a device runs only its table entries: M of each kind per loop. Permutes
  (both directions) run in every tick either way. Mirrors `uniap_jax.apply`'s
  executors and `apply._schedules` tables:

  | executor | forward runs | backward runs | permutes |
  |---|---|---|---|
  | gpipe | M + S - 1 | M + S - 1 | 2 (M + S - 1) |
  | gpipe-remat | 2 (M + S - 1) | M + S - 1 | 2 (M + S - 1) |
  | fused (T = M + 2S - 2) | M + S - 1 + 2T | T | M + S - 1 + 2T |
  | 1f1b (T = 2 (M + S - 1)) | M + S - 1 + 2T | T | M + S - 1 + 2T |
  | gpipe-remat, skip_idle | 2M | M | 2 (M + S - 1) |
  | fused, 1f1b, skip_idle | 3M | M | M + S - 1 + 2T |

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
  skip = skip_idle and executor != "gpipe"
  if executor == "gpipe":  # autodiff keeps every tick's residuals: no recomputation
    forward, backward, permutes = fill, fill, 2 * fill
  elif executor == "gpipe-remat":
    forward, backward, permutes = (2 * m, m, 2 * fill) if skip else (2 * fill, fill, 2 * fill)
  else:
    ticks = m + 2 * s - 2 if executor == "fused" else 2 * fill
    forward, backward, permutes = fill + 2 * ticks, ticks, fill + 2 * ticks
    if skip:
      forward, backward = 3 * m, m
  return forward, backward, permutes if s > 1 else 0


def runtime_run_split(executor: str, num_stages: int, num_microbatches: int, *,
                      skip_idle: bool = False) -> tuple[int, int, int, int, int]:
  """`runtime_runs`'s forward runs by what their results feed: (passes, table forwards,
  recomputations, backward runs, permutes).

  A pass produces the model's outputs (the autodiff loop's forward ticks, or the forward
  pass before an explicit table); a table forward, inside the backward rule of "fused"
  and "1f1b", only feeds the activations sent on, so XLA drops the layer positions that
  lead to no send; a recomputation is the forward half of a backward run's `jax.vjp`,
  whose primal outputs are discarded. passes + table forwards + recomputations is
  `runtime_runs`'s forward runs. These are executions on one device (what its
  collectives count); the lockstep time charges ticks (`runtime_ticks`).
  """
  forward, backward, permutes = runtime_runs(executor, num_stages, num_microbatches,
                                             skip_idle=skip_idle)
  s, m = num_stages, num_microbatches
  if s == 1 and m == 1:
    return 1, 0, 0, 1, 0
  fill = m + s - 1
  if executor == "gpipe":
    return fill, 0, 0, backward, permutes
  passes = m if skip_idle else fill
  if executor == "gpipe-remat":
    return passes, 0, forward - passes, backward, permutes
  ticks = (forward - passes) // 2
  return passes, ticks, ticks, backward, permutes


def runtime_ticks(executor: str, num_stages: int, num_microbatches: int, *,
                  skip_idle: bool = False) -> tuple[int, int, int, int, int]:
  """The lockstep ticks of one step by what the busiest device runs in them:
  (pass ticks, ticks with a forward and a backward on one device, ticks with a
  forward on one device and a backward on another but both on none, table ticks
  with forwards only, ticks with backward runs only).

  A tick lasts as long as its busiest device's work (the ppermutes that close it
  wait for every device): a pass forward, a table forward, a backward run (with its
  recomputation), or both. Without `skip_idle` every device runs every entry, so a
  table's every tick holds both. With it (`cluster.skips_idle_work`), idle entries cost
  nothing, and a tick costs what its busiest device runs; every tick of a forward
  pass and of GPipe's backward loop still has a busy device. Closed forms of
  `apply._schedules`'s tables (tests/test_apply_idle.py checks them):

  | executor | pass | both | mixed | forward | backward |
  |---|---|---|---|---|---|
  | gpipe, gpipe-remat | M + S - 1 | 0 | 0 | 0 | M + S - 1 |
  | fused | M + S - 1 | M + 2S - 2 | 0 | 0 | 0 |
  | 1f1b | M + S - 1 | 2 (M + S - 1) | 0 | 0 | 0 |
  | fused, skip_idle | M + S - 1 | M | 0 | S - 1 | S - 1 |
  | 1f1b, skip_idle, S, M > 1 | M + S - 1 | 0 | 2M - 3 | S | S + 1 |
  | 1f1b, skip_idle, S = 1 or M = 1 | M + S - 1 | 0 | 0 | max(S, M) | max(S, M) |
  """
  if executor not in EXECUTORS:
    raise ValueError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}.")
  s, m = num_stages, num_microbatches
  fill = m + s - 1
  if executor in ("gpipe", "gpipe-remat"):
    return fill, 0, 0, 0, fill
  if not skip_idle:
    return fill, (m + 2 * s - 2 if executor == "fused" else 2 * fill), 0, 0, 0
  if executor == "fused":
    return fill, m, 0, s - 1, s - 1
  if s == 1 or m == 1:
    return fill, 0, 0, max(s, m), max(s, m)
  return fill, 0, 2 * m - 3, s, s + 1


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


def _runtime(tables, choice, stage_of, executor: str, skip: bool) -> Summary:
  """What one device of the pipelined runtime issues in one step (the same on every
  device: with `skip`, every stage has M entries of each kind per loop)."""
  num_stages, m = tables.num_stages, tables.num_microbatches
  split = runtime_run_split(executor, num_stages, m, skip_idle=skip)
  backward_runs, permutes = split[3], split[4]
  manual = set(manual_axes(tables, choice))
  out: Summary = {}
  program = _program(tables, choice, stage_of)
  data = tuple(a for a in tables.mesh.names if a in manual)  # manual data-parallel axes
  for p, layer in enumerate(program.positions):
    cand = layer.candidates[choice[layer.name]]
    for comm, gathers in _position_comms(cand):
      if set(comm.axes) & manual:
        continue  # manual: the body runs on this device's batch share (see the psum below)
      runs = _comm_runs(comm, manual,
                        _forward_runs(comm, gathers and not skip, p, program, split),
                        backward_runs)
      _add(out, comm.kind, comm.axes, comm.bytes, comm.count * runs)
    for comm, runs in (*_terminal_reruns(p, program, split, choice, hoist=not skip),
                       *_regathers(p, program, split, choice)):
      if not set(comm.axes) & manual:
        _add(out, comm.kind, comm.axes, comm.bytes, comm.count * runs)
  for ls, ld, nbytes, dst in program.reshards:
    forward_runs = split[0] + split[2] + (split[1] if program.live[dst] else 0)
    for a, b, runs in ((ls, ld, forward_runs), (ld, ls, backward_runs)):
      comms, _ = strategies.reshard(a, b, nbytes, tables.mesh.sizes)
      for kind, axes, x in comms:
        names = tuple(tables.mesh.names[i] for i in axes)
        if not set(names) & manual:
          _add(out, kind, names, x, runs)
  for local, outputs_only in program.slot_bytes:
    _add(out, "send", (PIPELINE_AXIS,), local,
         _output_permutes(executor, split) if outputs_only else permutes)
  for comm in _outside_comms(tables, choice):  # outside the shard_map: no manual axes
    _add(out, comm.kind, comm.axes, comm.bytes, comm.count)
  for layer, n in program.stacks:
    nbytes, leaves = _stack_bytes(layer, layer.candidates[choice[layer.name]])
    if not leaves:
      continue
    if data:  # every stacked gradient, summed over the manual data axes once per step
      _add(out, "all-reduce", data, n * nbytes / leaves, leaves)
    if num_stages > 1:  # the state's leaves into per-stage stacks and their gradients back
      _add(out, "all-to-all", (PIPELINE_AXIS,), n * nbytes / leaves, 2 * leaves)
  return out


def _stack_bytes(layer: _tables.LayerCosts, cand: strategies.Candidate) -> tuple[float, int]:
  """(bytes per device, leaves) of one slot of a layer kind's parameter stacks: its own
  parameters and the tied ones another layer owns, which the pipeline passes to the
  call as parameters of its own (`Candidate.tied_bytes`)."""
  return (cand.param_bytes + sum(cand.tied_bytes),
          len(layer.param_paths) + len(cand.tied_bytes))


def _forward_runs(comm: strategies.Comm, gathers_params: bool, position: int,
                  program: "_Program", split: tuple[int, int, int, int, int]) -> int:
  """Runs per step that issue a forward collective of a layer position (`runtime_run_split`).

  Table forwards skip the positions that lead to no send (`_Program.live`). A
  recomputation of the stage runs all of a position whose output a later layer reads;
  of a position whose output leaves the model (`_Program.terminal`) only what its
  backward reads, the candidate's `rerun_comms` (`_terminal_reruns`). Parameter
  gathers (`gathers_params`, the candidate's `param_gathers`) are loop-invariant:
  XLA hoists them out of the tick loops, once per loop that reads them (autodiff
  GPipe's backward regathers are `_regathers`).
  """
  passes, table, recompute = split[:3]
  if gathers_params:
    passes, table, recompute = (min(n, 1) for n in (passes, table, recompute))
  runs = passes + (table if program.live[position] else 0)
  if not program.terminal[position]:
    runs += recompute
  return runs


def _split_gathers(comms: Sequence[strategies.Comm],
                   gathers: Sequence[strategies.Comm]) -> list[tuple[strategies.Comm, bool]]:
  """`comms` with each forward per-micro-batch collective split into its part that
  gathers parameters (`gathers`, True) and the rest (False)."""
  by_key: dict[tuple, list[float]] = {}
  for c in gathers:
    got = by_key.setdefault((c.kind, c.axes), [0.0, 0])
    got[0] += c.bytes * c.count
    got[1] += c.count
  out = []
  for comm in comms:
    got = (by_key.pop((comm.kind, comm.axes), None)
           if comm.phase == "forward" and not comm.per_step else None)
    if got is None:
      out.append((comm, False))
      continue
    total, n = got
    out.append((dataclasses.replace(comm, bytes=total / n, count=n), True))
    if comm.count > n:
      rest = comm.count - n
      out.append((dataclasses.replace(comm, bytes=(comm.bytes * comm.count - total) / rest,
                                      count=rest), False))
  return out


def inside_comms(cand: strategies.Candidate) -> list[strategies.Comm]:
  """The collectives a layer position issues inside the pipeline: its candidate's
  `pipeline_comms` without those of the ops outside its module calls (a loss), which
  run once per step outside the pipeline (`_outside_comms`)."""
  if not cand.outside_comms:
    return list(cand.pipeline_comms)
  less: dict[tuple, list[float]] = {}
  for c in cand.outside_comms:
    got = less.setdefault((c.kind, c.axes, c.phase, c.per_step), [0.0, 0])
    got[0] += c.bytes * c.count
    got[1] += c.count
  out = []
  for c in cand.pipeline_comms:
    got = less.get((c.kind, c.axes, c.phase, c.per_step))
    if got is None:
      out.append(c)
      continue
    n = c.count - got[1]
    if n > 0:
      out.append(dataclasses.replace(c, bytes=(c.bytes * c.count - got[0]) / n, count=n))
  return out


def _outside_comms(tables: _tables.CostTables, choice: Mapping[str, int]
                   ) -> list[strategies.Comm]:
  """The collectives of the ops outside the layers' module calls (the loss on the
  model's output), as the runtime runs them: once per step, outside the pipeline, on
  the whole batch (values with a batch dim move the bytes of every micro-batch). The
  batch arrives there split over the manual data axes as well: a sum over it (the
  loss's mean) is all-reduced over those of them the candidate does not split it on."""
  m = tables.num_microbatches
  data = [a for a in manual_axes(tables, choice) if a != PIPELINE_AXIS]
  out = []
  for layer in tables.layers:
    cand = layer.candidates[choice[layer.name]]
    for c, scaled in zip(cand.outside_comms, cand.outside_scales):
      out.append(dataclasses.replace(c, bytes=c.bytes * (m if scaled else 1)))
    for nbytes, axes in cand.outside_batch_sums:
      extra = tuple(a for a in data if a not in axes)
      if extra:
        out.append(strategies.Comm(kind="all-reduce", axes=extra, bytes=nbytes,
                                   phase="forward"))
  return out


def _position_comms(cand: strategies.Candidate) -> list[tuple[strategies.Comm, bool]]:
  """The collectives a layer position issues inside the pipeline (`inside_comms`),
  its forward parameter gathers apart (True)."""
  return _split_gathers(inside_comms(cand), [c for g in cand.param_gathers for c in g.comms])


def _regathers(position: int, program: "_Program", split: tuple[int, ...],
               choice: Mapping[str, int]) -> tuple[tuple[strategies.Comm, int], ...]:
  """Autodiff GPipe (no table, no recomputation of the stage, several passes): the
  backward loop cannot keep the gathered weights (they are not among the residuals
  it keeps), so it gathers again, in every backward run, each parameter whose gathered
  copy the backward reads (`ParamGather.backward_reads`: matmul kernels, not biases or
  embedding tables). (collective, runs per step) pairs."""
  passes, table, recompute, backward_runs = split[:4]
  if table or recompute or passes <= 1:
    return ()
  layer = program.positions[position]
  cand = layer.candidates[choice[layer.name]]
  return tuple((c, backward_runs) for g in cand.param_gathers if g.backward_reads
               for c in g.comms)


def _terminal_reruns(position: int, program: "_Program", split: tuple[int, ...],
                     choice: Mapping[str, int], hoist: bool = True
                     ) -> tuple[tuple[strategies.Comm, int], ...]:
  """The forward collectives a recomputation of the stage issues for a position whose
  output no layer reads: what its backward reads (`Candidate.rerun_comms`); XLA drops
  the rest of that forward (a row-parallel matmul closing the output, its all-reduce).
  Parameter gathers among them are hoisted (with `hoist`: not when the runs sit inside
  the conditional of skipped idle ticks): once per step. (collective, runs) pairs."""
  recompute = split[2]
  return tuple((c, min(recompute, 1) if hoisted and hoist else recompute)
               for c, hoisted in _terminal_rerun_comms(position, program, split, choice))


def _terminal_rerun_comms(position: int, program: "_Program", split: tuple[int, ...],
                          choice: Mapping[str, int]
                          ) -> list[tuple[strategies.Comm, bool]]:
  """`_terminal_reruns`' collectives, each with whether it gathers parameters."""
  if not (split[2] and program.terminal[position]):
    return []
  layer = program.positions[position]
  cand = layer.candidates[choice[layer.name]]
  gathers = [c for g in cand.param_gathers if g.recomputed for c in g.comms]
  return _split_gathers(cand.rerun_comms, gathers)


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
    reshards: (source layout, destination layout, bytes, destination position) of each
      edge inside the body.
    slot_bytes: per buffer slot sent between stages, (local bytes, whether only model
      outputs ride it: then it moves in forward runs only, `_output_permutes`).
    live: per position, whether its output leads (on some stage) to a value sent to
      the next stage; the others only feed the model's outputs.
    terminal: per position, whether no layer reads its output on any stage.
  """

  def __init__(self, positions, stacks, reshards, slot_bytes, live, terminal):
    self.positions, self.stacks = positions, stacks
    self.reshards, self.slot_bytes = reshards, slot_bytes
    self.live, self.terminal = live, terminal


def _program(tables: _tables.CostTables, choice: Mapping[str, int],
             stage_of: Mapping[str, int]) -> _Program:
  num_stages, sizes = tables.num_stages, tables.mesh.sizes
  # One kind of layer position per computation, parameter layout and recomputation
  # flag, as the runtime groups calls: candidates that differ only in activation
  # layouts share it.
  def key(l):
    cand = l.candidates[choice[l.name]]
    return (l.signature, tuple(cand.param_specs), cand.recompute)
  per_stage = [[l for l in tables.layers if stage_of[l.name] == s] for s in range(num_stages)]
  aligned = supersequence.align([[key(l) for l in layers] for layers in per_stage])
  positions = [per_stage[s][i] for s, i in (next(iter(w.items())) for w in aligned)]
  # Parameter stacks: per kind of call as apply groups them (`LayerCosts.stack_key`),
  # the most calls of the kind any stage holds.
  def stack_of(l):
    cand = l.candidates[choice[l.name]]
    return (l.stack_key or l.signature, tuple(cand.param_specs), cand.recompute)
  capacity: dict[tuple, int] = {}
  for layers in per_stage:
    counts: dict[tuple, int] = {}
    for l in layers:
      counts[stack_of(l)] = counts.get(stack_of(l), 0) + 1
    for k, n in counts.items():
      capacity[k] = max(capacity.get(k, 0), n)
  stacks = [(next(l for l in tables.layers if stack_of(l) == k), n)
            for k, n in capacity.items()]
  # Edges: resharding inside the stage body, once per pair of positions (stages that
  # share both positions run one program); buffer slots across stage boundaries.
  position_of = {per_stage[s][i].name: p for p, where in enumerate(aligned)
                 for s, i in where.items()}
  live: list[list[tuple[float, float]]] = [[] for _ in range(num_stages - 1)]
  seen: set[int] = set()
  pairs: dict[tuple, tuple] = {}
  layers = {l.name: l for l in tables.layers}
  for v, s_src, s_dst, src, dst, i, j, nbytes, ls, ld in _edge_values(tables, choice,
                                                                      stage_of):
    if layers[src].candidates[choice[src]].outside_outputs[i]:
      continue  # made by the loss's ops, outside the pipeline
    pairs.setdefault((position_of[src], position_of[dst], i, j, ls, ld),
                     (ls, ld, nbytes, position_of[dst]))
    if s_dst > s_src and v not in seen:
      seen.add(v)
      local = nbytes / strategies.shard_count(ls, sizes)
      for b in range(s_src, s_dst):
        live[b].append((nbytes, local, False))
  # The model's outputs made before the last stage ride to it (apply returns them from
  # the last stage, and reads the pipeline's result there).
  for l in tables.layers:
    for nbytes, local in l.candidates[choice[l.name]].model_outputs:
      for b in range(stage_of[l.name], num_stages - 1):
        live[b].append((nbytes, local, True))
  # (full bytes, local bytes, only outputs ride it), shared by equal sizes.
  slots: list[list] = []
  for values in live:
    taken: set[int] = set()
    for nbytes, local, output in values:
      j = next((j for j, got in enumerate(slots) if j not in taken and got[0] == nbytes), None)
      if j is None:
        j = len(slots)
        slots.append([nbytes, local, output])
      slots[j][2] = slots[j][2] and output
      taken.add(j)
  # Liveness of the uniform body's positions: a layer feeds a send when one of its
  # consumers is on a later stage or, on its own stage, feeds one itself.
  consumers: dict[str, list[str]] = {}
  for edge in tables.edges:
    consumers.setdefault(edge.src, []).append(edge.dst)
  feeds: dict[str, bool] = {}
  for l in reversed(tables.layers):
    feeds[l.name] = any(stage_of[d] > stage_of[l.name] or feeds.get(d, False)
                        for d in consumers.get(l.name, ()))
  live = [any(feeds[per_stage[s][i].name] for s, i in where.items()) for where in aligned]
  terminal = [all(not consumers.get(per_stage[s][i].name) for s, i in where.items())
              for where in aligned]
  return _Program(positions, stacks, list(pairs.values()),
                  [(local, output) for _, local, output in slots], live, terminal)


def _output_permutes(executor: str, split: tuple[int, ...]) -> int:
  """Permutes per step of a buffer slot only model outputs ride: "fused" and "1f1b"
  move it in the forward pass and the table's forward runs, not backward (the outputs'
  cotangents enter on the last stage); autodiff GPipe transposes every forward permute
  and "gpipe-remat"'s backward ticks move every slot's cotangent too
  (`runtime_run_split`'s permutes); all checked on compiled HLO (BERT's MLM logits,
  tests/test_apply_zoo.py)."""
  if executor in ("gpipe", "gpipe-remat"):
    return split[4]
  return split[0] + split[1]


def runtime_step_time_s(tables: _tables.CostTables, choice: Mapping[str, int],
                        stage_of: Mapping[str, int] | None = None, *,
                        executor: str, skip_idle: bool | None = None) -> float:
  """Seconds per step of the lockstep runtime that runs `executor`, priced like the tables.

  Every busy device of a tick runs every layer position of the uniform body, so a
  pass forward costs the sum over positions of their forward compute and collectives
  (P), a table forward that of the positions leading to a send (Ft: XLA drops the
  others there), a backward run the recomputation of the stage (R: all of a position
  whose output a later layer reads, of the others only what their backward reads,
  `op_rerun`, `rerun_comms`) plus the positions' backward compute and the
  collectives XLA issues per run (B), and for every position whose candidate
  recomputes its activations, the forward compute its backward reads and its
  "recompute" collectives once more (the `jax.checkpoint` apply wraps it in). The
  collectives are those `collectives_by_stage(..., executor=)` counts.

  Lockstep: a tick lasts as long as its busiest device's work, and the ppermutes that
  close it (one send per buffer slot and direction; a slot only model outputs ride,
  `_output_permutes`) run on every device. Without skipping every device runs every
  tick's entries, idle or not; with it (`skip_idle`, default as `uniap_jax.apply`
  decides: `runtime_skips_idle`) an idle entry costs nothing, and a tick costs P, Ft,
  R + B, Ft + R + B, or max(Ft, R + B) when one device runs a forward and another a
  backward (`runtime_ticks`). Parameter all-gathers over automatic axes are
  loop-invariant, hoisted by XLA (once per step for each loop that reads them),
  except inside the conditional of skipped ticks, where they run with their entry.

  Once per step: gradient synchronisation over manual axes, the optimizer
  (each device updates its 1/pp share of every leaf) and the all-to-alls between the
  stored state and the stacks. With one stage and one micro-batch this is the sum of
  the layers' per-micro-batch and per-step times (what the solver's objective gives).
  The loss (ops outside the last layer's module calls) runs once per step outside
  the pipeline, on the whole batch: its compute M times a micro-batch's, its
  collectives as `collectives_by_stage` counts them; a layer position's collectives
  are its candidate's `pipeline_comms` less the loss's (`inside_comms`).

  Compare `solver.Solution.objective` (the paper's GPipe time, sum of stage times +
  sends + (c - 1) x the slowest): the runtime's figure is larger by the recomputation,
  by the idle positions every stage runs, and, for "fused" and "1f1b", by the forward
  pass before the table and its forward entries; without skipping, also by a forward
  and a backward run in every table tick.
  """
  stage_of = stage_of or {l.name: 0 for l in tables.layers}
  mesh, cluster = tables.mesh, tables.cluster
  num_stages, m = tables.num_stages, tables.num_microbatches
  if num_stages == 1 and m == 1:  # the plain jitted step: the solver's objective
    return float(sum(tables.solver_time_s(l.name)[choice[l.name]] for l in tables.layers)
                 + sum(e.same_stage_s[choice[e.src]][choice[e.dst]] for e in tables.edges))
  skip = runtime_skips_idle(tables, choice, executor) if skip_idle is None else (
      skip_idle and executor != "gpipe")
  split = runtime_run_split(executor, num_stages, m, skip_idle=skip)
  permutes = split[4]
  manual = set(manual_axes(tables, choice))
  program = _program(tables, choice, stage_of)
  # Per run: a pass forward, a table forward, a recomputation, a backward run; and
  # what runs once per loop (hoisted gathers) or once per step.
  pass_s = table_s = rerun_s = backward_s = hoisted_s = once = 0.0
  for p, layer in enumerate(program.positions):
    cand = layer.candidates[choice[layer.name]]
    per_op = _formulas.roofline_time_s(cand.op_flops, cand.op_bytes, cand.op_dtype, cluster)
    phase = np.array(cand.op_phase)
    inside = ~np.asarray(cand.op_outside, dtype=bool)  # the loss runs outside (below)
    fwd = float(per_op[(phase == "forward") & inside].sum())
    rerun = float(per_op[np.asarray(cand.op_rerun, dtype=bool) & inside].sum())
    live, terminal = program.live[p], program.terminal[p]
    pass_s += fwd
    table_s += fwd if live else 0.0
    rerun_s += rerun if terminal else fwd
    backward_s += float(per_op[(phase == "backward") & inside].sum())
    if cand.recompute:  # what its backward reads of its forward, in every backward run
      backward_s += rerun
    for comm, gathers in _terminal_rerun_comms(p, program, split, choice):
      if not set(comm.axes) & manual:
        t = _formulas.comm_time_s(comm, mesh, cluster) * comm.count
        if gathers and not skip:  # hoisted out of the backward loop
          hoisted_s += t
        else:
          rerun_s += t
    for comm, _ in _regathers(p, program, split, choice):  # per backward run
      if not set(comm.axes) & manual:
        backward_s += _formulas.comm_time_s(comm, mesh, cluster) * comm.count
    for comm, gathers in _position_comms(cand):
      if set(comm.axes) & manual or not _comm_runs(comm, manual, 1, 1):
        continue  # over manual axes: the psum of the stacked gradients below
      t = _formulas.comm_time_s(comm, mesh, cluster) * comm.count
      if comm.per_step and comm.phase == "optimizer":
        once += t
      elif comm.phase == "forward" and not comm.per_step:
        if gathers and not skip:  # hoisted: once per loop that reads it
          hoisted_s += t * _forward_runs(comm, True, p, program, split)
        else:
          pass_s += t
          table_s += t if live else 0.0
          rerun_s += 0.0 if terminal else t
      else:  # backward, per-step gradient synchronisation, and recomputation
        backward_s += t
  for ls, ld, nbytes, dst in program.reshards:
    for a, b, phase in ((ls, ld, "forward"), (ld, ls, "backward")):
      comms, _ = strategies.reshard(a, b, nbytes, mesh.sizes)
      t = sum(_formulas.collective_time_s(kind, x, mesh.level_factors(axes), cluster.levels)
              for kind, axes, x in comms
              if not {mesh.names[i] for i in axes} & manual)
      if phase == "forward":
        pass_s += t
        rerun_s += t
        table_s += t if program.live[dst] else 0.0
      else:
        backward_s += t
  if not split[2]:
    rerun_s = 0.0  # autodiff GPipe keeps its residuals: no recomputation
  passes, both, mixed, forward_only, backward_only = runtime_ticks(
      executor, num_stages, m, skip_idle=skip)
  run_s = rerun_s + backward_s
  loops = (passes * pass_s + both * (table_s + run_s) + mixed * max(table_s, run_s)
           + forward_only * table_s + backward_only * run_s)
  data = tuple(mesh.index(a) for a in mesh.names if a in manual)
  if data:
    for layer, n in program.stacks:
      nbytes, leaves = _stack_bytes(layer, layer.candidates[choice[layer.name]])
      if leaves:
        once += _formulas.collective_time_s("all-reduce", n * nbytes,
                                            mesh.level_factors(data), cluster.levels)
  send = output_send = 0.0
  if num_stages > 1:
    for local, outputs_only in program.slot_bytes:
      t = _formulas.send_time_s(local, mesh.num_devices, cluster)
      if outputs_only:
        output_send += t * _output_permutes(executor, split)
      else:
        send += t
  for layer in tables.layers:
    cand = layer.candidates[choice[layer.name]]
    per_op = _formulas.roofline_time_s(cand.op_flops, cand.op_bytes, cand.op_dtype, cluster)
    phase = np.array(cand.op_phase)
    once += float(per_op[phase == "optimizer"].sum()) / num_stages
    # The loss: once per step outside the pipeline, on the whole batch (M micro-batches).
    outside = np.asarray(cand.op_outside, dtype=bool) & (phase != "optimizer")
    once += m * float(per_op[outside].sum())
  for comm in _outside_comms(tables, choice):
    once += _formulas.comm_time_s(comm, mesh, cluster) * comm.count
  if num_stages > 1:
    for layer, n in program.stacks:
      nbytes, _ = _stack_bytes(layer, layer.candidates[choice[layer.name]])
      once += 2 * _formulas.send_time_s(n * nbytes, mesh.num_devices, cluster)
  return loops + hoisted_s + permutes * send + output_send + once


def collectives_by_stage(tables: _tables.CostTables, choice: Mapping[str, int],
                         stage_of: Mapping[str, int] | None = None, *,
                         executor: str | None = None,
                         skip_idle: bool | None = None) -> tuple[Summary, ...]:
  """Per stage: (kind, mesh axes) -> {"count", "bytes"} one device of the stage issues
  in one step. Sends carry the pipeline axis "pp".

  Args:
    tables / choice / stage_of: as for `predicted_collectives`.
    executor: None for the paper's per-micro-batch count; else the runtime's executor,
      whose lockstep program is the same on every stage (see the module docstring).
    skip_idle: whether the runtime skips idle ticks' stage work; None decides as
      `uniap_jax.apply` does (`runtime_skips_idle`).
  """
  stage_of = stage_of or {l.name: 0 for l in tables.layers}
  if executor is None:
    return _paper_by_stage(tables, choice, stage_of)
  if executor not in EXECUTORS:
    raise ValueError(f"executor={executor!r}; allowed: None, {', '.join(EXECUTORS)}.")
  if tables.num_stages == 1 and tables.num_microbatches == 1:
    return _paper_by_stage(tables, choice, stage_of)
  skip = runtime_skips_idle(tables, choice, executor) if skip_idle is None else (
      skip_idle and executor != "gpipe")
  summary = _runtime(tables, choice, stage_of, executor, skip)
  return tuple({k: dict(v) for k, v in summary.items()} for _ in range(tables.num_stages))


def predicted_collectives(tables: _tables.CostTables, choice: Mapping[str, int],
                          stage_of: Mapping[str, int] | None = None, *,
                          executor: str | None = None,
                          skip_idle: bool | None = None) -> dict[str, float]:
  """kind -> bytes one device moves in one step (the busiest stage's device per kind).

  Args:
    tables: the configuration's cost tables.
    choice: layer name -> index into its `LayerCosts.candidates`.
    stage_of: layer name -> stage; default everything on stage 0.
    executor: None: the paper's count (per micro-batch and stage boundary). The name of
      `uniap_jax.apply`'s executor ("gpipe", "gpipe-remat", "fused", "1f1b"; a plan's
      schedule runs with `plans.runtime_executor`'s): what that runtime compiles.
    skip_idle: as for `collectives_by_stage`.
  Returns:
    DESIGN.md's `predicted.collectives`: kinds with nonzero bytes only.
  """
  out: dict[str, float] = {}
  for stage in collectives_by_stage(tables, choice, stage_of, executor=executor,
                                   skip_idle=skip_idle):
    per_kind: dict[str, float] = {}
    for (kind, _), entry in stage.items():
      per_kind[kind] = per_kind.get(kind, 0.0) + entry["bytes"]
    for kind, b in per_kind.items():
      out[kind] = max(out.get(kind, 0.0), b)
  return {k: v for k, v in sorted(out.items()) if v > 0}
