"""Lower bounds on a configuration's objective and memory, cheapest first, so that
most configurations are skipped before their tables are built: on the UniAP
objective (objective="paper") and on the runtime step time (objective="runtime",
`runtime_bound` and below)."""

from __future__ import annotations

import dataclasses
import math
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import solver
from uniap_jax import strategies
from uniap_jax.search._configs import Config


def to_problem(tables: cost.CostTables) -> solver.Problem:
  """One configuration's cost tables as the solver's Problem (per micro-batch, per device)."""
  layers = [
      solver.Layer(name=l.name, time=tables.solver_time_s(l.name),
                   memory=tables.memory_by_stage(l.name)[0],
                   memory_by_stage=tables.memory_by_stage(l.name))
      for l in tables.layers
  ]
  edges = [
      solver.Edge(src=e.src, dst=e.dst, same_stage=e.same_stage_s, cross_stage=e.cross_stage_s)
      for e in tables.edges
  ]
  return solver.Problem(layers=layers, edges=edges, num_stages=tables.num_stages,
                        num_microbatches=tables.num_microbatches,
                        memory_limit=max(tables.memory_limit_bytes - tables.reserve_bytes, 0.0))


def lower_bound(tables: cost.CostTables) -> float:
  """A cheap bound on the configuration's objective: every layer at its fastest
  candidate, edges free, the stages as balanced as contiguous stages can be."""
  times = [min(tables.solver_time_s(l.name)) for l in tables.layers]
  return objective_bound(times, num_stages=tables.num_stages,
                         num_microbatches=tables.num_microbatches)


def objective_bound(times: Sequence[float], *, num_stages: int,
                    num_microbatches: int) -> float:
  """A lower bound on the UniAP objective given a lower bound on each layer's time.

  sum p_i >= sum of the times; the slowest stage is at least the least possible
  bottleneck of a contiguous split into num_stages parts (found by bisection over
  a greedy split, rounded down); sends and resharding only add.
  """
  total = float(sum(times))
  if num_stages == 1 or not times:
    return num_microbatches * total
  return total + (num_microbatches - 1) * _least_bottleneck(times, num_stages)


def _least_bottleneck(times: Sequence[float], num_stages: int) -> float:
  """A lower bound on min over contiguous splits into num_stages parts of the largest
  part's sum: the largest cap bisection proves too small (or the trivial bound)."""
  total = float(sum(times))
  lo = max(max(times), total / num_stages)

  def parts(cap: float) -> int:
    count, acc = 1, 0.0
    for t in times:
      if acc + t > cap:
        count, acc = count + 1, t
      else:
        acc += t
    return count

  if parts(lo) <= num_stages:
    return lo
  hi = total
  for _ in range(30):
    if hi - lo <= 1e-4 * hi:
      break
    mid = 0.5 * (lo + hi)
    if parts(mid) <= num_stages:
      hi = mid
    else:
      lo = mid
  return lo


def stash_bytes(layers: Sequence[cost.LayerCosts], config: Config,
                executor: str | None) -> float:
  """What the runtime memory model keeps free besides the working set
  (`cost.runtime_reserve_bytes`: the stash, the least batch and outputs; 0 under the
  paper's model), for layers costed at this configuration's micro-batch: at most what
  `cost.build_cost_tables` adds to `reserve_bytes` from the candidates it keeps, with
  rows (`_runtime_memory`) that charge no more than the tables' do."""
  return cost.runtime_reserve_bytes(layers, config.mesh, executor=executor,
                                    num_stages=config.num_stages,
                                    num_microbatches=config.num_microbatches)


def _runtime_memory(layers: Sequence[cost.LayerCosts], config: Config, executor: str,
                    scale: float = 1.0) -> list[np.ndarray]:
  """Per layer, per candidate, the runtime memory model's bytes
  (`cost.runtime_layer_memory_bytes`, the same on every stage: what the solver's
  constraint sums under objective="runtime"), its batch-proportional terms scaled by
  `scale` (a lower bound when costed at a larger micro-batch)."""
  produced = {v for l in layers for v in l.output_ids}
  memo: dict[tuple, np.ndarray] = {}
  out = []
  for l in layers:
    key = (id(l.candidates), tuple(v in produced for v in l.input_ids))
    got = memo.get(key)
    if got is None:
      got = memo[key] = np.asarray(cost.runtime_layer_memory_bytes(
          l, executor=executor, num_stages=config.num_stages,
          num_microbatches=config.num_microbatches, produced=produced, batch_scale=scale),
          dtype=np.float64).reshape(-1)
    out.append(got)
  return out


def _least_memory(layers: Sequence[cost.LayerCosts], config: Config,
                  executor: str | None) -> list[np.ndarray]:
  """Per layer, per candidate, the least bytes the solver's constraint charges it on
  any stage: the paper's (activations of the fewest micro-batches any stage holds)
  or, with `executor`, the runtime model's."""
  if executor is not None:
    return _runtime_memory(layers, config, executor)
  c, s = config.num_microbatches, config.num_stages
  fewest = min(cost.microbatches_in_flight(config.schedule, c, s, i) for i in range(s))
  out = []
  for l in layers:
    state, grad = np.asarray(l.state_bytes), np.asarray(l.grad_bytes)
    act = np.asarray(l.activation_bytes) * fewest
    out.append(state + (grad + act if c > 1 else np.maximum(grad, act)))
  return out


