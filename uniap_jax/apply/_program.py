"""A model's forward as a program of top-level module calls, recorded and re-run by stage.

To pipeline an ordinary NNX model, its `__call__` is run with `self` replaced by a proxy
that intercepts every call of a submodule (`self.embed(x)`, `self.blocks[3](x)`,
`self.lm_head(x, self.embed.wte.embedding[...])`). Recording returns placeholders for
the layer outputs, so the forward's own code may pass them from call to call but not
compute with them; one recording yields the calls in order, what each consumes (earlier
outputs, parameters read by the forward, arrays it computes from its inputs such as masks
and positions) and the shapes of every output. On one micro-batch, a stage then re-runs the same
forward executing only its own calls (`run_stage`), or runs it with no call executed to
collect the arrays the forward computes for each call (`collect_extras`).

Supported: chains and DAGs of submodule calls (skip edges such as T5's encoder output),
submodules in `nnx.List`, lists, tuples and dicts, methods other than `__call__`,
parameters read by the forward and passed to a call (tied embeddings), arbitrary code on
the forward's inputs. Not supported (NotImplementedError names the place): code that
computes on a layer's output outside any submodule call, parameters used outside calls,
layers that update their own state (dropout RNG counts, batch statistics), `super()`
inside the root `__call__`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import inspect
import os
import traceback
import types
from typing import Any

import jax
import numpy as np
from flax import nnx

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GlueError(TypeError):
  """Raised when the forward computes on a placeholder outside a submodule call."""


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class ValueRef:
  """Leaf `leaf` of the output of call `call`."""

  call: int
  leaf: int


def _refuse(self, *args, **kwargs):
  raise GlueError(self._describe())


class _Stand:
  """Base of placeholders: knows its shape and dtype, refuses to be computed with."""

  __slots__ = ("aval",)

  @property
  def shape(self):
    return self.aval.shape

  @property
  def dtype(self):
    return self.aval.dtype

  @property
  def ndim(self):
    return len(self.aval.shape)

  @property
  def size(self):
    return int(np.prod(self.aval.shape))

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    raise GlueError(self._describe() + f" (attribute .{name})")

  __jax_array__ = __array__ = __bool__ = __float__ = __int__ = __index__ = _refuse
  __iter__ = __getitem__ = __len__ = _refuse


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
            "xor", "lshift", "rshift"):
  setattr(_Stand, f"__{_op}__", _refuse)
  setattr(_Stand, f"__r{_op}__", _refuse)
for _op in ("neg", "pos", "abs", "invert", "lt", "le", "gt", "ge"):
  setattr(_Stand, f"__{_op}__", _refuse)


class Placeholder(_Stand):
  """A layer output that this trace does not compute."""

  __slots__ = ("ref", "producer")

  def __init__(self, ref: ValueRef, aval: jax.ShapeDtypeStruct, producer: str):
    self.ref, self.aval, self.producer = ref, aval, producer

  def _describe(self):
    return f"the output of layer {self.producer!r}"


class ParamPlaceholder(_Stand):
  """A parameter read by the forward itself (`self.embed.wte.embedding[...]`)."""

  __slots__ = ("path",)

  def __init__(self, path: str, aval: jax.ShapeDtypeStruct):
    self.path, self.aval = path, aval

  def _describe(self):
    return f"parameter {self.path!r}"


def _aval(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval") and not isinstance(x, _Stand)


def _is_stand(x) -> bool:
  return isinstance(x, _Stand)


def invoke(module: nnx.Module, method: str, args: Sequence[Any], kwargs: dict[str, Any], *,
           remat: bool = False,
           runner: Callable[[nnx.Module, str, Sequence[Any], dict[str, Any]], Any] | None = None
           ) -> Any:
  """Calls `module.method(*args, **kwargs)`; with `remat`, as activation recomputation.

  With `remat` the call runs inside `nnx.remat` (`jax.checkpoint`) with the default
  policy: the backward pass keeps only the call's inputs (parameters and array
  arguments) and runs the call's forward again (the part of it the backward reads,
  collectives included) before differentiating it. Non-array arguments stay static.
  `runner(module, method, args, kwargs)`, when given, makes the call instead of
  `getattr(module, method)(...)` (e.g. `call_through` to see inside it).
  """
  if runner is None:
    runner = lambda mod, name, a, kw: getattr(mod, name)(*a, **kw)
  if not remat:
    return runner(module, method, args, kwargs)
  leaves, treedef = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(leaves) if _is_array(x)]

  def run(mod, values):
    full = list(leaves)
    for i, x in zip(dynamic, values):
      full[i] = x
    a, kw = jax.tree.unflatten(treedef, full)
    return runner(mod, method, a, kw)
  return nnx.remat(run)(module, [leaves[i] for i in dynamic])


def call_through(module: nnx.Module, method: str, args: Sequence[Any], kwargs: dict[str, Any],
                 icpt: Any, path: str) -> Any:
  """Runs `module.method` with its own submodule calls going to `icpt` as `path/...`.

  The method's code runs with `self` replaced by a proxy (as the root forward does),
  so that calls of the module's submodules (`self.attn.q(x)`) reach the interceptor
  under their full module paths. Falls back to a plain call (nothing inside it
  intercepted) where the method is not plain Python code on the class (a builtin, a
  staticmethod) or uses `super()`, which needs the real `self`.
  """
  fn = inspect.getattr_static(type(module), method, None)
  if not isinstance(fn, types.FunctionType) or "__class__" in fn.__code__.co_freevars:
    return getattr(module, method)(*args, **kwargs)
  return fn(_LayerProxy(module, icpt, path), *args, **kwargs)


def call_intercepted(module: nnx.Module, method: str, args: Sequence[Any],
                     kwargs: dict[str, Any], path: str, *,
                     after_call: Callable[[str, Any], Any],
                     before_call: Callable[..., Any] | None = None,
                     descend: Callable[[str], bool] = lambda name: False,
                     param: Callable[[str, Any], Any] | None = None) -> Any:
  """Runs `module.method` (the module at `path`) with its submodule calls intercepted.

  As `transparent_forward` does for the root: each submodule call (named by its full
  module path, "path@k" for a repeated one) has its arguments pass through
  `before_call`, is itself seen through when `descend(name)` holds, and its output
  passes through `after_call`. With `param`, a parameter the code reads directly
  (`self.kernel[...]`, `self.kernel.value`) is `param(path, value)`.
  """
  icpt = _Transparent(after_call, lambda name: False, before_call, descend, param)
  return call_through(module, method, args, kwargs, icpt, path)


# --- proxies -----------------------------------------------------------------------------


class _VariableProxy:
  """A Variable seen from the forward: reading it gives the interceptor's stand-in."""

  def __init__(self, real, path, icpt):
    self._real, self._path, self._icpt = real, path, icpt

  def _read(self):
    return self._icpt.param(self._path, self._real)

  def __getitem__(self, key):
    if key is Ellipsis or key == ():
      return self._read()
    return self._icpt.param_index(self._path, self._real, key)

  @property
  def value(self):
    return self._read()

  def get_value(self):
    return self._read()

  def __getattr__(self, name):
    return getattr(self._real, name)


