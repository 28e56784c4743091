"""The step's arguments as leaves: paths, roles, the batch."""

from __future__ import annotations

import collections
from collections.abc import Sequence
import dataclasses
from typing import Any

from flax import nnx
import jax
import numpy as np

@dataclasses.dataclass(frozen=True, slots=True)
class _Leaf:
  path: str
  arg_index: int
  role: str | None  # None: decided by dataflow
  spec: jax.ShapeDtypeStruct


def _batch_argnums(batch_argnums: Any, num_args: int) -> tuple[int, ...]:
  if batch_argnums is None:
    return (num_args - 1,)
  given = (batch_argnums,) if isinstance(batch_argnums, int) else batch_argnums
  try:
    given = tuple(given)
  except TypeError:
    raise TypeError(f"trace: batch_argnums must be an int or a sequence of ints, "
                    f"got {batch_argnums!r}.") from None
  if not given:
    raise ValueError("trace: batch_argnums=() names no batch argument; give at least one "
                     "(the batch's leading dimension is the one the planner splits).")
  out = []
  for a in given:
    if isinstance(a, bool) or not isinstance(a, int | np.integer):
      raise TypeError(f"trace: batch_argnums must hold ints, got {batch_argnums!r}.")
    if not -num_args <= a < num_args:
      raise ValueError(f"trace: batch_argnums={batch_argnums!r} is out of range for "
                       f"{num_args} example argument(s); use indices 0..{num_args - 1} "
                       f"(or negative ones), e.g. batch_argnums={num_args - 1}.")
    out.append(int(a) % num_args)
  return tuple(sorted(set(out)))


def _key_name(key: Any) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(_key_name(k) for k in path)


def leaf_path(path: Sequence[Any]) -> str:
  """A pytree key path as the "/"-joined leaf path the graph uses ("blocks/3/up/kernel").

  A trailing `.value` (an NNX Variable's array, as nnx.State flattens it) is dropped, so
  paths from `nnx.state(...)` trees match `InputInfo.path`.
  """
  keys = [_key_name(k) for k in path]
  if keys and keys[-1] == "value":
    keys = keys[:-1]
  return "/".join(keys)


def _flatten_args(args: Sequence[Any], batch_argnums: tuple[int, ...]):
  """Leaves of every argument with readable paths, roles known from types, and specs."""
  leaves, treedefs, counts = [], [], []
  for i, arg in enumerate(args):
    found: list[tuple[tuple[Any, ...], Any, str | None]] = []
    _collect_leaves(arg, (), None, found)
    treedef = jax.tree_util.tree_structure(arg)
    if treedef.num_leaves != len(found):  # pragma: no cover - defensive
      raise TypeError(f"trace: argument {i} flattens inconsistently ({treedef.num_leaves} vs "
                      f"{len(found)} leaves); pass plain pytrees of arrays.")
    for path, leaf, role in found:
      path_s = _path_str(path)
      role = "batch" if i in batch_argnums else role
      leaves.append(_Leaf(path_s, i, role, _leaf_spec(leaf, i, path_s)))
    treedefs.append(treedef)
    counts.append(len(found))
  return leaves, treedefs, counts


def _collect_leaves(node: Any, prefix: tuple[Any, ...], role: str | None, out: list) -> None:
  """Depth-first leaves (the order of jax.tree_util.tree_flatten) with NNX roles."""
  if role is None and isinstance(node, nnx.Optimizer):
    role = "optimizer_state"
  is_nnx = lambda x: x is not node and isinstance(x, nnx.Variable | nnx.Optimizer)
  for path, sub in jax.tree_util.tree_flatten_with_path(node, is_leaf=is_nnx)[0]:
    full = prefix + tuple(path)
    if isinstance(sub, nnx.Optimizer) and sub is not node:
      _collect_leaves(sub, full, role, out)
    elif isinstance(sub, nnx.Variable) and sub is not node:
      sub_role = role or ("param" if isinstance(sub, nnx.Param) else "other")
      for inner, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
        inner = tuple(inner)
        if inner and _key_name(inner[-1]) == "value":
          inner = inner[:-1]
        out.append((full + inner, leaf, sub_role))
    else:
      out.append((full, sub, role))


def _leaf_spec(leaf: Any, arg_index: int, path: str) -> jax.ShapeDtypeStruct:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=leaf.weak_type)
  if isinstance(leaf, jax.Array | np.ndarray | np.generic):
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
  if isinstance(leaf, bool | int | float | complex):
    return jax.ShapeDtypeStruct((), jax.numpy.asarray(leaf).dtype, weak_type=True)
  if isinstance(leaf, nnx.Module):
    raise TypeError(
        f"trace: {_where(arg_index, path)} is an NNX module that is not a pytree "
        f"({type(leaf).__name__}, pytree=False). Pass a pytree module (the default in "
        "flax >= 0.12), or split it (graphdef, state = nnx.split(model)) and pass the state.")
  raise TypeError(
      f"trace: {_where(arg_index, path)} is not an array: "
      f"{type(leaf).__name__} ({_short_repr(leaf)}). Every leaf of the step's arguments must "
      "be a jax.Array, a numpy array or a jax.ShapeDtypeStruct. Close over non-array values "
      "(functools.partial(step, value)) or mark them static in your pytree.")


def _where(arg_index: int, path: str) -> str:
  return f"argument {arg_index}, leaf '{path}'," if path else f"argument {arg_index}"


def _short_repr(x: Any, limit: int = 60) -> str:
  text = repr(x)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _batch_size(leaves: Sequence[_Leaf], batch_argnums: tuple[int, ...]) -> int:
  dims: dict[int, list[_Leaf]] = collections.defaultdict(list)
  batch = [l for l in leaves if l.role == "batch"]
  if not batch:
    raise ValueError(f"trace: the batch argument(s) {list(batch_argnums)} hold no array leaves; "
                     "pass the batch (shapes suffice) or set batch_argnums to the batch's position.")
  for l in batch:
    if not l.spec.shape:
      raise ValueError(
          f"trace: the batch's {_where(l.arg_index, l.path).rstrip(',')} is a scalar; every "
          "batch leaf needs a leading batch dimension. Move scalars out of the batch "
          "argument, or set batch_argnums to the batch's position.")
    dims[int(l.spec.shape[0])].append(l)
  if len(dims) > 1:
    seen = "; ".join(
        f"{d} for " + ", ".join(_where(l.arg_index, l.path).rstrip(",") for l in ls[:3])
        + (f" and {len(ls) - 3} more" if len(ls) > 3 else "") for d, ls in sorted(dims.items()))
    raise ValueError(
        f"trace: batch leaves disagree on the batch size (their leading dimension): {seen}. "
        "Every leaf of the batch argument(s) must have the same leading dimension; check "
        "batch_argnums and the batch's layout.")
  return next(iter(dims))
