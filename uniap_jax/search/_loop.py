"""The outer loop of UniAP: configurations visited best bound first, solved, the
best one kept (see the package docstring)."""

from __future__ import annotations

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
from uniap_jax.search._configs import _GIB
from uniap_jax.search._configs import configurations
from uniap_jax.search._bounds import _Check
from uniap_jax.search._bounds import _check_layers
from uniap_jax.search._bounds import _flops_bound
from uniap_jax.search._bounds import to_problem
from uniap_jax.search._build import build_plan


logger = logging.getLogger(__name__)


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
  and the solver. Until a first plan exists, the configuration taken is followed
  through to its solve (so that a short budget still ends with a plan). A
  configuration whose bound reaches the incumbent is pruned, and
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

  def _check(self, config: Config, *, exact: bool) -> _Check:
    """The exact test (layers costed at the configuration's micro-batch) or the relaxed
    one (costed once per mesh at its reference micro-batch count, scaled down)."""
    n = config.num_microbatches if exact else self._reference[config.mesh]
    return _check_layers(self._layers(config, n), config, limit=self.limit,
                         scale=n / config.num_microbatches, exact=exact)

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
      # Until there is an incumbent, the configuration taken goes straight on to its
      # solve (a dive) instead of back into the queue after each bound: bounding every
      # configuration first could spend a short budget without finding any plan. The
      # order stays a function of the inputs, and every bound stays valid.
      dive = self.best is None
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
        check = self._check(config, exact=True)
      except ValueError:
        continue
      needed.append(check.needed_bytes)
    return min(needed, default=math.inf)