def _stage_memory(layers: Sequence[cost.LayerCosts], config: Config,
                  scale: float, executor: str | None = None) -> list[list[float]]:
  """[layer][stage] the least bytes each layer needs on each stage, its activations
  scaled by `scale` (a lower bound when costed at a larger micro-batch); with
  `executor`, in the runtime memory model (the same on every stage)."""
  c, n = config.num_microbatches, config.num_stages
  if executor is not None:
    return [[float(row.min()) if row.size else math.inf] * n
            for row in _runtime_memory(layers, config, executor, scale)]
  in_flight = [cost.microbatches_in_flight(config.schedule, c, n, s) for s in range(n)]
  distinct = sorted(set(in_flight))
  per_signature: dict[int, dict[int, float]] = {}
  out = []
  for l in layers:
    got = per_signature.get(id(l.candidates))
    if got is None:
      state = np.asarray(l.state_bytes)
      grad = np.asarray(l.grad_bytes)
      act = np.asarray(l.activation_bytes) * scale
      got = {}
      for f in distinct:
        total = state + (grad + act * f if c > 1 else np.maximum(grad, act * f))
        got[f] = float(total.min())
      per_signature[id(l.candidates)] = got
    out.append([got[f] for f in in_flight])
  return out


def _fits(memory: Sequence[Sequence[float]], cap: float) -> bool:
  """Whether contiguous stages exist whose sums of least memory stay under `cap`.

  Filling each stage as far as it goes is exact for this relaxation (any feasible
  split ends each stage no later than the greedy one does), empty stages allowed.
  """
  cap *= 1 + solver.MEMORY_RTOL
  n = len(memory[0]) if memory else 1
  s, acc = 0, 0.0
  for row in memory:
    while acc + row[s] > cap:
      if s + 1 == n:
        return False
      s, acc = s + 1, 0.0
    acc += row[s]
  return True


def _least_peak(memory: Sequence[Sequence[float]]) -> float:
  """The least cap under which `_fits` holds (bisection, rounded up)."""
  if not memory:
    return 0.0
  lo = 0.0
  hi = sum(max(row) for row in memory)
  for _ in range(50):
    if hi - lo <= 1e-6 * hi:
      break
    mid = 0.5 * (lo + hi)
    if _fits(memory, mid):
      hi = mid
    else:
      lo = mid
  return hi


def _layer_times(layers: Sequence[cost.LayerCosts], num_microbatches: int,
                 scale: float) -> list[float]:
  """Per layer, the fastest candidate's per-micro-batch time in the objective, the
  micro-batch part scaled by `scale` (a lower bound when costed at a larger one)."""
  per_signature: dict[int, float] = {}
  out = []
  for l in layers:
    t = per_signature.get(id(l.candidates))
    if t is None:
      t = per_signature[id(l.candidates)] = float(np.min(
          np.asarray(l.microbatch_time_s) * scale +
          np.asarray(l.step_time_s) / num_microbatches))
    out.append(t)
  return out


def configuration_bound(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster,
                        config: Config, *, global_batch: int,
                        memory_limit_bytes: float | None = None, cutoff: float = math.inf,
                        cache: dict | None = None, executor: str | None = None) -> float:
  """A lower bound on a configuration's optimum, built no further than needed.

  First FLOPs over the stage's devices at the best peak (no costing); if that is
  below `cutoff`, the layers' fastest candidates and least memory at this
  configuration's micro-batch (costed, no edges). math.inf when that shows no
  assignment fits memory. Any method restricted to this configuration, UniAP's MIQP
  included, has an objective at least this large. `executor`: the memory model of
  the solver's constraint (None: the paper's; see `cost.build_cost_tables`).
  """
  cache = {} if cache is None else cache
  flops = cost.flops_time_bounds(graph, cluster, global_batch=global_batch,
                                        cache=cache)
  bound = _flops_bound(config, flops, global_batch)
  if bound >= cutoff:
    return bound
  layers = cost.layer_costs(graph, cluster, mesh=config.mesh,
                                   microbatch=global_batch // config.num_microbatches,
                                   cache=cache)
  limit = cluster.memory_bytes if memory_limit_bytes is None else memory_limit_bytes
  check = _check_layers(layers, config, limit=limit, scale=1.0, exact=True,
                        executor=executor)
  return max(bound, check.bound) if check.feasible else math.inf


def _flops_bound(config: Config, flops: Sequence[tuple[float, float]],
                 global_batch: int) -> float:
  """`objective_bound` over `cost.flops_time_bounds` for this configuration."""
  m, c = config.mesh.num_devices, config.num_microbatches
  b = global_batch // c
  times = [(b * per_sample + per_step / c) / m for per_sample, per_step in flops]
  return objective_bound(times, num_stages=config.num_stages, num_microbatches=c)


@dataclasses.dataclass(slots=True)
class _Check:
  """What costing one configuration's layers (no edges) says about it."""

  bound: float = 0.0
  feasible: bool = True
  needed_bytes: float = math.inf  # when infeasible: least memory per device it needs