class _ModuleProxy:
  """A submodule seen from the forward: its calls go to the interceptor."""

  def __init__(self, real, path, icpt):
    self._real, self._path, self._icpt = real, path, icpt

  def __call__(self, *args, **kwargs):
    return self._icpt.call(self._path, self._real, "__call__", args, kwargs)

  def __getattr__(self, name):
    value = getattr(self._real, name)
    wrapped = _wrap(value, f"{self._path}/{name}", self._icpt)
    if wrapped is not None:
      return wrapped
    if inspect.ismethod(value) and value.__self__ is self._real:
      return functools.partial(self._icpt.call, self._path, self._real, name)
    return value

  def __getitem__(self, key):
    if isinstance(key, slice):
      n = len(self._real)
      return [self[i] for i in range(n)[key]]
    value = self._real[key]
    return _wrap_or(value, f"{self._path}/{key}", self._icpt)

  def __iter__(self):
    for i in range(len(self._real)):
      yield self[i]

  def __len__(self):
    return len(self._real)


def _wrap(value, path, icpt):
  if isinstance(value, nnx.Variable):
    return _VariableProxy(value, path, icpt)
  if isinstance(value, nnx.Module):
    return _ModuleProxy(value, path, icpt)
  if isinstance(value, (list, tuple)) and any(isinstance(v, (nnx.Module, nnx.Variable))
                                              for v in value):
    return type(value)(_wrap_or(v, f"{path}/{i}", icpt) for i, v in enumerate(value))
  if isinstance(value, dict) and any(isinstance(v, (nnx.Module, nnx.Variable))
                                     for v in value.values()):
    return {k: _wrap_or(v, f"{path}/{k}", icpt) for k, v in value.items()}
  return None


