"""NNX module calls named while tracing, so that equations know their module."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
import contextlib
import dataclasses
import functools
from typing import Any

from flax import nnx
import jax

from uniap_jax.graph._args import _path_str

_MARK = "uniap_jax.module:"  # prefix of the named scope around one NNX module call
_STAMP = "_uniap_jax_module_path"  # static attribute carrying a module's path while tracing


def _defines_call(cls: type) -> bool:
  return any("__call__" in k.__dict__ for k in cls.__mro__ if k is not object)


def _has_int(keys: Sequence[Any]) -> bool:
  return any(isinstance(k, int) for k in keys)


@dataclasses.dataclass
class _Modules:
  """The NNX modules in the step's arguments: paths, classes, parent/child links."""

  names: dict[tuple[Any, ...], str]  # key path (with root prefix) -> "blocks/3"
  types: dict[str, str]  # name -> class name
  callable_: set[tuple[Any, ...]]
  children: dict[tuple[Any, ...], list[tuple[Any, ...]]]
  roots: list[tuple[Any, ...]]
  classes: list[type]

  @staticmethod
  def _roots(args: Sequence[Any]) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    found = jax.tree_util.tree_flatten_with_path(
        list(args), is_leaf=lambda x: isinstance(x, nnx.Module))[0]
    return [(tuple(p), m) for p, m in found if isinstance(m, nnx.Module)]

  @classmethod
  def _walk(cls, args: Sequence[Any]) -> Iterator[tuple[tuple[Any, ...], str, nnx.Module]]:
    roots = cls._roots(args)
    for prefix, root in roots:
      label = _path_str(prefix) if len(roots) > 1 else ""
      for path, node in nnx.iter_graph(root):
        if isinstance(node, nnx.Module):
          name = "/".join(([label] if label else []) + [str(k) for k in path])
          yield (prefix,) + tuple(path), name, node

  @classmethod
  def from_args(cls, args: Sequence[Any]) -> _Modules:
    names, types, callable_, classes = {}, {}, set(), {}
    for key, name, module in cls._walk(args):
      names[key] = name
      types[name] = type(module).__name__
      if _defines_call(type(module)):
        callable_.add(key)
        owner = next(k for k in type(module).__mro__ if "__call__" in k.__dict__)
        classes[id(owner)] = owner
    children = collections.defaultdict(list)
    roots = []
    for key in names:
      parent = next((key[:n] for n in range(len(key) - 1, 0, -1) if key[:n] in names), None)
      if parent is None:
        roots.append(key)
      else:
        children[parent].append(key)
    return cls(names, types, callable_, dict(children), roots, list(classes.values()))

  def stamp(self, args: Sequence[Any]) -> None:
    """Writes each callable module's path onto the freshly unflattened copies."""
    for key, name, module in self._walk(args):
      if key in self.callable_ and key not in self.roots:
        object.__setattr__(module, _STAMP, name)

  @contextlib.contextmanager
  def scoped_calls(self) -> Iterator[None]:
    """Patches `__call__` of the module classes so that each stamped call is a named scope."""
    active: list[str] = []
    calls: collections.Counter[str] = collections.Counter()
    patched = []

    def wrap(fn):
      @functools.wraps(fn)
      def call(self, *args, **kwargs):
        path = getattr(self, _STAMP, None)
        if not path or (active and active[-1] == path):
          return fn(self, *args, **kwargs)
        n = calls[path]
        calls[path] += 1
        active.append(path)
        try:
          with jax.named_scope(_MARK + (f"{path}@{n}" if n else path)):
            return fn(self, *args, **kwargs)
        finally:
          active.pop()
      return call

    try:
      for owner in self.classes:
        patched.append((owner, owner.__dict__["__call__"]))
        owner.__call__ = wrap(owner.__dict__["__call__"])
      yield
    finally:
      for owner, original in reversed(patched):
        owner.__call__ = original

  def kids(self, key: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Direct callable submodules, looking through collections (nnx.List, nnx.Dict)."""
    out = []
    for child in self.children.get(key, ()):
      out.extend([child] if child in self.callable_ else self.kids(child))
    return out

  def _expand(self, key: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """A module's kids, where a kid that holds a sequence of modules (and is not itself an
    element of one) is a container and is replaced by its own expansion."""
    out = []
    for child in self.kids(key):
      rel = child[len(key):]
      if not _has_int(rel) and any(_has_int(g[len(child):]) for g in self.kids(child)):
        out.extend(self._expand(child))
      else:
        out.append(child)
    return out

  def frontier(self) -> set[str]:
    """The default layer modules: the roots' expansions."""
    return {self.names[k] for root in self.roots for k in self._expand(root)}

  def expand_name(self, name: str) -> set[str]:
    """The expansion of one module, by name (empty for a leaf module)."""
    key = next((k for k, v in self.names.items() if v == name), None)
    return set() if key is None else {self.names[k] for k in self._expand(key)}