def _check_layers(layers: Sequence[cost.LayerCosts], config: Config, *, limit: float,
                  scale: float, exact: bool, executor: str | None = None) -> _Check:
  """Bounds a configuration from its layers' costs alone.

  exact: the layers were costed at this configuration's own micro-batch, so the
  memory test matches the solver's (with the reserve kept free, as `to_problem`
  does); else they were costed at a larger micro-batch B and scaled down by
  scale = b / B, and both tests are relaxations. Why scaling is valid: every
  sharding that splits a b-sample micro-batch also splits B samples (b divides B),
  and each of its costs (FLOPs and bytes per op, collective bytes, activations) is
  a constant plus a part proportional to the batch, so at b it is at least b / B of
  its value at B; the minima over candidates inherit this (the Pareto set kept at B
  holds every minimiser). `test_search` checks it against costs taken at b.
  executor: None tests the paper's memory; an executor, the runtime memory model the
  solver's constraint then sums (`cost.build_cost_tables(executor=...)`).
  """
  if any(not l.candidates for l in layers):
    return _Check(feasible=False)
  c = config.num_microbatches
  stash = stash_bytes(layers, config, executor) if exact else 0.0
  reserve = cost.reserve_bytes(layers) + stash if exact else 0.0
  memory = _stage_memory(layers, config, scale, executor)
  if exact:
    over = cost.over_limit(layers, schedule=config.schedule, num_microbatches=c,
                           num_stages=config.num_stages, limit_bytes=limit,
                           executor=executor, reserved_bytes=stash)
    if over:
      return _Check(feasible=False, needed_bytes=max(b for _, b in over))
    if reserve >= limit:
      return _Check(feasible=False, needed_bytes=reserve + sum(
          row[0] for row in memory) / config.num_stages)
  cap = max(limit - reserve, 0.0)
  if not _fits(memory, cap):
    return _Check(feasible=False, needed_bytes=_least_peak(memory) + reserve)
  times = _layer_times(layers, c, scale)
  return _Check(bound=objective_bound(times, num_stages=config.num_stages,
                                      num_microbatches=c))


# Bounds on the runtime step time (objective="runtime"): `cost.runtime_step_time_s`
# of any assignment in a configuration. That figure sums, over the lockstep
# program's layer positions, each position's forward compute and collectives times
# the forward runs that execute it, its backward compute and collectives (and, for a
# recomputing candidate, its forward once more) times the backward runs, plus
# resharding, sends and once-per-step terms (among them every layer's optimizer
# compute divided by S), all non-negative. With the runs `_split` counts (what the
# lockstep time charges at least, skipping idle ticks' work or not) and
# fill = M + S - 1:
#   - every position runs at least `_runs`' forward count: the fill forward passes,
#     and for the explicit tables ("fused", "1f1b") the recomputation that starts
#     each of their backward runs (the table's forward runs feed only the sends,
#     which a position off that path skips);
#   - its forward collectives run at least in the fill passes, except parameter
#     gathers (loop-invariant: hoisted out of the tick loops), not counted here;
#   - its backward compute and backward collectives run in every backward run.
# Collectives count only over axes the candidate shards parameters over (the
# runtime skips its manual axes, and no such axis is manual); "recompute"-phase ones
# not at all. The positions are a common supersequence of the stages' layer
# sequences (keyed by signature), so for every stage s each of its layers has a
# position of its own signature: the runtime is at least the largest, over stages,
# sum over the stage's layers of w(layer), w = min over the layer's candidates of
# those per-position figures, and stages are contiguous, so that maximum is at least
# the least bottleneck of a contiguous split (`_least_bottleneck`). With one stage
# and one micro-batch the runtime is the layers' summed solver times, which the same
# weights (runs (1, 1)) bound too. The bound does not see the union of the stages'
# programs the runtime really runs when stages hold layers of different kinds.


def _runs(executor: str, num_stages: int, num_microbatches: int) -> tuple[int, int, int]:
  """(forward runs of every position's compute, forward runs of its collectives,
  backward runs), at least, per step (see the comment above): the passes and the
  recomputations of `_split`, the passes, the backward runs."""
  passes, _, recompute, backward, _ = _split(executor, num_stages, num_microbatches)
  if num_stages == 1 and num_microbatches == 1:
    return 1, 1, 1
  return passes + recompute, passes, backward


def runtime_bound(weights: Sequence[float], optimizer_s: float, *, num_stages: int) -> float:
  """A lower bound on the runtime step time from per-layer lower bounds.

  Args:
    weights: per layer in graph order, at most what the runtime charges a position
      holding any of its candidates (see the comment above `_runs`).
    optimizer_s: at most the summed optimizer compute of the layers' candidates.
    num_stages: S; each device updates a 1/S share of every leaf.
  """
  if not weights:
    return optimizer_s / num_stages
  neck = float(sum(weights)) if num_stages == 1 else _least_bottleneck(weights, num_stages)
  return neck + optimizer_s / num_stages


def phase_flops_bounds(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
                       global_batch: int, cache: dict | None = None
                       ) -> tuple[tuple[float, float, float], ...]:
  """Per layer (forward per-sample s, backward per-sample s, optimizer per-step s).

  `cost.flops_time_bounds` with the micro-batch part split into its forward and
  backward ops, by the same argument: with b samples per micro-batch on m devices,
  every candidate's forward compute is at least b x forward / m, its backward at
  least b x backward / m, its optimizer compute at least optimizer / m.
  """
  cache = {} if cache is None else cache
  key = ("runtime_phase_flops", global_batch, id(cluster))
  got = cache.get(key)
  if got is not None and got[0] is cluster:
    return got[1]
  # Builds (and caches) the graph analysis and each signature's IR at the global batch.
  cost.flops_time_bounds(graph, cluster, global_batch=global_batch, cache=cache)
  info = cache.get("info")
  if info is None:
    info = cache["info"] = strategies.analyze(graph)
  rate = max(cluster.peak_flops_per_s.values()) * cluster.compute_efficiency
  by_signature: dict[str, tuple[float, float, float]] = {}
  out = []
  for layer in graph.layers:
    got = by_signature.get(layer.signature)
    if got is None:
      ir = cache.get(("ir", layer.signature, global_batch))
      if ir is None:
        ir = strategies.build_ir(layer, info, microbatch=global_batch)
      flops = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
      for o in ir.ops:
        if o.op.phase in flops:
          flops[o.op.phase] += o.flops
      got = by_signature[layer.signature] = (
          flops["forward"] / global_batch / rate, flops["backward"] / global_batch / rate,
          flops["optimizer"] / rate)
    out.append(got)
  out = tuple(out)
  cache[key] = (cluster, out)
  return out


