"""The outer loop every baseline shares, and what one configuration's attempt returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
import time
from typing import Any

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import search
from uniap_jax import solver
from uniap_jax.baselines import _candidates

_GIB = 2**30


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Knobs:
  """The knobs every baseline takes, as `ua.plan` names them (see `data_parallel`)."""

  args: Sequence[Any] | None = None
  global_batch: int | None = None
  memory_limit_bytes: float | None = None
  pp: int | None = None
  num_microbatches: int | None = None
  schedule: str | None = None
  time_limit_s: float = 60.0
  cache: dict | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
  """What a method found in one configuration.

  Attributes:
    choice / stage: the assignment, or None when none was found.
    exact: the method's restricted problem was solved to proven optimality (or proven
      infeasible, or no better than the incumbent).
    cutoff: proven no better than the incumbent (not a memory failure).
    needed_bytes: without an assignment, the least per-device memory the method needs
      here (reserve excluded), or math.inf when it has no candidate at all.
    reason: why there is no assignment; "time limit" when the budget ran out.
    time_s: seconds the method spent deciding (cost tables excluded).
  """

  choice: dict[str, int] | None = None
  stage: dict[str, int] | None = None
  exact: bool = False
  cutoff: bool = False
  needed_bytes: float = math.inf
  reason: str = ""
  time_s: float = 0.0


# A method's work in one configuration: (config, tables, UniAP's problem for them, the
# best objective so far or None, the deadline on time.perf_counter()) -> Attempt.
Inner = Callable[[search.Config, cost.CostTables, solver.Problem, float | None, float],
                 Attempt]


def check_pp1(method: str, pp: int | None) -> None:
  if pp not in (None, 1):
    raise ValueError(f"{method} does not pipeline, but pp={pp!r} was given. Leave pp unset "
                     "(or 1) for this method, or use 'megatron', 'pipeline_only', 'alpa' or "
                     "'galvatron' to pin a pipeline degree.")


def flat_pp1(config: search.Config) -> bool:
  return config.num_stages == 1 and config.mesh.kind == "flat"


def run(method: str, graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster,
        knobs: Knobs, *, accept: Callable[[search.Config], bool], inner: Inner,
        exact_method: bool = False, first_feasible: bool = False,
        prune: bool = True) -> plans.Plan:
  """Runs one baseline over its configurations and returns its best plan.

  Configurations are `search.configurations` under the same knobs, in its order,
  filtered by `accept`. Each is costed by `cost.build_cost_tables` exactly as UniAP
  costs it (with `prune=False` the dominated candidates stay, so that a method can
  find the one it prescribes), and each attempt is scored by `solver.evaluate` on
  `search.to_problem(tables)`, UniAP's own problem. A configuration whose lower bound
  cannot beat the best so far is skipped (no assignment there could).

  Args:
    method: the method's name, for messages.
    graph, cluster, knobs: what to plan and how (see `data_parallel`).
    accept: which configurations the method may use.
    inner: the method's work in one configuration.
    exact_method: the method solves its restricted problem exactly, so its plan is
      "optimal" (within its space) when every attempt was exact.
    first_feasible: stop at the first configuration with a plan (e.g. the smallest
      micro-batch count that fits).
    prune: Pareto-prune candidates, as UniAP does.
  Raises:
    search.InfeasibleError: no configuration gave a plan within memory.
    ValueError: bad knobs, nothing to search, or the time limit ran out first.
  """
  if not isinstance(cluster, cluster_lib.Cluster):
    raise TypeError(f"cluster must be a uniap_jax.Cluster (e.g. Cluster.preset('cpu-8')), "
                    f"got {type(cluster).__name__}")
  limit_s = knobs.time_limit_s
  if isinstance(limit_s, bool) or not (isinstance(limit_s, (int, float)) and limit_s > 0):
    raise ValueError(f"time_limit_s must be a positive number of seconds, got {limit_s!r}")
  if knobs.memory_limit_bytes is not None and not knobs.memory_limit_bytes > 0:
    raise ValueError(f"memory_limit_bytes must be positive, got {knobs.memory_limit_bytes!r}")
  global_batch = graph.batch_size if knobs.global_batch is None else knobs.global_batch
  configs = [c for c in search.configurations(
      graph, cluster, pp=knobs.pp, num_microbatches=knobs.num_microbatches,
      schedule=knobs.schedule, global_batch=global_batch) if accept(c)]
  if not configs:
    raise ValueError(f"{method}: no configuration to search with pp={knobs.pp}, "
                     f"num_microbatches={knobs.num_microbatches}, schedule={knobs.schedule}, "
                     f"global_batch={global_batch} on {cluster.num_devices} devices. Unpin "
                     "a knob.")
  start = time.perf_counter()
  deadline = start + limit_s
  cache = {} if knobs.cache is None else knobs.cache
  best = None  # (evaluation, config, tables, choice, stage)
  least, reasons, errors = math.inf, [], []
  bound, solve_s, exact, skipped, timed_out = math.inf, 0.0, True, 0, False
  for config in configs:
    if time.perf_counter() >= deadline:
      timed_out = True
      break
    incumbent = None if best is None else best[0].objective
    try:
      if incumbent is not None:
        # No assignment here can beat the incumbent: skip before building edges.
        lb = search.configuration_bound(
            graph, cluster, config, global_batch=global_batch,
            memory_limit_bytes=knobs.memory_limit_bytes, cutoff=incumbent, cache=cache)
        if lb >= incumbent:
          skipped += 1
          bound = min(bound, lb)
          continue
      tables = cost.build_cost_tables(
          graph, cluster, mesh=config.mesh, num_stages=config.num_stages,
          num_microbatches=config.num_microbatches, global_batch=global_batch,
          schedule=config.schedule, memory_limit_bytes=knobs.memory_limit_bytes,
          prune=prune, cache=cache)
    except ValueError as e:
      errors.append(f"{config.describe()}: {e}")
      continue
    if any(not l.candidates for l in tables.layers):
      reasons.append(f"{config.describe()}: a layer has no candidate")
      continue
    if tables.over_limit or tables.reserve_bytes >= tables.memory_limit_bytes:
      least = min(least, max([b for _, b in tables.over_limit] + [tables.reserve_bytes]))
      continue
    lb = search.lower_bound(tables)
    bound = min(bound, lb)
    incumbent = None if best is None else best[0].objective
    if incumbent is not None and lb >= incumbent:
      skipped += 1
      continue
    problem = search.to_problem(tables)
    attempt = inner(config, tables, problem, incumbent, deadline)
    solve_s += attempt.time_s
    exact &= attempt.exact
    if attempt.choice is None:
      if attempt.cutoff:
        skipped += 1
      elif attempt.reason == "time limit":
        timed_out = True
      else:
        least = min(least, attempt.needed_bytes + tables.reserve_bytes)
        reasons.append(f"{config.describe()}: {attempt.reason}")
      continue
    ev = solver.evaluate(problem, attempt.choice, attempt.stage)
    if not ev.fits:
      least = min(least, max(ev.stage_memory) + tables.reserve_bytes)
      continue
    if best is None or ev.objective < best[0].objective:
      best = (ev, config, tables, attempt.choice, attempt.stage)
      if first_feasible:
        break
  elapsed = time.perf_counter() - start
  if best is None:
    _raise_no_plan(method, cluster, knobs, least, reasons, errors, timed_out)
  ev, config, tables, choice, stage = best
  if exact and exact_method and not timed_out:
    status, gap = "optimal", 0.0
  else:
    status = "time_limit" if exact_method else "heuristic"
    gap = max(0.0, (ev.objective - min(bound, ev.objective)) / ev.objective)
  sol = solver.Solution(
      choice=dict(choice), stage=dict(stage), objective=ev.objective, status="optimal",
      gap=gap, time_s=solve_s, bound=min(bound, ev.objective), method=method,
      stage_times=ev.stage_times, send_times=ev.send_times, stage_memory=ev.stage_memory)
  stats = plans.SolverStats(status=status, gap=gap, time_s=solve_s, search_time_s=elapsed,
                            configurations=len(configs), skipped=skipped)
  return search.build_plan(graph, cluster, config, tables, sol, stats=stats,
                           global_batch=global_batch, args=knobs.args)


def _raise_no_plan(method: str, cluster: cluster_lib.Cluster, knobs: Knobs, least: float,
                   reasons: Sequence[str], errors: Sequence[str], timed_out: bool) -> None:
  limit = cluster.memory_bytes if knobs.memory_limit_bytes is None else knobs.memory_limit_bytes
  if errors and not reasons and least == math.inf:
    raise ValueError(f"{method}: no configuration could be costed: {errors[0]}")
  if timed_out and least == math.inf:
    raise ValueError(f"{method}: time_limit_s={knobs.time_limit_s} ran out before any plan "
                     "was found. Raise time_limit_s, or pin pp= and num_microbatches=.")
  if least < math.inf:
    raise search.InfeasibleError(
        f"{method}: out of memory: the leanest {method} plan needs {least / _GIB:.2f} GiB "
        f"per device; the limit is {limit / _GIB:.2f} GiB ({cluster.name!r}). Try more "
        "devices, a smaller global_batch, or another method.",
        needed_bytes=least, limit_bytes=limit)
  raise search.InfeasibleError(
      f"{method}: no plan of this kind exists: "
      f"{reasons[0] if reasons else 'no configuration had candidates'}. Try another "
      "global_batch or device count, or another method.",
      needed_bytes=math.inf, limit_bytes=limit)


def fixed_choice(tables: cost.CostTables, allowed: _candidates.Allowed,
                 key: Callable[[cost.LayerCosts, int], tuple], what: str,
                 fallback: _candidates.Allowed | None = None) -> Attempt:
  """One candidate per layer (the least `key` among `allowed`, else among `fallback`),
  every layer on stage 0."""
  start = time.perf_counter()
  choice = {}
  for layer in tables.layers:
    ks = allowed[layer.name] or (fallback or {}).get(layer.name, ())
    if not ks:
      return Attempt(exact=True, reason=_candidates.missing({layer.name: ()}, what, tables))
    choice[layer.name] = min(ks, key=lambda k: key(layer, k))
  return Attempt(choice=choice, stage={n: 0 for n in choice},
                 time_s=time.perf_counter() - start)


def time_key(tables: cost.CostTables) -> Callable[[cost.LayerCosts, int], tuple]:
  """Orders a layer's candidates by their per-micro-batch time in the objective."""
  return lambda layer, k: (tables.solver_time_s(layer.name)[k], k)
