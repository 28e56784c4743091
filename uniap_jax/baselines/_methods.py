"""The baseline plan functions and their registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
import time
from typing import Any

from uniap_jax import cluster as cluster_lib
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import search
from uniap_jax import solver
from uniap_jax.baselines import _candidates
from uniap_jax.baselines import _loop
from uniap_jax.baselines import _stages

DEFAULT_TIME_LIMIT_S = 60.0
PlanFn = Callable[..., plans.Plan]


def data_parallel(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
                  args: Sequence[Any] | None = None, global_batch: int | None = None,
                  memory_limit_bytes: float | None = None, pp: int | None = None,
                  num_microbatches: int | None = None, schedule: str | None = None,
                  time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                  cache: dict | None = None) -> plans.Plan:
  """Pure data parallelism (PyTorch DDP; `jax.jit` with a batch-sharded input).

  One flat mesh over every device; each layer takes the candidate that splits its
  batch over it and replicates its parameters. Gradient accumulation: the smallest
  micro-batch count that fits memory, as a user of DDP picks it.

  Args (shared by every baseline):
    graph: the traced step (`uniap_jax.trace`).
    cluster: the target cluster.
    args: the step's arguments, to shape the plan's spec pytrees (optional).
    global_batch: samples per step; default the traced batch.
    memory_limit_bytes: per-device limit; default the cluster's device memory.
    pp, num_microbatches, schedule: pin knobs of the search, as in `ua.plan`; pp must
      be unset or 1 for the methods that do not pipeline.
    time_limit_s: wall-clock budget of the whole method, in seconds.
    cache: a dict shared between calls on the same graph and cluster (cost tables).
  Returns:
    The method's best plan, scored by UniAP's cost model.
  Raises:
    search.InfeasibleError: no plan of this kind fits memory, or none exists.
    ValueError: a knob the method cannot honour, or a batch that does not split.

  Example:
    >>> plan = baselines.data_parallel(ua.trace(step, model, opt, batch), cluster)
    >>> plan.predicted.throughput, plan.num_microbatches
  """
  _loop.check_pp1("data_parallel", pp)
  knobs = _loop.Knobs(args=args, global_batch=global_batch,
                      memory_limit_bytes=memory_limit_bytes, pp=1,
                      num_microbatches=num_microbatches, schedule=schedule,
                      time_limit_s=time_limit_s, cache={} if cache is None else cache)
  roles = _candidates.label_roles(graph, knobs.cache)

  def inner(config, tables, problem, incumbent, deadline):
    allowed = _candidates.data_parallel_family(tables, roles)
    return _loop.fixed_choice(tables, allowed, _loop.time_key(tables), "data-parallel")

  return _loop.run("data_parallel", graph, cluster, knobs, accept=_loop.flat_pp1,
                   inner=inner, first_feasible=True, prune=False)


def fsdp(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
         args: Sequence[Any] | None = None, global_batch: int | None = None,
         memory_limit_bytes: float | None = None, pp: int | None = None,
         num_microbatches: int | None = None, schedule: str | None = None,
         time_limit_s: float = DEFAULT_TIME_LIMIT_S, cache: dict | None = None) -> plans.Plan:
  """Fully sharded data parallelism (ZeRO-3, PyTorch FSDP), no pipeline.

  One flat mesh; each layer takes the candidate that splits its batch and shards
  its parameters (gathered before use, gradients reduce-scattered) that leaves the
  fewest parameter and optimizer bytes per device, then the fastest. A layer with no
  such candidate (no parameters, or parameter dims the devices do not divide) runs
  data parallel. Micro-batches as in `data_parallel`; arguments as there.
  """
  _loop.check_pp1("fsdp", pp)
  knobs = _loop.Knobs(args=args, global_batch=global_batch,
                      memory_limit_bytes=memory_limit_bytes, pp=1,
                      num_microbatches=num_microbatches, schedule=schedule,
                      time_limit_s=time_limit_s, cache={} if cache is None else cache)
  roles = _candidates.label_roles(graph, knobs.cache)

  def inner(config, tables, problem, incumbent, deadline):
    sharded = _candidates.fsdp_family(tables, roles)
    replicated = _candidates.data_parallel_family(tables, roles)
    times = _loop.time_key(tables)
    key = lambda layer, k: (layer.state_bytes[k], *times(layer, k))
    return _loop.fixed_choice(tables, sharded, key, "fully sharded or data-parallel",
                              fallback=replicated)

  return _loop.run("fsdp", graph, cluster, knobs, accept=_loop.flat_pp1, inner=inner,
                   first_feasible=True, prune=False)


def megatron(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
             args: Sequence[Any] | None = None, global_batch: int | None = None,
             memory_limit_bytes: float | None = None, pp: int | None = None,
             num_microbatches: int | None = None, schedule: str | None = None,
             time_limit_s: float = DEFAULT_TIME_LIMIT_S,
             cache: dict | None = None) -> plans.Plan:
  """Megatron-LM's 3D parallelism: grid search over dp x tp x pp and micro-batches.

  Stages hold the repeated blocks as evenly as possible, contiguous (embedding and
  heads with the first and last blocks). Inside a stage the outer mesh axis is data
  parallel and the inner one tensor parallel: a layer may take any candidate that
  splits only its batch over dp and only model dims over tp (column/row splits,
  sequence parallelism, with or without recomputation), never parameters over dp;
  the best such choice of each stage under memory is solved exactly. tp = 1 is the
  flat mesh with data-parallel layers. Arguments as in `data_parallel`.
  """
  knobs = _loop.Knobs(args=args, global_batch=global_batch,
                      memory_limit_bytes=memory_limit_bytes, pp=pp,
                      num_microbatches=num_microbatches, schedule=schedule,
                      time_limit_s=time_limit_s, cache={} if cache is None else cache)
  roles = _candidates.label_roles(graph, knobs.cache)
  splits: dict[int, dict[str, int]] = {}

  def inner(config, tables, problem, incumbent, deadline):
    allowed = _candidates.megatron_family(tables, roles)
    reason = _candidates.missing(allowed, "Megatron (batch over dp, model dims over tp)",
                                 tables)
    if reason:
      return _loop.Attempt(exact=True, reason=reason)
    if config.num_stages not in splits:
      splits[config.num_stages] = _stages.uniform_stages(graph, config.num_stages)
    return _stages.solve_fixed_stages(problem, splits[config.num_stages], allowed, deadline)

  return _loop.run("megatron", graph, cluster, knobs,
                   accept=lambda c: c.mesh.kind in ("flat", "dp_tp"), inner=inner,
                   prune=False)


def pipeline_only(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
                  args: Sequence[Any] | None = None, global_batch: int | None = None,
                  memory_limit_bytes: float | None = None, pp: int | None = None,
                  num_microbatches: int | None = None, schedule: str | None = None,
                  time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                  cache: dict | None = None) -> plans.Plan:
  """Inter-layer parallelism alone (the paper's "pipeline-only" ablation; GPipe).

  Every stage is a flat data-parallel mesh and every layer takes its data-parallel
  candidate; the solver then places the stage boundaries exactly (UniAP's problem
  with each layer's candidates pinned to that one), for every pipeline degree,
  micro-batch count and schedule. Arguments as in `data_parallel`.
  """
  knobs = _loop.Knobs(args=args, global_batch=global_batch,
                      memory_limit_bytes=memory_limit_bytes, pp=pp,
                      num_microbatches=num_microbatches, schedule=schedule,
                      time_limit_s=time_limit_s, cache={} if cache is None else cache)
  roles = _candidates.label_roles(graph, knobs.cache)

  def inner(config, tables, problem, incumbent, deadline):
    allowed = _candidates.data_parallel_family(tables, roles)
    reason = _candidates.missing(allowed, "data-parallel", tables)
    if reason:
      return _loop.Attempt(exact=True, reason=reason)
    times = _loop.time_key(tables)
    pinned = {l.name: (min(allowed[l.name], key=lambda k: times(l, k)),)
              for l in tables.layers}
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
      return _loop.Attempt(reason="time limit")
    sol = solver.solve(_stages.restricted(problem, pinned), time_limit_s=remaining,
                       incumbent=incumbent)
    if sol.status == "cutoff":
      return _loop.Attempt(exact=True, cutoff=True, time_s=sol.time_s)
    if sol.status == "infeasible":
      return _loop.Attempt(exact=True, needed_bytes=sol.min_peak_memory,
                           reason="no stage split fits memory", time_s=sol.time_s)
    if not sol.choice:
      return _loop.Attempt(reason="time limit", time_s=sol.time_s)
    return _loop.Attempt(choice={n: pinned[n][0] for n in sol.choice}, stage=dict(sol.stage),
                         exact=sol.status == "optimal", time_s=sol.time_s)

  return _loop.run("pipeline_only", graph, cluster, knobs,
                   accept=lambda c: c.mesh.kind == "flat", inner=inner, exact_method=True,
                   prune=False)


def intra_only(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
               args: Sequence[Any] | None = None, global_batch: int | None = None,
               memory_limit_bytes: float | None = None, pp: int | None = None,
               num_microbatches: int | None = None, schedule: str | None = None,
               time_limit_s: float = DEFAULT_TIME_LIMIT_S,
               cache: dict | None = None) -> plans.Plan:
  """Intra-layer parallelism alone (the paper's "intra-only" ablation).

  UniAP with one stage: every layer's candidates free, every mesh and micro-batch
  count searched, solved exactly. Arguments as in `data_parallel`.
  """
  _loop.check_pp1("intra_only", pp)
  return search.plan_graph(graph, cluster, args=args, pp=1, num_microbatches=num_microbatches,
                           schedule=schedule, memory_limit_bytes=memory_limit_bytes,
                           time_limit_s=time_limit_s, global_batch=global_batch, cache=cache,
                           objective="paper")


def alpa(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
         args: Sequence[Any] | None = None, global_batch: int | None = None,
         memory_limit_bytes: float | None = None, pp: int | None = None,
         num_microbatches: int | None = None, schedule: str | None = None,
         time_limit_s: float = DEFAULT_TIME_LIMIT_S, cache: dict | None = None) -> plans.Plan:
  """Alpa-like hierarchical search: inter-operator first, then intra-operator per stage.

  Per configuration, a dynamic program over the layer order splits the layers into
  contiguous stages with the least slowest stage, each layer weighed by its fastest
  candidate, among splits whose stages fit memory with every layer at its leanest.
  Then each stage's strategies are optimised on their own (the stage's layers solved
  exactly as a one-stage problem), and the whole is scored under the joint objective.
  Arguments as in `data_parallel`.
  """
  knobs = _loop.Knobs(args=args, global_batch=global_batch,
                      memory_limit_bytes=memory_limit_bytes, pp=pp,
                      num_microbatches=num_microbatches, schedule=schedule,
                      time_limit_s=time_limit_s, cache=cache)

  def inner(config, tables, problem, incumbent, deadline):
    start = time.perf_counter()
    n, limit = len(problem.layers), problem.memory_limit * (1 + solver.MEMORY_RTOL)
    weight = _stages.prefix([min(l.time) for l in problem.layers])
    lean = [_stages.prefix([min(problem.stage_memory_table(u)[s]) for u in range(n)])
            for s in range(problem.num_stages)]

    def stage_cost(a, b, s):
      if lean[s][b] - lean[s][a] > limit:
        return math.inf
      return weight[b] - weight[a]

    _, split = _stages.min_max_split(n, problem.num_stages, stage_cost)
    if not split:
      needed, _ = _stages.min_max_split(n, problem.num_stages,
                                        lambda a, b, s: lean[s][b] - lean[s][a])
      return _loop.Attempt(exact=True, needed_bytes=needed,
                           reason="no stage split fits memory",
                           time_s=time.perf_counter() - start)
    stage_of = {l.name: s for l, s in zip(problem.layers, split)}
    got = _stages.solve_fixed_stages(problem, stage_of, _stages.all_candidates(problem),
                                     deadline)
    return dataclasses.replace(got, time_s=time.perf_counter() - start)

  return _loop.run("alpa", graph, cluster, knobs, accept=lambda c: True, inner=inner)


def galvatron(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
              args: Sequence[Any] | None = None, global_batch: int | None = None,
              memory_limit_bytes: float | None = None, pp: int | None = None,
              num_microbatches: int | None = None, schedule: str | None = None,
              time_limit_s: float = DEFAULT_TIME_LIMIT_S,
              cache: dict | None = None) -> plans.Plan:
  """Galvatron-like search: a fixed, balanced pipeline split, then per-layer strategies
  by dynamic programming under each stage's memory.

  The split balances parameter bytes over contiguous stages (the least largest stage,
  then the most even), fixed before any strategy is known as Galvatron fixes its
  pipeline division first; each stage's strategies are then chosen exactly under the
  memory limit, for every mesh, micro-batch count and schedule. Arguments as in
  `data_parallel`.
  """
  knobs = _loop.Knobs(args=args, global_batch=global_batch,
                      memory_limit_bytes=memory_limit_bytes, pp=pp,
                      num_microbatches=num_microbatches, schedule=schedule,
                      time_limit_s=time_limit_s, cache=cache)
  params = _stages.prefix([float(l.param_bytes) for l in graph.layers])
  splits: dict[int, dict[str, int]] = {}

  def inner(config, tables, problem, incumbent, deadline):
    k = config.num_stages
    if k not in splits:
      _, stage = _stages.min_max_split(len(graph.layers), k,
                                       lambda a, b, s: params[b] - params[a])
      splits[k] = {l.name: s for l, s in zip(graph.layers, stage)}
    return _stages.solve_fixed_stages(problem, splits[k], _stages.all_candidates(problem),
                                      deadline)

  return _loop.run("galvatron", graph, cluster, knobs, accept=lambda c: True, inner=inner)


BASELINES: dict[str, PlanFn] = {
    "data_parallel": data_parallel,
    "fsdp": fsdp,
    "megatron": megatron,
    "pipeline_only": pipeline_only,
    "intra_only": intra_only,
    "alpa": alpa,
    "galvatron": galvatron,
}
# The baselines that choose a pipeline degree (the others plan pp = 1 only).
PIPELINED = frozenset({"megatron", "pipeline_only", "alpa", "galvatron"})