def _wrap_or(value, path, icpt):
  wrapped = _wrap(value, path, icpt)
  return value if wrapped is None else wrapped


class RootProxy:
  """`self` of the root forward: submodules and Variables wrapped, methods bound to the proxy.

  `prefix` is the module path of the wrapped module (empty for the root): its
  submodules are reported to the interceptor as `prefix/name`.
  """

  def __init__(self, real, icpt, prefix: str = ""):
    object.__setattr__(self, "_real", real)
    object.__setattr__(self, "_icpt", icpt)
    object.__setattr__(self, "_prefix", prefix)

  def __getattr__(self, name):
    real = object.__getattribute__(self, "_real")
    # An instance attribute shadows the class's (e.g. a function stored on the module).
    own = getattr(real, "__dict__", {})
    static = None if name in own else inspect.getattr_static(type(real), name, None)
    if isinstance(static, types.FunctionType):
      return types.MethodType(static, self)
    if isinstance(static, property):
      return static.fget(self)
    prefix = object.__getattribute__(self, "_prefix")
    return _wrap_or(getattr(real, name), f"{prefix}/{name}" if prefix else name,
                    object.__getattribute__(self, "_icpt"))

  def __setattr__(self, name, value):
    raise NotImplementedError(
        f"The model's forward sets self.{name}; a pipelined forward must not change the model.")


class _LayerProxy(RootProxy):
  """`self` of a layer whose submodule calls are intercepted (`call_through`).

  Unlike the root, the layer runs for real: what it sets on itself lands on the module.
  """

  def __setattr__(self, name, value):
    setattr(object.__getattribute__(self, "_real"), name, value)


# --- recording -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Call:
  """One submodule call of the forward.

  Attributes:
    index: position in call order.
    name: module path from the root, e.g. "blocks/3" (the plan's layer name).
    method: the method called, "__call__" or another ("attend").
    inputs: earlier outputs it consumes.
    param_refs: paths of parameters the forward read and passed in, in argument order.
    arg_treedef / arg_leaves: the arguments (args, kwargs) as a treedef and one entry per
      leaf: ("ref", ValueRef, aval), ("param", path, aval), ("extra", aval) for an array
      the forward computed from its inputs, or ("static", value).
    out_treedef / out_avals: the output's structure and leaf shapes (one micro-batch).
  """

  index: int
  name: str
  method: str
  inputs: tuple[ValueRef, ...]
  param_refs: tuple[str, ...]
  arg_treedef: Any
  arg_leaves: tuple[tuple[Any, ...], ...]
  out_treedef: Any
  out_avals: tuple[jax.ShapeDtypeStruct, ...]

  def outputs(self) -> tuple[ValueRef, ...]:
    return tuple(ValueRef(self.index, i) for i in range(len(self.out_avals)))

  def signature(self) -> tuple[Any, ...]:
    """Equal for calls whose arguments have the same structure, shapes and static values."""
    def entry(e):
      if e[0] == "static":
        try:
          hash(e[1])
          return e
        except TypeError:
          return ("static", repr(e[1]))
      aval = e[-1]
      return (e[0], tuple(aval.shape), str(aval.dtype))
    return (self.arg_treedef, tuple(entry(e) for e in self.arg_leaves))


