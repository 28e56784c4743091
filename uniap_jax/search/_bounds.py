"""Lower bounds on a configuration's objective and memory, cheapest first, so that
most configurations are skipped before their tables are built."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import solver
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


def _stage_memory(layers: Sequence[cost.LayerCosts], config: Config,
                  scale: float) -> list[list[float]]:
  """[layer][stage] the least bytes each layer needs on each stage, its activations
  scaled by `scale` (a lower bound when costed at a larger micro-batch)."""
  c, n = config.num_microbatches, config.num_stages
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
                        cache: dict | None = None) -> float:
  """A lower bound on a configuration's optimum, built no further than needed.

  First FLOPs over the stage's devices at the best peak (no costing); if that is
  below `cutoff`, the layers' fastest candidates and least memory at this
  configuration's micro-batch (costed, no edges). math.inf when that shows no
  assignment fits memory. Any method restricted to this configuration, UniAP's MIQP
  included, has an objective at least this large.
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
  check = _check_layers(layers, config, limit=limit, scale=1.0, exact=True)
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
                  scale: float, exact: bool) -> _Check:
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
  """
  if any(not l.candidates for l in layers):
    return _Check(feasible=False)
  c = config.num_microbatches
  reserve = cost.reserve_bytes(layers) if exact else 0.0
  memory = _stage_memory(layers, config, scale)
  if exact:
    over = cost.over_limit(layers, schedule=config.schedule, num_microbatches=c,
                                  num_stages=config.num_stages, limit_bytes=limit)
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
