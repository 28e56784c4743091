"""The chosen configuration as a Plan: leaf specs, stages, predictions."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
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
from uniap_jax.search import _pins
from uniap_jax.search._configs import Config


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
        memory_bytes=int(tables.memory_by_stage(l.name)[sol.stage[l.name]][k]),
        recompute=l.candidates[k].recompute))
  activation_specs = {}
  for e in tables.edges:
    src = tables.layer(e.src)
    cand = src.candidates[sol.choice[e.src]]
    specs = dict(zip(src.output_ids, cand.output_specs))
    for v in e.value_ids:
      if v in specs:
        activation_specs[f"{e.src}->{e.dst}"] = PartitionSpec(*specs[v])
        break
  activation_specs.update(_pins.pins(graph, tables, sol.choice))
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
  stage_of = dict(sol.stage)
  # The solver's memory: each stage's own layers as its constraint sums them (the
  # paper's model, or under objective "runtime" the tables' per-layer runtime model),
  # with the largest transient of its own candidates (the solver kept the largest of
  # any candidate free, a linear stand-in for a max).
  memory = cost.linear_memory_bytes(tables, sol.choice, stage_of)
  step_time = sol.objective
  scale = global_batch / graph.batch_size
  model_flops = sum(l.flops + l.backward_flops for l in graph.layers) * scale
  dtype = graph.inputs[0].info.dtype if graph.inputs else "float32"
  # MFU against the peak the cost model charges matmuls at: fp32 matmuls at default
  # precision run on TF32 units where the device has them (strategies' op dtypes).
  peak = cluster.peak_flops("tfloat32" if dtype == "float32" else dtype) * cluster.num_devices
  # What plan.apply runs (`plans.runtime_executor`).
  collectives = cost.predicted_collectives(tables, sol.choice, stage_of,
                                            executor=config.executor)
  runtime_s = cost.runtime_step_time_s(tables, sol.choice, stage_of, executor=config.executor)
  runtime_memory = cost.runtime_memory_bytes(tables, sol.choice, stage_of,
                                             executor=config.executor)
  return plans.Predicted(
      step_time_s=step_time, compute_time_s=compute, communication_time_s=comm,
      bubble_time_s=max(step_time - c * slowest, 0.0),
      throughput=global_batch / step_time, memory_per_device_bytes=tuple(memory),
      mfu=model_flops / (step_time * peak), collectives=collectives,
      runtime_step_time_s=runtime_s, runtime_memory_per_device_bytes=runtime_memory)
