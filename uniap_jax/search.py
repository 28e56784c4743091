"""The outer loop of UniAP and the public `plan()`.

For every configuration — pipeline degree, intra-stage mesh shape, micro-batch count,
schedule — the cost tables become one `solver.Problem`, and the solver returns its
optimum (or proves it cannot beat the best so far). The best configuration becomes a
`Plan`.

Pruning: building every configuration's tables would dominate on large clusters
(hundreds of configurations, each with its own mesh and micro-batch size), so each
configuration is bounded before it is built, cheapest bound first: FLOPs over
devices at peak; its mesh's layers costed once at the largest micro-batch, scaled
down; its own layers' fastest candidates and least memory (no edges); only then
edges, Problem and solver. Configurations wait in a queue ordered by bound, so the
most promising is solved first and every configuration whose bound reaches the
incumbent is skipped unbuilt; the solver also receives the incumbent and stops as
soon as it proves that nothing better exists. The order is a function of the
inputs alone, so the same inputs give the same plan on every host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import solver
from uniap_jax import strategies

logger = logging.getLogger(__name__)

_GIB = 2**30
MAX_MICROBATCHES = 64  # micro-batch counts searched by default are divisors up to this
# The fine-grained mesh view (one axis per prime factor, `strategies.mesh_shapes`) is
# searched up to this many axes. Its candidates grow about threefold per axis (a
# Llama block: 1,400 on 4 axes, 9,800 on 6, 21 s to cost at 6), and so do its edge
# tables, squared; the flat and dp x tp meshes are always searched.
MAX_FINE_AXES = 4


class InfeasibleError(ValueError):
  """No configuration fits the per-device memory limit.

  Attributes:
    needed_bytes: the least per-device memory any configuration needs.
    limit_bytes: the per-device limit it was compared with.
  """

  def __init__(self, message: str, *, needed_bytes: float, limit_bytes: float):
    super().__init__(message)
    self.needed_bytes = needed_bytes
    self.limit_bytes = limit_bytes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
  """One point of the outer loop."""

  num_stages: int
  mesh: strategies.MeshShape
  num_microbatches: int
  schedule: str

  def describe(self) -> str:
    mesh = "x".join(f"{k}{v}" for k, v in self.mesh.as_dict().items())
    return f"pp={self.num_stages} mesh={mesh} c={self.num_microbatches} {self.schedule}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
  """What the loop reports after each configuration (for progress bars and logs)."""

  done: int
  total: int
  config: Config
  status: str  # the solver's status for this configuration, or "pruned"
  incumbent: float  # best step time so far (inf before the first plan)
  bound: float  # this configuration's proven lower bound


def plan(step: Callable[..., Any], *args: Any, cluster: cluster_lib.Cluster,
         batch_argnums: Sequence[int] | None = None, pp: int | None = None,
         num_microbatches: int | None = None, schedule: str | None = None,
         memory_limit_bytes: float | None = None, time_limit_s: float = 60.0,
         global_batch: int | None = None,
         progress: Callable[[Progress], None] | None = None) -> plans.Plan:
  """Chooses mesh axes, PartitionSpecs and pipeline stages for one train step.

  Traces `step` on shapes only, costs every layer's candidate shardings on `cluster`,
  and solves one UniAP MIQP per (pp, mesh shape, micro-batches, schedule) choice.

  Args:
    step: the train step as the user calls it; its last argument is the batch.
    *args: its arguments; ShapeDtypeStructs and nnx.eval_shape models suffice.
    cluster: the target machines, e.g. Cluster.preset("a100-40g-2x8").
    batch_argnums: which arguments are batch; default the last one.
    pp: pins the pipeline degree; it must divide cluster.num_devices.
    num_microbatches: pins the micro-batch count; it must divide the global batch.
    schedule: pins "gpipe" or "1f1b"; default both are searched.
    memory_limit_bytes: per-device limit; default the cluster's device memory.
    time_limit_s: wall-clock budget of the whole outer loop, in seconds.
    global_batch: samples per step; default the batch's leading dimension.
    progress: called after each configuration with a `Progress`.
  Returns:
    A Plan, optimal under the cost model or carrying the solver's gap.
  Raises:
    ValueError: the inputs cannot be planned; the message says which and why.
    InfeasibleError: no configuration fits memory; says how much is needed.

  References: Lin et al., UniAP, CVPR 2025, Sec. 3.3 and Algorithm 1.
  """
  graph = graph_lib.trace(step, *args, batch_argnums=batch_argnums)
  return plan_graph(graph, cluster, args=args, pp=pp, num_microbatches=num_microbatches,
                    schedule=schedule, memory_limit_bytes=memory_limit_bytes,
                    time_limit_s=time_limit_s, global_batch=global_batch, progress=progress)


def configurations(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
                   pp: int | None = None, num_microbatches: int | None = None,
                   schedule: str | None = None, global_batch: int) -> tuple[Config, ...]:
  """The outer loop's points, in a fixed order (the search visits them best bound first).

  Every pipeline degree dividing the devices (at most one stage per layer), every
  stage mesh of `strategies.mesh_shapes` (the fine view up to MAX_FINE_AXES axes),
  every micro-batch count dividing the global batch (up to MAX_MICROBATCHES, at least
  the pipeline degree), both schedules where they differ.

  Raises:
    ValueError: a pinned knob is not allowed; the message lists the values that are.
  """
  n = cluster.num_devices
  divisors = [d for d in range(1, n + 1) if n % d == 0]
  if pp is not None:
    if not isinstance(pp, int) or isinstance(pp, bool) or pp not in divisors:
      raise ValueError(f"pp={pp!r} does not divide the cluster's {n} devices. Use pp in "
                       f"{', '.join(map(str, divisors))}, or leave it unset.")
    if pp > len(graph.layers):
      raise ValueError(f"pp={pp} needs at least {pp} layers but the step has "
                       f"{len(graph.layers)}. Use pp <= {len(graph.layers)}.")
    degrees = [pp]
  else:
    degrees = [d for d in divisors if d <= len(graph.layers)]
  batch_divisors = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
  if num_microbatches is not None:
    if (not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool)
        or num_microbatches not in batch_divisors):
      raise ValueError(
          f"global_batch={global_batch} does not split into num_microbatches="
          f"{num_microbatches!r} equal micro-batches. Choose num_microbatches from "
          f"{', '.join(map(str, batch_divisors))}, or change global_batch.")
    counts = [num_microbatches]
  else:
    counts = [d for d in batch_divisors if d <= MAX_MICROBATCHES]
  if schedule is not None and schedule not in cost.SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(cost.SCHEDULES)}.")
  out = []
  for degree in degrees:
    for mesh in strategies.mesh_shapes(cluster, n // degree):
      if mesh.kind == "fine" and len(mesh.axes) > MAX_FINE_AXES:
        continue
      for c in counts:
        if degree > 1 and num_microbatches is None and c < degree:
          continue  # fewer micro-batches than stages leaves stages idle by construction
        # One stage and one micro-batch: the schedules coincide. One stage and several
        # micro-batches is gradient accumulation: "1f1b" keeps one micro-batch in flight.
        schedules = [schedule] if schedule else (
            ["gpipe"] if degree == 1 and c == 1 else list(cost.SCHEDULES))
        for sched in schedules:
          out.append(Config(num_stages=degree, mesh=mesh, num_microbatches=c, schedule=sched))
  if not out:
    raise ValueError(f"No configuration to search: pp={pp}, num_microbatches="
                     f"{num_microbatches}, global_batch={global_batch}.")
  return tuple(out)


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


def plan_graph(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
               args: Sequence[Any] | None = None, pp: int | None = None,
               num_microbatches: int | None = None, schedule: str | None = None,
               memory_limit_bytes: float | None = None, time_limit_s: float = 60.0,
               global_batch: int | None = None,
               progress: Callable[[Progress], None] | None = None,
               cache: dict | None = None) -> plans.Plan:
  """`plan` on an already traced graph (the part `Plan.solver.time_s` measures).

  Configurations are visited best bound first, each bound tightened step by step
  before anything dearer is built: (0) FLOPs over the stage's devices at the best
  peak, no costing at all; (1) the layers costed once per stage mesh at its largest
  micro-batch, scaled down to this configuration's; (2) the layers costed at its own
  micro-batch (fastest candidates, least memory per stage); (3) edges, the Problem
  and the solver. A configuration whose bound reaches the incumbent is pruned, and
  since the queue is ordered by bound, so is every one after it. The order depends
  only on the inputs (ties by configuration order), so every host gets the same plan
  unless the time limit stops the search. A first solve gets at most a quarter of
  the time left; one it stops returns to the queue at its proven bound.

  Args:
    graph, cluster, pp, num_microbatches, schedule, memory_limit_bytes, global_batch,
      progress: as in `plan`.
    args: the step's arguments, used only to shape `param_specs` / `batch_specs` as
      pytrees mirroring them; without them the trees are nested dicts by leaf path.
    time_limit_s: wall-clock budget of the whole search (costing included), seconds.
    cache: a dict of cost tables to share with other searches and baselines on the
      same graph and cluster (`cost.build_cost_tables`); default a fresh one.
  """
  if not isinstance(cluster, cluster_lib.Cluster):
    raise TypeError(f"cluster must be a uniap_jax.Cluster (e.g. Cluster.preset('cpu-8')), "
                    f"got {type(cluster).__name__}")
  if isinstance(time_limit_s, bool) or not (
      isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
    raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
  if memory_limit_bytes is not None and not memory_limit_bytes > 0:
    raise ValueError(f"memory_limit_bytes must be positive, got {memory_limit_bytes!r}")
  if cache is not None and not isinstance(cache, dict):
    raise TypeError(f"cache must be a dict (shared between searches on the same graph and "
                    f"cluster) or None, got {type(cache).__name__}")
  global_batch = graph.batch_size if global_batch is None else global_batch
  if not isinstance(global_batch, int) or global_batch < 1:
    raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
  configs = configurations(graph, cluster, pp=pp, num_microbatches=num_microbatches,
                           schedule=schedule, global_batch=global_batch)
  start = time.perf_counter()
  deadline = start + time_limit_s
  cache = {} if cache is None else cache
  limit = cluster.memory_bytes if memory_limit_bytes is None else memory_limit_bytes
  loop = _Search(graph=graph, cluster=cluster, configs=configs, cache=cache, limit=limit,
                 memory_limit_bytes=memory_limit_bytes, global_batch=global_batch,
                 deadline=deadline, progress=progress)
  loop.run()
  elapsed = time.perf_counter() - start
  best = loop.best
  if best is None:
    if loop.errors and len(loop.errors) == len(configs):
      raise ValueError("No configuration could be costed: " + loop.errors[0])
    if loop.open_bounds:
      first = loop.first_solve_s
      hint = f"; the first configuration alone took {first:.2f} s" if first else ""
      raise ValueError(
          f"time_limit_s={time_limit_s} ran out before any plan was found{hint}. "
          f"Try time_limit_s >= {max(10 * (first or 1.0) * len(configs), 60):.0f}, "
          "or pin pp= and num_microbatches= to search fewer configurations.")
    least = loop.least_memory()
    raise InfeasibleError(
        f"No plan fits: the leanest configuration needs {least / _GIB:.2f} GiB per "
        f"device; the limit is {limit / _GIB:.2f} GiB ({cluster.name!r}). Try more devices, "
        "a larger pp, schedule='1f1b', a smaller global_batch, or memory_limit_bytes= if the "
        "limit is wrong.", needed_bytes=least, limit_bytes=limit)
  objective, config, tables, sol = best
  proven = min(loop.open_bounds + [objective])
  gap = 0.0 if not loop.open_bounds else max(0.0, (objective - proven) / objective)
  stats = plans.SolverStats(status="optimal" if gap == 0.0 else "time_limit", gap=gap,
                            time_s=loop.solve_s, search_time_s=elapsed,
                            configurations=len(configs), skipped=loop.skipped)
  return build_plan(graph, cluster, config, tables, sol, stats=stats,
                    global_batch=global_batch, args=args)


class _Search:
  """The outer loop's state: a queue of (bound, level, configuration index)."""

  def __init__(self, *, graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster,
               configs: Sequence[Config], cache: dict, limit: float,
               memory_limit_bytes: float | None, global_batch: int, deadline: float,
               progress: Callable[[Progress], None] | None):
    self.graph, self.cluster, self.configs, self.cache = graph, cluster, configs, cache
    self.limit, self.memory_limit_bytes = limit, memory_limit_bytes
    self.global_batch, self.deadline, self.progress = global_batch, deadline, progress
    self.best: tuple[float, Config, cost.CostTables, solver.Solution] | None = None
    self.open_bounds: list[float] = []  # bounds of configurations not proven
    self.errors: list[str] = []
    self.skipped = 0
    self.done = 0
    self.solve_s = 0.0
    self.first_solve_s: float | None = None
    self._needed: list[float] = []  # least memory of configurations proven infeasible
    self._relaxed_out: list[int] = []  # infeasible by the scaled (relaxed) test only
    # The largest micro-batch each stage mesh is searched with: costed once, it bounds
    # every other micro-batch count on that mesh.
    self._reference: dict[strategies.MeshShape, int] = {}
    for c in configs:
      self._reference[c.mesh] = min(self._reference.get(c.mesh, c.num_microbatches),
                                    c.num_microbatches)

  def _report(self, config: Config, status: str, bound: float) -> None:
    self.done += 1
    if self.progress is not None:
      incumbent = self.best[0] if self.best else math.inf
      self.progress(Progress(done=self.done, total=len(self.configs), config=config,
                             status=status, incumbent=incumbent, bound=bound))
    logger.debug("%d/%d %s: %s (bound %.6g, incumbent %s)", self.done, len(self.configs),
                 config.describe(), status, bound, self.best[0] if self.best else None)

  def _layers(self, config: Config, num_microbatches: int) -> tuple[cost.LayerCosts, ...]:
    return cost.layer_costs(
        self.graph, self.cluster, mesh=config.mesh,
        microbatch=self.global_batch // num_microbatches, cache=self.cache)

  def _flops_bound(self, config: Config, flops: Sequence[tuple[float, float]]) -> float:
    return _flops_bound(config, flops, self.global_batch)

  def run(self) -> None:
    flops = cost.flops_time_bounds(self.graph, self.cluster,
                                          global_batch=self.global_batch, cache=self.cache)
    heap = [(self._flops_bound(c, flops), 0, i) for i, c in enumerate(self.configs)]
    heapq.heapify(heap)
    while heap:
      key, level, i = heapq.heappop(heap)
      config = self.configs[i]
      if time.perf_counter() >= self.deadline:
        self.open_bounds.append(key)
        self._report(config, "time_limit", key)
        continue
      if self.best is not None and key >= self.best[0]:
        self.skipped += 1
        self._report(config, "pruned", key)
        continue
      try:
        if level == 0 and self._reference[config.mesh] != config.num_microbatches:
          reference = self._reference[config.mesh]
          check = _check_layers(self._layers(config, reference), config, limit=self.limit,
                                scale=reference / config.num_microbatches, exact=False)
          if not check.feasible:
            self._relaxed_out.append(i)
            self._report(config, "infeasible", math.inf)
          else:
            heapq.heappush(heap, (max(key, check.bound), 1, i))
          continue
        if level <= 1:
          check = _check_layers(self._layers(config, config.num_microbatches), config,
                                limit=self.limit, scale=1.0, exact=True)
          if not check.feasible:
            self._needed.append(check.needed_bytes)
            self._report(config, "infeasible", math.inf)
          else:
            heapq.heappush(heap, (max(key, check.bound), 2, i))
          continue
        tables = cost.build_cost_tables(
            self.graph, self.cluster, mesh=config.mesh, num_stages=config.num_stages,
            num_microbatches=config.num_microbatches, global_batch=self.global_batch,
            schedule=config.schedule, memory_limit_bytes=self.memory_limit_bytes,
            cache=self.cache)
      except ValueError as e:
        self.errors.append(f"{config.describe()}: {e}")
        self._report(config, "error", math.inf)
        continue
      retry = self._solve(config, tables, key, last=level == 3)
      if retry is not None:
        heapq.heappush(heap, (retry, 3, i))

  def _solve(self, config: Config, tables: cost.CostTables, key: float, *,
             last: bool) -> float | None:
    """Solves one configuration; returns its proven bound when it should be tried
    again (stopped by its share of the budget), else None."""
    incumbent = self.best[0] if self.best else None
    problem = to_problem(tables)
    t0 = time.perf_counter()
    # One hard configuration may not eat the whole budget at first: each first try
    # gets a quarter of what is left (at least a second); one it stops goes back into
    # the queue at its proven bound and gets all the time left when it comes up again
    # (if the incumbent has not overtaken that bound by then).
    remaining = self.deadline - t0
    limit_s = remaining if last else min(remaining, max(remaining / 4, 1.0))
    sol = solver.solve(problem, time_limit_s=max(limit_s, 1e-3), incumbent=incumbent)
    dt = time.perf_counter() - t0
    self.solve_s += dt
    self.first_solve_s = dt if self.first_solve_s is None else self.first_solve_s
    bound = max(key, sol.bound)
    if sol.choice and (self.best is None or sol.objective < self.best[0]):
      self.best = (sol.objective, config, tables, sol)
    if sol.status == "time_limit" and not last and time.perf_counter() < self.deadline:
      return bound
    if sol.status == "infeasible":
      self._needed.append(sol.min_peak_memory + tables.reserve_bytes)
    elif sol.status == "cutoff":
      self.skipped += 1
    elif sol.status == "time_limit":
      self.open_bounds.append(bound)
    self._report(config, sol.status, bound)
    return None

  def least_memory(self) -> float:
    """The least per-device memory any configuration needs (for the error message):
    those ruled out by the relaxed test alone are costed exactly now."""
    needed = list(self._needed)
    for i in self._relaxed_out:
      config = self.configs[i]
      try:
        check = _check_layers(self._layers(config, config.num_microbatches), config,
                              limit=self.limit, scale=1.0, exact=True)
      except ValueError:
        continue
      needed.append(check.needed_bytes)
    return min(needed, default=math.inf)


def build_plan(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, config: Config,
               tables: cost.CostTables, sol: solver.Solution, *, stats: plans.SolverStats,
               global_batch: int, args: Sequence[Any] | None = None) -> plans.Plan:
  """Turns one configuration's solution into a Plan: specs, stages and predictions."""
  names = [l.name for l in graph.layers]
  stages = [[n for n in names if sol.stage[n] == s] for s in range(config.num_stages)]
  mesh_axes = ({"pp": config.num_stages} if config.num_stages > 1 else {})
  mesh_axes.update(config.mesh.as_dict())
  leaf_specs = _leaf_specs(graph, tables, sol.choice)
  num_args = max((i.arg_index for i in graph.inputs), default=-1) + 1
  if args is not None:
    num_args = len(args)
    trees = tuple(_spec_tree(args[i], i, leaf_specs) for i in range(num_args))
  else:
    trees = plans.specs_to_trees(leaf_specs, num_args)
  batch_argnums = graph.batch_argnums
  predicted = _predict(graph, cluster, config, tables, sol, global_batch)
  layer_plans = []
  for l in tables.layers:
    k = sol.choice[l.name]
    layer_plans.append(plans.LayerPlan(
        name=l.name, stage=sol.stage[l.name], strategy=l.candidates[k].name,
        kind=l.signature, time_s=float(tables.solver_time_s(l.name)[k]),
        memory_bytes=int(tables.memory_by_stage(l.name)[sol.stage[l.name]][k])))
  activation_specs = {}
  for e in tables.edges:
    src = tables.layer(e.src)
    cand = src.candidates[sol.choice[e.src]]
    specs = dict(zip(src.output_ids, cand.output_specs))
    for v in e.value_ids:
      if v in specs:
        activation_specs[f"{e.src}->{e.dst}"] = PartitionSpec(*specs[v])
        break
  return plans.Plan(
      mesh_axes=mesh_axes, stages=stages, num_microbatches=config.num_microbatches,
      schedule=config.schedule,
      param_specs=tuple(t for i, t in enumerate(trees) if i not in batch_argnums),
      batch_specs=tuple(trees[i] for i in batch_argnums), leaf_specs=tuple(leaf_specs),
      activation_specs=activation_specs, layers=tuple(layer_plans), predicted=predicted,
      solver=stats, cluster=cluster.name, global_batch=global_batch,
      batch_argnums=tuple(batch_argnums), fingerprint=fingerprint(graph),
      leaf_shapes=tuple((i.arg_index, i.path, i.info.shape) for i in graph.inputs))


def fingerprint(graph: graph_lib.LayerGraph) -> str:
  """A hash of the traced program: layer names and signatures, argument leaves."""
  h = hashlib.sha256()
  for l in graph.layers:
    h.update(f"{l.name}:{l.signature};".encode())
  for i in graph.inputs:
    h.update(f"{i.arg_index}:{i.path}:{i.info.shape}:{i.info.dtype}:{i.role};".encode())
  return h.hexdigest()[:16]


def _leaf_specs(graph: graph_lib.LayerGraph, tables: cost.CostTables,
                choice: dict[str, int]) -> list[plans.LeafSpec]:
  """Every argument leaf's spec: parameters from their layer's candidate, optimizer
  state like its parameter, batch leaves from the first layer that reads them."""
  by_path: dict[tuple[int, str], PartitionSpec] = {}
  param_shape: dict[str, tuple[tuple[int, ...], PartitionSpec]] = {}
  batch_spec: dict[int, PartitionSpec] = {}
  for layer in graph.layers:
    costs = tables.layer(layer.name)
    k = choice[layer.name]
    specs = costs.param_specs(k)
    for p in layer.params:
      spec = PartitionSpec(*specs.get(p.path, ()))
      by_path.setdefault((p.arg_index, p.path), spec)
      param_shape.setdefault(p.path, (p.info.shape, spec))
    for v, entries in zip(costs.input_ids, costs.candidates[k].input_specs):
      batch_spec.setdefault(v, PartitionSpec(*entries))
  out: list[plans.LeafSpec] = []
  for leaf in graph.inputs:
    key = (leaf.arg_index, leaf.path)
    if key in by_path:
      spec = by_path[key]
    elif leaf.role == "batch":
      spec = batch_spec.get(leaf.value_id, PartitionSpec())
    elif leaf.role == "optimizer_state":
      spec = _optimizer_leaf_spec(leaf, param_shape)
    else:
      spec = PartitionSpec()
    out.append((leaf.arg_index, leaf.path, spec))
  return sorted(out, key=lambda x: x[:2])


def _optimizer_leaf_spec(leaf: graph_lib.InputInfo,
                         param_shape: dict[str, tuple[tuple[int, ...], PartitionSpec]]
                         ) -> PartitionSpec:
  """An optimizer moment takes the spec of the parameter whose path ends its own."""
  parts = leaf.path.split("/")
  for start in range(len(parts)):
    got = param_shape.get("/".join(parts[start:]))
    if got is not None and got[0] == leaf.info.shape:
      return got[1]
  return PartitionSpec()


def _spec_tree(arg: Any, arg_index: int, leaf_specs: Sequence[plans.LeafSpec]) -> Any:
  """A pytree of PartitionSpecs mirroring one argument (an NNX object as its nnx.State)."""
  specs = {path: spec for i, path, spec in leaf_specs if i == arg_index}
  tree = nnx.state(arg) if isinstance(arg, (nnx.Module, nnx.Optimizer)) else arg
  return jax.tree_util.tree_map_with_path(
      lambda p, _: specs.get(graph_lib.leaf_path(p), PartitionSpec()), tree)


def _predict(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, config: Config,
             tables: cost.CostTables, sol: solver.Solution,
             global_batch: int) -> plans.Predicted:
  """Step time, its parts, memory per stage, MFU and collectives of the chosen plan."""
  c = config.num_microbatches
  stage_times = list(sol.stage_times) or [0.0] * config.num_stages
  send_times = list(sol.send_times)
  slowest = max(stage_times + send_times)
  bottleneck = int(np.argmax(stage_times))
  compute = comm = 0.0
  for l in tables.layers:
    if sol.stage[l.name] != bottleneck:
      continue
    cand = l.candidates[sol.choice[l.name]]
    layer_comm = sum(cost.comm_time_s(x, tables.mesh, cluster) * x.count
                     for x in cand.comms if not x.per_step)
    comm += layer_comm
    compute += l.microbatch_time_s[sol.choice[l.name]] - layer_comm
  memory = []
  for s in range(config.num_stages):
    total = tables.reserve_bytes
    for l in tables.layers:
      if sol.stage[l.name] == s:
        total += tables.memory_by_stage(l.name)[s][sol.choice[l.name]]
    memory.append(int(total))
  step_time = sol.objective
  scale = global_batch / graph.batch_size
  model_flops = sum(l.flops + l.backward_flops for l in graph.layers) * scale
  dtype = graph.inputs[0].info.dtype if graph.inputs else "float32"
  # MFU against the peak the cost model charges matmuls at: fp32 matmuls at default
  # precision run on TF32 units where the device has them (strategies' op dtypes).
  peak = cluster.peak_flops("tfloat32" if dtype == "float32" else dtype) * cluster.num_devices
  stage_of = dict(sol.stage)
  # What plan.apply runs: the plan's schedule is the executor's name.
  collectives = cost.predicted_collectives(tables, sol.choice, stage_of, executor=config.schedule)
  runtime_s = cost.runtime_step_time_s(tables, sol.choice, stage_of, executor=config.schedule)
  return plans.Predicted(
      step_time_s=step_time, compute_time_s=compute, communication_time_s=comm,
      bubble_time_s=max(step_time - c * slowest, 0.0),
      throughput=global_batch / step_time, memory_per_device_bytes=tuple(memory),
      mfu=model_flops / (step_time * peak), collectives=collectives,
      runtime_step_time_s=runtime_s)
