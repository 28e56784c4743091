"""The outer loop's points: pipeline degree, stage mesh, micro-batches, schedule."""

from __future__ import annotations

import dataclasses

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import strategies


MAX_MICROBATCHES = 64  # micro-batch counts searched by default are divisors up to this


# The fine-grained mesh view (one axis per prime factor, `strategies.mesh_shapes`) is
# searched up to this many axes. Its candidates grow about threefold per axis (a
# Llama block: 1,400 on 4 axes, 9,800 on 6, 21 s to cost at 6), and so do its edge
# tables, squared; the flat and dp x tp meshes are always searched.
MAX_FINE_AXES = 4


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
  """One point of the outer loop."""

  num_stages: int
  mesh: strategies.MeshShape
  num_microbatches: int
  schedule: str

  @property
  def executor(self) -> str:
    """The pipeline executor `plan.apply` runs this configuration's plans with."""
    return plans.runtime_executor(self.schedule, self.num_stages, self.num_microbatches)

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
  incumbent: float  # best step time so far under the objective (inf before a plan)
  bound: float  # this configuration's proven lower bound, in the same units


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
