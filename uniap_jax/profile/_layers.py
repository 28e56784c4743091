"""Timing the step's own layers, beside what the cost model charges for them.

Matmul and elementwise kernels (`calibrate`) fit the roofline's figures; a model's
layers mix both with fusions, layouts and small ops those kernels do not show. So each
distinct layer kind (one per signature) is run on its own, replayed from the traced
program (`graph.trace_program`), with its forward, backward and optimizer equations:

- whole on one device: its compute alone, to which `fit_layer_efficiency` fits the
  efficiency the roofline needs to reproduce the layers (the unsharded candidate's
  ops through `cost.roofline_time_s`, summed, exactly as the cost tables charge it);
- under its candidates on a stage mesh: parameters and boundary inputs placed as the
  candidate says, its boundary outputs constrained likewise, XLA inserting the
  collectives. Beside each time, the candidate's `microbatch_time_s + step_time_s`
  from the cost tables (one micro-batch): how far the cost model is off, per candidate.

Inputs are synthetic: floats uniform in [0.1, 0.2) (finite under sqrt, log and
division), integers zero (valid indices), PRNG keys from key data zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import strategies


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerTiming:
  """One layer kind timed once: whole on one device, or under one candidate.

  Attributes:
    layer: the timed layer (the first of its kind in the graph).
    count: layers of this kind in the graph.
    mesh: the stage mesh, axis name -> size; {} on one device.
    candidate: the candidate's name; "" on one device (unsharded).
    predicted_s: seconds the cost model charges for it on the cluster it was timed
      for (forward, backward and optimizer; with collectives under a candidate).
    times_s: seconds of each timed run, in order.
  """

  layer: str
  count: int = 1
  mesh: dict[str, int] = dataclasses.field(default_factory=dict)
  candidate: str = ""
  predicted_s: float
  times_s: tuple[float, ...]

  def __post_init__(self):
    if not (self.predicted_s >= 0 and math.isfinite(self.predicted_s)):
      raise ValueError(f"LayerTiming({self.layer!r}).predicted_s must be finite and >= 0, got "
                       f"{self.predicted_s!r}.")
    if not self.times_s or any(not (t > 0 and math.isfinite(t)) for t in self.times_s):
      raise ValueError(f"LayerTiming({self.layer!r}).times_s must be positive seconds, got "
                       f"{self.times_s!r}.")
    object.__setattr__(self, "times_s", tuple(float(t) for t in self.times_s))
    object.__setattr__(self, "mesh", {str(k): int(v) for k, v in dict(self.mesh).items()})

  @property
  def time_s(self) -> float:
    """The median timed run."""
    return float(statistics.median(self.times_s))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class _Program:
  """One layer as a function of its input values (id -> array), and those inputs."""

  layer: graph_lib.Layer
  fn: Callable[[dict[int, jax.Array]], dict[int, jax.Array]]
  inputs: dict[int, Any]  # value id -> abstract value (jax.core aval)


def _programs(graph: graph_lib.LayerGraph, equations: Sequence[graph_lib.Equation]
              ) -> dict[str, _Program]:
  """signature -> the first layer of that kind, as a replayable program."""
  out: dict[str, _Program] = {}
  for layer in graph.layers:
    if layer.signature in out:
      continue
    indices = sorted(op.index for op in layer.ops)
    made: set[int] = set()
    inputs: dict[int, Any] = {}
    for k in indices:
      e = equations[k]
      for (how, v), var in zip(e.operands, e.eqn.invars):
        if how == "value" and v not in made and v not in inputs:
          inputs[v] = var.aval
      made.update(e.out_ids)
    used = {v for k in indices for how, v in equations[k].operands if how == "value"}
    results = sorted((made - used) | (made & set(graph.output_ids)))

    def fn(values, indices=tuple(indices), results=tuple(results)):
      env = graph_lib.replay(equations, indices, values)
      return {v: env[v] for v in results}

    out[layer.signature] = _Program(layer=layer, fn=fn, inputs=inputs)
  return out


def _synthetic(aval: Any, rng: np.random.Generator) -> Any:
  """A concrete value for an abstract one (see the module docstring)."""
  if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.extended):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(aval.shape, aval.dtype))
    return jax.random.wrap_key_data(jnp.zeros(data.shape, data.dtype))
  dtype = np.dtype(aval.dtype)
  if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
    return jnp.asarray(rng.uniform(0.1, 0.2, aval.shape).astype(np.float32), dtype=aval.dtype)
  return jnp.zeros(aval.shape, aval.dtype)


def time_runs_s(fn: Callable[..., Any], args: Sequence[Any], repeats: int) -> tuple[float, ...]:
  """Seconds of `repeats` runs of fn(*args), after one untimed (compiling) run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return tuple(times)


