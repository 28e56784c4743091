"""CostTables: per layer and candidate, time and memory; per edge, resharding and sends.

One `CostTables` describes one configuration of the outer search: a stage mesh, a
number of stages, micro-batches and a schedule. Its entries are per device and per
micro-batch where the MIQP wants them so (DESIGN.md, solver semantics), with the
per-step costs kept apart:

  microbatch_time_s[k]  forward + backward compute and the collectives of one
                        micro-batch (tensor-parallel all-reduces, FSDP gathers, ...);
  step_time_s[k]        once per step, after the last micro-batch: the optimizer
                        update and gradient synchronisation (data-parallel all-reduce,
                        FSDP reduce-scatter), which the runtime issues once on the
                        micro-batch gradients accumulated locally.

How they enter the objective: the pipeline runs c micro-batches, then every stage
synchronises and updates its own parameters, all stages at once. The exact iteration
time is the UniAP objective over microbatch_time_s plus max over stages of the
stage's summed step_time_s. `solver_time_s` folds the step cost into a per-micro-
batch figure, microbatch_time_s + step_time_s / c, which keeps the solver's objective
linear: the sum-over-stages part then carries sum(step)/c and the (c - 1) x bottleneck
part carries (c - 1)/c of the bottleneck stage's step, together close to the step
cost of the bottleneck stage for any c.

Memory, `memory_by_stage(i)[s][k]`, bytes per device of layer i under candidate k
on stage s, in one of two models (the tables' `executor`):

  paper (executor None, the default: objective="paper", the baselines): parameters +
      optimizer state + gradients + (activations + batch leaves) x micro-batches in
      flight on stage s (`microbatches_in_flight`; with one micro-batch, the larger
      of gradients and activations: gradients appear as the backward frees
      activations). UniAP's per-layer memory.
  runtime (executor named, objective="runtime"): a per-layer linear stand-in for
      what `uniap_jax.apply` holds with that executor (`cost.runtime_memory_bytes`),
      the same on every stage; see `runtime_layer_memory_bytes` for its terms and
      where it over- and under-charges. With one stage and one micro-batch the step
      is a plain jit and both models coincide.

`reserve_bytes` is the largest transient working set of any kept candidate, to
subtract from the per-device limit once (in both models); under the runtime model
`CostTables.reserve_bytes` adds `runtime_reserve_bytes`, what every device holds
whichever layers its stage runs: a bound on a table executor's stash of stage inputs,
and the least batch and model-output cotangents of all micro-batches.

Communication is not overlapped with compute (as in UniAP); the collectives are the
ones XLA compiles for the candidate's layouts, provided the runtime pins them (see
`strategies.value_layouts` for tensors inside a layer that XLA's own propagation
would lay out differently, e.g. under sequence parallelism).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
import dataclasses
import hashlib
import math
import warnings

import numpy as np

from uniap_jax import cluster as cluster_lib
from uniap_jax import graph as graph_lib
from uniap_jax import strategies
from uniap_jax.cost import _formulas

SCHEDULES = ("gpipe", "1f1b")
_GIB = 2**30


def microbatches_in_flight(schedule: str, num_microbatches: int, num_stages: int,
                           stage: int) -> int:
  """Micro-batches whose activations a stage holds at once.

  GPipe runs every forward before any backward: all c. 1F1B starts backwards as soon
  as the last stage can: stage s holds at most num_stages - s.
  """
  if schedule == "gpipe":
    return num_microbatches
  if schedule == "1f1b":
    return min(num_microbatches, num_stages - stage)
  raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}.")


def _produced_ids(layers: Sequence["LayerCosts"]) -> frozenset[int]:
  """Value ids some layer outputs (the others a layer reads are batch leaves)."""
  return frozenset(v for l in layers for v in l.output_ids)


def _device_wide_bytes(layer: "LayerCosts", produced: Collection[int]) -> np.ndarray:
  """Per candidate, the local bytes per micro-batch of the batch leaves the layer reads
  and of its model outputs: what the runtime holds for all M micro-batches on every
  device, whichever stage the layer is on."""
  fed = [v in produced for v in layer.input_ids]
  return np.array([
      sum(b for b, f in zip(layer.input_local_bytes[k], fed) if not f)
      + sum(local for _, local in cand.model_outputs)
      for k, cand in enumerate(layer.candidates)], dtype=np.float64)


def runtime_layer_memory_bytes(layer: "LayerCosts", *, executor: str, num_stages: int,
                               num_microbatches: int, produced: Collection[int],
                               batch_scale: float = 1.0) -> tuple[float, ...]:
  """Per candidate, bytes per device the runtime memory model charges one layer, on
  any stage: a per-layer linear stand-in for `cost.runtime_memory_bytes` that the
  MIQP's memory constraint can sum over a stage's layers, next to
  `runtime_reserve_bytes` kept free once per device.

  With one stage and one micro-batch the step is a plain jit: the paper's memory,
  state + max(gradients, activations). Otherwise, per candidate k:

    state + slot + max(grad, slot)
        the stored state (the runtime keeps 1/S of every layer's; here all of the
        stage's), the parameter stacks (`slot`: the candidate's parameters and the
        tied ones passed to it, `Candidate.tied_bytes`) and their gradients (at
        least a slot; `grad_bytes` where larger); after the backward loop the stored
        gradients (grads / S) replace the residuals and are covered as well;
    residuals
        a table executor ("gpipe-remat", "fused", "1f1b"): the activations of ONE
        micro-batch (each backward entry's `jax.vjp` recomputes the stage run);
        autodiff "gpipe": (M + S - 1) ticks x (activations + slot when the layer
        reads another layer's output or is recomputed: the parameter slices a tick
        keeps);
    batch and outputs, above the least
        M x (the local bytes of the batch leaves it reads + of its model outputs,
        `Candidate.model_outputs`) less the least of that over the layer's
        candidates: all M micro-batches of the batch and of the outputs' cotangents
        live through the step on EVERY device, so their least part is in the reserve
        (charged to every stage) and only the candidate's excess to its own stage.

  Kept free once per device instead (`CostTables.reserve_bytes`): the working set
  (`reserve_bytes`, the largest `temp_bytes`, as in the paper's model) and
  `runtime_reserve_bytes` (a table executor's stash of stage inputs, bounded over
  every stage split and candidate, and the least batch and outputs). Charging the
  stash per layer, (stash_slots + 1) x every layer's inputs, would charge a stage of
  n blocks n stashes where the runtime keeps one.

  Where the sum over a stage's layers plus the reserve can fall below
  `runtime_memory_bytes` (the search keeps that as its final check): the lockstep
  program's figure is the same on every device and takes maxima over stages that no
  single stage's sum sees: the stacks take the most calls of each kind of any stage,
  the residuals every position of the stages' common supersequence (stages that
  recompute different layers run the union of both kinds of positions), and a
  candidate's batch and outputs above the least count on its own stage only. With
  alike stages (a transformer's blocks) the busiest stage's sum covers it; with one
  stage it does (up to a candidate whose parameter bytes exceed its state's lead
  over one that dominates it in the Pareto pruning). Where it over-charges: the
  stored state in full (the runtime keeps 1/S of the model's, about one stage's),
  max(grad, slot) for gradients the size of a slot, and the stash bound (every
  crossing value at its largest layout).

  Args:
    layer: the layer's costs.
    executor: the pipeline executor (`cost.EXECUTORS`).
    num_stages / num_microbatches: the configuration.
    produced: value ids any layer of the graph outputs (`output_ids`).
    batch_scale: multiplies the terms proportional to the micro-batch (activations,
      batch, outputs): b / B bounds them from below for layers costed at a larger
      micro-batch B (`search`'s relaxed test).
  Returns:
    One figure per candidate, bytes per device.
  Raises:
    ValueError: an unknown executor, or a layer without `input_local_bytes`.
  """
  from uniap_jax.cost import _memory  # here: _memory imports this module
  s, m = num_stages, num_microbatches
  _memory.stash_slots(executor, s, m)  # validates the executor
  if s == 1 and m == 1:
    return tuple(st + max(g, a * batch_scale) for st, g, a in
                 zip(layer.state_bytes, layer.grad_bytes, layer.activation_bytes))
  if len(layer.input_local_bytes) != len(layer.candidates):
    raise ValueError(
        f"Layer {layer.name!r} has input_local_bytes for {len(layer.input_local_bytes)} "
        f"of its {len(layer.candidates)} candidates; build it with "
        "cost.build_cost_tables or cost.layer_costs.")
  if not layer.candidates:
    return ()
  wide = _device_wide_bytes(layer, produced)
  excess = wide - wide.min()
  fed = any(v in produced for v in layer.input_ids)
  out = []
  for k, cand in enumerate(layer.candidates):
    slot = cand.param_bytes + sum(cand.tied_bytes)
    fixed = layer.state_bytes[k] + slot + max(layer.grad_bytes[k], slot)
    act = layer.activation_bytes[k]
    if executor == "gpipe":
      fixed += (m + s - 1) * slot if (cand.recompute or fed) else 0.0
      varying = (m + s - 1) * act
    else:
      varying = act
    out.append(fixed + batch_scale * (varying + m * float(excess[k])))
  return tuple(out)


def runtime_reserve_bytes(layers: Sequence["LayerCosts"], mesh: strategies.MeshShape, *,
                          executor: str | None, num_stages: int, num_microbatches: int,
                          stash_layers: Sequence["LayerCosts"] | None = None) -> float:
  """Bytes per device the runtime memory model keeps free once, besides the working
  set (`reserve_bytes`): 0 under the paper's model (executor None) and with one stage
  and one micro-batch; else

    stash     a table executor's (not autodiff "gpipe"'s, one stage's neither)
              (stash_slots + 1) x its buffer slots (`cost.runtime_memory_bytes`): one
              slot per value crossing a stage boundary (a layer's output read on a
              later stage, a model output made before the last stage), slots shared
              across boundaries between values of one full size. So for each full
              size n, at most the most values of size n crossing any one cut, each
              at most the largest local bytes of a value of size n under any
              candidate's layout: a bound for any split into non-empty stages and
              any candidates;
    batch and outputs
              M x the sum over layers of the least, over their candidates, local
              bytes of the batch leaves read and of the model outputs
              (`runtime_layer_memory_bytes` charges each candidate's excess).

  The least batch and outputs go with the rows charging each candidate's excess, so
  they are taken on the same layers (`CostTables.layers`); the stash bound holds for
  any subset of `stash_layers`' candidates (default `layers`): `build_cost_tables`
  takes it on every candidate kept before its configuration's view, so that the
  search's checks on those layers charge the same stash.
  """
  if executor is None or (num_stages == 1 and num_microbatches == 1):
    return 0.0
  from uniap_jax.cost import _memory  # here: _memory imports this module
  slots = _memory.stash_slots(executor, num_stages, num_microbatches)
  produced = _produced_ids(layers)
  wide = sum(float(_device_wide_bytes(l, produced).min()) for l in layers if l.candidates)
  total = num_microbatches * wide
  if executor == "gpipe" or num_stages == 1:
    return total
  sizes = mesh.sizes
  layers = layers if stash_layers is None else stash_layers
  made = {v: i for i, l in enumerate(layers) for v in l.output_ids}
  last_read: dict[int, int] = {}
  for i, l in enumerate(layers):
    for v in l.input_ids:
      if v in made and made[v] < i:
        last_read[v] = max(last_read.get(v, i), i)
  n = len(layers)
  crossing: list[tuple[int, int, float]] = []  # (made at, last read at, full bytes)
  local: dict[float, float] = {}  # full bytes -> the most local bytes of such a value
  for i, l in enumerate(layers):
    if not l.candidates:
      continue
    for j, v in enumerate(l.output_ids):
      if v in last_read:
        full = l.output_nbytes[j]
        crossing.append((i, last_read[v], full))
        local[full] = max(local.get(full, 0.0), max(
            full / strategies.shard_count(c.output_layouts[j], sizes) for c in l.candidates))
    for j, (full, _) in enumerate(l.candidates[0].model_outputs):
      crossing.append((i, n, full))  # rides to the last stage
      local[full] = max(local.get(full, 0.0),
                        max(c.model_outputs[j][1] for c in l.candidates))
  most: dict[float, int] = {}
  for cut in range(1, n):  # stages [..., cut) and [cut, ...): a boundary before layer cut
    count: dict[float, int] = {}
    for first, last, full in crossing:
      if first < cut <= last:
        count[full] = count.get(full, 0) + 1
    for full, k in count.items():
      most[full] = max(most.get(full, 0), k)
  return total + (slots + 1) * sum(k * local[full] for full, k in most.items())


def layer_memory_bytes(layer: "LayerCosts", *, schedule: str, num_microbatches: int,
                       num_stages: int, stage: int, executor: str | None = None,
                       produced: Collection[int] = ()) -> tuple[float, ...]:
  """Per candidate, the memory `CostTables.memory_by_stage` charges a layer on `stage`:
  the paper's (executor None) or the runtime model's (`runtime_layer_memory_bytes`)."""
  if executor is None:
    return layer.memory_bytes(
        microbatches_in_flight(schedule, num_microbatches, num_stages, stage),
        num_microbatches > 1)
  return runtime_layer_memory_bytes(layer, executor=executor, num_stages=num_stages,
                                    num_microbatches=num_microbatches, produced=produced)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class LayerCosts:
  """The Pareto-optimal candidates of one layer, with their costs (per device).

  Attributes:
    name: the layer's name in the graph.
    signature: equal for identical layers (which share candidates and costs).
    candidates: candidates kept (shared by layers with the same signature).
    param_paths / input_ids / output_ids: this layer's parameter paths and boundary
      value ids, in the positional order of the candidates' specs.
    input_nbytes / output_nbytes: full sizes of the boundary values per micro-batch.
    microbatch_time_s / step_time_s: see the module docstring.
    state_bytes: parameters + optimizer state (AdamW's per `model_state_bytes` when the
      step has no optimizer to trace).
    grad_bytes: gradients (accumulated over micro-batches).
    activation_bytes: activations kept for backward plus batch leaves, per micro-batch.
    temp_bytes: the largest transient working set.
    num_costed: candidates costed before Pareto pruning.
    stack_key: equal for layers a pipeline can keep in one set of parameter stacks
      (`stack_key`): the same forward computation over the same parameters (paths
      relative to the layer). Coarser than `signature`, which also tells apart the
      backward ops autodiff attributes to the first reader of a shared input.
    input_local_bytes: per candidate, per boundary input (`input_ids`), its bytes per
      device and micro-batch in the candidate's input layout (the runtime memory
      model's stash and batch terms).
  """

  name: str
  signature: str
  candidates: tuple[strategies.Candidate, ...]
  param_paths: tuple[str, ...]
  input_ids: tuple[int, ...]
  output_ids: tuple[int, ...]
  input_nbytes: tuple[float, ...]
  output_nbytes: tuple[float, ...]
  microbatch_time_s: tuple[float, ...]
  step_time_s: tuple[float, ...]
  state_bytes: tuple[float, ...]
  grad_bytes: tuple[float, ...]
  activation_bytes: tuple[float, ...]
  temp_bytes: tuple[float, ...]
  num_costed: int
  stack_key: str = ""
  input_local_bytes: tuple[tuple[float, ...], ...] = ()

  def memory_bytes(self, in_flight: int, accumulate: bool = True) -> tuple[float, ...]:
    """Per candidate, bytes per device with `in_flight` micro-batches' activations.

    With gradient accumulation (more than one micro-batch) the gradient buffers live
    through every micro-batch, next to the activations. With one micro-batch,
    gradients appear as the backward pass frees activations, so the layer needs the
    larger of the two, not their sum.
    """
    out = []
    for s, g, a in zip(self.state_bytes, self.grad_bytes, self.activation_bytes):
      out.append(s + (g + a * in_flight if accumulate else max(g, a * in_flight)))
    return tuple(out)

  def param_specs(self, k: int) -> dict[str, tuple]:
    """Parameter path -> PartitionSpec entries under candidate k."""
    return dict(zip(self.param_paths, self.candidates[k].param_specs))

  def find(self, **specs: tuple) -> int:
    """Index of the first candidate whose parameter specs include `specs` (path=spec)."""
    for k in range(len(self.candidates)):
      mine = self.param_specs(k)
      if all(mine.get(p.replace("__", "/")) == s for p, s in specs.items()):
        return k
    raise KeyError(f"Layer {self.name!r} has no candidate with {specs}.")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class EdgeCosts:
  """Seconds per micro-batch to move an edge's values, [src candidate][dst candidate].

  same_stage_s: resharding from the source's output layout to the destination's
  input layout, and back for the cotangent. cross_stage_s: a send to the next stage
  (and the cotangent's send back) plus that resharding.
  """

  src: str
  dst: str
  value_ids: tuple[int, ...]
  same_stage_s: np.ndarray
  cross_stage_s: np.ndarray


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class CostTables:
  """Costs of one (mesh, stages, micro-batches, schedule) configuration.

  Attributes:
    mesh: the mesh of one stage.
    cluster: the cluster.
    num_stages / num_microbatches / microbatch_size / schedule: the configuration
      (microbatch_size counts samples of the whole micro-batch, all stage devices).
    layers / edges: in graph order.
    memory_limit_bytes: per device.
    reserve_bytes: memory to keep free on every device (see module doc): the largest
      transient working set, plus under the runtime model `runtime_reserve_bytes`.
    over_limit: (layer name, least memory in bytes it reaches, on stage 0) for layers
      with no candidate under the limit.
    unsupported: primitive -> "layer @ source" for primitives kept replicated.
    executor: None for the paper's memory model; else the pipeline executor whose
      runtime memory `memory_by_stage` models (see the module docstring).
  """

  mesh: strategies.MeshShape
  cluster: cluster_lib.Cluster
  num_stages: int
  num_microbatches: int
  microbatch_size: int
  schedule: str
  layers: tuple[LayerCosts, ...]
  edges: tuple[EdgeCosts, ...]
  memory_limit_bytes: float
  reserve_bytes: float
  over_limit: tuple[tuple[str, float], ...]
  unsupported: Mapping[str, str]
  executor: str | None = None

  def layer(self, name: str) -> LayerCosts:
    for l in self.layers:
      if l.name == name:
        return l
    raise KeyError(f"No layer {name!r}; layers are {[l.name for l in self.layers]}.")

  def memory_by_stage(self, name: str) -> tuple[tuple[float, ...], ...]:
    """[stage][candidate] bytes per device of one layer placed on that stage, in the
    tables' memory model (see the module docstring)."""
    l = self.layer(name)
    if self.executor is not None:
      row = runtime_layer_memory_bytes(
          l, executor=self.executor, num_stages=self.num_stages,
          num_microbatches=self.num_microbatches,
          produced=_produced_ids(self.layers))
      return (row,) * self.num_stages
    return tuple(l.memory_bytes(microbatches_in_flight(
        self.schedule, self.num_microbatches, self.num_stages, s), self.num_microbatches > 1)
                 for s in range(self.num_stages))

  def solver_time_s(self, name: str) -> tuple[float, ...]:
    """microbatch_time_s + step_time_s / num_microbatches (see the module docstring)."""
    l = self.layer(name)
    return tuple(m + s / self.num_microbatches
                 for m, s in zip(l.microbatch_time_s, l.step_time_s))

  def check_memory(self) -> None:
    """Raises ValueError naming the layers that fit nowhere, with their least memory."""
    if not self.over_limit:
      return
    worst = ", ".join(f"{n!r} needs {b / _GIB:.2f} GiB" for n, b in self.over_limit)
    model = ("the paper's memory model" if self.executor is None else
             f"the runtime memory model of executor {self.executor!r}")
    raise ValueError(
        f"No candidate fits under {self.memory_limit_bytes / _GIB:.2f} GiB per device on "
        f"{self.mesh.as_dict()} with {self.num_microbatches} micro-batch(es) of "
        f"{self.microbatch_size} ({model}): {worst} at least. Try more devices per stage, more "
        "stages, schedule='1f1b', smaller micro-batches, or memory_limit_bytes= if the "
        "limit is wrong.")


def _pareto(points: np.ndarray) -> list[int]:
  """Indices of rows not dominated by another row (<= everywhere, < somewhere)."""
  keep = []
  order = np.lexsort(points.T[::-1])
  for i in order:
    p = points[i]
    dominated = False
    for j in keep:
      q = points[j]
      if np.all(q <= p) and np.any(q < p):
        dominated = True
        break
      if np.all(q == p):
        dominated = True  # identical costs: the earlier candidate stands for both
        break
    if not dominated:
      keep.append(i)
  return sorted(keep)


def _candidate_times(cand: strategies.Candidate, mesh: strategies.MeshShape,
                     cluster: cluster_lib.Cluster) -> tuple[float, float]:
  per_op = _formulas.roofline_time_s(cand.op_flops, cand.op_bytes, cand.op_dtype, cluster)
  phase = np.array(cand.op_phase)
  fwd = float(per_op[phase == "forward"].sum())
  bwd = float(per_op[phase == "backward"].sum())
  opt = float(per_op[phase == "optimizer"].sum())
  # A recomputation reruns only the forward ops whose results the backward reads.
  rerun = float(per_op[cand.op_rerun].sum()) if cand.recompute else 0.0
  micro = fwd + bwd + rerun
  step = opt
  for c in cand.comms:
    t = _formulas.comm_time_s(c, mesh, cluster) * c.count
    if c.per_step:
      step += t
    else:
      micro += t
  return micro, step


def _reshard_time_s(src: strategies.Layout, dst: strategies.Layout, nbytes: float,
                    mesh: strategies.MeshShape, cluster: cluster_lib.Cluster) -> float:
  comms, _ = strategies.reshard(src, dst, nbytes, mesh.sizes)
  return sum(_formulas.collective_time_s(kind, b, mesh.level_factors(axes), cluster.levels)
             for kind, axes, b in comms)


def build_cost_tables(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
                      mesh: strategies.MeshShape, num_stages: int = 1,
                      num_microbatches: int = 1, global_batch: int | None = None,
                      schedule: str = "gpipe", memory_limit_bytes: float | None = None,
                      recompute: bool | None = None, prune: bool = True,
                      cache: dict | None = None, executor: str | None = None) -> CostTables:
  """Costs every layer's candidates and every edge for one configuration.

  Layers with the same signature are costed once. Candidates are pruned to the Pareto
  set (micro-batch time, step time, state, gradient and activation memory) within each
  pair of boundary layouts: nothing the MIQP could prefer is lost.

  Args:
    graph: the traced step.
    cluster: the target cluster.
    mesh: the mesh of one stage (`strategies.mesh_shapes`).
    num_stages: pipeline stages; num_stages * mesh devices must be the cluster's.
    num_microbatches: micro-batches per step.
    global_batch: samples per step; default the traced batch.
    schedule: "gpipe" or "1f1b" (decides activations in flight).
    memory_limit_bytes: per device; default the cluster's device memory.
    recompute: None offers activation recomputation as a per-layer option; True or
      False pins it.
    prune: keep only Pareto-optimal candidates.
    cache: a dict reused across calls (same graph and cluster) to share layer costs.
    executor: None keeps the paper's memory model; a pipeline executor
      (`cost.EXECUTORS`, e.g. `plans.runtime_executor(schedule, num_stages,
      num_microbatches)`) makes the memory, the over-limit check and the Pareto view
      follow the runtime memory model of that executor (see the module docstring).
  Returns:
    The CostTables.
  Raises:
    ValueError: stages and mesh do not cover the cluster, the batch does not split,
      or an unknown executor.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}.")
  if executor is not None:
    from uniap_jax.cost import _memory  # here: _memory imports this module
    _memory.stash_slots(executor, num_stages, num_microbatches)  # validates it
  if num_stages * mesh.num_devices != cluster.num_devices:
    raise ValueError(
        f"num_stages={num_stages} x {mesh.num_devices} devices per stage "
        f"({mesh.as_dict()}) != the cluster's {cluster.num_devices} devices; choose a "
        f"mesh of {cluster.num_devices // max(num_stages, 1)} devices.")
  global_batch = graph.batch_size if global_batch is None else global_batch
  if num_microbatches < 1 or global_batch % num_microbatches:
    raise ValueError(
        f"global_batch={global_batch} does not split into num_microbatches="
        f"{num_microbatches} equal micro-batches ({global_batch} % {num_microbatches} = "
        f"{global_batch % max(num_microbatches, 1)}). Choose num_microbatches from "
        f"{[d for d in range(1, global_batch + 1) if global_batch % d == 0]}.")
  microbatch = global_batch // num_microbatches
  limit = cluster.memory_bytes if memory_limit_bytes is None else memory_limit_bytes
  cache = {} if cache is None else cache
  layers, unsupported = _layer_costs(graph, cluster, mesh, microbatch, recompute, prune, cache)
  for prim, where in unsupported:
    warnings.warn(f"No sharding rule for {prim!r} ({where}): kept replicated; add one in "
                  "uniap_jax/strategies/_rules.py.", stacklevel=2)
  edges = _all_edge_costs(graph, layers, mesh, cluster, cache)
  costed = layers
  runtime = lambda ls: runtime_reserve_bytes(ls, mesh, executor=executor,
                                             num_stages=num_stages,
                                             num_microbatches=num_microbatches,
                                             stash_layers=costed)
  reserve = reserve_bytes(layers)
  # On every candidate kept; the view's reserve below is at least this one.
  over = over_limit(layers, schedule=schedule, num_microbatches=num_microbatches,
                    num_stages=num_stages, limit_bytes=limit, executor=executor,
                    reserved_bytes=runtime(layers))
  pipelined = num_stages > 1 or num_microbatches > 1
  if prune or pipelined:
    layers, edges = _configuration_view(layers, edges, num_microbatches, cache,
                                        prune=prune, pipelined=pipelined,
                                        executor=executor if pipelined else None)
  # The runtime model's reserve goes with the rows the solver sums: the view's.
  reserve += runtime(layers)
  return CostTables(mesh=mesh, cluster=cluster, num_stages=num_stages,
                    num_microbatches=num_microbatches, microbatch_size=microbatch,
                    schedule=schedule, layers=tuple(layers), edges=edges,
                    memory_limit_bytes=float(limit), reserve_bytes=reserve,
                    over_limit=tuple(over), unsupported=dict(unsupported),
                    executor=executor)


def layer_costs(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
                mesh: strategies.MeshShape, microbatch: int, recompute: bool | None = None,
                prune: bool = True, cache: dict | None = None) -> tuple[LayerCosts, ...]:
  """Every layer's costs on one stage mesh at one micro-batch size, without edges.

  This is the part of `build_cost_tables` that does not depend on the number of
  stages, micro-batches or the schedule, so an outer loop can bound a configuration
  (fastest and leanest candidates) before it pays for the edges. Same arguments as
  `build_cost_tables`; `microbatch` counts the samples of one micro-batch.
  """
  if not isinstance(microbatch, int) or microbatch < 1:
    raise ValueError(f"microbatch must be a positive int, got {microbatch!r}.")
  cache = {} if cache is None else cache
  return _layer_costs(graph, cluster, mesh, microbatch, recompute, prune, cache)[0]


def _graph_info(graph: graph_lib.LayerGraph, cache: dict) -> strategies.GraphInfo:
  """The graph-wide analysis the strategies need, once per cache."""
  info = cache.get("info")
  if info is None:
    info = cache["info"] = strategies.analyze(graph)
  return info


def flops_time_bounds(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster, *,
                      global_batch: int, cache: dict | None = None
                      ) -> tuple[tuple[float, float], ...]:
  """Per layer, compute seconds no candidate on any mesh can beat, before any costing.

  Returns (per_sample_s, per_step_s) per layer: with a micro-batch of b samples on a
  stage of m devices, every candidate's `microbatch_time_s` is at least
  b * per_sample_s / m and its `step_time_s` at least per_step_s / m. Why: a device
  does at least 1/m of each op's FLOPs, no faster than the cluster's best peak times
  its efficiency (the roofline charges max(FLOPs, bytes) terms), and communication
  only adds; an op's FLOPs grow at least in proportion to the batch (constant parts
  only help), so the traced FLOPs at `global_batch` samples, scaled down to b, bound
  them from below. Optimizer ops run once per step.
  """
  cache = {} if cache is None else cache
  key = ("flops_bounds", global_batch, id(cluster))
  got = cache.get(key)
  if got is not None:
    return got
  info = _graph_info(graph, cache)
  rate = max(cluster.peak_flops_per_s.values()) * cluster.compute_efficiency
  by_signature: dict[str, tuple[float, float]] = {}
  out = []
  for layer in graph.layers:
    pair = by_signature.get(layer.signature)
    if pair is None:
      ir_key = ("ir", layer.signature, global_batch)
      ir = cache.get(ir_key)
      if ir is None:
        ir = cache[ir_key] = strategies.build_ir(layer, info, microbatch=global_batch)
      micro = sum(o.flops for o in ir.ops if o.op.phase != "optimizer")
      step = sum(o.flops for o in ir.ops if o.op.phase == "optimizer")
      pair = by_signature[layer.signature] = (micro / global_batch / rate, step / rate)
    out.append(pair)
  got = cache[key] = tuple(out)
  return got


def reserve_bytes(layers: Sequence[LayerCosts]) -> float:
  """The largest transient working set of any kept candidate (kept free once per device)."""
  return max((max(l.temp_bytes, default=0.0) for l in layers), default=0.0)


def over_limit(layers: Sequence[LayerCosts], *, schedule: str, num_microbatches: int,
               num_stages: int, limit_bytes: float, executor: str | None = None,
               reserved_bytes: float = 0.0) -> tuple[tuple[str, float], ...]:
  """(layer, least bytes) for layers with no candidate under the limit on stage 0, in
  the paper's memory model (executor None) or the runtime model of `executor`, with
  `reserved_bytes` (the runtime model's, `runtime_reserve_bytes`) held besides."""
  produced = _produced_ids(layers) if executor is not None else ()
  over = []
  for l in layers:
    memory = layer_memory_bytes(l, schedule=schedule, num_microbatches=num_microbatches,
                                num_stages=num_stages, stage=0, executor=executor,
                                produced=produced)
    least = min((m + t for m, t in zip(memory, l.temp_bytes)),
                default=math.inf) + reserved_bytes
    if least > limit_bytes:
      over.append((l.name, least))
  return tuple(over)


def _layer_costs(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster,
                 mesh: strategies.MeshShape, microbatch: int, recompute: bool | None,
                 prune: bool, cache: dict
                 ) -> tuple[tuple[LayerCosts, ...], tuple[tuple[str, str], ...]]:
  """The layers' costs and the unsupported primitives, computed once per mesh and
  micro-batch size in `cache` (identical layers share one costing)."""
  key = ("layers", mesh, microbatch, recompute, prune, id(cluster))
  got = cache.get(key)
  if got is not None:
    return got
  info = _graph_info(graph, cache)
  unsupported: dict[str, str] = {}
  layers: list[LayerCosts] = []
  for layer in graph.layers:
    ir_key = ("ir", layer.signature, microbatch)
    ir = cache.get(ir_key)
    if ir is None:
      ir = cache[ir_key] = strategies.build_ir(layer, info, microbatch=microbatch)
    for prim, src in strategies.unsupported(ir).items():
      unsupported.setdefault(prim, f"layer {ir.layer.name!r} at {src or 'unknown source'}")
    if ir.layer is layer:
      ids = lambda v: v
    else:
      rebind_key = ("rebind", layer.signature, microbatch, layer.name)
      mapping = cache.get(rebind_key)
      if mapping is None:
        mapping = cache[rebind_key] = strategies.rebind(ir, layer)
      ids = mapping.__getitem__
    shared_key = (layer.signature, mesh, microbatch, recompute, prune, id(cluster))
    shared = cache.get(shared_key)
    if shared is None:
      shared = cache[shared_key] = _cost_layer(ir, mesh, cluster, recompute, prune)
    cands, micro, step, state, grads, act, temp, costed, local_in = shared
    paths = {p.value_id: p.path for p in layer.params}
    layers.append(LayerCosts(
        name=layer.name, signature=layer.signature, candidates=cands,
        param_paths=tuple(paths[ids(v)] for v in ir.param_ids),
        input_ids=tuple(ids(v) for v in ir.input_ids),
        output_ids=tuple(ids(v) for v in ir.output_ids),
        input_nbytes=tuple(float(ir.values[v].nbytes) for v in ir.input_ids),
        output_nbytes=tuple(float(ir.values[v].nbytes) for v in ir.output_ids),
        microbatch_time_s=micro, step_time_s=step, state_bytes=state, grad_bytes=grads,
        activation_bytes=act, temp_bytes=temp, num_costed=costed,
        stack_key=stack_key(layer), input_local_bytes=local_in))
  got = cache[key] = (tuple(layers), tuple(sorted(unsupported.items())))
  return got


def stack_key(layer: graph_lib.Layer) -> str:
  """A hash of a layer's forward ops (primitives, parameters, shapes, value ids
  renumbered by first use) and its parameters' paths below the layer's module path:
  what `uniap_jax.apply` groups calls into one kind of parameter stacks by (module
  structure, leaf shapes, argument shapes), as far as the trace shows it."""
  canon: dict[int, int] = {}

  def c(i: int) -> int:
    if i < 0:
      return -1
    return canon.setdefault(i, len(canon))

  base = layer.name.split("@")[0] + "/"
  items: list = [tuple((p.path[len(base):] if p.path.startswith(base) else p.path,
                        p.info.shape, p.info.dtype) for p in layer.params)]
  for op in layer.ops:
    if op.phase != "forward":
      continue
    items.append((op.primitive, tuple(c(i) for i in op.in_ids),
                  tuple((t.shape, t.dtype) for t in op.in_types),
                  tuple(c(o) for o in op.out_ids), op.params))
  return hashlib.blake2b(repr(items).encode(), digest_size=16).hexdigest()


def _all_edge_costs(graph: graph_lib.LayerGraph, layers: Sequence[LayerCosts],
                    mesh: strategies.MeshShape, cluster: cluster_lib.Cluster,
                    cache: dict) -> tuple[EdgeCosts, ...]:
  """The graph's edges between costed layers, once per mesh and micro-batch size (the
  layers tuple is shared per both), each distinct table computed once."""
  key = ("edges", id(layers), id(cluster))
  got = cache.get(key)
  if got is not None and got[0] is layers:
    return got[1]
  by_name = {l.name: l for l in layers}
  edges = tuple(_edge_costs(e, by_name, mesh, cluster, cache) for e in graph.edges
                if e.src in by_name and e.dst in by_name)
  cache[key] = (layers, edges)
  return edges


def _configuration_view(layers: tuple[LayerCosts, ...], edges: tuple[EdgeCosts, ...],
                        num_microbatches: int, cache: dict, *, prune: bool = True,
                        pipelined: bool = False, executor: str | None = None
                        ) -> tuple[tuple[LayerCosts, ...], tuple[EdgeCosts, ...]]:
  """The candidates one configuration can prefer (`prune`) and run as charged
  (`pipelined`), with their edges' rows.

  In a pipeline, candidates whose output takes a split from a parameter
  (`Candidate.splits_new_dims`) are left out: XLA reshards such outputs more often
  than the runtime model can say. A layer all of whose candidates do so keeps them.

  Once the micro-batch count is fixed, the solver sees a candidate only through its
  time microbatch_time_s + step_time_s / c and its memory, state + gradients +
  activations x in-flight (state + max(gradients, activations) with one micro-batch).
  A candidate dominated in those (two or three numbers, not the five kept per mesh)
  by one with the same boundary layouts, hence the same edge costs, is never needed.
  The reserve and the memory checks are taken before this, on every kept candidate.
  Under the runtime memory model (`executor`) a candidate's memory is state + slot +
  max(gradients, slot) + a multiple of its activations + terms fixed by its boundary
  layouts (`runtime_layer_memory_bytes`), so the memory objectives are those two
  (and the slot apart under autodiff "gpipe", which charges it per tick).
  """
  key = ("view", id(layers), num_microbatches, prune, pipelined, executor)
  got = cache.get(key)
  if got is not None and got[0] is layers:
    return got[1]
  c = num_microbatches
  keep_of: dict[int, list[int]] = {}  # id(candidates) -> kept indices
  fields = ("candidates", "microbatch_time_s", "step_time_s", "state_bytes", "grad_bytes",
            "activation_bytes", "temp_bytes", "input_local_bytes")
  picked: dict[int, dict[str, tuple] | None] = {}
  out_layers = []
  for l in layers:
    if id(l.candidates) not in keep_of:
      time = np.asarray(l.microbatch_time_s) + np.asarray(l.step_time_s) / c
      state, grad = np.asarray(l.state_bytes), np.asarray(l.grad_bytes)
      act = np.asarray(l.activation_bytes)
      if executor is not None:
        slot = np.array([cand.param_bytes + sum(cand.tied_bytes) for cand in l.candidates])
        columns = [time, state + slot + np.maximum(grad, slot), act]
        objectives = np.stack(columns + ([slot] if executor == "gpipe" else []), axis=1)
      elif c > 1:
        objectives = np.stack([time, state + grad, act], axis=1)
      else:
        objectives = np.stack([time, state + np.maximum(grad, act)], axis=1)
      groups: dict[tuple, list[int]] = {}
      for i, cand in enumerate(l.candidates):
        groups.setdefault(cand.boundary_key, []).append(i)
      if pipelined:
        runs = {i for i, cand in enumerate(l.candidates) if not cand.splits_new_dims}
        if runs:
          groups = {k: [i for i in idx if i in runs] for k, idx in groups.items()}
          groups = {k: idx for k, idx in groups.items() if idx}
      keep = sorted(i for idx in groups.values() for i in
                    ((idx[j] for j in _pareto(objectives[idx])) if prune else idx))
      keep_of[id(l.candidates)] = keep
      # Layers of one signature share the picked tuples (edge caches key on them).
      picked[id(l.candidates)] = None if len(keep) == len(l.candidates) else {
          f: tuple(getattr(l, f)[i] for i in keep) for f in fields}
    got = picked[id(l.candidates)]
    out_layers.append(l if got is None else dataclasses.replace(l, **got))
  by_name = {l.name: l for l in layers}
  sliced: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
  out_edges = []
  for e in edges:
    src_keep = keep_of[id(by_name[e.src].candidates)]
    dst_keep = keep_of[id(by_name[e.dst].candidates)]
    skey = (id(e.same_stage_s), id(src_keep), id(dst_keep))
    tables = sliced.get(skey)
    if tables is None:
      rows = np.ix_(src_keep, dst_keep)
      tables = sliced[skey] = (e.same_stage_s[rows], e.cross_stage_s[rows])
    out_edges.append(dataclasses.replace(e, same_stage_s=tables[0], cross_stage_s=tables[1]))
  got = (tuple(out_layers), tuple(out_edges))
  cache[key] = (layers, got)
  return got


def _cost_layer(ir: strategies.LayerIR, mesh: strategies.MeshShape,
                cluster: cluster_lib.Cluster, recompute: bool | None, prune: bool):
  cands = strategies.layer_candidates(ir, mesh, recompute=recompute, warn=False,
                                      platform=cluster.platform)
  if not cands:
    return (), (), (), (), (), (), (), 0, ()
  times = [_candidate_times(c, mesh, cluster) for c in cands]
  traced_optimizer = bool(ir.opt_state_ids) or any(o.op.phase == "optimizer" for o in ir.ops)
  sixteen_bit = all(ir.values[v].itemsize == 2 for v in ir.param_ids) and bool(ir.param_ids)

  def state(c: strategies.Candidate) -> float:
    if traced_optimizer:
      return c.param_bytes + c.optimizer_bytes
    # No optimizer in the step: assume AdamW in mixed precision (model_state_bytes).
    per_param = _formulas.ADAM_MOMENTS * _formulas.FP32_BYTES + (
        _formulas.FP32_BYTES if sixteen_bit else 0)
    return c.param_bytes + c.param_elements * per_param

  rows = np.array([[m, s, state(c), c.grad_bytes, c.activation_bytes + c.batch_bytes,
                    c.temp_bytes] for c, (m, s) in zip(cands, times)], dtype=np.float64)
  # Transient memory is reserved once per device (reserve_bytes), not summed per
  # layer, so it does not decide which candidates are worth keeping.
  objectives = rows[:, :5]
  keep = list(range(len(cands)))
  if prune:
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cands):
      groups.setdefault(c.boundary_key, []).append(i)
    keep = sorted(i for idx in groups.values() for i in
                  (idx[j] for j in _pareto(objectives[idx])))
  column = lambda j: tuple(float(rows[i, j]) for i in keep)
  sizes = mesh.sizes
  local_in = tuple(
      tuple(float(ir.values[v].nbytes) / strategies.shard_count(lay, sizes)
            for v, lay in zip(ir.input_ids, cands[i].input_layouts)) for i in keep)
  return (tuple(cands[i] for i in keep), column(0), column(1), column(2), column(3),
          column(4), column(5), len(cands), local_in)


def _edge_costs(edge: graph_lib.Edge, layers: Mapping[str, LayerCosts],
                mesh: strategies.MeshShape, cluster: cluster_lib.Cluster,
                cache: dict) -> EdgeCosts:
  src, dst = layers[edge.src], layers[edge.dst]
  positions = tuple((src.output_ids.index(v), dst.input_ids.index(v)) for v in edge.value_ids
                    if v in src.output_ids and v in dst.input_ids)
  key = ("edge", src.signature, dst.signature, positions, mesh, id(cluster),
         src.output_nbytes, id(src.candidates), id(dst.candidates))
  got = cache.get(key)
  if got is None:
    # Resharding times depend on the layouts and sizes only: shared by all edges of
    # one mesh (the residual stream between blocks, into the norm, ...).
    memo = cache.setdefault(("reshard_s", mesh, id(cluster)), {})
    got = cache[key] = _edge_tables(src, dst, positions, mesh, cluster, memo)
  return EdgeCosts(src=edge.src, dst=edge.dst, value_ids=edge.value_ids,
                   same_stage_s=got[0], cross_stage_s=got[1])


def _edge_tables(src: LayerCosts, dst: LayerCosts, positions: Sequence[tuple[int, int]],
                 mesh: strategies.MeshShape, cluster: cluster_lib.Cluster,
                 memo: dict[tuple, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
  """[src candidate][dst candidate] seconds; `memo` maps (source layout, destination
  layout, bytes) to (same-stage, cross-stage) seconds on this mesh and cluster."""
  ns, nd = len(src.candidates), len(dst.candidates)
  same = np.zeros((ns, nd))
  cross = np.zeros((ns, nd))
  stride = mesh.num_devices
  sizes = mesh.sizes
  for i, j in positions:
    nbytes = src.output_nbytes[i]
    # Candidates share few distinct boundary layouts: cost each pair once.
    src_lay: dict[strategies.Layout, int] = {}
    dst_lay: dict[strategies.Layout, int] = {}
    src_idx = [src_lay.setdefault(c.output_layouts[i], len(src_lay)) for c in src.candidates]
    dst_idx = [dst_lay.setdefault(c.input_layouts[j], len(dst_lay)) for c in dst.candidates]
    pair = np.zeros((2, len(src_lay), len(dst_lay)))
    for a, ls in enumerate(src_lay):
      for b, ld in enumerate(dst_lay):
        got = memo.get((ls, ld, nbytes))
        if got is None:
          there = _reshard_time_s(ls, ld, nbytes, mesh, cluster)
          back = _reshard_time_s(ld, ls, nbytes, mesh, cluster)
          send = (_formulas.send_time_s(nbytes / strategies.shard_count(ls, sizes), stride,
                                        cluster) +
                  _formulas.send_time_s(nbytes / strategies.shard_count(ld, sizes), stride,
                                        cluster))
          got = memo[(ls, ld, nbytes)] = (there + back, there + back + send)
        pair[0, a, b], pair[1, a, b] = got
    rows = np.ix_(src_idx, dst_idx)
    same += pair[0][rows]
    cross += pair[1][rows]
  return same, cross
