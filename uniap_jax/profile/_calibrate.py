"""Calibration: the cost model's device figures, measured on the devices at hand.

Planning never needs this module: the analytic figures of a `Cluster` always
work. Calibration replaces four of them with measurements, fitted against the
cost model's own formulas so that the cost model reproduces what was timed:

- `compute_efficiency` from jitted matmuls on every device at once: the factor
  by which `cost.roofline_time_s` must divide the peak-FLOP time to give the
  measured time;
- `memory_bandwidth_bytes_per_s` from an elementwise add: the bytes per second
  it achieved, which the roofline's memory term uses as they are;
- per topology level, `latency_s` (alpha) and `bandwidth_bytes_per_s` (1/beta)
  from all-reduce, all-gather, reduce-scatter, all-to-all and send (ppermute)
  over a mesh axis that spans exactly that level, at a few sizes: a
  least-squares fit, in relative error, of `cost.collective_time_s`, which is
  linear in alpha and beta.

Timing: one untimed run first (compilation and warm-up), `block_until_ready`
around every run, the median of the repeats; collectives run `iterations` times
back to back in one program, so that a program's dispatch, which a train step
pays once and not per collective, is shared among them. The result, a `Calibration`, holds
the fitted figures and every raw time; it is plain data with a JSON form, and
`Calibration.apply(cluster)` returns the calibrated `Cluster`.
`calibrate_cached` measures once per device kind and count and reuses the JSON.

Example:
  cluster = ua.Cluster.from_devices()
  cluster = profile.calibrate_cached(cluster, "calibration.json").apply(cluster)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import logging
import math
import os
import statistics
from typing import Any
import warnings

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np

from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import strategies
from uniap_jax.profile import _layers

_log = logging.getLogger(__name__)

# Version of the JSON written by `Calibration.to_json`, under a key of its own so
# that a cluster JSON (which has "schema_version") is never taken for one.
SCHEMA_VERSION = 1
_VERSION_KEY = "calibration_schema_version"

COMPUTE_KINDS = ("matmul", "elementwise")
# What cost.collective_time_s charges; "send" is a ppermute to the next device.
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send")

_MIB = 2**20
_KIB = 2**10
# Default sizes per platform. CPU: small enough that a calibration of 8 virtual
# devices takes seconds; the largest elementwise array (16 MiB) exceeds common
# last-level caches. Accelerators: matmuls of 4096^2 and more reach a large share
# of peak on current GPUs and TPUs; buffers of 1 GiB and collectives up to
# 128 MiB are bandwidth bound on NVLink and ICI.
_DEFAULTS = {
    "cpu": {"matmul_sizes": (256, 512), "elementwise_bytes": (4 * _MIB, 16 * _MIB),
            "sizes_bytes": (64 * _KIB, 512 * _KIB, 4 * _MIB), "dtype": "float32"},
    "accelerator": {"matmul_sizes": (4096, 8192),
                    "elementwise_bytes": (256 * _MIB, 1024 * _MIB),
                    "sizes_bytes": (1 * _MIB, 16 * _MIB, 128 * _MIB), "dtype": "bfloat16"},
}


def _positive(value: Any, path: str, *, zero_ok: bool = False) -> float:
  ok = not isinstance(value, bool) and isinstance(value, (int, float))
  x = float(value) if ok else math.nan
  if not math.isfinite(x) or x < 0 or (x == 0 and not zero_ok):
    allowed = "a non-negative number" if zero_ok else "a positive number"
    raise ValueError(f"{path} must be {allowed}, got {value!r} ({type(value).__name__}).")
  return x


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
  """One timed operation, with the sizes the cost model charges it for.

  Attributes:
    kind: one of `COMPUTE_KINDS` or `COLLECTIVE_KINDS`.
    level: for a collective, the topology level its group spans; "" otherwise.
    group_size: devices in one collective group; 1 for compute.
    dtype: element type, e.g. "float32".
    flops: per device (compute; 0 for collectives).
    nbytes: per device: bytes read plus written (compute), or the larger of a
      collective's operand and result (XLA's convention, as cost.py charges).
    count: operations each timed run executes back to back (one program).
    times_s: seconds of each timed run, in order.
  """

  kind: str
  level: str = ""
  group_size: int = 1
  dtype: str
  flops: float = 0.0
  nbytes: float
  count: int = 1
  times_s: tuple[float, ...]

  def __post_init__(self):
    if self.kind not in COMPUTE_KINDS + COLLECTIVE_KINDS:
      raise ValueError(f"Measurement.kind must be one of {COMPUTE_KINDS + COLLECTIVE_KINDS}, "
                       f"got {self.kind!r}.")
    if self.kind in COLLECTIVE_KINDS and not (self.level and self.group_size > 1):
      raise ValueError(f"A {self.kind} measurement needs a level name and group_size > 1, "
                       f"got level={self.level!r}, group_size={self.group_size!r}.")
    object.__setattr__(self, "flops", _positive(self.flops, "Measurement.flops", zero_ok=True))
    object.__setattr__(self, "nbytes", _positive(self.nbytes, "Measurement.nbytes"))
    if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
      raise ValueError(f"Measurement.count must be a positive int, got {self.count!r}.")
    times = tuple(_positive(t, "Measurement.times_s[]") for t in self.times_s)
    if not times:
      raise ValueError("Measurement.times_s must hold at least one time, got ().")
    object.__setattr__(self, "times_s", times)

  @property
  def time_s(self) -> float:
    """Seconds of one operation: the median timed run over `count`."""
    return float(statistics.median(self.times_s)) / self.count


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LevelFit:
  """Fitted alpha-beta figures of one topology level.

  Attributes:
    name: the level's name in the Cluster, e.g. "nvlink".
    bandwidth_bytes_per_s: 1/beta, in the sense of `Level.bandwidth_bytes_per_s`.
    latency_s: alpha, in the sense of `Level.latency_s`.
    bandwidth_fitted: False when the times did not grow with size: the
      bandwidth is then the lowest the times allow (a lower bound; measure
      larger sizes) and only the latency was fitted.
  """

  name: str
  bandwidth_bytes_per_s: float
  latency_s: float
  bandwidth_fitted: bool = True

  def __post_init__(self):
    _positive(self.bandwidth_bytes_per_s, f"LevelFit({self.name!r}).bandwidth_bytes_per_s")
    _positive(self.latency_s, f"LevelFit({self.name!r}).latency_s", zero_ok=True)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
  """Measured device figures and the raw times they were fitted to.

  Attributes:
    device_kind: as JAX reports it for the measured devices.
    num_devices: how many devices ran the measurements.
    platform: "cpu", "gpu" or "tpu".
    jax_version: the JAX that compiled the measured programs.
    compute_efficiency: fitted fraction of peak FLOP/s, in (0, 1].
    memory_bandwidth_bytes_per_s: the memory bandwidth per device the elementwise
      ops achieved (the roofline's memory term).
    levels: one fit per measured level (levels of size 1 have none), innermost first.
    measurements: every timed operation.
    notes: what the fit had to assume or clip, in words.
    layers: the step's layer kinds timed with `calibrate(layers=...)`, each beside
      what the calibrated cost model charges for it.
  """

  device_kind: str
  num_devices: int
  platform: str
  jax_version: str
  compute_efficiency: float
  memory_bandwidth_bytes_per_s: float
  levels: tuple[LevelFit, ...] = ()
  measurements: tuple[Measurement, ...] = ()
  notes: tuple[str, ...] = ()
  layers: tuple[_layers.LayerTiming, ...] = ()

  def __post_init__(self):
    for field in ("device_kind", "platform", "jax_version"):
      if not isinstance(getattr(self, field), str):
        raise ValueError(f"Calibration.{field} must be a string, got {getattr(self, field)!r}.")
    _positive(self.compute_efficiency, "Calibration.compute_efficiency")
    if not 0 < self.compute_efficiency <= 1:
      raise ValueError("Calibration.compute_efficiency must be in (0, 1], got "
                       f"{self.compute_efficiency!r}.")
    _positive(self.memory_bandwidth_bytes_per_s, "Calibration.memory_bandwidth_bytes_per_s")
    if not isinstance(self.num_devices, int) or self.num_devices < 1:
      raise ValueError(f"Calibration.num_devices must be a positive int, got {self.num_devices!r}.")
    for field in ("levels", "measurements", "notes", "layers"):
      object.__setattr__(self, field, tuple(getattr(self, field)))
    names = [l.name for l in self.levels]
    if len(set(names)) != len(names):
      raise ValueError(f"Calibration.levels must have unique names, got {names}.")

  def level_figures(self) -> dict[str, tuple[float, float]]:
    """Level name -> (bandwidth_bytes_per_s, latency_s)."""
    return {l.name: (l.bandwidth_bytes_per_s, l.latency_s) for l in self.levels}

  def apply(self, cluster: cluster_lib.Cluster) -> cluster_lib.Cluster:
    """`cluster` with the calibrated figures; every other field unchanged.

    Raises:
      ValueError: the cluster describes another device kind, or lacks a
        calibrated level.
    """
    if _kind_key(cluster.device_kind) != _kind_key(self.device_kind):
      raise ValueError(
          f"This calibration was measured on {self.device_kind!r} but cluster "
          f"{cluster.name!r} has device_kind {cluster.device_kind!r}. Calibrate on the "
          "cluster's own devices (profile.calibrate), or start from Cluster.from_devices().")
    known = {l.name for l in cluster.levels}
    missing = [l.name for l in self.levels if l.name not in known]
    if missing:
      raise ValueError(
          f"Calibrated level(s) {missing} are not levels of cluster {cluster.name!r} "
          f"({sorted(known)}). Calibrate with that cluster, or drop those levels with "
          "dataclasses.replace(calibration, levels=...).")
    return cluster.with_calibration(
        compute_efficiency=self.compute_efficiency,
        memory_bandwidth_bytes_per_s=self.memory_bandwidth_bytes_per_s,
        levels={l.name: {"bandwidth_bytes_per_s": l.bandwidth_bytes_per_s,
                         "latency_s": l.latency_s} for l in self.levels})

  def to_json(self) -> str:
    """This calibration as JSON, read back exactly by `from_json`."""
    data = {_VERSION_KEY: SCHEMA_VERSION, **dataclasses.asdict(self)}
    return json.dumps(data, indent=1) + "\n"

  @classmethod
  def from_json(cls, text: str) -> Calibration:
    """Reads `to_json`'s output.

    Raises:
      ValueError: not JSON, another schema version, or a missing or invalid field.
    """
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"Calibration JSON is not valid JSON: {e}.") from None
    if not isinstance(data, dict) or data.get(_VERSION_KEY) != SCHEMA_VERSION:
      got = data.get(_VERSION_KEY) if isinstance(data, dict) else data
      raise ValueError(f"Calibration JSON must have {_VERSION_KEY} {SCHEMA_VERSION}, got "
                       f"{got!r}. Measure again with profile.calibrate.")
    del data[_VERSION_KEY]
    try:
      levels = tuple(LevelFit(**l) for l in data.pop("levels", ()))
      measurements = tuple(Measurement(**{**m, "times_s": tuple(m["times_s"])})
                           for m in data.pop("measurements", ()))
      layers = tuple(_layers.LayerTiming(**{**l, "times_s": tuple(l["times_s"])})
                     for l in data.pop("layers", ()))
      return cls(levels=levels, measurements=measurements, layers=layers,
                 notes=tuple(data.pop("notes", ())), **data)
    except (TypeError, KeyError) as e:
      raise ValueError(f"Calibration JSON has a missing or unknown field: {e}.") from None

  def summary(self, cluster: cluster_lib.Cluster) -> str:
    """A table of the analytic figures of `cluster` beside the calibrated ones,
    and of every measured time beside what each predicts."""
    calibrated = self.apply(cluster)
    rows = [f"Calibration of {self.num_devices} x {self.device_kind} (jax {self.jax_version})"
            f" against {cluster.name!r}:",
            f"  {'figure':<34} {'analytic':>12} {'calibrated':>12}",
            f"  {'compute_efficiency':<34} {cluster.compute_efficiency:>12.4g} "
            f"{calibrated.compute_efficiency:>12.4g}",
            f"  {'memory_bandwidth_bytes_per_s':<34} {cluster.memory_bandwidth_bytes_per_s:>12.4g} "
            f"{calibrated.memory_bandwidth_bytes_per_s:>12.4g}"]
    for before, after in zip(cluster.levels, calibrated.levels):
      if before.name in self.level_figures():
        rows.append(f"  {before.name + '.bandwidth_bytes_per_s':<34} "
                    f"{before.bandwidth_bytes_per_s:>12.4g} {after.bandwidth_bytes_per_s:>12.4g}")
        rows.append(f"  {before.name + '.latency_s':<34} {before.latency_s:>12.4g} "
                    f"{after.latency_s:>12.4g}")
    rows.append(f"  {'measured':<34} {'time_s':>12} {'analytic':>12} {'calibrated':>12}")
    for m in self.measurements:
      label = f"{m.kind} {m.level} {_human_bytes(m.nbytes)}".replace("  ", " ")
      rows.append(f"  {label:<34} {m.time_s:>12.4g} {predicted_time_s(m, cluster):>12.4g} "
                  f"{predicted_time_s(m, calibrated):>12.4g}")
    if self.layers:
      rows.append(f"  {'layer kind (layers), mesh, candidate':<60} {'time_s':>10} "
                  f"{'predicted':>10}")
    for t in self.layers:
      where = " ".join(f"{k}{v}" for k, v in t.mesh.items()) or "one device"
      label = f"{t.layer} (x{t.count}), {where}" + (f", {t.candidate}" if t.candidate else "")
      rows.append(f"  {label:<60} {t.time_s:>10.4g} {t.predicted_s:>10.4g}")
    rows.extend(f"  note: {n}" for n in self.notes)
    return "\n".join(rows)


def _kind_key(device_kind: str) -> str:
  return device_kind.strip().lower()


def _human_bytes(nbytes: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", _MIB), ("KiB", _KIB)):
    if nbytes >= size:
      return f"{nbytes / size:.4g} {unit}"
  return f"{nbytes:.4g} B"


# ----------------------------------------------------------------------------
# The cost model's prediction of a measurement, and the fits.


def _level_index(cluster: cluster_lib.Cluster, name: str) -> int:
  for i, level in enumerate(cluster.levels):
    if level.name == name:
      return i
  raise ValueError(f"Cluster {cluster.name!r} has no level {name!r}; its levels are "
                   f"{[l.name for l in cluster.levels]}.")


def predicted_time_s(m: Measurement, cluster: cluster_lib.Cluster) -> float:
  """Seconds the cost model charges for the measured operation on `cluster`."""
  if m.kind in COMPUTE_KINDS:
    return float(cost.roofline_time_s(np.array([m.flops]), np.array([m.nbytes]), [m.dtype],
                                      cluster)[0])
  factors = [1] * len(cluster.levels)
  factors[_level_index(cluster, m.level)] = m.group_size
  return cost.collective_time_s(m.kind, m.nbytes, tuple(factors), cluster.levels)


def _with_level(cluster: cluster_lib.Cluster, name: str, *, bandwidth_bytes_per_s: float,
                latency_s: float) -> cluster_lib.Cluster:
  return cluster.with_calibration(levels={name: {
      "bandwidth_bytes_per_s": bandwidth_bytes_per_s, "latency_s": latency_s}})


def _relative_sse(coefficients: np.ndarray, times_s: np.ndarray, x: np.ndarray) -> float:
  return float(np.sum((coefficients @ x / times_s - 1.0) ** 2))


def fit_level(measurements: Sequence[Measurement], cluster: cluster_lib.Cluster,
              level: str) -> LevelFit:
  """Least-squares alpha and beta of one level from its collectives' median times.

  `cost.collective_time_s` is linear in the level's latency and in the inverse
  of its bandwidth: t = a * latency_s + b / bandwidth, with a and b read off
  the formula itself (evaluated at unit figures). The fit minimises the sum of
  squared relative errors, so that small (latency-bound) and large
  (bandwidth-bound) sizes count alike, with latency >= 0 and bandwidth > 0.

  Raises:
    ValueError: no measurement of a collective over `level`.
  """
  ms = [m for m in measurements if m.kind in COLLECTIVE_KINDS and m.level == level]
  if not ms:
    raise ValueError(f"No collective measured over level {level!r}; measured levels: "
                     f"{sorted({m.level for m in measurements if m.level})}.")
  unit_beta = _with_level(cluster, level, bandwidth_bytes_per_s=1.0, latency_s=0.0)
  unit_both = _with_level(cluster, level, bandwidth_bytes_per_s=1.0, latency_s=1.0)
  b = np.array([predicted_time_s(m, unit_beta) for m in ms])
  a = np.array([predicted_time_s(m, unit_both) for m in ms]) - b
  coefficients = np.stack([a, b], axis=1)
  times = np.array([m.time_s for m in ms])
  weighted = coefficients / times[:, None]
  ones = np.ones(len(ms))
  x, *_ = np.linalg.lstsq(weighted, ones, rcond=None)
  if not (x[0] >= 0 and x[1] > 0):
    # The optimum lies on the boundary of latency >= 0, beta >= 0: fit one of them.
    only = [np.array([0.0, weighted[:, 1] @ ones / (weighted[:, 1] @ weighted[:, 1])]),
            np.array([weighted[:, 0] @ ones / (weighted[:, 0] @ weighted[:, 0]), 0.0])]
    x = min(only, key=lambda y: _relative_sse(coefficients, times, y))
  if x[1] > 0:
    return LevelFit(name=level, bandwidth_bytes_per_s=float(1.0 / x[1]), latency_s=float(x[0]))
  # Times did not grow with size: take the largest beta no measurement contradicts
  # (bandwidth alone explains at most each time), then fit latency given it.
  beta = float(np.min(times / b))
  rest = 1.0 - weighted[:, 1] * beta
  latency = max(float(weighted[:, 0] @ rest / (weighted[:, 0] @ weighted[:, 0])), 0.0)
  return LevelFit(name=level, bandwidth_bytes_per_s=1.0 / beta, latency_s=latency,
                  bandwidth_fitted=False)


def _inverse_scale(predicted_s: np.ndarray, times_s: np.ndarray) -> float:
  """The s minimising sum((s * predicted / time - 1)^2)."""
  q = predicted_s / times_s
  return float(q.sum() / (q @ q))


def fit_compute(measurements: Sequence[Measurement], cluster: cluster_lib.Cluster
                ) -> tuple[float, float, tuple[str, ...]]:
  """(compute_efficiency, memory_bandwidth_bytes_per_s, notes) from compute times.

  Efficiency: the matmul times over the roofline's at efficiency 1, fitted in
  relative error; clipped to 1 (with a note) if the devices beat the cluster's
  peak. Bandwidth: what the roofline, with that efficiency, needs to reproduce
  the elementwise times.

  Raises:
    ValueError: no matmul or no elementwise measurement.
  """
  notes = []
  matmuls = [m for m in measurements if m.kind == "matmul"]
  elementwise = [m for m in measurements if m.kind == "elementwise"]
  if not matmuls or not elementwise:
    raise ValueError("fit_compute needs matmul and elementwise measurements, got kinds "
                     f"{sorted({m.kind for m in measurements})}.")
  at_peak = dataclasses.replace(cluster, compute_efficiency=1.0)
  predicted = np.array([predicted_time_s(m, at_peak) for m in matmuls])
  efficiency = 1.0 / _inverse_scale(predicted, np.array([m.time_s for m in matmuls]))
  if efficiency > 1.0:
    notes.append(f"matmuls reached {efficiency:.3g} x the peak of {cluster.name!r}; "
                 "compute_efficiency clipped to 1 (the cluster's peak FLOP/s is too low).")
    efficiency = 1.0
  # Memory time at unit bandwidth (the roofline's memory term: bytes / bandwidth).
  memory_s = np.array([m.nbytes for m in elementwise], dtype=np.float64)
  inverse_bandwidth = _inverse_scale(memory_s, np.array([m.time_s for m in elementwise]))
  bandwidth = 1.0 / inverse_bandwidth
  fitted = dataclasses.replace(cluster, compute_efficiency=efficiency,
                               memory_bandwidth_bytes_per_s=bandwidth)
  for m in elementwise:
    if predicted_time_s(m, fitted) > m.nbytes / bandwidth * (1 + 1e-9):
      notes.append(f"the elementwise op of {_human_bytes(m.nbytes)} is compute bound under "
                   "the fitted figures; the bandwidth is a lower bound.")
      break
  return efficiency, bandwidth, tuple(notes)


# ----------------------------------------------------------------------------
# Timing on devices.


# One timing rule for kernels, collectives and layers (tests replace it by a counter).
_time_runs_s = _layers.time_runs_s


def _filled(shape: tuple[int, ...], dtype: str, sharding: NamedSharding) -> jax.Array:
  """Zeros made on the devices (no host transfer in multi-host jobs; repeated sums stay finite)."""
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _ordered(devices: Sequence[Any]) -> list[Any]:
  """Devices in the cluster's numbering: TPU chips by coordinates, x fastest."""
  devices = list(devices)
  if all(len(getattr(d, "coords", ()) or ()) == 3 for d in devices):
    return sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0,
                                          tuple(reversed(d.coords)),
                                          getattr(d, "core_on_chip", 0)))
  return devices


