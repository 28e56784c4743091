"""The device mesh of a plan, and the plan's PartitionSpecs matched to a step's leaves.

Leaves are matched by path, never by position: a plan read back from JSON holds its
specs as nested dicts, and a plan made for another model must be caught here with a
message that names the first leaf that differs, not deep inside `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

from uniap_jax import plans

PIPELINE_AXIS = "pp"
# Axis names that carry tensor parallelism; they go innermost so that their frequent
# collectives stay inside a node (devices that are neighbours in jax.devices()).
TENSOR_AXIS_NAMES = ("tp", "tensor", "model", "mp", "sp")
_REMEDY = "Plan again for this model."


def mesh_axis_order(mesh_axes: Mapping[str, int]) -> tuple[str, ...]:
  """Plan order with `pp` outermost and tensor-parallel axes innermost (both stable)."""
  names = list(mesh_axes)
  outer = [n for n in names if n == PIPELINE_AXIS]
  inner = [n for n in names if n in TENSOR_AXIS_NAMES]
  middle = [n for n in names if n not in outer and n not in inner]
  return tuple(outer + middle + inner)


def make_mesh(plan: plans.Plan, devices: Sequence[Any] | None = None) -> Mesh:
  """The plan's mesh over the first `plan.num_devices` devices, every axis `Auto`.

  Auto axis types let `shard_map` take inputs in any layout and let
  `with_sharding_constraint` name every axis (jax 0.10's `make_mesh` defaults to
  Explicit, which needs neither and costs extra all-gathers in a partial-manual
  shard_map; see reference/pipelines.md, section 5).

  By default the devices are `jax.devices()` ordered by (process, id): each process's
  devices are contiguous, so with `pp` outermost a pipeline stage spans whole processes
  (one process per stage when pp equals the process count) and the inner, tensor-parallel
  axes stay inside one process. Every process builds the same mesh.

  Raises:
    ValueError: the plan needs more devices than there are.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  need = plan.num_devices
  shape = " x ".join(f"{k}={v}" for k, v in plan.mesh_axes.items())
  if need > len(devices):
    kind = devices[0].platform if devices else "none"
    raise ValueError(
        f"The plan needs {need} devices (mesh {shape}) but JAX sees {len(devices)} ({kind}). "
        f"Run it on {need} devices, or plan again for {len(devices)} devices.")
  names = mesh_axis_order(plan.mesh_axes)
  sizes = tuple(plan.mesh_axes[n] for n in names)
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices[:need])


def leaf_path(keypath: Sequence[Any]) -> str:
  """"/"-joined pytree path, without the trailing `.value` of an NNX Variable."""
  parts = []
  for key in keypath:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  if parts and parts[-1] == "value" and keypath and isinstance(keypath[-1],
                                                                 jax.tree_util.GetAttrKey):
    parts.pop()
  return "/".join(parts)


def paths_and_leaves(tree: Any) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(leaf_path(kp), leaf) for kp, leaf in flat]


def plan_leaf_specs(plan: plans.Plan) -> dict[tuple[int, str], PartitionSpec]:
  """(argument index, path) -> spec, from `leaf_specs`, else from the spec pytrees."""
  if plan.leaf_specs:
    return {(int(i), str(p)): s for i, p, s in plan.leaf_specs}
  out: dict[tuple[int, str], PartitionSpec] = {}
  param_args = [i for i in range(len(plan.param_specs) + len(plan.batch_argnums))
                if i not in plan.batch_argnums]
  trees = list(zip(param_args, plan.param_specs)) + list(zip(plan.batch_argnums, plan.batch_specs))
  for arg, tree in trees:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
    for kp, spec in flat:
      out[(arg, leaf_path(kp))] = PartitionSpec() if spec is None else spec
  return out


def _plan_leaf_shapes(plan: plans.Plan) -> dict[tuple[int, str], tuple[int, ...]]:
  # `leaf_shapes` ((arg, path, shape) triples) is a proposed Plan field; used when present.
  shapes = getattr(plan, "leaf_shapes", None) or ()
  return {(int(i), str(p)): tuple(int(d) for d in s) for i, p, s, *_ in shapes}


def spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def check_spec(spec: PartitionSpec, shape: Sequence[int], mesh_axes: Mapping[str, int],
               where: str) -> None:
  """Rejects a spec longer than the leaf's rank, unknown axes, or dims that do not divide."""
  if len(spec) > len(shape):
    raise ValueError(
        f"Plan does not match this step: {where} has shape {tuple(shape)} (rank {len(shape)}) "
        f"but the plan's spec {spec} has {len(spec)} entries. {_REMEDY}")
  for dim, entry in enumerate(spec):
    axes = spec_axes(entry)
    unknown = [a for a in axes if a not in mesh_axes]
    if unknown:
      raise ValueError(f"{where}: spec {spec} names mesh axes {unknown} that the plan's mesh "
                       f"{dict(mesh_axes)} lacks. {_REMEDY}")
    ways = math.prod(mesh_axes[a] for a in axes)
    if shape[dim] % ways:
      raise ValueError(
          f"Plan does not match this step: {where} has shape {tuple(shape)}; its dim {dim} "
          f"({shape[dim]}) does not split over {'x'.join(axes)}={ways} as spec {spec} says. "
          f"{_REMEDY}")


