"""The outer loop of UniAP: configurations visited best bound first, solved, the
best one kept (see the package docstring)."""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import solver
from uniap_jax import strategies
from uniap_jax.search._configs import Config
from uniap_jax.search._configs import Progress
from uniap_jax.search._configs import configurations
from uniap_jax.search._bounds import _Check
from uniap_jax.search._bounds import _check_layers
from uniap_jax.search._bounds import _flops_bound
from uniap_jax.search._bounds import _runtime_flops_bound
from uniap_jax.search._bounds import _runtime_position_bound
from uniap_jax.search._bounds import phase_flops_bounds
from uniap_jax.search._bounds import runtime_lower_bound
from uniap_jax.search._bounds import stash_bytes
from uniap_jax.search._bounds import to_problem
from uniap_jax.search._build import build_plan
from uniap_jax.search._build import fingerprint


logger = logging.getLogger(__name__)

# What ranks the configurations (see the package docstring): "runtime", the step
# time of what `uniap_jax.apply` runs (`cost.runtime_step_time_s`) for each
# configuration's paper-optimal assignment; "paper", the UniAP objective itself.
OBJECTIVES = ("runtime", "paper")


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


def check_objective(objective: Any) -> str:
  """Returns `objective` if it names one of OBJECTIVES, else raises a ValueError."""
  if not isinstance(objective, str) or objective not in OBJECTIVES:
    raise ValueError(
        f"objective={objective!r}; allowed: 'runtime' (rank configurations by the step "
        "time of the pipeline uniap_jax.apply runs, the default) or 'paper' (by the UniAP "
        "objective of the paper, GPipe's time per iteration).")
  return objective