def _one_device(graph: graph_lib.LayerGraph, cluster: cluster_lib.Cluster,
                cache: dict | None = None) -> cost.CostTables:
  """Cost tables of every layer unsharded on one device, without recomputation."""
  mesh = strategies.mesh_shapes(cluster, 1)[0]
  return cost.build_cost_tables(graph, cluster, mesh=mesh, num_stages=cluster.num_devices,
                                recompute=False, cache=cache)


def compute_s(candidate: strategies.Candidate, cluster: cluster_lib.Cluster) -> float:
  """Seconds the roofline charges for a candidate's ops (forward, backward, optimizer),
  per op as the cost tables do; collectives not included."""
  return float(cost.roofline_time_s(candidate.op_flops, candidate.op_bytes,
                                    candidate.op_dtype, cluster).sum())


def _jax_mesh(mesh: strategies.MeshShape, devices: Sequence[Any]) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(devices[:mesh.num_devices]).reshape(mesh.sizes),
                           mesh.names, axis_types=(AxisType.Auto,) * len(mesh.names))


def time_layers(step_fn: Callable[..., Any], *example_args: Any, cluster: cluster_lib.Cluster,
                devices: Sequence[Any] | None = None,
                mesh: strategies.MeshShape | None = None, max_candidates: int = 3,
                repeats: int = 3, batch_argnums: int | Sequence[int] | None = None,
                seed: int = 0) -> tuple[LayerTiming, ...]:
  """Times every distinct layer kind of a step, on one device and under candidates.

  Args:
    step_fn / example_args: the train step and arguments, as for `uniap_jax.trace`
      (shapes suffice: inputs are synthetic).
    cluster: the cluster whose figures give `predicted_s`; its device count decides
      the stages when `mesh` is smaller (as in the outer loop).
    devices: default `jax.devices()`; the first ones run the timings.
    mesh: the stage mesh for candidate timings; default none (one device only).
    max_candidates: per layer kind, the candidates the cost model ranks fastest for
      one micro-batch, timed in that order.
    repeats: timed runs per program, after one untimed run; the median counts.
    batch_argnums: as for `trace`.
    seed: of the synthetic inputs.
  Returns:
    Per layer kind in graph order: the one-device timing, then its candidates'.
  Raises:
    ValueError: bad counts, or a mesh needing more devices than given.
  """
  for name, value in (("max_candidates", max_candidates), ("repeats", repeats)):
    if isinstance(value, bool) or not isinstance(value, int) or value < (name == "repeats"):
      raise ValueError(f"time_layers: {name} must be a non-negative int (repeats >= 1), got "
                       f"{value!r}.")
  devices = list(jax.devices() if devices is None else devices)
  if mesh is not None and mesh.num_devices > len(devices):
    raise ValueError(f"time_layers: the mesh {mesh.as_dict()} needs {mesh.num_devices} "
                     f"devices; {len(devices)} given.")
  graph, equations = graph_lib.trace_program(step_fn, *example_args,
                                             batch_argnums=batch_argnums)
  counts: dict[str, int] = {}
  for layer in graph.layers:
    counts[layer.signature] = counts.get(layer.signature, 0) + 1
  programs = _programs(graph, equations)
  rng = np.random.default_rng(seed)
  cache: dict = {}  # cost tables shared by the ranking here and `predict` below
  tables = jmesh = None
  if mesh is not None and max_candidates:
    tables = cost.build_cost_tables(graph, cluster, mesh=mesh,
                                    num_stages=cluster.num_devices // mesh.num_devices,
                                    cache=cache)
    jmesh = _jax_mesh(mesh, devices)
  out = []
  one = jax.sharding.SingleDeviceSharding(devices[0])
  for signature, program in programs.items():
    values = {v: _synthetic(a, rng) for v, a in program.inputs.items()}
    placed = jax.device_put(values, one)
    out.append(LayerTiming(layer=program.layer.name, count=counts[signature], predicted_s=0.0,
                           times_s=time_runs_s(jax.jit(program.fn), (placed,), repeats)))
    if tables is None:
      continue
    costs = tables.layer(program.layer.name)
    ranked = sorted(range(len(costs.candidates)),
                    key=lambda k: costs.microbatch_time_s[k] + costs.step_time_s[k])
    for k in ranked[:max_candidates]:
      fn, placed = _under_candidate(program, costs, k, values, jmesh, graph)
      out.append(LayerTiming(
          layer=program.layer.name, count=counts[signature], mesh=mesh.as_dict(),
          candidate=costs.candidates[k].name, predicted_s=0.0,
          times_s=time_runs_s(fn, (placed,), repeats)))
  return predict(graph, out, cluster, cache=cache)


