"""Seconds and bytes: alpha-beta collectives per topology level, roofline compute, state memory.

Collectives run hierarchically: the part of a group inside the fastest level first,
the slower levels on the data that is left (a reduce-scatter inside the node shrinks
what crosses InfiniBand by the node's share), so a collective over axes that span
nodes pays the slower level for that part. Within a level a collective is a ring
(both directions on a torus).
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np

from uniap_jax import cluster as cluster_lib
from uniap_jax import strategies

# Bytes per parameter of model state in mixed-precision Adam training: 16-bit weights
# and gradients, an fp32 master copy and two fp32 moments (Rajbhandari et al., ZeRO,
# SC 2020, Sec. 3.1: "16 bytes of memory per parameter").
MIXED_PRECISION_ADAM_BYTES_PER_PARAM = 16
# optax.adamw keeps mu and nu (two moments), in fp32 when mixed precision is used.
ADAM_MOMENTS = 2
FP32_BYTES = 4
_SIXTEEN_BIT = ("bfloat16", "float16")


def _level_time_s(level: cluster_lib.Level, steps: float, volume_bytes: float,
                  alpha_steps: float) -> float:
  bandwidth = level.bandwidth_bytes_per_s * (2.0 if level.torus else 1.0)
  return alpha_steps * level.latency_s + steps * volume_bytes / bandwidth


def collective_time_s(kind: str, nbytes: float, factors: Sequence[int],
                      levels: Sequence[cluster_lib.Level]) -> float:
  """Seconds of one collective moving `nbytes` per device over a group spread as `factors`.

  Args:
    kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or "send".
    nbytes: the larger of operand and result on one device (XLA's convention).
    factors: per topology level (innermost first), how many positions of that level
      the group spans (`MeshShape.level_factors`); their product is the group size.
    levels: the cluster's levels.
  Returns:
    Hierarchical ring time: sum over levels of alpha * steps + beta * volume, where
    level l carries nbytes / (product of the inner factors). All-reduce is a
    reduce-scatter plus an all-gather (twice the steps).
  """
  if nbytes <= 0 or math.prod(factors) <= 1:
    return 0.0
  total = 0.0
  inner = 1
  if kind == "send":
    slowest = max(i for i, k in enumerate(factors) if k > 1)
    return _level_time_s(levels[slowest], 1.0, nbytes, 1.0)
  if kind == "all-to-all":
    outer = math.prod(factors)
    for level, k in zip(levels, factors):
      outer //= k
      if k > 1:
        # Data for peers that differ first at this level crosses it.
        total += _level_time_s(level, (k - 1) / k, nbytes / max(outer, 1), k - 1)
    return total
  twice = 2.0 if kind == "all-reduce" else 1.0
  for level, k in zip(levels, factors):
    if k > 1:
      total += _level_time_s(level, twice * (k - 1) / k, nbytes / inner, twice * (k - 1))
    inner *= k
  return total


def comm_time_s(comm: strategies.Comm, mesh: strategies.MeshShape,
                cluster: cluster_lib.Cluster) -> float:
  """Seconds of one execution of a candidate's collective on `cluster`."""
  axes = tuple(mesh.index(name) for name in comm.axes)
  return collective_time_s(comm.kind, comm.bytes, mesh.level_factors(axes), cluster.levels)


def send_time_s(nbytes: float, stride_devices: int, cluster: cluster_lib.Cluster) -> float:
  """Seconds of a point-to-point send between devices `stride_devices` apart (next stage).

  The send crosses the slowest level in which the two devices' positions differ.
  """
  if nbytes <= 0:
    return 0.0
  crossed, radix = 0, 1
  for i, level in enumerate(cluster.levels):
    if (stride_devices // radix) % level.size:
      crossed = i
    radix *= level.size
  return _level_time_s(cluster.levels[crossed], 1.0, nbytes, 1.0)


def _peak(cluster: cluster_lib.Cluster, dtype: str) -> float:
  try:
    return cluster.peak_flops(dtype)
  except ValueError:
    return cluster.peak_flops("float32")


def roofline_time_s(flops: np.ndarray, nbytes: np.ndarray, dtypes: Sequence[str],
                    cluster: cluster_lib.Cluster) -> np.ndarray:
  """Per op: max(FLOPs / (peak(dtype) x efficiency), bytes / memory bandwidth), in seconds.

  `compute_efficiency` is the fraction of peak FLOP/s kernels reach; it scales the
  compute term only. Memory-bound kernels are limited by the memory bandwidth, which
  is the figure they reach (calibration fits it from elementwise ops as achieved
  bytes per second); dividing it by the FLOP efficiency as well would charge an
  elementwise op 1 / efficiency times its time.
  """
  peaks = {d: _peak(cluster, d) for d in set(dtypes)}
  peak = np.array([peaks[d] for d in dtypes], dtype=np.float64)
  compute = flops / (peak * cluster.compute_efficiency)
  memory = nbytes / cluster.memory_bandwidth_bytes_per_s
  return np.maximum(compute, memory)


def model_state_bytes(num_params: float, param_dtype: str, *, shard_degree: int = 1,
                      optimizer: str = "adamw") -> float:
  """Bytes per device of parameters, gradients and optimizer state (no activations).

  Mixed precision (16-bit parameters): 2 + 2 bytes of weight and gradient, an fp32
  master copy (4) and AdamW's two fp32 moments (8) -- 16 bytes per parameter, as
  ZeRO counts it. fp32 parameters: 4 + 4 + 8 = 16 bytes too, without a master copy.
  `shard_degree` devices share the state (ZeRO-3 / FSDP); 1 means replicated.
  """
  if optimizer not in ("adamw", "adam"):
    raise ValueError(f"model_state_bytes: optimizer={optimizer!r}; known: 'adamw', 'adam'.")
  itemsize = np.dtype(param_dtype).itemsize
  per_param = 2 * itemsize + ADAM_MOMENTS * FP32_BYTES
  if param_dtype in _SIXTEEN_BIT:
    per_param += FP32_BYTES  # master weights
  return num_params * per_param / shard_degree