def layer_names(calls: Sequence[Call]) -> list[str]:
  """Per call, the plan's name of its layer: the module path for its first call,
  "path@k" for the k-th call after it (the tracer's names for a module called again)."""
  seen: dict[str, int] = {}
  out = []
  for call in calls:
    k = seen.get(call.name, 0)
    seen[call.name] = k + 1
    out.append(call.name if k == 0 else f"{call.name}@{k}")
  return out


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Program:
  """The forward as calls; `ret_leaves` are the returned leaves (ValueRef, or an aval for
  an array the forward computed from its inputs), under `ret_treedef`."""

  calls: tuple[Call, ...]
  ret_treedef: Any
  ret_leaves: tuple[Any, ...]

  def layer_names(self) -> list[str]:
    """Per call, the plan's name of its layer (`layer_names`)."""
    return layer_names(self.calls)

  def consumers(self) -> dict[ValueRef, list[int]]:
    """ValueRef -> indices of the calls that read it; len(calls) stands for the return."""
    out: dict[ValueRef, list[int]] = {}
    for call in self.calls:
      for ref in call.inputs:
        out.setdefault(ref, []).append(call.index)
    for leaf in self.ret_leaves:
      if isinstance(leaf, ValueRef):
        out.setdefault(leaf, []).append(len(self.calls))
    return out


def _user_line(tb) -> str:
  """The innermost frame outside uniap_jax, jax, flax and numpy: the user's glue line."""
  frames = traceback.extract_tb(tb)
  for frame in reversed(frames):
    path = os.path.abspath(frame.filename)
    if path.startswith(_PACKAGE_DIR) or any(
        f"{os.sep}{lib}{os.sep}" in path for lib in ("jax", "flax", "numpy", "jaxlib")):
      continue
    return f"{os.path.relpath(path)}:{frame.lineno}"
  return "unknown location"


class _Recorder:
  """Interceptor that records calls and returns placeholders."""

  def __init__(self):
    self.calls: list[Call] = []

  def param(self, path, var):
    return ParamPlaceholder(path, _aval(var.get_value()))

  def param_index(self, path, var, key):
    raise GlueError(f"parameter {path!r} (indexed in the forward)")

  def call(self, path, real, method, args, kwargs):
    index = len(self.calls)
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_stand)
    inputs, refs, dyn, kinds, template = [], [], [], [], []
    for leaf in leaves:
      if isinstance(leaf, Placeholder):
        inputs.append(leaf.ref)
        kinds.append(("dyn", len(dyn)))
        dyn.append(leaf.aval)
        template.append(("ref", leaf.ref, leaf.aval))
      elif isinstance(leaf, ParamPlaceholder):
        refs.append(leaf.path)
        kinds.append(("dyn", len(dyn)))
        dyn.append(leaf.aval)
        template.append(("param", leaf.path, leaf.aval))
      elif _is_array(leaf):
        kinds.append(("dyn", len(dyn)))
        dyn.append(leaf)
        template.append(("extra", _aval(leaf)))
      else:
        kinds.append(("static", leaf))
        template.append(("static", leaf))
    graphdef, state = nnx.split(real)
    state_avals = jax.tree.map(_aval, state)
    mutated = []

    def run(state_in, dyn_in):
      module = nnx.merge(graphdef, state_in)
      rebuilt = [dyn_in[k[1]] if k[0] == "dyn" else k[1] for k in kinds]
      a, kw = jax.tree.unflatten(treedef, rebuilt)
      out = getattr(module, method)(*a, **kw)
      after = jax.tree.leaves(nnx.state(module))
      mutated.append(any(x is not y for x, y in zip(jax.tree.leaves(state_in), after)))
      return out

    out = jax.eval_shape(run, state_avals, dyn)
    if mutated and mutated[0]:
      raise NotImplementedError(
          f"Layer {path!r} updates its own state during the forward (dropout RNG counts, "
          "batch statistics, caches); a pipelined forward cannot carry such updates between "
          "stages. Make the layer deterministic (e.g. deterministic=True) to pipeline it.")
    out_leaves, out_treedef = jax.tree.flatten(out)
    call = Call(index=index, name=path, method=method, inputs=tuple(inputs), param_refs=tuple(refs),
                arg_treedef=treedef, arg_leaves=tuple(template), out_treedef=out_treedef,
                out_avals=tuple(_aval(x) for x in out_leaves))
    self.calls.append(call)
    return jax.tree.unflatten(out_treedef, [
        Placeholder(ref, aval, path) for ref, aval in zip(call.outputs(), call.out_avals)])


