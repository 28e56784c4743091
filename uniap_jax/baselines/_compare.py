"""UniAP against the baselines on one model and cluster, as table rows."""

from __future__ import annotations

import collections
from collections.abc import Sequence
import dataclasses
import math
import time
from typing import Any

from uniap_jax import cluster as cluster_lib
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import search
from uniap_jax.baselines import _methods

_GIB = 2**30


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Row:
  """One method's result for a comparison table.

  Attributes:
    method: "uniap" or a key of BASELINES.
    status: the plan's solver status ("optimal", "heuristic", "time_limit"); or
      "out of memory" (the method's plans do not fit), "no plan" (its kind of plan
      does not exist here, e.g. a batch that does not split over the devices), or
      "not applicable" (a pinned pp the method cannot use).
    step_time_s: predicted time per iteration (math.inf without a plan).
    throughput: predicted samples per second (0 without a plan).
    memory_per_device_bytes: the fullest stage's per-device memory (0 without a plan).
    optimisation_time_s: the method's own solving time (cost tables excluded, as the
      paper's optimisation times exclude profiling).
    search_time_s: wall time of the whole call, cost tables included.
    description: the plan in a few words, or why there is none.
    plan: the plan itself, or None.
  """

  method: str
  status: str
  step_time_s: float
  throughput: float
  memory_per_device_bytes: float
  optimisation_time_s: float
  search_time_s: float
  description: str
  plan: plans.Plan | None = None

  @property
  def feasible(self) -> bool:
    return self.plan is not None


def describe(plan: plans.Plan) -> str:
  """A plan in a few words: mesh, micro-batches, schedule, layers per stage."""
  mesh = " ".join(f"{k}{v}" for k, v in plan.mesh_axes.items())
  sizes = "/".join(str(len(s)) for s in plan.stages)
  strategies_ = collections.Counter(l.strategy for l in plan.layers).most_common(1)
  common = f", mostly {strategies_[0][0]}" if strategies_ else ""
  return (f"{mesh}, c={plan.num_microbatches} {plan.schedule}, layers/stage {sizes}"
          f"{common}")


def compare(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
            methods: Sequence[str] | None = None, args: Sequence[Any] | None = None,
            global_batch: int | None = None, memory_limit_bytes: float | None = None,
            pp: int | None = None, num_microbatches: int | None = None,
            schedule: str | None = None,
            time_limit_s: float = _methods.DEFAULT_TIME_LIMIT_S,
            cache: dict | None = None, warm_start: Sequence[plans.Plan] = (),
            seed_from_baselines: bool = True) -> tuple[Row, ...]:
  """UniAP and the baselines on one model and cluster, under one cost model.

  Every method is scored by the paper's objective (`plan.predicted.step_time_s`), the
  one the baselines optimise. The baselines run first and UniAP last, starting from
  the best plan among theirs and `warm_start` (a warm start: their plans lie inside
  UniAP's search space). So UniAP's plan is never worse than a baseline's, also when
  its time limit cuts the search short; a row whose plan is that warm start says so
  in its status. UniAP's optimisation time is its own search; the warm start's cost is
  in the baselines' rows.

  Args:
    graph, cluster, args, global_batch, memory_limit_bytes, pp, num_microbatches,
      schedule, time_limit_s: as in `data_parallel`, passed to every method (a pinned
      pp != 1 makes the non-pipelining methods "not applicable").
    methods: "uniap" and/or keys of BASELINES; default all, UniAP first.
    cache: cost tables shared by every method (same graph and cluster only).
    warm_start: further plans of this graph and cluster (with the same knobs) for
      UniAP to start from, e.g. baseline plans found by earlier calls.
    seed_from_baselines: False runs UniAP's search from `warm_start` alone, not from
      this call's baseline plans (to check that the search by itself reaches them).
  Returns:
    One Row per method, in the order asked.
  Raises:
    ValueError: an unknown method name.
  """
  names = ["uniap", *_methods.BASELINES] if methods is None else list(methods)
  unknown = [m for m in names if m != "uniap" and m not in _methods.BASELINES]
  if unknown:
    raise ValueError(f"Unknown method(s) {unknown}; known: uniap, "
                     f"{', '.join(_methods.BASELINES)}.")
  cache = {} if cache is None else cache
  knobs = dict(args=args, global_batch=global_batch, memory_limit_bytes=memory_limit_bytes,
               num_microbatches=num_microbatches, schedule=schedule, time_limit_s=time_limit_s)
  rows: dict[str, Row] = {}
  for name in sorted(names, key=lambda n: n == "uniap"):  # the baselines first
    start = time.perf_counter()
    if name != "uniap" and name not in _methods.PIPELINED and pp not in (None, 1):
      rows[name] = Row(method=name, status="not applicable", step_time_s=math.inf,
                       throughput=0.0, memory_per_device_bytes=0.0, optimisation_time_s=0.0,
                       search_time_s=0.0, description=f"does not pipeline; pp={pp} pinned")
      continue
    try:
      if name == "uniap":
        seeds = [r.plan for r in rows.values() if r.plan is not None and seed_from_baselines]
        seeds += list(warm_start)
        seed = min(seeds, key=lambda p: p.predicted.step_time_s, default=None)
        plan = search.plan_graph(graph, cluster, pp=pp, cache=cache, objective="paper",
                                 incumbent=seed, **knobs)
      else:
        extra = {"pp": pp} if name in _methods.PIPELINED else {}
        plan = _methods.BASELINES[name](graph, cluster, cache=cache, **extra, **knobs)
    except search.InfeasibleError as e:
      status = "out of memory" if math.isfinite(e.needed_bytes) else "no plan"
      rows[name] = Row(method=name, status=status, step_time_s=math.inf,
                       throughput=0.0, memory_per_device_bytes=0.0, optimisation_time_s=0.0,
                       search_time_s=time.perf_counter() - start, description=str(e))
      continue
    status = plan.solver.status
    if name == "uniap" and plan.solver.warm_start:
      status += " (warm start kept)"
    rows[name] = Row(
        method=name, status=status, step_time_s=plan.predicted.step_time_s,
        throughput=plan.predicted.throughput,
        memory_per_device_bytes=float(max(plan.predicted.memory_per_device_bytes)),
        optimisation_time_s=plan.solver.time_s, search_time_s=time.perf_counter() - start,
        description=describe(plan), plan=plan)
  return tuple(rows[name] for name in names)


def format_table(rows: Sequence[Row]) -> str:
  """The rows as a fixed-width text table (for launchers to print)."""
  header = (f"{'method':<14} {'status':<14} {'step ms':>10} {'samples/s':>10} "
            f"{'GiB/dev':>8} {'opt s':>7} {'total s':>8}  plan")
  lines = [header, "-" * len(header)]
  for r in rows:
    step = f"{r.step_time_s * 1e3:.2f}" if r.feasible else "-"
    tput = f"{r.throughput:.3f}" if r.feasible else "-"
    mem = f"{r.memory_per_device_bytes / _GIB:.2f}" if r.feasible else "-"
    text = r.description if r.feasible else r.description.split(". ")[0]
    lines.append(f"{r.method:<14} {r.status:<14} {step:>10} {tput:>10} {mem:>8} "
                 f"{r.optimisation_time_s:>7.2f} {r.search_time_s:>8.2f}  {text}")
  return "\n".join(lines)
