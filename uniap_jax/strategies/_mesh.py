"""Intra-stage mesh shapes: a stage's devices as named axes laid over the topology."""

from __future__ import annotations

import dataclasses
import functools
import math
import re

from uniap_jax import cluster as cluster_lib


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MeshAxis:
  """One named mesh axis.

  Attributes:
    name: the axis name used in PartitionSpecs, e.g. "dp", "tp", "nvlink_0".
    size: number of devices along it.
  """

  name: str
  size: int

  def __post_init__(self):
    if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
      raise ValueError(f"MeshAxis.name must be an identifier, got {self.name!r}.")
    if not isinstance(self.size, int) or self.size < 1:
      raise ValueError(f"MeshAxis.size must be a positive int, got {self.size!r}.")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MeshShape:
  """The mesh of one pipeline stage: axes outermost first, as `jax.make_mesh` takes them.

  Devices of the stage are the stage's consecutive cluster devices; mesh position
  (row-major, last axis fastest) i is the stage's i-th device, so the last axis runs
  along the innermost (fastest) topology level.

  Attributes:
    axes: the named axes, outermost first; sizes multiply to the stage's devices.
    level_sizes: the cluster's level sizes, innermost first (from `Cluster.levels`).
    kind: "flat" (one axis), "dp_tp" (two axes) or "fine" (prime-sized axes per level).
  """

  axes: tuple[MeshAxis, ...]
  level_sizes: tuple[int, ...]
  kind: str = "dp_tp"

  def __post_init__(self):
    names = [a.name for a in self.axes]
    if len(set(names)) != len(names):
      raise ValueError(f"MeshShape axis names must be unique, got {names}.")
    if math.prod(self.level_sizes) % self.num_devices:
      raise ValueError(
          f"MeshShape with {self.num_devices} devices does not divide the cluster's "
          f"{math.prod(self.level_sizes)} devices (levels {self.level_sizes}).")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(a.name for a in self.axes)

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(a.size for a in self.axes)

  @property
  def num_devices(self) -> int:
    return math.prod(self.sizes)

  def as_dict(self) -> dict[str, int]:
    return {a.name: a.size for a in self.axes}

  def index(self, name: str) -> int:
    for i, a in enumerate(self.axes):
      if a.name == name:
        return i
    raise ValueError(f"No mesh axis {name!r}; axes are {list(self.names)}.")

  def level_factors(self, axes: tuple[int, ...]) -> tuple[int, ...]:
    """How a group over mesh axes (indices) spreads over the topology levels.

    Returns, per level (innermost first), how many distinct positions of that level
    one group touches. A collective runs hierarchically: its part inside the fastest
    level first, the slower levels on the reduced data.
    """
    return _level_factors(self.sizes, self.level_sizes, tuple(sorted(axes)))


@functools.lru_cache(maxsize=4096)
def _level_factors(sizes: tuple[int, ...], level_sizes: tuple[int, ...],
                   axes: tuple[int, ...]) -> tuple[int, ...]:
  strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
  ids = [0]
  for a in axes:
    ids = [d + c * strides[a] for d in ids for c in range(sizes[a])]
  factors = []
  radix = 1
  for size in level_sizes:
    factors.append(len({(d // radix) % size for d in ids}))
    radix *= size
  if math.prod(factors) != len(ids):
    # The group does not split cleanly along levels: charge it all to the slowest
    # level it touches.
    slowest = max(i for i, f in enumerate(factors) if f > 1)
    factors = [1] * len(level_sizes)
    factors[slowest] = len(ids)
  return tuple(factors)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _prime_factors(n: int) -> list[int]:
  out, p = [], 2
  while n > 1:
    while n % p == 0:
      out.append(p)
      n //= p
    p += 1
  return out


def _stage_levels(level_sizes: tuple[int, ...], num_devices: int) -> list[tuple[int, int]]:
  """(level index, devices of the stage along it), innermost first."""
  out, left = [], num_devices
  for i, size in enumerate(level_sizes):
    take = math.gcd(size, left)
    if take > 1:
      out.append((i, take))
    left //= take
  return out


def mesh_shapes(cluster: cluster_lib.Cluster, num_devices: int, *,
                fine: bool = True) -> tuple[MeshShape, ...]:
  """The intra-stage meshes worth planning for a stage of `num_devices` devices.

  One flat axis ("dp"); every two-axis split ("dp", "tp") with tp innermost, so a
  tensor-parallel axis stays inside a node (or along the fastest ICI dimension) for
  as long as it fits; and, with `fine`, the fine-grained view: one axis per prime
  factor of each level's share of the stage (8 devices in a node -> nvlink_0,
  nvlink_1, nvlink_2 of size 2), so that neighbouring layers can use different
  degrees (tp=4,dp=2 then tp=2,dp=4) inside one jit.

  Args:
    cluster: the target cluster.
    num_devices: devices of one stage; must divide `cluster.num_devices`.
    fine: include the fine-grained view.
  Returns:
    Mesh shapes, flat first, then two-axis splits by growing tp, then the fine view.
  Raises:
    ValueError: num_devices does not divide the cluster's devices.
  """
  total = cluster.num_devices
  if not isinstance(num_devices, int) or num_devices < 1 or total % num_devices:
    raise ValueError(
        f"A stage of num_devices={num_devices!r} does not divide the cluster's {total} "
        f"devices; use one of {_divisors(total)}.")
  level_sizes = tuple(l.size for l in cluster.levels)
  out = [MeshShape(axes=(MeshAxis(name="dp", size=num_devices),), level_sizes=level_sizes,
                   kind="flat")]
  for tp in _divisors(num_devices)[1:-1]:
    out.append(MeshShape(axes=(MeshAxis(name="dp", size=num_devices // tp),
                               MeshAxis(name="tp", size=tp)),
                         level_sizes=level_sizes, kind="dp_tp"))
  if fine:
    axes = []
    for level_index, share in reversed(_stage_levels(level_sizes, num_devices)):
      base = re.sub(r"[^A-Za-z0-9_]", "_", cluster.levels[level_index].name)
      if not re.match(r"[A-Za-z_]", base):
        base = "l" + base
      for j, p in enumerate(_prime_factors(share)):
        axes.append(MeshAxis(name=f"{base}_{j}", size=p))
    if len(axes) > 2:
      out.append(MeshShape(axes=tuple(axes), level_sizes=level_sizes, kind="fine"))
  return tuple(out)
