"""The outer loop of UniAP and the public `plan()`.

For every configuration — pipeline degree, intra-stage mesh shape, micro-batch count,
schedule — the cost tables become one `solver.Problem`, and the solver returns its
optimum (or proves it cannot beat the best so far). The best configuration becomes a
`Plan`. Configurations are visited in a fixed order, so the same inputs give the same
plan on every host.

Pruning: before building a configuration's MIQP, a lower bound — every layer at its
fastest candidate, the stages perfectly balanced — is compared with the incumbent;
the solver itself also receives the incumbent and stops as soon as it proves that
nothing better exists there.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
  """The outer loop's points, in the fixed order they are visited.

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
  """A cheap bound on the configuration's objective: fastest candidates, perfect balance."""
  total = sum(min(tables.solver_time_s(l.name)) for l in tables.layers)
  return total + (tables.num_microbatches - 1) * total / tables.num_stages


def plan_graph(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
               args: Sequence[Any] | None = None, pp: int | None = None,
               num_microbatches: int | None = None, schedule: str | None = None,
               memory_limit_bytes: float | None = None, time_limit_s: float = 60.0,
               global_batch: int | None = None,
               progress: Callable[[Progress], None] | None = None) -> plans.Plan:
  """`plan` on an already traced graph (the part `Plan.solver.time_s` measures).

  `args` are the step's arguments, used only to shape `param_specs` / `batch_specs` as
  pytrees mirroring them; without them the trees are nested dicts by leaf path.
  """
  if not isinstance(cluster, cluster_lib.Cluster):
    raise TypeError(f"cluster must be a uniap_jax.Cluster (e.g. Cluster.preset('cpu-8')), "
                    f"got {type(cluster).__name__}")
  if not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
    raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
  if memory_limit_bytes is not None and not memory_limit_bytes > 0:
    raise ValueError(f"memory_limit_bytes must be positive, got {memory_limit_bytes!r}")
  global_batch = graph.batch_size if global_batch is None else global_batch
  if not isinstance(global_batch, int) or global_batch < 1:
    raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
  configs = configurations(graph, cluster, pp=pp, num_microbatches=num_microbatches,
                           schedule=schedule, global_batch=global_batch)
  start = time.perf_counter()
  cache: dict = {}
  best: tuple[float, Config, cost.CostTables, solver.Solution] | None = None
  open_bounds: list[float] = []  # bounds of configurations not proven
  least_memory = math.inf
  skipped = 0
  solve_s = 0.0
  first_solve_s = None
  limit = cluster.memory_bytes if memory_limit_bytes is None else memory_limit_bytes
  batch_errors: list[str] = []
  for done, config in enumerate(configs, 1):
    remaining = time_limit_s - (time.perf_counter() - start)
    if remaining <= 0:
      open_bounds.append(0.0)
      continue
    try:
      tables = cost.build_cost_tables(
          graph, cluster, mesh=config.mesh, num_stages=config.num_stages,
          num_microbatches=config.num_microbatches, global_batch=global_batch,
          schedule=config.schedule, memory_limit_bytes=memory_limit_bytes, cache=cache)
    except ValueError as e:
      batch_errors.append(f"{config.describe()}: {e}")
      continue
    incumbent = best[0] if best else None
    status, bound = "pruned", math.inf
    if (any(len(l.candidates) == 0 for l in tables.layers) or tables.over_limit
        or tables.reserve_bytes >= tables.memory_limit_bytes):
      status = "infeasible"
      if tables.over_limit:
        least_memory = min(least_memory, max(b for _, b in tables.over_limit))
      else:
        least_memory = min(least_memory, tables.reserve_bytes + sum(
            min(tables.memory_by_stage(l.name)[0]) for l in tables.layers
            if l.candidates) / tables.num_stages)
    elif incumbent is not None and lower_bound(tables) >= incumbent:
      skipped += 1
      bound = lower_bound(tables)
    else:
      problem = to_problem(tables)
      t0 = time.perf_counter()
      sol = solver.solve(problem, time_limit_s=remaining, incumbent=incumbent)
      dt = time.perf_counter() - t0
      solve_s += dt
      first_solve_s = dt if first_solve_s is None else first_solve_s
      status, bound = sol.status, sol.bound
      if sol.status == "infeasible":
        least_memory = min(least_memory, sol.min_peak_memory + tables.reserve_bytes)
      elif sol.status == "cutoff":
        skipped += 1
      elif sol.choice:
        if sol.status == "time_limit":
          open_bounds.append(sol.bound)
        if best is None or sol.objective < best[0]:
          best = (sol.objective, config, tables, sol)
      else:  # time limit without any assignment
        open_bounds.append(sol.bound)
    if progress is not None:
      progress(Progress(done=done, total=len(configs), config=config, status=status,
                        incumbent=best[0] if best else math.inf, bound=bound))
    logger.debug("%d/%d %s: %s (incumbent %s)", done, len(configs), config.describe(), status,
                best[0] if best else None)
  elapsed = time.perf_counter() - start
  if best is None:
    if batch_errors and len(batch_errors) == len(configs):
      raise ValueError("No configuration could be costed: " + batch_errors[0])
    if open_bounds:
      hint = (f"; the first configuration alone took {first_solve_s:.2f} s"
              if first_solve_s else "")
      raise ValueError(
          f"time_limit_s={time_limit_s} ran out before any plan was found{hint}. "
          f"Try time_limit_s >= {max(10 * (first_solve_s or 1.0) * len(configs), 60):.0f}, "
          "or pin pp= and num_microbatches= to search fewer configurations.")
    raise InfeasibleError(
        f"No plan fits: the leanest configuration needs {least_memory / _GIB:.2f} GiB per "
        f"device; the limit is {limit / _GIB:.2f} GiB ({cluster.name!r}). Try more devices, "
        "a larger pp, schedule='1f1b', a smaller global_batch, or memory_limit_bytes= if the "
        "limit is wrong.", needed_bytes=least_memory, limit_bytes=limit)
  objective, config, tables, sol = best
  proven = min(open_bounds + [objective])
  gap = 0.0 if not open_bounds else max(0.0, (objective - proven) / objective)
  stats = plans.SolverStats(status="optimal" if gap == 0.0 else "time_limit", gap=gap,
                            time_s=solve_s, search_time_s=elapsed,
                            configurations=len(configs), skipped=skipped)
  return build_plan(graph, cluster, config, tables, sol, stats=stats,
                    global_batch=global_batch, args=args)


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
  collectives = cost.predicted_collectives(tables, sol.choice, stage_of)
  return plans.Predicted(
      step_time_s=step_time, compute_time_s=compute, communication_time_s=comm,
      bubble_time_s=max(step_time - c * slowest, 0.0),
      throughput=global_batch / step_time, memory_per_device_bytes=tuple(memory),
      mfu=model_flops / (step_time * peak), collectives=collectives)