def predict(graph: graph_lib.LayerGraph, timings: Sequence[LayerTiming],
            cluster: cluster_lib.Cluster, *,
            cache: dict | None = None) -> tuple[LayerTiming, ...]:
  """`timings` with `predicted_s` as the cost model charges each on `cluster`.

  `cache`: cost tables to reuse (as `cost.build_cost_tables` takes it), same graph.

  Raises:
    ValueError: a timing names a layer, mesh or candidate the graph and cluster lack.
  """
  tables: dict[tuple, cost.CostTables] = {}
  out = []
  for t in timings:
    key = tuple(sorted(t.mesh.items()))
    if key not in tables:
      if not t.mesh:
        tables[key] = _one_device(graph, cluster, cache)
      else:
        size = math.prod(t.mesh.values())
        meshes = [m for m in strategies.mesh_shapes(cluster, size) if m.as_dict() == t.mesh]
        if not meshes or cluster.num_devices % size:
          raise ValueError(f"Cluster {cluster.name!r} has no stage mesh {t.mesh}.")
        tables[key] = cost.build_cost_tables(graph, cluster, mesh=meshes[0],
                                             num_stages=cluster.num_devices // size,
                                             cache=cache)
    costs = tables[key].layer(t.layer)
    if not t.mesh:
      predicted = compute_s(costs.candidates[0], cluster)
    else:
      names = [c.name for c in costs.candidates]
      if t.candidate not in names:
        raise ValueError(f"Layer {t.layer!r} on {t.mesh} has no candidate {t.candidate!r}.")
      k = names.index(t.candidate)
      predicted = costs.microbatch_time_s[k] + costs.step_time_s[k]
    out.append(dataclasses.replace(t, predicted_s=predicted))
  return tuple(out)


def _under_candidate(program: _Program, costs: cost.LayerCosts, k: int,
                     values: dict[int, Any], mesh: jax.sharding.Mesh,
                     graph: graph_lib.LayerGraph):
  """The layer's program jitted with candidate k's layouts, and its inputs placed so."""
  cand = costs.candidates[k]
  value_of_path = {p.path: p.value_id for l in graph.layers for p in l.params}
  specs: dict[int, PartitionSpec] = {}
  for path, spec in zip(costs.param_paths, cand.param_specs):
    specs[value_of_path[path]] = PartitionSpec(*spec)
  specs.update((v, PartitionSpec(*s)) for v, s in zip(costs.input_ids, cand.input_specs))
  outputs = {v: PartitionSpec(*s) for v, s in zip(costs.output_ids, cand.output_specs)}
  sharding = lambda v: NamedSharding(mesh, specs.get(v, PartitionSpec()))
  placed = {v: jax.device_put(x, sharding(v)) for v, x in values.items()}

  def fn(vals):
    got = program.fn(vals)
    return {v: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, outputs[v]))
            if v in outputs else x for v, x in got.items()}

  return jax.jit(fn), placed


def fit_layer_efficiency(graph: graph_lib.LayerGraph, timings: Sequence[LayerTiming],
                         cluster: cluster_lib.Cluster) -> float:
  """The compute efficiency in (0, 1] under which the roofline best reproduces the
  one-device layer times, in relative least squares.

  A one-dimensional search (log grid, then refined), so that it holds whatever form
  `cost.roofline_time_s` gives efficiency.

  Raises:
    ValueError: no one-device timing of a layer in `graph`.
  """
  names = {l.name for l in graph.layers}
  whole = [t for t in timings if not t.mesh and t.layer in names]
  if not whole:
    raise ValueError("fit_layer_efficiency needs one-device layer timings of this graph "
                     "(time_layers output); got none.")
  measured = np.array([t.time_s for t in whole])
  alone = _one_device(graph, cluster)
  candidates = [alone.layer(t.layer).candidates[0] for t in whole]

  def error(efficiency: float) -> float:
    c = dataclasses.replace(cluster, compute_efficiency=efficiency)
    predicted = np.array([compute_s(k, c) for k in candidates])
    return float(np.sum((predicted / measured - 1.0) ** 2))

  grid = np.geomspace(1e-4, 1.0, 41)
  ratio = grid[1] / grid[0]
  best = float(min(grid, key=error))
  lo, hi = best / ratio, min(best * ratio, 1.0)
  for _ in range(40):  # golden-section refinement around the best grid point
    a, b = hi - (hi - lo) / 1.618, lo + (hi - lo) / 1.618
    lo, hi = (lo, b) if error(a) < error(b) else (a, hi)
  return float(min(max((lo + hi) / 2, 1e-4), 1.0))