def record(root: nnx.Module, forward: Callable[..., Any], args: Sequence[Any],
           kwargs: dict[str, Any]) -> Program:
  """Records `forward(root, *args, **kwargs)` (call it under jax.eval_shape) as a Program.

  Raises:
    NotImplementedError: the forward computes on a layer output or a parameter outside a
      submodule call, or returns something other than layer outputs and arrays; the
      message names the layer and the user's source line.
  """
  rec = _Recorder()
  try:
    ret = forward(RootProxy(root, rec), *args, **kwargs)
  except GlueError as e:
    where = _user_line(e.__traceback__)
    done = [c.name for c in rec.calls]
    raise NotImplementedError(
        f"Cannot pipeline {type(root).__name__}: its forward computes on {e} outside a "
        f"submodule call, at {where} (after the calls {done[-3:]}). A pipelined forward may "
        "only pass layer outputs from one submodule call to the next; move that computation "
        "into a submodule (e.g. into the layer that produces or consumes the value).") from None
  leaves, treedef = jax.tree.flatten(ret, is_leaf=_is_stand)
  ret_leaves = []
  for leaf in leaves:
    if isinstance(leaf, Placeholder):
      ret_leaves.append(leaf.ref)
    elif isinstance(leaf, ParamPlaceholder):
      raise NotImplementedError(
          f"{type(root).__name__}'s forward returns parameter {leaf.path!r}; a pipelined "
          "forward must return layer outputs.")
    elif _is_array(leaf):
      ret_leaves.append(_aval(leaf))
    else:
      raise NotImplementedError(
          f"{type(root).__name__}'s forward returns {type(leaf).__name__} {leaf!r}; a "
          "pipelined forward must return arrays.")
  if not rec.calls:
    raise NotImplementedError(
        f"{type(root).__name__}'s forward calls no submodule; there is nothing to pipeline.")
  return Program(calls=tuple(rec.calls), ret_treedef=treedef, ret_leaves=tuple(ret_leaves))


# --- running one stage ----------------------------------------------------------------------