def match_specs(plan: plans.Plan, arg_index: int, tree: Any, *,
                what: str = "") -> list[PartitionSpec]:
  """One spec per leaf of `tree` (argument `arg_index` of the step), in leaf order.

  Raises:
    ValueError: a leaf the plan does not know, a plan leaf this argument lacks, or a
      shape that differs from the plan's; the message names the first one.
  """
  specs = plan_leaf_specs(plan)
  shapes = _plan_leaf_shapes(plan)
  leaves = paths_and_leaves(tree)
  out = []
  seen = set()
  for path, leaf in leaves:
    key = (arg_index, path)
    shape = tuple(getattr(leaf, "shape", ()))
    label = f"argument {arg_index}{what} leaf {path!r}" if path else f"argument {arg_index}{what}"
    if key not in specs:
      known = sorted(p for i, p in specs if i == arg_index)
      hint = f" The plan's leaves of argument {arg_index} begin {known[:3]}." if known else (
          f" The plan has no leaves for argument {arg_index}.")
      raise ValueError(f"Plan does not match this step: {label} {shape} is not in the plan."
                       f"{hint} {_REMEDY}")
    if key in shapes and shapes[key] != shape:
      raise ValueError(f"Plan does not match this step: {label} is {shape} here but "
                       f"{shapes[key]} in the plan. {_REMEDY}")
    check_spec(specs[key], shape, plan.mesh_axes, label)
    out.append(specs[key])
    seen.add(key)
  missing = sorted(p for i, p in specs if i == arg_index and (i, p) not in seen)
  if missing:
    shape = shapes.get((arg_index, missing[0]))
    extra = f" {shape}" if shape is not None else ""
    raise ValueError(
        f"Plan does not match this step: the plan has argument {arg_index} leaf "
        f"{missing[0]!r}{extra}, which this step's argument {arg_index} lacks "
        f"({len(missing)} such leaves). {_REMEDY}")
  return out


def named_shardings(mesh: Mesh, specs: Sequence[PartitionSpec]) -> list[NamedSharding]:
  return [NamedSharding(mesh, s) for s in specs]


def batch_axes(plan: plans.Plan, batch_specs: Sequence[PartitionSpec]) -> tuple[str, ...]:
  """Mesh axes that split the batch (leading) dim, in mesh order: the data-parallel axes."""
  found: tuple[str, ...] = ()
  for spec in batch_specs:
    if len(spec) and spec[0] is not None:
      found = spec_axes(spec[0])
      break
  order = mesh_axis_order(plan.mesh_axes)
  return tuple(a for a in order if a in found)


def check_batch_split(batch_size: int, num_microbatches: int, dp: int, *, where: str) -> None:
  """Raises a ValueError that lists workable sizes when the batch does not split."""
  unit = num_microbatches * dp
  if batch_size % unit == 0:
    return
  ms = [m for m in range(1, batch_size + 1) if batch_size % (m * dp) == 0]
  lower = (batch_size // unit) * unit
  sizes = [s for s in (lower, lower + unit) if s > 0]
  raise ValueError(
      f"{where} has batch size {batch_size}, which does not split into "
      f"num_microbatches={num_microbatches} x data-parallel {dp} = {unit} equal parts "
      f"({batch_size} % {unit} = {batch_size % unit}). Use a batch size that is a multiple of "
      f"{unit} (e.g. {' or '.join(map(str, sizes))}), or plan with num_microbatches in "
      f"{ms or 'none: the batch does not even split over data parallelism'}.")


def add_axis(spec: PartitionSpec, shape: Sequence[int], axis: str,
             mesh_axes: Mapping[str, int]) -> PartitionSpec:
  """`spec` with `axis` added on the first unsplit dim it divides (unchanged if none)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if any(axis in spec_axes(e) for e in entries):
    return spec
  for d, e in enumerate(entries):
    if e is None and shape[d] % mesh_axes[axis] == 0:
      entries[d] = axis
      return PartitionSpec(*entries)
  for d, e in enumerate(entries):
    axes = spec_axes(e) + (axis,)
    if e is not None and shape[d] % math.prod(mesh_axes[a] for a in axes) == 0:
      entries[d] = axes
      return PartitionSpec(*entries)
  return spec


def spans_processes(mesh: Mesh) -> bool:
  """True when the mesh holds devices of more than one process (a multi-host job)."""
  return len({d.process_index for d in mesh.devices.flat}) > 1


def place(tree: Any, shardings: Any) -> Any:
  """`jax.device_put(tree, shardings)`, also when the shardings span processes.

  A sharding over several processes cannot take a host value through `device_put`
  without a cross-process equality check of every leaf (one collective each, every
  step). Here a value that is not yet a global array is read as the global value,
  the same on every process (as `device_put` assumes), and each process builds only
  its own shards from it with `jax.make_array_from_callback`. Global arrays (from an
  earlier step, or built by the user with `jax.make_array_from_process_local_data`)
  are resharded as `device_put` does, or kept when already laid out right.
  """
  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x  # laid out already: every step after the first (device_put costs ~20 us)
    if sharding.is_fully_addressable or (isinstance(x, jax.Array)
                                         and not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    host = np.asarray(x)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)