def _runtime_flops_bound(config: Config, flops: Sequence[tuple[float, float, float]],
                         global_batch: int) -> float:
  """`runtime_bound` over `phase_flops_bounds` for this configuration (level 0)."""
  m, c, s = config.mesh.num_devices, config.num_microbatches, config.num_stages
  fr, _, br = _runs(config.executor, s, c)
  b = global_batch // c
  weights = [(fr * f + br * g) * b / m for f, g, _ in flops]
  return runtime_bound(weights, sum(o for _, _, o in flops) / m, num_stages=s)


def _param_axes(cand: strategies.Candidate) -> set[str]:
  """Mesh axes over which the candidate shards some parameter."""
  out: set[str] = set()
  for spec in cand.param_specs:
    for entry in spec:
      if entry:
        out.update(entry if isinstance(entry, tuple) else (entry,))
  return out


def _cached(cache: dict, key: tuple, candidates, cluster) -> np.ndarray | None:
  """Rows stored under `key` for these very candidates and cluster (the key holds ids,
  so the stored objects are compared too), or None."""
  got = cache.get(key)
  if got is not None and got[0] is candidates and got[1] is cluster:
    return got[2]
  return None


def _op_times(cand: strategies.Candidate, cluster: cluster_lib.Cluster,
              pipelined: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(seconds per op, phase per op) of one candidate, priced as the tables price them.

  pipelined: the ops outside the layer's module calls (the loss) get phase "outside":
  the pipelined runtime runs them once per step, outside the pipeline (not bounded
  here; they only add)."""
  per_op = cost.roofline_time_s(np.asarray(cand.op_flops, dtype=np.float64),
                                np.asarray(cand.op_bytes, dtype=np.float64),
                                cand.op_dtype, cluster)
  phase = np.asarray(cand.op_phase)
  outside = getattr(cand, "op_outside", None)
  if pipelined and outside is not None and np.any(outside):
    phase = np.where(np.asarray(outside, dtype=bool) & (phase != "optimizer"), "outside",
                     phase)
  return per_op, phase


def _comms(cand: strategies.Candidate, pipelined: bool) -> Sequence[strategies.Comm]:
  """The collectives the runtime issues per run of a position holding the candidate:
  inside a pipeline its `pipeline_comms` less the loss's (`cost.inside_comms`), else
  its `comms`."""
  return cost.inside_comms(cand) if pipelined else cand.comms


def _phase_times(candidates: Sequence[strategies.Candidate], mesh: strategies.MeshShape,
                 cluster: cluster_lib.Cluster, cache: dict,
                 pipelined: bool = False) -> np.ndarray:
  """[6, candidate], at least what `cost.runtime_step_time_s` charges a position
  holding the candidate (see the comment above `_runs`): forward compute per forward
  run, forward collectives per pass, backward compute and collectives per backward
  run (with the forward again for a candidate that recomputes its activations),
  once per step on its own position, optimizer compute (once per step, shared
  by the S stages), and what a recomputation runs again (at most the forward). Once
  per candidate tuple, mesh and `pipelined` (`_op_times`, `_comms`) in `cache`.
  """
  key = ("runtime_phase_rows", id(candidates), mesh, id(cluster), pipelined)
  got = _cached(cache, key, candidates, cluster)
  if got is not None:
    return got
  rows = np.zeros((6, len(candidates)))
  for k, cand in enumerate(candidates):
    per_op, phase = _op_times(cand, cluster, pipelined)
    rows[0, k] = float(per_op[phase == "forward"].sum())
    rows[2, k] = float(per_op[phase == "backward"].sum())
    rows[4, k] = float(per_op[phase == "optimizer"].sum())
    rows[5, k] = min(_rerun_s(cand, per_op, phase), rows[0, k])
    if cand.recompute:  # under jax.checkpoint: what its backward reads of its forward
      rows[2, k] += _rerun_s(cand, per_op, phase)
    sharded = _param_axes(cand)
    for comm in _comms(cand, pipelined):
      if not comm.axes or not set(comm.axes) <= sharded or comm.phase == "recompute":
        continue  # may be skipped: over a manual axis, or closing a recomputed output
      t = cost.comm_time_s(comm, mesh, cluster) * comm.count
      if comm.per_step:
        rows[3 if comm.phase == "optimizer" else 2, k] += t
      elif comm.phase == "forward" and comm.kind != "all-gather":
        rows[1, k] += t  # (parameter gathers are hoisted out of the loops)
      elif comm.phase == "backward":
        rows[2, k] += t
  cache[key] = (candidates, cluster, rows)
  return rows


def _rerun_s(cand: strategies.Candidate, per_op: np.ndarray,
             phase: np.ndarray | None = None) -> float:
  """Seconds of what a recomputation of the candidate's forward runs again
  (`Candidate.op_rerun`; all of the forward where candidates do not say), without the
  ops `phase` (from `_op_times`) puts outside."""
  phase = np.asarray(cand.op_phase) if phase is None else phase
  rerun = getattr(cand, "op_rerun", None)
  if rerun is None:
    return float(per_op[phase == "forward"].sum())
  return float(per_op[np.asarray(rerun, dtype=bool) & (phase != "outside")].sum())


def _runtime_layer_bound(layers: Sequence[cost.LayerCosts], config: Config,
                         cluster: cluster_lib.Cluster, cache: dict | None = None, *,
                         memory_cap: float | None = None,
                         executor: str | None = None) -> float:
  """`runtime_bound` from the layers' own candidates (level 2; also on tables' layers).

  Valid for layers costed at this configuration's micro-batch: the tables keep a
  subset of those candidates, so minima over them are at most the chosen ones'.
  With one stage and one micro-batch the runtime is the summed solver times, so
  their least sum bounds it as well.

  memory_cap: bytes per device the layers may use (limit less the reserve), or None.
  With it, the bound also respects memory, by Lagrangian relaxation: the busiest
  stage is at least the average one, so runtime >= (1/S) sum over layers of v(k),
  v = w + optimizer compute (+ summed solver time with one stage and one
  micro-batch), over assignments whose least memory m(k) (activations of the
  fewest micro-batches any stage holds) sums to at most S x memory_cap; for every
  lambda >= 0 that is at least (1/S) (sum over layers of min_k (v + lambda m) -
  lambda S memory_cap). The fastest candidates often do not fit (large models),
  which the plain bound ignores. `executor`: the memory model the solver's
  constraint sums (None: the paper's, `_least_memory`).
  """
  cache = {} if cache is None else cache
  if any(not l.candidates for l in layers):
    return math.inf
  c, s, mesh = config.num_microbatches, config.num_stages, config.mesh
  fr, fc, br = _runs(config.executor, s, c)
  passes = _split(config.executor, s, c)[0]
  read = {v for l in layers for v in l.input_ids}
  least_memory = _least_memory(layers, config, executor)
  groups: dict[tuple, list] = {}  # (id(candidates), read, id(m)) -> [count, v, m, ...]
  weights, optimizer_s, solver_s = [], 0.0, 0.0
  for l, m in zip(layers, least_memory):
    # A recomputation runs all of a layer whose output is read, else only what its
    # backward reads (the runtime's terminal positions).
    consumed = any(v in read for v in l.output_ids)
    gkey = (id(l.candidates), consumed, m.tobytes())
    got = groups.get(gkey)
    if got is None:
      fwd, fwd_comm, bwd, once, opt, rerun = _phase_times(
          l.candidates, mesh, cluster, cache, pipelined=not (s == 1 and c == 1))
      solver_t = np.asarray(l.microbatch_time_s) + np.asarray(l.step_time_s) / c
      forward = fr * fwd if consumed else passes * fwd + (fr - passes) * rerun
      w = forward + fc * fwd_comm + br * bwd + once
      v = w + opt
      if s == 1 and c == 1:
        v = np.maximum(v, solver_t)
      got = groups[gkey] = [
          0, v, m, float(np.min(w)), float(np.min(opt)), float(np.min(solver_t))]
    got[0] += 1
    weights.append(got[3])
    optimizer_s += got[4]
    solver_s += got[5]
  bound = runtime_bound(weights, optimizer_s, num_stages=s)
  if s == 1 and c == 1:
    bound = max(bound, solver_s)
  if memory_cap is not None and math.isfinite(memory_cap):
    budget = s * memory_cap * (1 + solver.MEMORY_RTOL)
    parts = [(n, v, m) for n, v, m, *_ in groups.values()]
    bound = max(bound, _lagrangian_bound(parts, budget) / s)
  return bound


def _lagrangian_bound(parts: Sequence[tuple[int, np.ndarray, np.ndarray]],
                      budget: float) -> float:
  """max over lambda >= 0 of sum over groups of n x min_k (v + lambda m) - lambda budget:
  a lower bound on the least sum of v over one candidate per item (n items per group)
  whose m sum to at most `budget` (weak duality). The dual is concave in lambda; a
  bisection on its slope finds its top, and every value it visits is a valid bound."""

  def dual(lam: float) -> tuple[float, float]:
    value, used = -lam * budget, 0.0
    for n, v, m in parts:
      k = int(np.argmin(v + lam * m))
      value += n * float(v[k] + lam * m[k])
      used += n * float(m[k])
    return value, used

  best, used = dual(0.0)
  if used <= budget:
    return best  # the fastest candidates fit: memory adds nothing
  spread_v = sum(n * float(np.ptp(v)) for n, v, _ in parts)
  spread_m = sum(n * float(np.ptp(m)) for n, _, m in parts)
  if spread_v <= 0 or spread_m <= 0:
    return best
  scale = spread_v / spread_m
  lo, hi = math.log(scale * 1e-9), math.log(scale * 1e9)
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    value, used = dual(math.exp(mid))
    best = max(best, value)
    if used > budget:
      lo = mid  # still over the budget: a larger price on memory
    else:
      hi = mid
    if hi - lo < 1e-4:
      break
  return best


def runtime_lower_bound(tables: cost.CostTables) -> float:
  """A cheap bound on `cost.runtime_step_time_s` of any assignment of the tables that
  fits their memory limit, under the executor of their schedule (see the comment
  above `runtime_bound`), in the tables' memory model (`CostTables.executor`)."""
  config = Config(num_stages=tables.num_stages, mesh=tables.mesh,
                  num_microbatches=tables.num_microbatches, schedule=tables.schedule)
  cap = max(tables.memory_limit_bytes - tables.reserve_bytes, 0.0)
  return _runtime_position_bound(tables.layers, config, tables.cluster, memory_cap=cap,
                                 executor=tables.executor)


# The position bound (level 2 under "runtime", and on built tables). The lockstep
# program has one layer position per element of a common supersequence of the stages'
# sequences of layer kinds; `cost` keys a position by (signature, parameter specs,
# recompute flag), so grouping by signature alone is coarser: for every signature g,
# the positions of signature g number at least the most layers of g on any one stage,
# m_g = max over stages of c_s(g) >= max(1, ceil(N_g / S)), and each costs at least the
# least per-position figure over the candidates of any layer of g (the runtime prices
# a position by one of its layers' candidates). So the runtime is at least
#   sum over g of [m_g x w_g + 2 send(m_g x least parameter bytes of g)]   (S > 1:
#       the stacks' all-to-alls, once per step; send time is affine, so subadditive;
#       signatures that share a stack key share stacks, with at least the slots of
#       each: only the first of them is charged)
#   + permutes x send(least bytes of a value between layers)               (S > 1)
#   + optimizer compute / S.
# m_g is taken as the least over contiguous splits into at most S stages whose stages
# also fit memory with every layer at its least memory (`_least_counts`): with two
# repeated kinds (an encoder and a decoder) contiguity keeps them on separate stages.
# Per-position figures (with (passes, table, recompute, backward, permutes) the runs of
# `_split`): forward compute and forward collectives x (passes + recomputations),
# except for a layer whose output no layer reads (its position may be terminal:
# recomputations rerun only `op_rerun`, and none of its forward collectives); all-
# gathers, which `cost` treats as hoisted parameter gathers, once per loop (1, one
# more with recomputations, plus the backward runs under autodiff GPipe); backward
# compute (with what a recomputing candidate reruns) and backward, gradient-
# synchronisation and non-all-reduce "recompute" collectives x backward runs;
# optimizer collectives once. Collectives count only over axes the candidate shards
# parameters over (never manual), as in `_phase_times`. Under 1F1B the positions
# that lead to a send also run the table's forwards (`_live_bound`).


def _split(executor: str, num_stages: int, num_microbatches: int
           ) -> tuple[int, int, int, int, int]:
  """(passes, table forwards, recomputations, backward runs, permutes): how many
  times, at least, the lockstep time charges each kind of run's work per step,
  whether or not the runtime skips idle ticks' work (`cost.runtime_skips_idle`).

  From `cost.runtime_ticks` with skipping, where a tick costs its busiest device's
  work: a pass tick a pass forward, a table tick with a forward and a backward on one
  device both, one with forwards only a table forward, and one with a backward run
  (with or without a forward elsewhere: max(Ft, R + B) >= R + B) a recomputation and
  a backward. Without skipping every table tick charges both, which is no less.
  Parameter gathers hoisted without skipping run at least once per loop either way.
  """
  if num_stages == 1 and num_microbatches == 1:
    return 1, 0, 0, 1, 0
  permutes = cost.runtime_runs(executor, num_stages, num_microbatches)[2]
  passes, both, mixed, forward, backward = cost.runtime_ticks(
      executor, num_stages, num_microbatches, skip_idle=num_stages > 1)
  if executor == "gpipe":
    return passes, 0, 0, backward, permutes
  runs = both + mixed + backward
  return passes, both + forward, runs, runs, permutes


def _position_rows(candidates: Sequence[strategies.Candidate], mesh: strategies.MeshShape,
                   cluster: cluster_lib.Cluster, cache: dict) -> np.ndarray:
  """[9, candidate]: forward compute, backward compute (+ what a recomputation runs
  again, when recomputing), forward all-gathers, forward all-reduces, other forward
  collectives, per-backward-run collectives, optimizer collectives, optimizer compute,
  what a recomputation runs again (at most the forward); seconds per execution inside
  a pipeline (the loss's ops and collectives left out: they run once per step outside
  it, `_op_times`, `_comms`)."""
  key = ("runtime_position_rows", id(candidates), mesh, id(cluster))
  got = _cached(cache, key, candidates, cluster)
  if got is not None:
    return got
  rows = np.zeros((9, len(candidates)))
  for k, cand in enumerate(candidates):
    per_op, phase = _op_times(cand, cluster, pipelined=True)
    rows[0, k] = float(per_op[phase == "forward"].sum())
    rerun = _rerun_s(cand, per_op, phase)
    rows[1, k] = float(per_op[phase == "backward"].sum()) + (rerun if cand.recompute
                                                            else 0.0)
    rows[8, k] = min(rerun, rows[0, k])
    rows[7, k] = float(per_op[phase == "optimizer"].sum())
    sharded = _param_axes(cand)
    for comm in _comms(cand, pipelined=True):
      if not comm.axes or not set(comm.axes) <= sharded:
        continue  # may be over a manual axis: not issued inside the body
      t = cost.comm_time_s(comm, mesh, cluster) * comm.count
      if comm.per_step:
        rows[6 if comm.phase == "optimizer" else 5, k] += t
      elif comm.phase == "forward":
        rows[{"all-gather": 2, "all-reduce": 3}.get(comm.kind, 4), k] += t
      elif comm.phase == "backward" or (comm.phase == "recompute" and
                                        comm.kind != "all-reduce"):
        rows[5, k] += t  # (a "recompute" all-reduce may close the output: not reissued)
  cache[key] = (candidates, cluster, rows)
  return rows


def _least_counts(kinds: Sequence[int], counts: Sequence[int],
                  memory: Sequence[Sequence[float]] | None, cap: float, num_stages: int,
                  cost_of: Callable[[Sequence[int]], float]) -> float:
  """min over contiguous splits into at most num_stages stages (each fitting `cap`
  with the least memory `memory[layer][stage]`) of cost_of(per kind, the most layers
  of that kind on one stage); `kinds[i]` is layer i's kind, `counts[g]` kind g's
  layers. cost_of must be non-decreasing in every count. A lower bound on it when the
  caps to try are too many (the pigeonhole caps), math.inf when nothing fits."""
  s = num_stages
  lo = [max(1, -(-n // s)) if n else 0 for n in counts]
  if memory is not None:
    cap *= 1 + solver.MEMORY_RTOL

  def fits(caps: Sequence[int]) -> bool:
    """Greedy: each stage takes layers while caps and memory allow (exact, as for
    `_fits`: a stage's constraints hold on any part of a segment that meets them)."""
    stage, acc, used = 0, 0.0, [0] * len(counts)
    for i, g in enumerate(kinds):
      if caps[g] < 1:
        return False
      while used[g] >= caps[g] or (memory is not None and acc + memory[i][stage] > cap):
        if stage + 1 == s:
          return False
        stage, acc, used = stage + 1, 0.0, [0] * len(counts)
      used[g] += 1
      if memory is not None:
        acc += memory[i][stage]
    return True

  multi = [g for g, n in enumerate(counts) if n > lo[g]]
  if not multi:
    return cost_of(lo) if fits(lo) else math.inf
  ranges = [range(lo[g], counts[g] + 1) for g in multi]
  if math.prod(len(r) for r in ranges[:-1]) > 4096:
    return cost_of(lo)
  best = math.inf
  last = multi[-1]
  for head in itertools.product(*ranges[:-1]):
    caps = list(lo)
    for g, m in zip(multi, head):
      caps[g] = m
    if cost_of(caps) >= best:
      continue
    caps[last] = counts[last]
    if not fits(caps):
      continue
    a, b = lo[last], counts[last]  # the least cap of the last kind that fits: bisection
    while a < b:
      mid = (a + b) // 2
      caps[last] = mid
      if fits(caps):
        b = mid
      else:
        a = mid + 1
    caps[last] = a
    best = min(best, cost_of(caps))
  return best


def _runtime_position_bound(layers: Sequence[cost.LayerCosts], config: Config,
                            cluster: cluster_lib.Cluster, cache: dict | None = None, *,
                            memory_cap: float | None = None,
                            executor: str | None = None) -> float:
  """The position bound (see the comment above `_split`), and never less than
  `_runtime_layer_bound`: a lower bound on `cost.runtime_step_time_s` of any
  assignment of layers costed at this configuration's micro-batch (or of tables built
  from them: their candidates are a subset) that fits `memory_cap` bytes per device
  (limit less the reserve; None: memory not considered) in the memory model of the
  solver's constraint (`executor` None: the paper's; else the runtime model's)."""
  cache = {} if cache is None else cache
  old = _runtime_layer_bound(layers, config, cluster, cache, memory_cap=memory_cap,
                             executor=executor)
  c, s, mesh = config.num_microbatches, config.num_stages, config.mesh
  if math.isinf(old) or not layers or (s == 1 and c == 1):
    return old
  passes, table, recompute, backward, permutes = _split(config.executor, s, c)
  autodiff = not recompute and passes > 1  # GPipe by autodiff: backward runs regather
  gather_runs = 1 + (backward if autodiff else 0) + (1 if recompute else 0)
  read = {v for l in layers for v in l.input_ids}
  kind_of: dict[str, int] = {}
  weight: list[float] = []
  param_bytes: list[float] = []
  kinds: list[int] = []
  optimizer_s = 0.0
  least_send = math.inf
  position = {v: i for i, l in enumerate(layers) for v in l.output_ids}
  # Values the loss's ops make (`Candidate.outside_outputs`, alike for a layer's
  # candidates) are computed outside the pipeline: no buffer slot carries them.
  outside_made = {v for l in layers if l.candidates
                  for v, out in zip(l.output_ids,
                                    getattr(l.candidates[0], "outside_outputs", ())) if out}
  last_reader: dict[int, int] = {}
  for i, l in enumerate(layers):
    for v in l.input_ids:
      if v in position and position[v] < i and v not in outside_made:
        last_reader[v] = max(last_reader.get(v, i), i)
  reaches = [False] * len(layers)  # whether a layer's outputs lead to the last layer
  if layers:
    reaches[-1] = True
  readers: dict[int, list[int]] = {}
  for i, l in enumerate(layers):
    for v in l.input_ids:
      if v in position and position[v] < i:
        readers.setdefault(position[v], []).append(i)
  for i in range(len(layers) - 2, -1, -1):
    reaches[i] = any(reaches[j] for j in readers.get(i, ()))
  live_weight: list[float] = []
  stack_keys: dict[str, set[int]] = {}
  per_layer: list[tuple[int, bool, np.ndarray]] = []
  for i, l in enumerate(layers):
    rows = _position_rows(l.candidates, mesh, cluster, cache)
    consumed = any(v in read for v in l.output_ids)
    if consumed:  # its position is not terminal: recomputations run all of it
      w = ((passes + recompute) * (rows[0] + rows[3] + rows[4]) + gather_runs * rows[2])
    else:  # maybe terminal: recomputations rerun only what its backward reads
      w = passes * (rows[0] + rows[3] + rows[4]) + recompute * rows[8] + (
          gather_runs - (1 if recompute else 0)) * rows[2]
    w = w + backward * (rows[1] + rows[5]) + rows[6]
    g = kind_of.setdefault(l.signature, len(weight))
    if g == len(weight):
      weight.append(math.inf)
      live_weight.append(math.inf)
      param_bytes.append(math.inf)
    weight[g] = min(weight[g], float(w.min()))
    per_layer.append((g, consumed, w))
    if reaches[i]:  # on a stage before the last, it leads to a send: its position is live
      w = w + table * (rows[0] + rows[3] + rows[4]) + min(table, 1) * rows[2]
    live_weight[g] = min(live_weight[g], float(w.min()))
    param_bytes[g] = min(param_bytes[g], min(float(k.param_bytes) for k in l.candidates))
    stack_keys.setdefault(l.stack_key or l.signature, set()).add(g)
    kinds.append(g)
    optimizer_s += float(rows[7].min())
    for j, v in enumerate(l.output_ids):
      if v in last_reader:
        least_send = min(least_send, min(
            l.output_nbytes[j] / strategies.shard_count(k.output_layouts[j], mesh.sizes)
            for k in l.candidates))
  # `cost` stacks the parameters of signatures with one stack key together (one kind
  # of call in apply), with at least the slots of each: only one of them is charged.
  for gs in stack_keys.values():
    for g in sorted(gs)[1:]:
      param_bytes[g] = 0.0
  counts = [kinds.count(g) for g in range(len(weight))]
  sends = 0.0
  if s > 1 and math.isfinite(least_send):
    covered = np.zeros(len(layers) + 1)
    for v, last in last_reader.items():
      covered[position[v] + 1] += 1
      covered[last + 1] -= 1
    if np.all(np.cumsum(covered)[1:len(layers)] > 0):  # every stage boundary is crossed
      sends = permutes * cost.send_time_s(least_send, mesh.num_devices, cluster)

  def stacks(g: int, m: int) -> float:
    """The all-to-alls of kind g's stacks (m slots), there and back, once per step."""
    if s == 1 or not param_bytes[g] > 0:
      return 0.0
    return 2 * cost.send_time_s(m * param_bytes[g], mesh.num_devices, cluster)

  def cost_of(caps: Sequence[int]) -> float:
    return sum(m * weight[g] + stacks(g, m) for g, m in enumerate(caps))

  memory = None
  cap = math.inf
  if memory_cap is not None and math.isfinite(memory_cap):
    memory, cap = _stage_memory(layers, config, 1.0, executor), memory_cap
  least = _least_counts(kinds, counts, memory, cap, s, cost_of)
  if memory is not None:
    least = max(least, _position_lagrangian(layers, config, per_layer, counts, memory_cap,
                                            executor)
                + sum(stacks(g, -(-n // s)) for g, n in enumerate(counts)))
  if table and s > 1:  # live positions run the table's forwards too (`_live_bound`)
    least = max(least, _live_bound(kinds, counts, weight, live_weight, s, stacks))
  return max(old, least + sends + optimizer_s / s)


def _position_lagrangian(layers: Sequence[cost.LayerCosts], config: Config,
                         per_layer: Sequence[tuple[int, bool, np.ndarray]],
                         counts: Sequence[int], memory_cap: float,
                         executor: str | None = None) -> float:
  """The positions' compute and collectives under memory, by Lagrangian relaxation.

  The positions of kind g cost at least, on any one stage s, the sum over its layers
  of kind g of what their keys' positions cost; averaged over the at most
  min(S, N_g) stages that hold layers of g, at least (1 / min(S, N_g)) x the sum over
  the layers of g. A layer's key (parameter specs, recompute flag) is what its
  position shares, so each key counts at the least figure and least memory of its
  candidates (v_K, m_K; a position is priced by one of its layers' candidates, not
  necessarily this layer's). The layers' memory sums to at most S x memory_cap, so
  for every lambda >= 0 the cost is at least sum over layers of
  min_K (v_K / min(S, N_g) + lambda m_K) - lambda S memory_cap (`_lagrangian_bound`).
  m is the least memory the solver's constraint charges (`_least_memory`, in the
  model `executor` names).
  """
  s = config.num_stages
  groups: dict[tuple, list] = {}
  for l, (g, consumed, w), m in zip(layers, per_layer, _least_memory(layers, config, executor)):
    key = (id(l.candidates), consumed, g, m.tobytes())
    got = groups.get(key)
    if got is None:
      by_key: dict[tuple, tuple[float, float]] = {}
      for k, cand in enumerate(l.candidates):
        kk = (tuple(cand.param_specs), cand.recompute)
        v0, m0 = by_key.get(kk, (math.inf, math.inf))
        by_key[kk] = (min(v0, float(w[k])), min(m0, float(m[k])))
      share = min(s, counts[g])
      got = groups[key] = [0, np.array([v / share for v, _ in by_key.values()]),
                           np.array([m for _, m in by_key.values()])]
    got[0] += 1
  budget = s * memory_cap * (1 + solver.MEMORY_RTOL)
  return _lagrangian_bound([tuple(x) for x in groups.values()], budget)


def _live_bound(kinds: Sequence[int], counts: Sequence[int], weight: Sequence[float],
                live_weight: Sequence[float], num_stages: int,
                stack_cost: Callable[[int, int], float]) -> float:
  """A lower bound on the positions' cost counting live ones (1F1B's table forwards).

  The last stage is a suffix of the layers. For a suffix holding x_g layers of kind g,
  the other S - 1 stages hold N_g - x_g, so some stage before the last holds at least
  a_g = ceil((N_g - x_g) / (S - 1)) of them, whose positions are live (a layer whose
  outputs lead to the last layer feeds a send from any earlier stage), and kind g has
  at least m_g = max(x_g, a_g, ceil(N_g / S)) positions: cost >= a_g x live weight +
  (m_g - a_g) x weight + the stacks' all-to-alls (`stack_cost(g, m_g)`). Least over
  every suffix.
  """
  s, n = num_stages, len(kinds)
  best = math.inf
  suffix = [0] * len(counts)
  for start in range(n, -1, -1):  # the last stage is layers[start:]
    if start < n:
      suffix[kinds[start]] += 1
    total = 0.0
    for g, count in enumerate(counts):
      x = suffix[g]
      a = -(-(count - x) // (s - 1))
      m = max(x, a, -(-count // s))
      total += a * live_weight[g] + (m - a) * weight[g] + stack_cost(g, m)
    best = min(best, total)
  return best