class _StageRunner:
  """Interceptor that runs the calls of one stage and stands placeholders in for the rest."""

  def __init__(self, program: Program, runs: Callable[[int], bool],
               module_for: Callable[[int], Any], env: dict[ValueRef, Any],
               after_call: Callable[[Call, Any], Any], remat: Callable[[int], bool],
               before_call: Callable[..., Any] | None = None,
               runner: Callable[[Call], Any] | None = None):
    self.program, self.runs, self.module_for = program, runs, module_for
    self.env, self.after_call, self.remat = env, after_call, remat
    self.before_call, self.runner = before_call, runner
    self.names = program.layer_names()
    self.count = 0

  def param(self, path, var):
    return ParamPlaceholder(path, _aval(var.get_value()))

  def param_index(self, path, var, key):
    raise GlueError(f"parameter {path!r} (indexed in the forward)")

  def call(self, path, real, method, args, kwargs):
    index = self.count
    self.count += 1
    if index >= len(self.program.calls) or (
        self.program.calls[index].name, self.program.calls[index].method) != (path, method):
      raise NotImplementedError(
          f"The forward's calls changed between recording and running (call {index} is "
          f"{path}.{method}); a pipelined forward must call the same layers in the same order "
          "every time.")
    call = self.program.calls[index]
    if not self.runs(index):
      return jax.tree.unflatten(call.out_treedef, [
          Placeholder(ref, aval, path) for ref, aval in zip(call.outputs(), call.out_avals)])
    module, ref_values = self.module_for(index)
    refs = iter(ref_values)
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_stand)
    real_leaves = []
    made: dict[int, tuple[Any, str]] = {}  # id -> (array, the layer that made it; "": param)
    for leaf in leaves:
      if isinstance(leaf, Placeholder):
        real_leaves.append(self.env[leaf.ref])
        made[id(real_leaves[-1])] = (real_leaves[-1], self.names[leaf.ref.call])
      elif isinstance(leaf, ParamPlaceholder):
        real_leaves.append(next(refs))
        made[id(real_leaves[-1])] = (real_leaves[-1], "")
      else:
        real_leaves.append(leaf)
    a, kw = jax.tree.unflatten(treedef, real_leaves)
    if self.before_call is not None:
      def producer(x):
        got = made.get(id(x))
        return got[1] if got is not None and got[0] is x else None
      a, kw = self.before_call(call, a, kw, producer)
    out = invoke(module, method, a, kw, remat=self.remat(index),
                 runner=None if self.runner is None else self.runner(call))
    out = self.after_call(call, out)
    for ref, value in zip(call.outputs(), jax.tree.leaves(out)):
      self.env[ref] = value
    return out


def run_stage(program: Program, root: nnx.Module, forward: Callable[..., Any],
              args: Sequence[Any], kwargs: dict[str, Any], *, runs: Callable[[int], bool],
              module_for: Callable[[int], Any], env: dict[ValueRef, Any],
              after_call: Callable[[Call, Any], Any] = lambda call, out: out,
              remat: Callable[[int], bool] = lambda index: False,
              before_call: Callable[..., Any] | None = None,
              runner: Callable[[Call], Any] | None = None) -> list[Any]:
  """Re-runs the forward, executing the calls for which `runs(index)` holds.

  `env` maps values computed elsewhere (received from the previous stage) to arrays and
  receives every value computed here; calls for which `remat(index)` holds recompute
  their activations (`invoke`). With `before_call`, a call's arguments first go
  through `before_call(call, args, kwargs, producer)` (which returns new `(args,
  kwargs)`; `producer(x)` names the layer whose output `x` is, as
  `Program.layer_names` does, "" for a parameter the forward read, None otherwise);
  `runner(call)`, when not None, makes the call (`invoke`'s `runner`). Returns the
  returned leaves, with placeholders for values not available here.
  """
  runner = _StageRunner(program, runs, module_for, env, after_call, remat, before_call, runner)
  ret = forward(RootProxy(root, runner), *args, **kwargs)
  if runner.count != len(program.calls):
    raise NotImplementedError(
        f"The forward made {runner.count} submodule calls, {len(program.calls)} when recorded; "
        "a pipelined forward must call the same layers every time.")
  leaves = jax.tree.leaves(ret, is_leaf=_is_stand)
  return [env.get(leaf.ref, leaf) if isinstance(leaf, Placeholder) else leaf for leaf in leaves]


