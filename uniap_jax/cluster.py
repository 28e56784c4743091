"""The cluster a plan targets: devices, their peaks and memory, and topology.

A `Cluster` is plain, immutable data: per-device peak FLOP/s by dtype, memory
and memory bandwidth, and a tuple of topology `Level`s, innermost (fastest)
first, each with the alpha-beta figures of one collective step. The cost model
reads it; nothing here computes a cost.

Three ways to get one: a named preset (`Cluster.preset("a100-40g-2x8")`, the
`PRESETS` table below), a JSON file (`Cluster.from_json`, schema in
docs/cluster_schema.md), or the devices JAX sees (`Cluster.from_devices()`),
which knows the figures of common device kinds and warns about the ones it has
to guess. Calibration (`Cluster.with_calibration`) replaces the analytic
figures with measured ones.

Figures come from reference/hardware.md unless a comment says otherwise. GPU
memory is in GB (1e9 bytes) as the vendors and hardware.md write it; TPU memory
is in GiB (2**30 bytes) as hardware.md writes it.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

SCHEMA_VERSION = 1  # version of the JSON written by `Cluster.to_json`

# Fraction of peak FLOP/s that real kernels reach, before calibration. Assumed:
# published hand-tuned end-to-end MFU is 38-71% (hardware.md: MaxText, Megatron,
# Llama 3, PaLM) and includes communication and pipeline bubbles, which our
# cost model charges separately, so kernels alone reach at least that; 0.6 sits
# inside that range. `Cluster.with_calibration` replaces it with a measurement.
DEFAULT_COMPUTE_EFFICIENCY = 0.6

# Dtype names `peak_flops_per_s` may list. "tfloat32" is the TF32 tensor-core
# rate of float32 matmuls (XLA's default precision on Ampere and Hopper GPUs).
DTYPES = ("bfloat16", "float16", "float32", "float64", "tfloat32", "int8",
          "float8_e4m3fn", "float8_e5m2")

# Where `Cluster.peak_flops` looks when a dtype is not listed, in order.
# 16-bit floats share tensor-core rates; devices without 16-bit units (TITAN Xp)
# compute them in float32 after conversion. float32 on a device that lists only
# 16-bit rates (TPU) takes the bfloat16 rate: XLA's default precision on TPU
# runs a float32 matmul as one bfloat16 pass with float32 accumulation. float64
# has no fallback: no rate we could guess is close.
_FALLBACK_DTYPES = types.MappingProxyType({
    "bfloat16": ("float16", "float32"),
    "float16": ("bfloat16", "float32"),
    "float32": ("bfloat16", "float16"),
    "tfloat32": ("float32", "bfloat16", "float16"),
    "int8": ("bfloat16", "float16", "float32"),
    "float8_e4m3fn": ("bfloat16", "float16", "float32"),
    "float8_e5m2": ("bfloat16", "float16", "float32"),
    "float64": (),
})

# Collective step latencies: "a few microseconds inside a node and tens across
# nodes" (hardware.md). TPU ICI links chips directly, so it gets the intra-node
# figure; DCN crosses the data-centre network like InfiniBand, slower.
INTRA_NODE_LATENCY_S = 5e-6
INTER_NODE_LATENCY_S = 2e-5
DCN_LATENCY_S = 5e-5


# ----------------------------------------------------------------------------
# Validation helpers: each returns the normalised value or raises a ValueError
# that names the field's path, what is allowed, and what was given.


def _bad(path: str, allowed: str, value: Any) -> ValueError:
  return ValueError(
      f"{path} must be {allowed}, got {value!r} ({type(value).__name__}).")


def _number(value: Any, path: str, *, zero_ok: bool = False) -> float:
  allowed = "a non-negative number" if zero_ok else "a positive number"
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise _bad(path, allowed, value)
  x = float(value)
  if not math.isfinite(x) or x < 0 or (x == 0 and not zero_ok):
    raise _bad(path, allowed, value)
  return x


def _count(value: Any, path: str) -> int:
  ok = not isinstance(value, bool) and (
      isinstance(value, numbers.Integral)
      or (isinstance(value, float) and value.is_integer()))
  if not ok or value < 1:
    raise _bad(path, "a positive integer", value)
  return int(value)


def _fraction(value: Any, path: str) -> float:
  try:
    x = _number(value, path)
  except ValueError:
    x = math.nan
  if not 0 < x <= 1:
    raise _bad(path, "a number in (0, 1]", value)
  return x


def _text(value: Any, path: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise _bad(path, "a non-empty string", value)
  return value


def _notes(value: Any, path: str) -> str:
  if not isinstance(value, str):
    raise _bad(path, "a string", value)
  return value


def _flag(value: Any, path: str) -> bool:
  if not isinstance(value, bool):
    raise _bad(path, "true or false", value)
  return value


class _FrozenMapping(Mapping[str, float]):
  """A read-only, hashable dict sorted by key: keeps Cluster immutable."""

  __slots__ = ("_items", "_dict")

  def __init__(self, items: Mapping[str, float]):
    self._items = tuple(sorted(items.items()))
    self._dict = dict(self._items)

  def __getitem__(self, key: str) -> float:
    return self._dict[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._dict)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(self._items)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Mapping):
      return NotImplemented
    return self._dict == dict(other.items())

  def __repr__(self) -> str:
    return repr(self._dict)

  def __reduce__(self):
    return (_FrozenMapping, (self._dict,))


def _peaks(value: Any, path: str) -> _FrozenMapping:
  allowed = "a mapping from dtype name to FLOP/s, e.g. {'bfloat16': 312e12}"
  if isinstance(value, (list, tuple)) and all(
      isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
    value = dict(value)  # (dtype, FLOP/s) pairs
  if not isinstance(value, Mapping) or not value:
    raise _bad(path, allowed, value)
  unknown = sorted(str(k) for k in value if k not in DTYPES)
  if unknown:
    raise ValueError(
        f"{path} has unknown dtype(s) {', '.join(map(repr, unknown))}; "
        f"allowed: {', '.join(DTYPES)}.")
  return _FrozenMapping(
      {k: _number(v, f"{path}[{k!r}]") for k, v in value.items()})


# One check per field, shared by the constructors and by `from_json`.
_LEVEL_CHECKS = types.MappingProxyType({
    "name": _text,
    "size": _count,
    "bandwidth_bytes_per_s": _number,
    "latency_s": lambda v, p: _number(v, p, zero_ok=True),
    "torus": _flag,
})
_CLUSTER_CHECKS = types.MappingProxyType({
    "name": _text,
    "device_kind": _text,
    "num_nodes": _count,
    "devices_per_node": _count,
    "peak_flops_per_s": _peaks,
    "memory_bytes": _count,
    "memory_bandwidth_bytes_per_s": _number,
    "compute_efficiency": _fraction,
    "notes": _notes,
})


def _set_checked(obj: Any, checks: Mapping[str, Any], where: str) -> None:
  for field, check in checks.items():
    object.__setattr__(obj, field, check(getattr(obj, field), where + field))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Level:
  """One level of the topology: `size` groups of the level below, linked alike.

  Attributes:
    name: e.g. "nvlink", "pcie", "infiniband", "ici-x", "dcn"; unique within
      a cluster.
    size: how many groups of the level below this level joins.
    bandwidth_bytes_per_s: per device and direction, what one ring step at this
      level achieves.
    latency_s: alpha of one collective step at this level; 0 drops the latency
      term, as the UniAP paper does.
    torus: wrap-around links (TPU ICI), so a ring can use both directions.
  """

  name: str
  size: int
  bandwidth_bytes_per_s: float
  latency_s: float
  torus: bool = False

  def __post_init__(self):
    _set_checked(self, _LEVEL_CHECKS, "Level.")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
  """Devices, their peaks and memory, and the topology a plan targets.

  Devices are numbered innermost-fastest: device d sits at position
  d % levels[0].size in its innermost group, and so on outwards. A node (host)
  holds `devices_per_node` consecutive devices. On GPUs the first level is the
  node; on TPUs the levels are the ICI torus dimensions and hosts need not align
  with them.

  Attributes:
    name: preset name or a label of your choice.
    device_kind: as JAX reports it, e.g. "NVIDIA A100-SXM4-40GB", "TPU v5p".
    num_nodes: hosts (processes) in the cluster.
    devices_per_node: JAX devices per host.
    peak_flops_per_s: per device, by dtype name (see `DTYPES`); read it through
      `peak_flops`, which falls back for dtypes not listed.
    memory_bytes: per device.
    memory_bandwidth_bytes_per_s: per device, HBM or GDDR.
    levels: topology, innermost (fastest) first; sizes multiply to num_devices.
    compute_efficiency: fraction of peak that kernels reach
      (`DEFAULT_COMPUTE_EFFICIENCY` until calibrated).
    notes: where the figures come from and what is assumed.

  Example:
    >>> c = Cluster.preset("a100-40g-2x8")
    >>> c.num_devices, c.peak_flops("bfloat16"), [l.name for l in c.levels]
    (16, 312000000000000.0, ['nvlink', 'infiniband'])
  """

  name: str
  device_kind: str
  num_nodes: int
  devices_per_node: int
  peak_flops_per_s: Mapping[str, float]
  memory_bytes: int
  memory_bandwidth_bytes_per_s: float
  levels: tuple[Level, ...]
  compute_efficiency: float = DEFAULT_COMPUTE_EFFICIENCY
  notes: str = ""

  def __post_init__(self):
    _set_checked(self, _CLUSTER_CHECKS, "Cluster.")
    levels = self.levels
    if isinstance(levels, Level) or not isinstance(levels, Sequence) or any(
        not isinstance(l, Level) for l in levels):
      raise _bad("Cluster.levels", "a sequence of Level objects", levels)
    object.__setattr__(self, "levels", tuple(levels))
    _check_topology(self.num_nodes, self.devices_per_node, self.levels,
                    "Cluster: ")

  @property
  def num_devices(self) -> int:
    """All devices: the product of the level sizes."""
    return math.prod(l.size for l in self.levels)

  @property
  def platform(self) -> str:
    """The XLA backend that compiles for these devices: "cpu", "tpu" or "gpu".

    Read from `device_kind` as JAX reports it ("cpu"; "TPU v4", ...); any other
    kind is a GPU. The cost model needs it where backends keep different buffers
    (XLA:CPU materialises broadcasts that GPU and TPU fuse, `strategies`).
    """
    kind = self.device_kind.strip().lower()
    if kind == "cpu":
      return "cpu"
    return "tpu" if kind.startswith("tpu") else "gpu"

  def peak_flops(self, dtype: Any) -> float:
    """Peak FLOP/s of one device for `dtype`, falling back if it is not listed.

    Args:
      dtype: a dtype name ("bfloat16"), numpy/JAX dtype or scalar type.
    Returns:
      `peak_flops_per_s[dtype]`, else the first listed of its fallbacks
      (`_FALLBACK_DTYPES`): 16-bit floats share one rate and drop to float32;
      float32 on a bfloat16-only device (TPU) takes the bfloat16 rate, which is
      what XLA's default matmul precision runs there.
    Raises:
      ValueError: unknown dtype, or neither it nor a fallback is listed.
    """
    name = _dtype_name(dtype)
    for candidate in (name, *_FALLBACK_DTYPES[name]):
      if candidate in self.peak_flops_per_s:
        return self.peak_flops_per_s[candidate]
    raise ValueError(
        f"Cluster {self.name!r} lists no peak for {name} "
        f"(listed: {', '.join(self.peak_flops_per_s)}) and {name} has no "
        f"fallback. Add peak_flops_per_s[{name!r}] in the cluster JSON.")

  # -- presets

  @classmethod
  def preset(cls, name: str) -> Cluster:
    """The named cluster from `PRESETS`; `Cluster.presets()` lists the names."""
    if not isinstance(name, str):
      raise _bad("Cluster.preset(name)", "a preset name (str)", name)
    if name in PRESETS:
      return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown cluster preset {name!r}.{hint} Known presets: "
        f"{', '.join(cls.presets())}. For other hardware use "
        "Cluster.from_json(path) or Cluster.from_devices().")

  @staticmethod
  def presets() -> tuple[str, ...]:
    """Names of all presets, sorted."""
    return tuple(sorted(PRESETS))

  # -- JSON

  def to_json(self) -> str:
    """This cluster as JSON (docs/cluster_schema.md), exactly as read back."""
    data = {"schema_version": SCHEMA_VERSION}
    for field in _CLUSTER_CHECKS:
      value = getattr(self, field)
      data[field] = dict(value) if field == "peak_flops_per_s" else value
    data["levels"] = [
        {f: getattr(l, f) for f in _LEVEL_CHECKS} for l in self.levels]
    return json.dumps(data, indent=2) + "\n"

  @classmethod
  def from_json(cls, path_or_text: str | os.PathLike[str]) -> Cluster:
    """Reads a cluster from a JSON file or JSON text (docs/cluster_schema.md).

    Args:
      path_or_text: a path, or JSON text (a string starting with "{").
    Returns:
      The Cluster; unlisted optional fields take their defaults.
    Raises:
      ValueError: unreadable file or invalid JSON; the message names the file,
        the field path (e.g. "levels[1].bandwidth_bytes_per_s") and what is
        allowed.
    """
    if isinstance(path_or_text, str) and path_or_text.lstrip()[:1] in "{[":
      label, text = "cluster JSON", path_or_text
    elif isinstance(path_or_text, (str, os.PathLike)):
      label = os.fspath(path_or_text)
      try:
        with open(label, encoding="utf-8") as f:
          text = f.read()
      except OSError as e:
        raise ValueError(
            f"Cannot read cluster JSON {label!r}: {e.strerror}. Pass a path to "
            "a JSON file or the JSON text itself.") from None
    else:
      raise _bad("Cluster.from_json(path_or_text)", "a path or JSON text",
                 path_or_text)
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{label}: not valid JSON: {e}.") from None
    return _cluster_from_dict(data, label)

  # -- devices

  @classmethod
  def from_devices(cls, devices: Sequence[Any] | None = None, *,
                   devices_per_node: int | None = None) -> Cluster:
    """Describes the devices JAX sees, with known figures for their kind.

    Reads the device kind, the count, and the hosts (one per `process_index`);
    fills peaks, memory and bandwidth from a table of known kinds, and guesses
    the interconnect (and, for TPUs without coordinates, the torus shape). A
    warning names every guessed figure: measure them with `uniap_jax.profile`
    and apply them with `with_calibration`, or write a cluster JSON.

    Args:
      devices: JAX devices (or objects with `device_kind`, `process_index`,
        `platform`); default `jax.devices()`.
      devices_per_node: devices per node, when a process does not own a whole
        node (e.g. one process per GPU); default: devices per process.
    Returns:
      The Cluster, named like the presets ("a100-40g-2x8", "tpu-v5p-128",
      "cpu-8").
    Raises:
      ValueError: no devices, mixed kinds, uneven hosts, or a kind not in the
        table (the message lists the known kinds).
    """
    if devices is None:
      import jax  # pylint: disable=g-import-not-at-top (not at module import)
      devices = jax.devices()
    return _from_devices(list(devices), devices_per_node)

  # -- calibration

  def with_calibration(
      self, *, compute_efficiency: float | None = None,
      memory_bandwidth_bytes_per_s: float | None = None,
      levels: Mapping[str, Mapping[str, float]] | None = None) -> Cluster:
    """A copy with measured figures in place of the analytic ones.

    Args:
      compute_efficiency: measured fraction of peak FLOP/s, in (0, 1].
      memory_bandwidth_bytes_per_s: measured per-device memory bandwidth.
      levels: by level name, a mapping with "bandwidth_bytes_per_s" and/or
        "latency_s", e.g. {"nvlink": {"bandwidth_bytes_per_s": 2.4e11}}.
    Raises:
      ValueError: an unknown level or figure name, or an invalid figure.
    """
    levels = dict(levels or {})
    known = [l.name for l in self.levels]
    unknown = sorted(set(levels) - set(known))
    if unknown:
      raise ValueError(
          "with_calibration: unknown level(s) "
          f"{', '.join(map(repr, unknown))}; {self.name!r} has levels "
          f"{', '.join(known)}.")
    new_levels = []
    for level in self.levels:
      figures = dict(levels.get(level.name, {}))
      extra = sorted(set(figures) - {"bandwidth_bytes_per_s", "latency_s"})
      if extra:
        raise ValueError(
            f"with_calibration: levels[{level.name!r}] has unknown figure(s) "
            f"{', '.join(map(repr, extra))}; allowed: bandwidth_bytes_per_s, "
            "latency_s.")
      new_levels.append(dataclasses.replace(level, **figures))
    changes: dict[str, Any] = {"levels": tuple(new_levels)}
    if compute_efficiency is not None:
      changes["compute_efficiency"] = compute_efficiency
    if memory_bandwidth_bytes_per_s is not None:
      changes["memory_bandwidth_bytes_per_s"] = memory_bandwidth_bytes_per_s
    return dataclasses.replace(self, **changes)


def _dtype_name(dtype: Any) -> str:
  if isinstance(dtype, str):
    name = dtype
  else:
    try:
      name = np.dtype(dtype).name
    except TypeError:
      name = str(dtype)
  if name not in _FALLBACK_DTYPES:
    raise ValueError(f"Unknown dtype {dtype!r}; known: {', '.join(DTYPES)}.")
  return name


def _check_topology(num_nodes: int, devices_per_node: int,
                    levels: Sequence[Level], where: str) -> None:
  """Levels exist, have unique names, and their sizes match the node counts."""
  if not levels:
    raise ValueError(f"{where}levels must list at least one Level "
                     "(a single device is one level of size 1).")
  names = [l.name for l in levels]
  dupes = sorted(n for n, k in collections.Counter(names).items() if k > 1)
  if dupes:
    raise ValueError(f"{where}level names must be unique; repeated: "
                     f"{', '.join(map(repr, dupes))}.")
  n = math.prod(l.size for l in levels)
  sizes = " x ".join(f"{l.name} {l.size}" for l in levels)
  if n % devices_per_node:
    options = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(
        f"{where}devices_per_node={devices_per_node} does not divide the {n} "
        f"devices the levels describe ({sizes}). Use devices_per_node in "
        f"{', '.join(map(str, options))}, or change the level sizes.")
  if num_nodes * devices_per_node != n:
    raise ValueError(
        f"{where}num_nodes={num_nodes} x devices_per_node={devices_per_node} = "
        f"{num_nodes * devices_per_node} devices, but the levels describe {n} "
        f"({sizes}). Use num_nodes={n // devices_per_node}, or change the "
        "level sizes.")


_REQUIRED = ("schema_version", "name", "device_kind", "num_nodes",
             "devices_per_node", "peak_flops_per_s", "memory_bytes",
             "memory_bandwidth_bytes_per_s", "levels")
_OPTIONAL = ("compute_efficiency", "notes")
_LEVEL_REQUIRED = ("name", "size", "bandwidth_bytes_per_s", "latency_s")


def _check_keys(data: Any, required: Sequence[str], optional: Sequence[str],
                where: str) -> None:
  if not isinstance(data, dict):
    raise _bad(where, "a JSON object", data)
  allowed = (*required, *optional)
  unknown = sorted(k for k in data if k not in allowed)
  if unknown:
    raise ValueError(
        f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; "
        f"allowed: {', '.join(allowed)}.")
  missing = [k for k in required if k not in data]
  if missing:
    raise ValueError(
        f"{where} is missing field(s) {', '.join(map(repr, missing))}; see "
        "docs/cluster_schema.md.")


def _cluster_from_dict(data: Any, label: str) -> Cluster:
  """Checks parsed JSON, naming paths after `label`; builds the Cluster."""
  _check_keys(data, _REQUIRED, _OPTIONAL, label)
  version = data["schema_version"]
  if isinstance(version, bool) or version != SCHEMA_VERSION:
    raise _bad(f"{label}: schema_version",
               f"{SCHEMA_VERSION} (the version this uniap_jax reads)", version)
  values = {f: check(data[f], f"{label}: {f}")
            for f, check in _CLUSTER_CHECKS.items() if f in data}
  raw_levels = data["levels"]
  if not isinstance(raw_levels, list):
    raise _bad(f"{label}: levels", "a list of level objects", raw_levels)
  levels = []
  for i, raw in enumerate(raw_levels):
    where = f"{label}: levels[{i}]"
    _check_keys(raw, _LEVEL_REQUIRED, ("torus",), where)
    levels.append(Level(**{f: check(raw[f], f"{where}.{f}")
                           for f, check in _LEVEL_CHECKS.items() if f in raw}))
  _check_topology(values["num_nodes"], values["devices_per_node"], levels,
                  f"{label}: ")
  return Cluster(levels=tuple(levels), **values)


# ----------------------------------------------------------------------------
# Known devices and links.


def _link(name: str, bandwidth_bytes_per_s: float, latency_s: float) -> Level:
  """A kind of interconnect as one device sees it: a size-1 Level template."""
  return Level(name=name, size=1, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
               latency_s=latency_s)


# Per device and direction, from hardware.md unless noted.
NVLINK4 = _link("nvlink", 450e9, INTRA_NODE_LATENCY_S)  # H100
NVLINK3 = _link("nvlink", 300e9, INTRA_NODE_LATENCY_S)  # A100
NVLINK2 = _link("nvlink", 150e9, INTRA_NODE_LATENCY_S)  # V100
PCIE4 = _link("pcie", 25e9, INTRA_NODE_LATENCY_S)  # x16, effective
PCIE3 = _link("pcie", 12e9, INTRA_NODE_LATENCY_S)  # x16, effective
# InfiniBand, per NIC. NDR is not in hardware.md: 400 Gb/s / 8, derived the same
# way as hardware.md's HDR (200 Gb/s = 25 GB/s) and EDR (100 Gb/s = 12.5 GB/s).
IB_NDR = _link("infiniband", 50e9, INTER_NODE_LATENCY_S)
IB_HDR = _link("infiniband", 25e9, INTER_NODE_LATENCY_S)
IB_EDR = _link("infiniband", 12.5e9, INTER_NODE_LATENCY_S)
ICI_45 = _link("ici", 45e9, INTRA_NODE_LATENCY_S)  # v4, v5e, per link
ICI_90 = _link("ici", 90e9, INTRA_NODE_LATENCY_S)  # v5p, per link
# Between TPU slices: "one to two orders of magnitude slower than ICI"
# (hardware.md); assumed one order below ICI's 45 GB/s, rounded down.
DCN = _link("dcn", 4e9, DCN_LATENCY_S)
# cpu-8, made up so that planning tests see real trade-offs, not a real machine:
# 1e8 B/s against 1e11 FLOP/s is 1000 FLOP per byte, an A100's ratio on NVLink
# (312e12 / 300e9), so communication is neither free nor prohibitive.
CPU_HOST = _link("host", 1e8, INTRA_NODE_LATENCY_S)
# Between CPU processes (gloo over the network or loopback), made up the same way:
# an A100 node's NVLink : InfiniBand HDR ratio (300 : 25) below CPU_HOST.
CPU_NETWORK = _link("network", 1e8 * 25 / 300, INTER_NODE_LATENCY_S)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _DeviceSpec:
  """Figures of one device kind, and how `from_devices` recognises it."""

  key: str            # preset name prefix, e.g. "a100-40g"
  device_kind: str    # as JAX reports it
  pattern: str        # regex (case-insensitive) matched against device_kind
  peak_flops_per_s: Mapping[str, float]
  memory_bytes: int
  memory_bandwidth_bytes_per_s: float
  intra: Level        # inside a node (GPU) or per ICI dimension (TPU)
  inter: Level        # across nodes (GPU) or slices (TPU)
  nics_per_node: int | None = None  # None: one NIC per device (DGX-style)
  cores_per_device: int = 1   # TPU preset names count TensorCores
  torus_multiple: int = 0     # TPU: the slice wraps when all dims are multiples


_GB = 10**9    # GPU memory as vendors and hardware.md write it
_GIB = 2**30   # TPU memory as hardware.md writes it

# Order matters: the first pattern that matches wins.
_DEVICE_SPECS = (
    _DeviceSpec(key="h100-80g", device_kind="NVIDIA H100 80GB HBM3",
                pattern=r"H100",
                # hardware.md; tfloat32: NVIDIA's H100 SXM datasheet (dense,
                # half the 16-bit rate).
                peak_flops_per_s={"bfloat16": 989e12, "float16": 989e12,
                                  "tfloat32": 494.5e12, "float32": 67e12},
                memory_bytes=80 * _GB, memory_bandwidth_bytes_per_s=3350e9,
                intra=NVLINK4, inter=IB_NDR),
    _DeviceSpec(key="a100-80g", device_kind="NVIDIA A100-SXM4-80GB",
                pattern=r"A100.*80\s*GB",
                peak_flops_per_s={"bfloat16": 312e12, "float16": 312e12,
                                  "tfloat32": 156e12, "float32": 19.5e12},
                memory_bytes=80 * _GB, memory_bandwidth_bytes_per_s=2039e9,
                intra=NVLINK3, inter=IB_HDR),
    _DeviceSpec(key="a100-40g", device_kind="NVIDIA A100-SXM4-40GB",
                pattern=r"A100",
                peak_flops_per_s={"bfloat16": 312e12, "float16": 312e12,
                                  "tfloat32": 156e12, "float32": 19.5e12},
                memory_bytes=40 * _GB, memory_bandwidth_bytes_per_s=1555e9,
                intra=NVLINK3, inter=IB_HDR),
    # Volta has fp16 tensor cores only (hardware.md's column merges bf16/fp16);
    # XLA computes bfloat16 there in float32, so bfloat16 gets the float32 rate.
    _DeviceSpec(key="v100-32g", device_kind="Tesla V100-SXM2-32GB",
                pattern=r"V100.*32\s*GB",
                peak_flops_per_s={"float16": 125e12, "bfloat16": 15.7e12,
                                  "float32": 15.7e12},
                memory_bytes=32 * _GB, memory_bandwidth_bytes_per_s=900e9,
                intra=NVLINK2, inter=IB_EDR),
    _DeviceSpec(key="v100-16g", device_kind="Tesla V100-SXM2-16GB",
                pattern=r"V100",
                peak_flops_per_s={"float16": 125e12, "bfloat16": 15.7e12,
                                  "float32": 15.7e12},
                memory_bytes=16 * _GB, memory_bandwidth_bytes_per_s=900e9,
                intra=NVLINK2, inter=IB_EDR),
    # Consumer cards: PCIe inside the node, one NIC per node.
    _DeviceSpec(key="rtx3090-24g", device_kind="NVIDIA GeForce RTX 3090",
                pattern=r"RTX 3090",
                peak_flops_per_s={"bfloat16": 71e12, "float16": 71e12,
                                  "float32": 35.6e12},
                memory_bytes=24 * _GB, memory_bandwidth_bytes_per_s=936e9,
                intra=PCIE4, inter=IB_HDR, nics_per_node=1),
    # hardware.md lists no 16-bit rate: the float32 fallback applies.
    _DeviceSpec(key="titanxp-12g", device_kind="NVIDIA TITAN Xp",
                pattern=r"TITAN Xp",
                peak_flops_per_s={"float32": 12.1e12},
                memory_bytes=12 * _GB, memory_bandwidth_bytes_per_s=548e9,
                intra=PCIE3, inter=IB_EDR, nics_per_node=1),
    # TPUs: one JAX device per chip (v4 and v5p merge the chip's 2 TensorCores
    # into one device, "megacore"); figures per chip from hardware.md.
    # Wrap-around: the Cloud TPU v4 docs make a slice a torus only when every
    # dimension is a multiple of 4 (4x4x4, 4x4x8, ...); smaller slices are
    # meshes. Assumed the same for v5p, and that v5e wraps only as a full
    # 16x16 pod.
    _DeviceSpec(key="tpu-v4", device_kind="TPU v4", pattern=r"^TPU v4$",
                peak_flops_per_s={"bfloat16": 275e12},
                memory_bytes=32 * _GIB, memory_bandwidth_bytes_per_s=1200e9,
                intra=ICI_45, inter=DCN, cores_per_device=2, torus_multiple=4),
    _DeviceSpec(key="tpu-v5e", device_kind="TPU v5 lite",
                pattern=r"^TPU v5( lite|e)$",
                peak_flops_per_s={"bfloat16": 197e12},
                memory_bytes=16 * _GIB, memory_bandwidth_bytes_per_s=810e9,
                intra=ICI_45, inter=DCN, torus_multiple=16),
    _DeviceSpec(key="tpu-v5p", device_kind="TPU v5p", pattern=r"^TPU v5p?$",
                peak_flops_per_s={"bfloat16": 459e12},
                memory_bytes=95 * _GIB, memory_bandwidth_bytes_per_s=2765e9,
                intra=ICI_90, inter=DCN, cores_per_device=2, torus_multiple=4),
    # cpu: nominal, for tests. 1e11 FLOP/s is one core with two 8-wide float32
    # FMA units at ~3 GHz (2 x 8 x 2 x 3e9 = 96e9), rounded; XLA computes
    # 16-bit floats on CPU in float32, so the fallback applies. Memory is large
    # (64 GiB) so that nothing is memory-bound unless a test sets
    # memory_limit_bytes.
    _DeviceSpec(key="cpu", device_kind="cpu", pattern=r"^cpu$",
                peak_flops_per_s={"float32": 1e11},
                memory_bytes=64 * _GIB, memory_bandwidth_bytes_per_s=1e10,
                intra=CPU_HOST, inter=CPU_NETWORK),
)
_SPECS_BY_KEY = types.MappingProxyType({s.key: s for s in _DEVICE_SPECS})


def _match_kind(device_kind: str) -> _DeviceSpec:
  for spec in _DEVICE_SPECS:
    if re.search(spec.pattern, device_kind.strip(), re.IGNORECASE):
      return spec
  raise ValueError(
      f"Unknown device kind {device_kind!r}; known kinds: "
      f"{', '.join(s.device_kind for s in _DEVICE_SPECS)} (and their PCIe or "
      "other-memory variants). Describe the hardware in a JSON file and use "
      "Cluster.from_json(path) (schema: docs/cluster_schema.md).")


def _build(spec: _DeviceSpec, name: str, num_nodes: int, devices_per_node: int,
           levels: Sequence[Level], notes: str) -> Cluster:
  return Cluster(
      name=name, device_kind=spec.device_kind, num_nodes=num_nodes,
      devices_per_node=devices_per_node,
      peak_flops_per_s=spec.peak_flops_per_s, memory_bytes=spec.memory_bytes,
      memory_bandwidth_bytes_per_s=spec.memory_bandwidth_bytes_per_s,
      levels=tuple(levels), notes=notes)


def _gpu(key: str, num_nodes: int, devices_per_node: int, *,
         intra: Level | None = None, nics_per_node: int | None = None,
         name: str | None = None, notes: str = "") -> Cluster:
  """GPU nodes: one intra-node level; an InfiniBand level if there are 2+ nodes.

  The inter-node bandwidth per device is the node's NIC bandwidth shared by its
  devices: nics x NIC rate / devices_per_node (one NIC per device by default).
  A size-1 level (one node) is left out.
  """
  spec = _SPECS_BY_KEY[key]
  intra = intra or spec.intra
  levels = [dataclasses.replace(intra, size=devices_per_node)]
  if num_nodes > 1:
    nics = nics_per_node or spec.nics_per_node or devices_per_node
    share = spec.inter.bandwidth_bytes_per_s * min(nics, devices_per_node)
    levels.append(dataclasses.replace(
        spec.inter, size=num_nodes,
        bandwidth_bytes_per_s=share / devices_per_node))
  return _build(spec, name or f"{key}-{num_nodes}x{devices_per_node}",
                num_nodes, devices_per_node, levels, notes)


def _ici_levels(spec: _DeviceSpec, dims: Sequence[int]) -> list[Level]:
  """One level per ICI dimension of size > 1 ("ici-x", ...), innermost first."""
  torus = all(d % spec.torus_multiple == 0 for d in dims)
  levels = [dataclasses.replace(spec.intra, size=d, name=f"ici-{axis}",
                                torus=torus)
            for axis, d in zip("xyz", dims) if d > 1]
  return levels or [dataclasses.replace(spec.intra, size=1, name="ici")]


def _tpu(key: str, dims: Sequence[int], *, chips_per_host: int,
         notes: str = "") -> Cluster:
  """One TPU slice of shape `dims` (chips), hosts of `chips_per_host` chips."""
  spec = _SPECS_BY_KEY[key]
  levels = _ici_levels(spec, dims)
  chips = math.prod(dims)
  return _build(spec, f"{key}-{chips * spec.cores_per_device}",
                chips // chips_per_host, chips_per_host, levels, notes)


def _cpu(num_devices: int, notes: str) -> Cluster:
  return _gpu("cpu", 1, num_devices, name=f"cpu-{num_devices}", notes=notes)


_CPU_NOTES = ("Nominal figures for the virtual CPU devices tests run on "
              "(XLA_FLAGS=--xla_force_host_platform_device_count), not "
              "measured: 1000 FLOP per byte of link bandwidth as on an A100 "
              "node, and memory so large that nothing is memory-bound unless a "
              "test sets memory_limit_bytes.")

# Every preset. Figures: the device table above; topology as noted.
PRESETS: Mapping[str, Cluster] = types.MappingProxyType({c.name: c for c in (
    # DGX-style nodes: 8 GPUs on NVLink, one InfiniBand NIC per GPU.
    _gpu("a100-40g", 1, 8),
    _gpu("a100-40g", 2, 8),
    _gpu("a100-40g", 4, 4),
    _gpu("h100-80g", 1, 8),
    _gpu("h100-80g", 8, 8),
    _gpu("v100-32g", 1, 8),
    # Consumer cards on PCIe (3.0 for TITAN Xp, 4.0 for RTX 3090).
    _gpu("titanxp-12g", 1, 8),
    _gpu("rtx3090-24g", 1, 8),
    # TPU names count TensorCores (2 per v4/v5p chip, 1 per v5e chip); one JAX
    # device per chip. Hosts: 4 chips each (v4, v5p; v5e pods use 4-chip hosts).
    _tpu("tpu-v4", (2, 2, 4), chips_per_host=4, notes=(
        "16 chips as a 2x2x4 slice, 4 hosts of 4 chips. A 3D mesh without "
        "wrap-around: the Cloud TPU v4 docs make a slice a torus only when "
        "every dimension is a multiple of 4.")),
    _tpu("tpu-v5p", (4, 4, 4), chips_per_host=4,
         notes="64 chips as a 4x4x4 cube, a 3D torus; 16 hosts of 4 chips."),
    _tpu("tpu-v5p", (8, 8, 16), chips_per_host=4,
         notes="1024 chips as an 8x8x16 slice, a 3D torus (every dimension a "
         "multiple of 4); 256 hosts of 4 chips."),
    _tpu("tpu-v5e", (16, 16), chips_per_host=4,
         notes="256 chips as a full 16x16 pod, a 2D torus; 64 hosts of 4 "
         "chips."),
    # The UniAP paper's environments (reference/uniap.md states only: EnvB's
    # GPUs have 12 GB; EnvC is 4 nodes of 4 GPUs). The rest is assumed.
    _gpu("v100-32g", 1, 8, name="env_a", notes=(
        "UniAP EnvA. Stated: nothing about its hardware. Assumed: one node of "
        "8 V100-SXM2-32GB on NVLink 2, a common single-server setup of the "
        "GPU generation of EnvB's 12 GB cards.")),
    _gpu("titanxp-12g", 2, 4, name="env_b", notes=(
        "UniAP EnvB. Stated: 12 GB GPUs. Assumed: TITAN Xp 12GB (the 12 GB "
        "device in hardware.md), 2 nodes of 4 on PCIe 3.0, one InfiniBand EDR "
        "NIC per node shared by its 4 GPUs.")),
    _gpu("a100-40g", 4, 4, name="env_c", notes=(
        "UniAP EnvC. Stated: 4 nodes of 4 GPUs. Assumed: A100-SXM4-40GB on "
        "NVLink 3, one InfiniBand HDR NIC per GPU (same figures as "
        "a100-40g-4x4).")),
    _cpu(8, _CPU_NOTES),
)})


# ----------------------------------------------------------------------------
# from_devices.


def _from_devices(devices: list[Any], devices_per_node: int | None) -> Cluster:
  if not devices:
    raise ValueError("Cluster.from_devices: no devices given. Pass "
                     "jax.devices() or leave `devices` unset.")
  kinds = sorted({str(d.device_kind) for d in devices})
  if len(kinds) > 1:
    raise ValueError(
        f"Cluster.from_devices: mixed device kinds {kinds}; uniap_jax plans "
        "homogeneous clusters. Pass the devices of one kind.")
  spec = _match_kind(kinds[0])
  n = len(devices)
  per_process = collections.Counter(int(d.process_index) for d in devices)
  counts = sorted(set(per_process.values()))
  if len(counts) > 1:
    raise ValueError(
        "Cluster.from_devices: processes hold different numbers of devices "
        f"({dict(sorted(per_process.items()))}); uniap_jax needs equal nodes. "
        "Pass devices_per_node=, or describe the cluster with from_json.")
  if devices_per_node is None:
    devices_per_node = counts[0]
  devices_per_node = _count(devices_per_node, "devices_per_node")
  if n % devices_per_node:
    raise ValueError(
        f"Cluster.from_devices: devices_per_node={devices_per_node} does not "
        f"divide the {n} devices. Use one of "
        f"{', '.join(str(d) for d in range(1, n + 1) if n % d == 0)}.")
  num_nodes = n // devices_per_node
  guessed = []

  if spec.key == "cpu":
    guessed.append("every figure (nominal CPU figures, see cpu-8)")
    cluster = _cpu(n, _CPU_NOTES)
    if num_nodes > 1:  # processes: a slower level between them
      cluster = _gpu("cpu", num_nodes, devices_per_node, notes=_CPU_NOTES,
                     name=f"cpu-{num_nodes}x{devices_per_node}")
  elif spec.key.startswith("tpu"):
    cluster = _tpu_from_devices(spec, devices, devices_per_node, guessed)
  else:
    intra = spec.intra
    if "pcie" in kinds[0].lower() and intra.name == "nvlink":
      intra = PCIE4  # PCIe cards of data-centre GPUs
    guessed.append(f"{intra.name} bandwidth {intra.bandwidth_bytes_per_s:.3g} "
                   f"B/s and latency {intra.latency_s:.3g} s")
    if num_nodes > 1:
      nics = ("one per device" if spec.nics_per_node is None
              else f"{spec.nics_per_node} per node")
      guessed.append(
          f"{spec.inter.name} bandwidth {spec.inter.bandwidth_bytes_per_s:.3g} "
          f"B/s per NIC ({nics}) and latency {spec.inter.latency_s:.3g} s")
    cluster = _gpu(spec.key, num_nodes, devices_per_node, intra=intra)
  if kinds[0] != spec.device_kind:
    guessed.append(f"that {kinds[0]!r} has the figures of {spec.device_kind!r}")
  guessed.append(f"compute_efficiency {DEFAULT_COMPUTE_EFFICIENCY} (analytic "
                 "default)")
  notes = "Probed by Cluster.from_devices; guessed: " + "; ".join(guessed) + "."
  warnings.warn(
      f"Cluster.from_devices({cluster.name}): could not know "
      f"{'; '.join(guessed)}. "
      "Measure them (uniap_jax.profile) and apply with "
      "Cluster.with_calibration, or write them in a cluster JSON "
      "(Cluster.from_json).", stacklevel=3)
  return dataclasses.replace(cluster, device_kind=kinds[0], notes=notes)


def _tpu_from_devices(spec: _DeviceSpec, devices: list[Any],
                      devices_per_node: int, guessed: list[str]) -> Cluster:
  """Slices from `slice_index`; ICI dimensions from chip `coords` if present."""
  slice_of = [int(getattr(d, "slice_index", 0) or 0) for d in devices]
  slices = sorted(set(slice_of))
  chips = len(devices) // len(slices)
  coords = [getattr(d, "coords", None)
            for d, s in zip(devices, slice_of) if s == slices[0]]
  dims: tuple[int, ...] = (chips,)
  if all(c is not None and len(c) == 3 for c in coords):
    found = tuple(max(c[a] for c in coords) - min(c[a] for c in coords) + 1
                  for a in range(3))
    if math.prod(found) == chips:
      dims = found
  if dims == (chips,):
    guessed.append(f"the ICI shape (no chip coordinates: one ring of {chips})")
    levels = [dataclasses.replace(spec.intra, size=chips, name="ici")]
  else:
    levels = _ici_levels(spec, dims)
    guessed.append("whether the ICI slice wraps around (torus)")
  guessed.append(f"ICI bandwidth {spec.intra.bandwidth_bytes_per_s:.3g} B/s "
                 f"per link and latency {spec.intra.latency_s:.3g} s")
  if len(slices) > 1:
    levels.append(dataclasses.replace(spec.inter, size=len(slices)))
    guessed.append(f"DCN bandwidth {spec.inter.bandwidth_bytes_per_s:.3g} B/s "
                   f"and latency {spec.inter.latency_s:.3g} s")
  n = len(devices)
  return _build(spec, f"{spec.key}-{n * spec.cores_per_device}",
                n // devices_per_node, devices_per_node, levels, "")


# Platforms (as `jax.Device.platform` and `Cluster.platform` name them) whose
# collectives inside a conditional only wait for the devices of their own group.
_GROUP_LOCAL_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def skips_idle_work(platform: str, automatic_axis_sizes: Sequence[int]) -> bool:
  """Whether the pipeline's table executors may run a tick's stage work under `lax.cond`.

  In tick t a device of stage s runs a forward (backward) only when the table has a
  micro-batch at [t, s]; skipping the idle ones puts the stage body, with every
  collective XLA inserts for the automatic (non-manual) mesh axes, inside a
  conditional whose predicate differs between stages. The ppermutes between stages
  stay outside it, on every device in every tick.

  Safe when no collective can sit inside the branch: every automatic axis (all axes
  but "pp" and the manual data axes) has size 1, so the body issues none. On GPU and
  TPU it is safe for any mesh: a collective over automatic axes groups devices that
  differ only in those axes, hence share their "pp" coordinate, hence their stage and
  the predicate: every member of a group takes the same branch, and a collective
  waits only for its group. (A collective inside a branch that only some members of
  its group take would deadlock there too; none exists, since "pp" is manual and the
  manual data axes issue no collective inside the body.) The CPU backend is not
  safe with collectives inside: its collectives inside a conditional whose predicate
  differs between devices can hang (measured with a tensor-parallel axis), so on CPU
  only meshes without automatic axes of size > 1 skip. Unknown platforms are treated
  like CPU. `uniap_jax.apply` decides by the devices it runs on, `uniap_jax.cost` by
  `Cluster.platform`.

  Args:
    platform: "cpu", "gpu" ("cuda", "rocm") or "tpu".
    automatic_axis_sizes: sizes of the mesh axes the pipeline's shard_map leaves
      automatic.
  """
  if platform.lower() in _GROUP_LOCAL_PLATFORMS:
    return True
  return all(int(n) == 1 for n in automatic_axis_sizes)