def plan(step: Callable[..., Any], *args: Any, cluster: cluster_lib.Cluster,
         batch_argnums: Sequence[int] | None = None, pp: int | None = None,
         num_microbatches: int | None = None, schedule: str | None = None,
         memory_limit_bytes: float | None = None, time_limit_s: float = 60.0,
         global_batch: int | None = None, objective: str = "runtime",
         incumbent: plans.Plan | None = None,
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
    objective: what ranks the configurations: "runtime" (default), the step time of
      the pipeline `plan.apply` runs (`plan.predicted.runtime_step_time_s`); a
      configuration whose plan needs more memory than the limit in that runtime
      (`plan.predicted.runtime_memory_per_device_bytes`) is rejected. "paper", the
      UniAP objective (`plan.predicted.step_time_s`) under the paper's memory
      (`plan.predicted.memory_per_device_bytes`) alone: its plan's runtime memory may
      exceed the limit. Within a configuration the solver always minimises the UniAP
      objective, under the paper's per-layer memory ("paper") or a per-layer stand-in
      for the runtime's ("runtime"; see `uniap_jax.search`).
    incumbent: a plan of the same step and cluster (e.g. a baseline's) to start from:
      the search returns it unless it finds a strictly better one (see `plan_graph`).
    progress: called after each configuration with a `Progress`.
  Returns:
    A Plan, optimal under the cost model or carrying the solver's gap.
  Raises:
    ValueError: the inputs cannot be planned; the message says which and why.
    InfeasibleError: no configuration fits memory; says how much is needed.

  References: Lin et al., UniAP, CVPR 2025, Sec. 3.3 and Algorithm 1.
  """
  check_objective(objective)
  graph = graph_lib.trace(step, *args, batch_argnums=batch_argnums)
  return plan_graph(graph, cluster, args=args, pp=pp, num_microbatches=num_microbatches,
                    schedule=schedule, memory_limit_bytes=memory_limit_bytes,
                    time_limit_s=time_limit_s, global_batch=global_batch,
                    objective=objective, incumbent=incumbent, progress=progress)


def plan_graph(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
               args: Sequence[Any] | None = None, pp: int | None = None,
               num_microbatches: int | None = None, schedule: str | None = None,
               memory_limit_bytes: float | None = None, time_limit_s: float = 60.0,
               global_batch: int | None = None, objective: str = "runtime",
               incumbent: plans.Plan | None = None,
               progress: Callable[[Progress], None] | None = None,
               cache: dict | None = None, prune: bool = True) -> plans.Plan:
  """`plan` on an already traced graph (the part `Plan.solver.time_s` measures).

  Configurations are visited best bound first, each bound tightened step by step
  before anything dearer is built: (0) FLOPs over the stage's devices at the best
  peak, no costing at all; (1) the layers costed once per stage mesh at its largest
  micro-batch, scaled down to this configuration's; (2) the layers costed at its own
  micro-batch (fastest candidates, least memory per stage); (3) edges, the Problem
  and the solver. Until a first plan exists, the configuration taken is followed
  through to its solve (so that a short budget still ends with a plan). A
  configuration whose bound reaches the incumbent is pruned, and
  since the queue is ordered by bound, so is every one after it. The order depends
  only on the inputs (ties by configuration order), so every host gets the same plan
  unless the time limit stops the search. A first solve gets at most a quarter of
  the time left; one it stops returns to the queue at its proven bound (under
  "runtime", whose bound it cannot raise, it waits until every other configuration
  is decided, then shares what time is left). The bounds
  and the incumbent are in the units of `objective` (see the package docstring).

  Args:
    graph, cluster, pp, num_microbatches, schedule, memory_limit_bytes, global_batch,
      objective, progress: as in `plan`.
    args: the step's arguments, used only to shape `param_specs` / `batch_specs` as
      pytrees mirroring them; without them the trees are nested dicts by leaf path.
    time_limit_s: wall-clock budget of the whole search (costing included), seconds.
    incumbent: a warm start: a plan of this graph on this cluster with this global
      batch (a baseline's, `uniap_jax.baselines`, or an earlier search's) within the
      pinned knobs and the memory limit. Its step time under `objective`
      (`predicted.runtime_step_time_s` or `predicted.step_time_s`) is the first
      incumbent, so configurations that cannot beat it are pruned from the start.
      When nothing strictly better is found, that plan is returned with new solver
      stats: status "optimal" when every other configuration was ruled out, else
      "time_limit" with its gap (a time limit too short for any solve thus returns
      it rather than failing).
    cache: a dict of cost tables to share with other searches and baselines on the
      same graph and cluster (`cost.build_cost_tables`); default a fresh one.
    prune: False visits and solves every configuration to the end (no bound skips a
      configuration and the solver gets no cutoff): a reference for tests.
  """
  if not isinstance(cluster, cluster_lib.Cluster):
    raise TypeError(f"cluster must be a uniap_jax.Cluster (e.g. Cluster.preset('cpu-8')), "
                    f"got {type(cluster).__name__}")
  check_objective(objective)
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
  limit = cluster.memory_bytes if memory_limit_bytes is None else memory_limit_bytes
  warm = None
  if incumbent is not None:
    warm = _warm_value(incumbent, graph, cluster, objective=objective, pp=pp,
                       num_microbatches=num_microbatches, schedule=schedule,
                       global_batch=global_batch, limit=limit)
  start = time.perf_counter()
  deadline = start + time_limit_s
  cache = {} if cache is None else cache
  loop = _Search(graph=graph, cluster=cluster, configs=configs, cache=cache, limit=limit,
                 memory_limit_bytes=memory_limit_bytes, global_batch=global_batch,
                 deadline=deadline, progress=progress, objective=objective, warm=warm,
                 prune=prune)
  loop.run()
  elapsed = time.perf_counter() - start
  best = loop.best
  if best is None and loop.errors and len(loop.errors) == len(configs):
    raise ValueError("No configuration could be costed: " + loop.errors[0])
  if best is None and warm is None:
    if loop.open_bounds:
      first = loop.first_solve_s
      hint = f"; the first configuration alone took {first:.2f} s" if first else ""
      raise ValueError(
          f"time_limit_s={time_limit_s} ran out before any plan was found{hint}. "
          f"Try time_limit_s >= {max(10 * (first or 1.0) * len(configs), 60):.0f}, "
          "or pin pp= and num_microbatches= to search fewer configurations.")
    if loop.over_runtime:
      need, worst = min(loop.over_runtime, key=lambda x: x[0])
      raise InfeasibleError(
          f"No plan fits at runtime: {len(loop.over_runtime)} configuration(s) solved "
          "within the solver's per-layer memory model, but the pipeline plan.apply runs "
          "holds more (one program for every stage: parameter stacks and layer "
          "positions for the busiest and most varied stages, stage buffers): the "
          "leanest of them, "
          f"{worst.describe()}, needs {plans.format_bytes(need)} per device; the limit is "
          f"{plans.format_bytes(limit)} ({cluster.name!r}). Try more devices, "
          "or memory_limit_bytes= if the limit is wrong; "
          "objective='paper' checks the paper's memory only (its plan may exceed the limit "
          "when applied).", needed_bytes=need, limit_bytes=limit)
    least = loop.least_memory()
    raise InfeasibleError(
        f"No plan fits: the leanest configuration needs {plans.format_bytes(least)} per "
        f"device; the limit is {plans.format_bytes(limit)} ({cluster.name!r}). Try more "
        "devices, a larger pp, schedule='1f1b', a smaller global_batch, or "
        "memory_limit_bytes= if the limit is wrong.", needed_bytes=least, limit_bytes=limit)
  value = loop.incumbent
  proven = min(loop.open_bounds + [value])
  gap = 0.0 if not loop.open_bounds else max(0.0, (value - proven) / value)
  stats = solver_stats(status="optimal" if gap == 0.0 else "time_limit", gap=gap,
                       time_s=loop.solve_s, search_time_s=elapsed,
                       configurations=len(configs), skipped=loop.skipped,
                       objective=objective, warm_start=best is None)
  if best is None:  # the warm start stands: nothing strictly better was found
    return dataclasses.replace(incumbent, solver=stats)
  _, config, tables, sol = best
  return build_plan(graph, cluster, config, tables, sol, stats=stats,
                    global_batch=global_batch, args=args)


def solver_stats(**fields: Any) -> plans.SolverStats:
  """`plans.SolverStats` from the fields it has (`objective` and `warm_start` are
  recorded where the Plan schema carries them)."""
  known = {f.name for f in dataclasses.fields(plans.SolverStats)}
  return plans.SolverStats(**{k: v for k, v in fields.items() if k in known})


def _warm_value(incumbent: plans.Plan, graph: graph_lib.LayerGraph,
                cluster: cluster_lib.Cluster, *, objective: str, pp: int | None,
                num_microbatches: int | None, schedule: str | None, global_batch: int,
                limit: float) -> float:
  """The warm-start plan's step time under `objective`, after checking that it is a
  plan the search could have returned."""
  if not isinstance(incumbent, plans.Plan):
    raise TypeError(f"incumbent must be a uniap_jax.Plan (e.g. a baseline's plan for the "
                    f"same graph and cluster) or None, got {type(incumbent).__name__}")
  problems = []
  if incumbent.fingerprint and incumbent.fingerprint != fingerprint(graph):
    problems.append(f"it was made for another program (fingerprint {incumbent.fingerprint}, "
                    f"this one {fingerprint(graph)})")
  if incumbent.cluster != cluster.name:
    problems.append(f"it was made for cluster {incumbent.cluster!r}, not {cluster.name!r}")
  if incumbent.global_batch != global_batch:
    problems.append(f"its global batch is {incumbent.global_batch}, not {global_batch}")
  plan_pp = incumbent.mesh_axes.get("pp", 1)
  if pp is not None and plan_pp != pp:
    problems.append(f"it has pp={plan_pp} but pp={pp} is pinned")
  if num_microbatches is not None and incumbent.num_microbatches != num_microbatches:
    problems.append(f"it has {incumbent.num_microbatches} micro-batches but "
                    f"num_microbatches={num_microbatches} is pinned")
  if schedule is not None and incumbent.schedule != schedule:
    problems.append(f"its schedule is {incumbent.schedule!r} but schedule={schedule!r} "
                    "is pinned")
  peak = max(incumbent.predicted.memory_per_device_bytes, default=0)
  if peak > limit * (1 + solver.MEMORY_RTOL):
    problems.append(f"it needs {plans.format_bytes(peak)} per device, over the limit of "
                    f"{plans.format_bytes(limit)}")
  runtime_peak = max(incumbent.predicted.runtime_memory_per_device_bytes, default=0)
  if objective == "runtime" and runtime_peak > limit * (1 + solver.MEMORY_RTOL):
    problems.append(f"the pipeline plan.apply runs for it needs {plans.format_bytes(runtime_peak)} "
                    f"per device, over the limit of {plans.format_bytes(limit)}")
  if problems:
    raise ValueError("incumbent cannot warm-start this search: " + "; ".join(problems) +
                     ". Pass a plan made for the same step, cluster and knobs, or none.")
  value = (incumbent.predicted.runtime_step_time_s if objective == "runtime"
           else incumbent.predicted.step_time_s)
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(
        f"incumbent has no {objective} step time to start from "
        f"({'predicted.runtime_step_time_s' if objective == 'runtime' else 'predicted.step_time_s'}"
        f" = {value!r}). Re-plan it with this version, or pass objective='paper'.")
  return float(value)


class _Search:
  """The outer loop's state: a queue of (bound, level, configuration index), with
  bounds and incumbent in the units of `objective`."""

  def __init__(self, *, graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster,
               configs: Sequence[Config], cache: dict, limit: float,
               memory_limit_bytes: float | None, global_batch: int, deadline: float,
               progress: Callable[[Progress], None] | None, objective: str = "paper",
               warm: float | None = None, prune: bool = True):
    self.graph, self.cluster, self.configs, self.cache = graph, cluster, configs, cache
    self.limit, self.memory_limit_bytes = limit, memory_limit_bytes
    self.global_batch, self.deadline, self.progress = global_batch, deadline, progress
    self.objective, self.warm, self.prune = check_objective(objective), warm, prune
    # The best assignment found: (its value under `objective`, config, tables, solution).
    self.best: tuple[float, Config, cost.CostTables, solver.Solution] | None = None
    self.open_bounds: list[float] = []  # bounds of configurations not proven
    self.errors: list[str] = []
    self.skipped = 0
    self.done = 0
    self.solve_s = 0.0
    self.first_solve_s: float | None = None
    self._needed: list[float] = []  # least memory of configurations proven infeasible
    # Configurations whose solved plan fits the paper's memory but whose runtime
    # (objective "runtime") needs more than the limit: (runtime bytes, config).
    self.over_runtime: list[tuple[float, Config]] = []
    self._relaxed_out: list[int] = []  # infeasible by the scaled (relaxed) test only
    # The largest micro-batch each stage mesh is searched with: costed once, it bounds
    # every other micro-batch count on that mesh.
    self._reference: dict[strategies.MeshShape, int] = {}
    for c in configs:
      self._reference[c.mesh] = min(self._reference.get(c.mesh, c.num_microbatches),
                                    c.num_microbatches)

  @property
  def incumbent(self) -> float:
    """The value to beat: the best found or the warm start, math.inf before either."""
    found = self.best[0] if self.best is not None else math.inf
    return min(found, self.warm if self.warm is not None else math.inf)

  def _report(self, config: Config, status: str, bound: float) -> None:
    self.done += 1
    incumbent = self.incumbent
    if self.progress is not None:
      self.progress(Progress(done=self.done, total=len(self.configs), config=config,
                             status=status, incumbent=incumbent, bound=bound))
    logger.debug("%d/%d %s: %s (bound %.6g, incumbent %.6g)", self.done, len(self.configs),
                 config.describe(), status, bound, incumbent)

  def _layers(self, config: Config, num_microbatches: int) -> tuple[cost.LayerCosts, ...]:
    return cost.layer_costs(
        self.graph, self.cluster, mesh=config.mesh,
        microbatch=self.global_batch // num_microbatches, cache=self.cache)

  def _check(self, config: Config, *, exact: bool) -> _Check:
    """The exact test (layers costed at the configuration's micro-batch) or the relaxed
    one (costed once per mesh at its reference micro-batch count, scaled down).

    Under objective "runtime" the bound is the runtime's: the exact test's layers
    give `_runtime_position_bound`; the relaxed test bounds no runtime (scaling the
    Pareto set of a larger micro-batch does not bound forward and backward compute
    apart), so it only rules configurations out by memory.
    """
    n = config.num_microbatches if exact else self._reference[config.mesh]
    layers = self._layers(config, n)
    executor = self._memory_executor(config)
    check = _check_layers(layers, config, limit=self.limit,
                          scale=n / config.num_microbatches, exact=exact, executor=executor)
    if self.objective == "runtime" and check.feasible:
      check.bound = _runtime_position_bound(
          layers, config, self.cluster, self.cache,
          memory_cap=max(self.limit - cost.reserve_bytes(layers)
                         - stash_bytes(layers, config, executor), 0.0),
          executor=executor) if exact else 0.0
    return check

  def _memory_executor(self, config: Config) -> str | None:
    """The memory model of the solver's constraint for `config`: under "runtime" the
    runtime model of the executor its plans run with (`cost.build_cost_tables`'s
    `executor`), under "paper" the paper's (None). Tables, pre-checks and bounds all
    take it from here, so they agree."""
    return config.executor if self.objective == "runtime" else None

  def _flops_bound(self, config: Config, flops: Sequence[tuple[float, ...]]) -> float:
    if self.objective == "runtime":
      return _runtime_flops_bound(config, flops, self.global_batch)
    return _flops_bound(config, flops, self.global_batch)

  def run(self) -> None:
    if self.objective == "runtime":
      flops = phase_flops_bounds(self.graph, self.cluster, global_batch=self.global_batch,
                                 cache=self.cache)
    else:
      flops = cost.flops_time_bounds(self.graph, self.cluster,
                                     global_batch=self.global_batch, cache=self.cache)
    heap = [(self._flops_bound(c, flops), 0, i) for i, c in enumerate(self.configs)]
    heapq.heapify(heap)
    deferred: list[tuple[float, int, cost.CostTables]] = []
    while heap:
      key, level, i = heapq.heappop(heap)
      config = self.configs[i]
      # Pruned before the deadline test: a bound at or above the incumbent settles the
      # configuration even when no time is left.
      if self.prune and not math.isinf(self.incumbent) and key >= self.incumbent:
        self.skipped += 1
        self._report(config, "pruned", key)
        continue
      if time.perf_counter() >= self.deadline:
        self.open_bounds.append(key)
        self._report(config, "time_limit", key)
        continue
      # Until there is an incumbent, the configuration taken goes straight on to its
      # solve (a dive) instead of back into the queue after each bound: bounding every
      # configuration first could spend a short budget without finding any plan. The
      # order stays a function of the inputs, and every bound stays valid.
      dive = math.isinf(self.incumbent)
      try:
        queued = False
        while level < 2 and not queued:
          if level == 0 and self._reference[config.mesh] == config.num_microbatches:
            level = 1  # costed at its own micro-batch already: the exact test is next
            continue
          exact = level == 1
          check = self._check(config, exact=exact)
          if not check.feasible:
            if exact:
              self._needed.append(check.needed_bytes)
            else:
              self._relaxed_out.append(i)
            self._report(config, "infeasible", math.inf)
            break
          key, level = max(key, check.bound), level + 1
          if not dive:
            heapq.heappush(heap, (key, level, i))
            queued = True
        if level < 2 or queued:
          continue
        tables = cost.build_cost_tables(
            self.graph, self.cluster, mesh=config.mesh, num_stages=config.num_stages,
            num_microbatches=config.num_microbatches, global_batch=self.global_batch,
            schedule=config.schedule, memory_limit_bytes=self.memory_limit_bytes,
            cache=self.cache, executor=self._memory_executor(config))
      except ValueError as e:
        self.errors.append(f"{config.describe()}: {e}")
        self._report(config, "error", math.inf)
        continue
      if self.objective == "runtime":
        # The tables keep a subset of the candidates: their bound may be higher.
        key = max(key, runtime_lower_bound(tables))
        if self.prune and not math.isinf(self.incumbent) and key >= self.incumbent:
          self.skipped += 1
          self._report(config, "pruned", key)
          continue
      retry = self._solve(config, tables, key, last=level == 3)
      if retry is not None and self.objective == "paper":
        heapq.heappush(heap, (retry, 3, i))
      elif retry is not None:
        deferred.append((retry, i, tables))
    self._run_deferred(sorted(deferred, key=lambda x: x[:2]))

  def _run_deferred(self, deferred: Sequence[tuple[float, int, cost.CostTables]]) -> None:
    """Under "runtime", solves stopped by their first share of the budget wait until
    every other configuration is decided, then share what is left.

    A stopped solve's paper bound says nothing about the runtime, so its key cannot
    rise as under "paper"; back in the queue it would come up again at once and take
    the whole budget from configurations that may be quick to settle.
    """
    for n, (key, i, tables) in enumerate(deferred):
      config = self.configs[i]
      now = time.perf_counter()
      if self.prune and key >= self.incumbent:
        self.skipped += 1
        self._report(config, "pruned", key)
        continue
      if now >= self.deadline:
        self.open_bounds.append(key)
        self._report(config, "time_limit", key)
        continue
      self._solve(config, tables, key, last=True,
                  limit_s=(self.deadline - now) / (len(deferred) - n))

  def _solve(self, config: Config, tables: cost.CostTables, key: float, *,
             last: bool, limit_s: float | None = None) -> float | None:
    """Solves one configuration; returns its proven bound when it should be tried
    again (stopped by its share of the budget), else None.

    The solver minimises the UniAP objective. Under "paper" it gets the incumbent as
    its cutoff. Under "runtime" it gets none: the runtime incumbent is on another
    scale, and no UniAP objective value provably separates the assignments whose
    runtime could beat it, so a cutoff could drop the configuration's paper optimum,
    which is the assignment the search ranks.
    """
    paper = self.objective == "paper"
    incumbent = None
    if paper and self.prune and not math.isinf(self.incumbent):
      incumbent = self.incumbent
    problem = to_problem(tables)
    t0 = time.perf_counter()
    # One hard configuration may not eat the whole budget at first: each first try
    # gets a quarter of what is left (at least a second); one it stops goes back into
    # the queue at its proven bound and gets all the time left when it comes up again
    # (if the incumbent has not overtaken that bound by then); under "runtime" it
    # waits until the queue is empty (`_run_deferred`).
    remaining = self.deadline - t0
    if limit_s is None:
      limit_s = remaining if last else min(remaining, max(remaining / 4, 1.0))
    sol = solver.solve(problem, time_limit_s=max(limit_s, 1e-3), incumbent=incumbent)
    dt = time.perf_counter() - t0
    self.solve_s += dt
    self.first_solve_s = dt if self.first_solve_s is None else self.first_solve_s
    # The configuration's proven bound in the search's units: the solver's bound is
    # on the UniAP objective, which bounds nothing of the runtime.
    bound = max(key, sol.bound) if paper else key
    rejected = False
    if sol.choice:
      value = sol.objective if paper else cost.runtime_step_time_s(
          tables, sol.choice, sol.stage, executor=config.executor)
      if value < self.incumbent:
        if self._over_runtime_memory(config, tables, sol):
          rejected = True
        else:
          self.best = (value, config, tables, sol)
    if sol.status == "time_limit" and not last and time.perf_counter() < self.deadline:
      return bound
    if sol.status == "infeasible":
      self._needed.append(sol.min_peak_memory + tables.reserve_bytes)
    elif sol.status == "cutoff":
      self.skipped += 1
    elif sol.status == "time_limit":
      self.open_bounds.append(bound)
    # A plan over the limit at runtime is reported like a configuration that fits
    # nowhere (its bound, for the gap, is kept above).
    self._report(config, "infeasible" if rejected else sol.status, bound)
    return None

  def _over_runtime_memory(self, config: Config, tables: cost.CostTables,
                           sol: solver.Solution) -> bool:
    """Under "runtime", whether the assignment's runtime memory (what `plan.apply`
    holds, `cost.runtime_memory_bytes`) exceeds the limit; such a configuration is
    rejected (recorded in `over_runtime`). Under "paper" never: the paper's memory,
    which the solver's constraint enforces, is the only test.

    Only an assignment that would become the incumbent is tested: one that does not
    is not chosen anyway. A rejected configuration's bound stays as it was (its
    solve is not undone), so the search's bounds and gap stay valid: it simply cannot
    be the incumbent. Another assignment of the same configuration might fit, but the
    solver's constraint sums a per-layer stand-in for the runtime's memory
    (`cost.runtime_layer_memory_bytes`), not this figure, so the configuration is
    dropped.
    """
    if self.objective != "runtime":
      return False
    need = max(cost.runtime_memory_bytes(tables, sol.choice, sol.stage,
                                         executor=config.executor))
    if need <= self.limit * (1 + solver.MEMORY_RTOL):
      return False
    self.over_runtime.append((float(need), config))
    logger.debug("%s: its plan's runtime needs %s per device, over the limit of %s",
                 config.describe(), plans.format_bytes(need), plans.format_bytes(self.limit))
    return True

  def least_memory(self) -> float:
    """The least per-device memory any configuration needs (for the error message):
    those ruled out by the relaxed test alone are costed exactly now."""
    needed = list(self._needed)
    for i in self._relaxed_out:
      config = self.configs[i]
      try:
        check = self._check(config, exact=True)
      except ValueError:
        continue
      needed.append(check.needed_bytes)
    return min(needed, default=math.inf)