def transparent_forward(root: nnx.Module, forward: Callable[..., Any], args: Sequence[Any],
                        kwargs: dict[str, Any], after_call: Callable[[str, Any], Any],
                        remat: Callable[[str], bool] = lambda name: False, *,
                        before_call: Callable[..., Any] | None = None,
                        descend: Callable[[str], bool] = lambda name: False,
                        param: Callable[[str, Any], Any] | None = None) -> Any:
  """Runs the forward for real, passing each submodule call's output through `after_call`.

  A call is named by its module path for its first call, "path@k" for the k-th call
  after it (the tracer's names for a module called again). It recomputes its
  activations (`invoke`) when `remat(name)` holds. With `before_call`, its arguments
  first go through `before_call(name, args, kwargs, producer)` (which returns new
  `(args, kwargs)`), where `producer(x)` names the call whose output array `x` is
  ("" for a parameter the forward read, None when unknown: an input or a value
  the forward computed). When `descend(name)` holds, the call's own submodule calls
  are intercepted too (`call_through`), under their full module paths, and with
  `param`, a parameter such a call reads (`self.kernel[...]`) is `param(path, value)`.
  """
  icpt = _Transparent(after_call, remat, before_call, descend, param)
  return forward(RootProxy(root, icpt), *args, **kwargs)


class _Transparent:
  def __init__(self, after_call, remat, before_call=None, descend=lambda name: False,
               param=None):
    self.after_call, self.remat = after_call, remat
    self.before_call, self.descend = before_call, descend
    self.param_hook = param
    self.seen: dict[str, int] = {}
    # id of an array -> (the array, kept alive so the id stays its own; its producer).
    self.made: dict[int, tuple[Any, str]] = {}

  def _producer(self, x) -> str | None:
    got = self.made.get(id(x))
    return got[1] if got is not None and got[0] is x else None

  def param(self, path, var):
    value = var.get_value()
    if self.param_hook is not None:
      value = self.param_hook(path, value)
    self.made[id(value)] = (value, "")
    return value

  def param_index(self, path, var, key):
    return var[key]

  def call(self, path, real, method, args, kwargs):
    k = self.seen.get(path, 0)
    self.seen[path] = k + 1
    name = path if k == 0 else f"{path}@{k}"
    if self.before_call is not None:
      args, kwargs = self.before_call(name, args, kwargs, self._producer)
    runner = None
    if self.descend(name):
      runner = lambda mod, m, a, kw: call_through(mod, m, a, kw, self, path)
    out = self.after_call(name, invoke(real, method, args, kwargs, remat=self.remat(name),
                                       runner=runner))
    for leaf in jax.tree.leaves(out):
      self.made[id(leaf)] = (leaf, name)
    return out


class _Collector:
  """Interceptor that returns placeholders for every call and keeps each call's extras."""

  def __init__(self, program: Program):
    self.program = program
    self.extras: list[list[Any]] = []

  def param(self, path, var):
    return ParamPlaceholder(path, _aval(var.get_value()))

  def param_index(self, path, var, key):
    raise GlueError(f"parameter {path!r} (indexed in the forward)")

  def call(self, path, real, method, args, kwargs):
    index = len(self.extras)
    if index >= len(self.program.calls) or self.program.calls[index].name != path:
      raise NotImplementedError(
          f"The forward's calls changed between recording and running (call {index} is "
          f"{path}.{method}); a pipelined forward must call the same layers in the same order "
          "every time.")
    call = self.program.calls[index]
    leaves = jax.tree.leaves((args, kwargs), is_leaf=_is_stand)
    self.extras.append([leaf for leaf, e in zip(leaves, call.arg_leaves) if e[0] == "extra"])
    return jax.tree.unflatten(call.out_treedef, [
        Placeholder(ref, aval, path) for ref, aval in zip(call.outputs(), call.out_avals)])


def collect_extras(program: Program, root: nnx.Module, forward: Callable[..., Any],
                   args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[list[list[Any]], list[Any]]:
  """Runs the forward's own code on real inputs, no layer executed.

  Returns each call's extras (arrays the forward computed from its inputs, in argument
  order) and the returned leaves (placeholders, or such arrays).
  """
  collector = _Collector(program)
  ret = forward(RootProxy(root, collector), *args, **kwargs)
  if len(collector.extras) != len(program.calls):
    raise NotImplementedError(
        f"The forward made {len(collector.extras)} submodule calls, {len(program.calls)} when "
        "recorded; a pipelined forward must call the same layers every time.")
  return collector.extras, jax.tree.leaves(ret, is_leaf=_is_stand)