def _time_compute(devices: list[Any], dtype: str, matmul_sizes: Sequence[int],
                  elementwise_bytes: Sequence[int], repeats: int) -> list[Measurement]:
  n = len(devices)
  mesh = Mesh(np.array(devices), ("d",))
  spec = PartitionSpec("d")
  sharding = NamedSharding(mesh, spec)
  itemsize = np.dtype(dtype).itemsize
  out = []
  matmul = jax.jit(jax.shard_map(jnp.matmul, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  for size in sorted(matmul_sizes):
    x = _filled((n, size, size), dtype, sharding)
    out.append(Measurement(kind="matmul", dtype=dtype, flops=2.0 * size**3,
                           nbytes=3.0 * size * size * itemsize,
                           times_s=_time_runs_s(matmul, (x, x), repeats)))
  add = jax.jit(jax.shard_map(jnp.add, mesh=mesh, in_specs=(spec, spec), out_specs=spec))
  for nbytes in sorted(elementwise_bytes):
    elements = max(nbytes // itemsize, 1)
    x = _filled((n * elements,), dtype, sharding)
    out.append(Measurement(kind="elementwise", dtype=dtype, flops=float(elements),
                           nbytes=3.0 * elements * itemsize,
                           times_s=_time_runs_s(add, (x, x), repeats)))
  return out


def _collective_loop(kind: str, k: int, iterations: int) -> Callable[[jax.Array], jax.Array]:
  """`iterations` dependent collectives of `kind` over axis "level", in one program.

  One program dispatch is shared by all of them, so the time per collective
  excludes most of the dispatch overhead, which a train step does not pay per
  collective. The carry keeps its shape: all-gather's result is sliced back to
  one block, reduce-scatter's written back into its operand (both O(1/k) of the
  collective's own traffic).
  """
  ring = [(i, (i + 1) % k) for i in range(k)]

  def step(i, x):
    if kind == "all-reduce":
      return jax.lax.psum(x, "level")
    if kind == "all-to-all":
      return jax.lax.all_to_all(x, "level", 0, 0, tiled=True)
    if kind == "send":
      return jax.lax.ppermute(x, "level", ring)
    n = x.shape[0]
    if kind == "all-gather":
      return jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(x, "level", tiled=True),
                                          (i % k) * n, n)
    piece = jax.lax.psum_scatter(x, "level", tiled=True)
    return jax.lax.dynamic_update_slice_in_dim(x, piece, (i % k) * (n // k), 0)

  return lambda x: jax.lax.fori_loop(0, iterations, step, x)


def _time_level(devices: list[Any], cluster: cluster_lib.Cluster, index: int, dtype: str,
                sizes_bytes: Sequence[int], repeats: int, iterations: int
                ) -> list[Measurement]:
  """Every collective kind over a mesh axis spanning level `index`, all groups at once."""
  k = cluster.levels[index].size
  inner = math.prod(l.size for l in cluster.levels[:index])
  mesh = Mesh(np.array(devices).reshape(-1, k, inner), ("outer", "level", "inner"))
  spec = PartitionSpec(("outer", "level", "inner"))
  sharding = NamedSharding(mesh, spec)
  itemsize = np.dtype(dtype).itemsize
  out = []
  for kind in COLLECTIVE_KINDS:
    # check_vma=False: a psum's result is invariant over "level" while the loop
    # carry that feeds it varies; the loop needs both typed alike.
    fn = jax.jit(jax.shard_map(_collective_loop(kind, k, iterations), mesh=mesh,
                               in_specs=spec, out_specs=spec, check_vma=False))
    for nbytes in sorted(sizes_bytes):
      # XLA's convention: nbytes is the larger of operand and result; the
      # operand splits into k equal pieces for scatter-like kinds.
      elements = max(round(nbytes / itemsize / k), 1) * k
      operand = elements // k if kind == "all-gather" else elements
      x = _filled((len(devices) * operand,), dtype, sharding)
      out.append(Measurement(kind=kind, level=cluster.levels[index].name, group_size=k,
                             dtype=dtype, nbytes=float(elements * itemsize), count=iterations,
                             times_s=_time_runs_s(fn, (x,), repeats)))
  return out


def _check_sizes(name: str, values: Sequence[int]) -> tuple[int, ...]:
  values = tuple(values)
  if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
    raise ValueError(f"calibrate: {name} must be a non-empty sequence of positive ints, got "
                     f"{values!r}.")
  return values


def calibrate(cluster: cluster_lib.Cluster, devices: Sequence[Any] | None = None, *,
              sizes_bytes: Sequence[int] | None = None,
              matmul_sizes: Sequence[int] | None = None,
              elementwise_bytes: Sequence[int] | None = None,
              dtype: str | None = None, repeats: int = 5, iterations: int = 10,
              layers: tuple[Callable[..., Any], Sequence[Any]] | None = None,
              layer_mesh: strategies.MeshShape | None = None,
              max_candidates: int = 2) -> Calibration:
  """Times compute and every level's collectives on `devices`; fits the cost model's figures.

  All devices run at once, as they do in a sharded step: a batched matmul and
  an elementwise add (one block per device), then, for each topology level of
  size > 1, each collective kind over a mesh axis spanning that level (the
  other axes form independent groups that run concurrently).

  Args:
    cluster: the cluster the devices form; its levels say which devices share
      which link. Devices are numbered as `Cluster` says (innermost level
      fastest); TPU chips are ordered by their coordinates.
    devices: default `jax.devices()`; exactly `cluster.num_devices` of them.
    sizes_bytes: per-device collective sizes (XLA's convention: the larger of
      operand and result). Default by platform: 64 KiB-4 MiB on CPU, 1-128 MiB
      on accelerators.
    matmul_sizes: sides of the square matmuls, per device. Default 256, 512 on
      CPU; 4096, 8192 on accelerators (compute bound there).
    elementwise_bytes: per-device size of each elementwise operand.
    dtype: element type of every measurement; default float32 on CPU, bfloat16
      on accelerators.
    repeats: timed runs per operation (after one untimed run); the median counts.
    iterations: collectives per timed program, back to back, so that the
      program's dispatch overhead is shared among them.
    layers: (train step, its example arguments): also time each distinct layer kind
      of that step, whole on one device and under its `max_candidates` fastest
      candidates on `layer_mesh`, and fit `compute_efficiency` to the one-device
      layer times instead of the matmuls (`profile.time_layers`).
    layer_mesh: the stage mesh for the candidate timings; default a data x tensor
      mesh over all devices.
    max_candidates: candidates timed per layer kind.
  Returns:
    The Calibration: fitted figures and every raw time.
  Raises:
    ValueError: a device count that differs from the cluster's, bad sizes, or
      `layers` that is not a (step, arguments) pair.
  """
  if layers is not None and not (isinstance(layers, tuple) and len(layers) == 2
                                 and callable(layers[0])
                                 and isinstance(layers[1], (tuple, list))):
    raise ValueError("calibrate: layers must be (train_step, example_args), e.g. "
                     f"layers=(train_step, (model, optimizer, batch)); got {layers!r:.80}.")
  devices = _ordered(jax.devices() if devices is None else devices)
  if len(devices) != cluster.num_devices:
    raise ValueError(
        f"calibrate: {len(devices)} devices given but cluster {cluster.name!r} has "
        f"{cluster.num_devices}. Pass devices= with exactly those devices, or use "
        "Cluster.from_devices(devices).")
  kinds = sorted({str(d.device_kind) for d in devices})
  if len(kinds) > 1:
    raise ValueError(f"calibrate: mixed device kinds {kinds}; pass devices of one kind.")
  if _kind_key(kinds[0]) != _kind_key(cluster.device_kind):
    warnings.warn(f"calibrate: measuring {kinds[0]!r} devices for cluster {cluster.name!r} "
                  f"of {cluster.device_kind!r}; the result applies to {kinds[0]!r} clusters.",
                  stacklevel=2)
  for name, value in (("repeats", repeats), ("iterations", iterations)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"calibrate: {name} must be a positive int, got {value!r}.")
  platform = str(devices[0].platform)
  defaults = _DEFAULTS["cpu" if platform == "cpu" else "accelerator"]
  dtype = np.dtype(dtype or defaults["dtype"]).name
  sizes_bytes = _check_sizes("sizes_bytes", sizes_bytes or defaults["sizes_bytes"])
  matmul_sizes = _check_sizes("matmul_sizes", matmul_sizes or defaults["matmul_sizes"])
  elementwise_bytes = _check_sizes("elementwise_bytes",
                                   elementwise_bytes or defaults["elementwise_bytes"])

  measurements = _time_compute(devices, dtype, matmul_sizes, elementwise_bytes, repeats)
  efficiency, bandwidth, notes = fit_compute(measurements, cluster)
  fits = []
  for index, level in enumerate(cluster.levels):
    if level.size > 1:
      timed = _time_level(devices, cluster, index, dtype, sizes_bytes, repeats, iterations)
      measurements.extend(timed)
      fits.append(fit_level(timed, cluster, level.name))
      if not fits[-1].bandwidth_fitted:
        notes += (f"level {level.name!r}: collective times did not grow with size; its "
                  "bandwidth is only a lower bound (use larger sizes_bytes).",)
  result = Calibration(
      device_kind=kinds[0], num_devices=len(devices), platform=platform,
      jax_version=jax.__version__, compute_efficiency=efficiency,
      memory_bandwidth_bytes_per_s=bandwidth, levels=tuple(fits),
      measurements=tuple(measurements), notes=notes)
  if layers is not None:
    result = _calibrate_layers(result, cluster, devices, layers, layer_mesh, max_candidates,
                               repeats)
  for note in result.notes:
    _log.warning("calibrate: %s", note)
  return result


def _calibrate_layers(result: Calibration, cluster: cluster_lib.Cluster,
                      devices: Sequence[Any], layers: tuple[Callable[..., Any], Sequence[Any]],
                      mesh: strategies.MeshShape | None, max_candidates: int,
                      repeats: int) -> Calibration:
  """`result` with compute_efficiency fitted to the step's layers, and their timings."""
  step, args = layers
  if mesh is None:
    meshes = strategies.mesh_shapes(cluster, cluster.num_devices)
    mesh = next((m for m in meshes if len(m.axes) == 2), meshes[0])
  kernels = result.apply(cluster)
  timed = _layers.time_layers(step, *args, cluster=kernels, devices=devices, mesh=mesh,
                              max_candidates=max_candidates, repeats=repeats)
  graph = graph_lib.trace(step, *args)
  efficiency = _layers.fit_layer_efficiency(graph, timed, kernels)
  kinds = sum(1 for t in timed if not t.mesh)
  note = (f"compute_efficiency {efficiency:.3g} fitted to {kinds} layer kind(s) of the "
          f"step; matmuls alone gave {result.compute_efficiency:.3g}.")
  if efficiency >= 1.0 - 1e-6:
    note += (" At the bound: the layers ran at least as fast as the roofline at the "
             "cluster's peak, e.g. because XLA fuses elementwise ops whose bytes the "
             "roofline charges one by one.")
  result = dataclasses.replace(result, compute_efficiency=efficiency,
                               notes=result.notes + (note,))
  return dataclasses.replace(result, layers=_layers.predict(graph, timed, result.apply(cluster)))


def _matches(calibration: Calibration, cluster: cluster_lib.Cluster,
             devices: Sequence[Any]) -> bool:
  measured = {l.name for l in cluster.levels if l.size > 1}
  return (_kind_key(calibration.device_kind) == _kind_key(str(devices[0].device_kind))
          and calibration.num_devices == len(devices)
          and {l.name for l in calibration.levels} == measured)


def calibrate_cached(cluster: cluster_lib.Cluster, path: str | os.PathLike[str],
                     devices: Sequence[Any] | None = None, **kwargs: Any) -> Calibration:
  """The calibration stored at `path` if it fits these devices; else measures and stores it.

  A stored calibration fits when its device kind, device count and calibrated
  levels are those of `devices` and `cluster`; the measurement options
  (`kwargs`, as for `calibrate`) are not compared. A file that is not a
  calibration is an error, never overwritten.

  Raises:
    ValueError: `path` exists but holds no valid calibration; or as `calibrate`.
  """
  devices = list(jax.devices() if devices is None else devices)
  path = os.fspath(path)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    try:
      stored = Calibration.from_json(text)
    except ValueError as e:
      raise ValueError(f"{path}: {e} Delete the file or choose another path.") from None
    if _matches(stored, cluster, devices):
      return stored
    warnings.warn(
        f"{path} holds a calibration of {stored.num_devices} x {stored.device_kind!r} "
        f"(levels {[l.name for l in stored.levels]}); measuring {len(devices)} x "
        f"{str(devices[0].device_kind)!r} for {cluster.name!r} and overwriting it.",
        stacklevel=2)
  calibration = calibrate(cluster, devices, **kwargs)
  temporary = f"{path}.tmp{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as f:
    f.write(calibration.to_json())
  os.replace(temporary, path)
  return calibration
