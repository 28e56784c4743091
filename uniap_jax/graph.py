"""The LayerGraph: a train step's jaxpr grouped into layers (module calls).

This module is the only jaxpr reader of uniap_jax. Everything downstream
(strategies, costs, solver) sees the plain dataclasses defined here.

Value ids: every tensor the step's jaxpr computes or consumes gets one integer id,
unique across the whole graph. An `Op` names its operands and results by id and
carries their `TensorInfo`, so a sharding rule can follow a tensor from op to op
inside a layer, and a layer's boundary tensors and parameters are named by the
same ids. Ids are dense: `LayerGraph.tensors[i]` is the type of value `i`, and the
step's array leaves are values `0 .. len(inputs) - 1`, in argument order. Literals
and constants captured by the step (numpy arrays it closes over) have no id: an op
names them -1, with their type in `in_types`.

How `trace` builds the graph:
  1. `jax.make_jaxpr` on shapes only. NNX modules leave the name stack empty, so
     while tracing each submodule's `__call__` runs inside a `jax.named_scope` that
     names its graph path ("blocks/3"); the path rides along as a static attribute of
     the module, so it survives NNX transforms that split and merge modules. Linen
     already names module paths; plain functions name regions with `jax.named_scope`.
  2. Calls (`jit`, `custom_jvp_call`, `custom_vjp_call`, `checkpoint`) are inlined, so
     ops are primitives. Loops and conditionals (`scan`, `while`, `cond`) stay one op
     each whose FLOPs and bytes are those of the body times the trip count (`scan`:
     its length; `while`: the body once, with a warning, as the trip count is unknown;
     `cond`: the costliest branch).
  3. Phases: equations under `transpose(...)` in the name stack are backward; under
     `jvp(...)`, forward. Untransformed equations are forward when they feed the
     differentiated function (batch preprocessing) or only read its results
     (metrics), and optimizer when they read gradients or touch nothing the forward
     pass made (step counts, bias corrections).
  4. Layers are the outermost module calls below the root (an embedding, each block,
     the final norm, the head). A module holding a sequence of submodules
     (`self.blocks = nnx.List(...)`, held by an encoder, say) is a container and is
     replaced by its children, as is a lone top-level module; a module called twice
     gives two layers ("embed", "embed@1"). Without NNX modules, `jax.named_scope`
     regions are layers (Linen names its modules so), the one scope holding sub-scopes
     (Linen's root module) replaced by them; with no scope at all the whole function
     is one layer, with a warning.
  5. Equations outside every layer (the loss, preprocessing, the optimizer) go to the
     nearest layer by dataflow, so that every equation belongs to exactly one layer.
     In order of preference (after any stage decides something, they start over):
       a. the one layer all candidates agree on: optimizer equations follow their
          users (ending at the parameter update they feed, whose layer owns the
          parameter); backward equations the residuals they read; forward and
          optimizer equations their operands; then any equation its users;
       b. backward equations: the one layer their cotangents come from;
       c. joins (a loss summed over layers, a global gradient norm): the latest
          layer they read from;
       d. values several layers read (a mask, a position table, the optimizer's
          step count): the earliest of them, or for forward values the layer that
          ran just before, if earlier;
       e. unconnected equations: the layer of the nearest equation before them.
     A parameter belongs to the first layer whose forward pass reads it; an
     optimizer-state leaf to the first layer that reads it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import enum
import functools
import hashlib
import math
import os
import re
import traceback
from typing import Any, Literal
import warnings

from flax import nnx
import jax
from jax.extend import core as jex_core
from jax.extend import source_info_util
import numpy as np

# Source lines of equations name the user's code, not this tracer's call wrappers (as
# flax registers its own files).
source_info_util.register_exclusion(os.path.abspath(__file__))

OpKind = Literal[
    "dot_general",
    "conv",
    "elementwise",
    "reduction",
    "gather",
    "scatter",
    "reshape",
    "transpose",
    "broadcast",
    "slice",
    "concatenate",
    "convert",
    "other",
]
Phase = Literal["forward", "backward", "optimizer"]
Role = Literal["param", "optimizer_state", "batch", "other"]
_PHASES = ("forward", "backward", "optimizer")
_KINDS = frozenset(OpKind.__args__)
_ROLES = frozenset(Role.__args__)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
  """Shape and dtype of one tensor, with its size in bytes.

  PRNG key arrays are described by their key data (e.g. uint32 with a trailing 2).
  """

  shape: tuple[int, ...]
  dtype: str  # numpy dtype name, e.g. "float32", "bfloat16"

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize

  @property
  def size(self) -> int:
    """Number of elements."""
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Op:
  """One jaxpr equation, as a sharding rule and the cost model need it.

  Attributes:
    primitive: the jaxpr primitive name, e.g. "dot_general", "add", "reduce_sum".
    kind: the primitive family that decides which sharding rule applies.
    phase: forward, backward (transposed/linearised equations) or optimizer.
    in_ids / out_ids: value ids of operands and results (literals and captured
      constants get id -1).
    in_types / out_types: their shapes and dtypes, in the same order.
    params: the primitive's parameters that rules need, as sorted (key, value)
      pairs of plain Python data, e.g. ("dimension_numbers", (((1,), (0,)), ((), ())))
      for dot_general. Gather and scatter dimension numbers are spelled out as
      separate keys (offset_dims, collapsed_slice_dims, ...); conv's
      dimension_numbers is (lhs_spec, rhs_spec, out_spec).
    flops: floating point operations of this equation (2mnk for a matmul), counted
      as XLA's cost analysis counts them: 1 per element for arithmetic, compares,
      selects and converts, input minus output elements for reductions, 0 for data
      movement and for transcendental functions (those are `transcendentals`).
    bytes_accessed: bytes read plus bytes written, for the roofline.
    source: the user's source line, "path/model.py:88:12 (Block.__call__)", or ""
      when unknown.
    transcendentals: exp, log, tanh, sqrt, ... evaluations (XLA counts them apart).
    module: the innermost module call or named scope the equation ran in, e.g.
      "blocks/3/mlp/up" ("" outside modules); finer than the layer.
    index: position of the equation in the inlined program (program order).
  """

  primitive: str
  kind: OpKind
  phase: Phase
  in_ids: tuple[int, ...]
  out_ids: tuple[int, ...]
  in_types: tuple[TensorInfo, ...]
  out_types: tuple[TensorInfo, ...]
  params: tuple[tuple[str, Any], ...] = ()
  flops: float = 0.0
  bytes_accessed: float = 0.0
  source: str = ""
  transcendentals: float = 0.0
  module: str = ""
  index: int = -1

  def __post_init__(self):
    if len(self.in_ids) != len(self.in_types) or len(self.out_ids) != len(self.out_types):
      raise ValueError(
          f"Op {self.primitive!r}: {len(self.in_ids)} in_ids but {len(self.in_types)} in_types, "
          f"{len(self.out_ids)} out_ids but {len(self.out_types)} out_types; they must match.")
    if self.kind not in _KINDS:
      raise ValueError(f"Op {self.primitive!r}: kind={self.kind!r}; allowed: {sorted(_KINDS)}.")
    if self.phase not in _PHASES:
      raise ValueError(f"Op {self.primitive!r}: phase={self.phase!r}; allowed: {_PHASES}.")

  def param(self, key: str, default: Any = None) -> Any:
    for k, v in self.params:
      if k == key:
        return v
    return default


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParamInfo:
  """One parameter (or optimizer-state) leaf a layer owns.

  Attributes:
    path: "/"-joined pytree path inside its argument, e.g. "blocks/3/mlp/up/kernel".
    arg_index: which argument of the step holds it.
    value_id: the id under which the ops consume it.
    info: shape and dtype.
    updated_id: the id of the new value the step writes back (an NNX in-place update)
      or returns in the same place of the same argument; -1 when it is not updated.
      The optimizer ops that compute it belong to the layer that owns the leaf.
  """

  path: str
  arg_index: int
  value_id: int
  info: TensorInfo
  updated_id: int = -1


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
  """One module call: the unit the MIQP places on a pipeline stage.

  Attributes:
    name: the module path, e.g. "embed", "blocks/3", "head"; "embed@1" for the
      second call of a module.
    index: position in the graph's topological order.
    signature: equal for layers with the same computation and shapes: a hash of
      the op sequence (primitives, phases, params, shapes, literals) with value ids
      renumbered in order of first use.
    ops: every equation attributed to this layer, forward first, in program order.
    params: parameter leaves the layer uses (owned by it; shared parameters go to
      the first layer whose forward pass reads them; a parameter no op reads is in
      no layer, only in `LayerGraph.inputs`).
    input_ids / output_ids: boundary values, sorted: inputs are the batch (and
      other non-parameter) leaves and the forward values of other layers that this
      layer's ops read; outputs are this layer's forward values that other layers
      read or the step returns. Cotangents flowing back are not listed: they have
      the shapes of the forward boundary values.
    flops: forward FLOPs; backward_flops and optimizer_flops from their traced
      equations.
    bytes_accessed: forward bytes read + written.
    param_bytes: bytes of all parameters.
    activation_bytes: bytes of forward values the backward pass reads (residuals),
      per step for the traced batch; counted for the layer whose backward ops read
      them (its own forward values and its inputs), each once per layer.
    module_type: class name of the module (NNX), "" when unknown.
    backward_bytes_accessed / optimizer_bytes_accessed: bytes of those phases.
    activation_ids: the values counted in activation_bytes, sorted.
    optimizer_state: optimizer-state leaves (moments, counts) this layer's ops
      read; a leaf read by several layers goes to the first.
    optimizer_state_bytes: their bytes.
  """

  name: str
  index: int
  signature: str
  ops: tuple[Op, ...]
  params: tuple[ParamInfo, ...]
  input_ids: tuple[int, ...]
  output_ids: tuple[int, ...]
  flops: float
  backward_flops: float
  optimizer_flops: float
  bytes_accessed: float
  param_bytes: int
  activation_bytes: int
  module_type: str = ""
  backward_bytes_accessed: float = 0.0
  optimizer_bytes_accessed: float = 0.0
  activation_ids: tuple[int, ...] = ()
  optimizer_state: tuple[ParamInfo, ...] = ()
  optimizer_state_bytes: int = 0

  def forward_ops(self) -> tuple[Op, ...]:
    return tuple(op for op in self.ops if op.phase == "forward")

  def backward_ops(self) -> tuple[Op, ...]:
    return tuple(op for op in self.ops if op.phase == "backward")

  def optimizer_ops(self) -> tuple[Op, ...]:
    return tuple(op for op in self.ops if op.phase == "optimizer")

  @property
  def total_flops(self) -> float:
    """Forward + backward + optimizer FLOPs of one step."""
    return self.flops + self.backward_flops + self.optimizer_flops


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
  """Data flowing forward from layer `src` to layer `dst` (names)."""

  src: str
  dst: str
  value_ids: tuple[int, ...]
  tensors: tuple[TensorInfo, ...]

  @property
  def nbytes(self) -> int:
    return sum(t.nbytes for t in self.tensors)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InputInfo:
  """One array leaf of the step's arguments: a parameter, optimizer state or batch leaf.

  `role`: batch for leaves of the batch arguments; for NNX, nnx.Param leaves of a
  model are params, leaves of an nnx.Optimizer optimizer_state, other variables
  (RNG state, batch statistics) other; for plain pytrees, leaves the forward pass
  reads are params, leaves only the optimizer reads optimizer_state. `updated_id`
  as in ParamInfo.
  """

  path: str
  arg_index: int
  value_id: int
  info: TensorInfo
  role: Literal["param", "optimizer_state", "batch", "other"]
  updated_id: int = -1

  def __post_init__(self):
    if self.role not in _ROLES:
      raise ValueError(f"InputInfo {self.path!r}: role={self.role!r}; allowed: {sorted(_ROLES)}.")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerGraph:
  """A train step as layers and the tensors between them.

  Attributes:
    layers: in topological (program) order; they partition the program's equations.
    edges: forward data dependencies between layers, sorted by (src index, dst index).
    inputs: every array leaf of the step's arguments, in argument order.
    batch_argnums: which arguments are batch (their leading dim is the batch).
    batch_size: the leading dimension of the batch leaves.
    tensors: the type of every value, indexed by value id.
    output_ids: the values the step returns (its array leaves, in order); written-back
      leaves are `InputInfo.updated_id`.
  """

  layers: tuple[Layer, ...]
  edges: tuple[Edge, ...]
  inputs: tuple[InputInfo, ...]
  batch_argnums: tuple[int, ...]
  batch_size: int
  tensors: tuple[TensorInfo, ...] = ()
  output_ids: tuple[int, ...] = ()

  def __post_init__(self):
    names = [l.name for l in self.layers]
    if len(set(names)) != len(names):
      dup = sorted(n for n, c in collections.Counter(names).items() if c > 1)
      raise ValueError(f"LayerGraph: layer names must be unique, got duplicates {dup}.")
    for i, l in enumerate(self.layers):
      if l.index != i:
        raise ValueError(f"LayerGraph: layer {l.name!r} has index {l.index} at position {i}.")
    known = set(names)
    for e in self.edges:
      if e.src not in known or e.dst not in known:
        raise ValueError(f"LayerGraph: edge {e.src!r} -> {e.dst!r} names an unknown layer.")

  def layer(self, name: str) -> Layer:
    for l in self.layers:
      if l.name == name:
        return l
    raise KeyError(f"No layer named {name!r}; layers are {[l.name for l in self.layers]}")

  def tensor(self, value_id: int) -> TensorInfo:
    """The type of one value id (not of -1, which stands for literals)."""
    if not 0 <= value_id < len(self.tensors):
      raise KeyError(f"No value id {value_id}; ids run from 0 to {len(self.tensors) - 1}.")
    return self.tensors[value_id]

  def summary(self) -> str:
    """A readable table: one row per layer, with totals."""
    return _summary(self)


def trace(step_fn: Callable[..., Any], *example_args: Any,
          batch_argnums: int | Sequence[int] | None = None) -> LayerGraph:
  """Traces one train step (or loss function) into a LayerGraph, on shapes only.

  The step runs once under `jax.make_jaxpr` on abstract values: nothing is
  allocated, so a 7B-parameter model traces in seconds. NNX modules' `__call__`
  methods are wrapped in named scopes while tracing (not thread-safe: do not call
  those modules from another thread meanwhile); the caller's objects are not
  modified. See the module docstring for how equations become layers.

  Args:
    step_fn: the train step as the user calls it, e.g. NNX
      `step(model, optimizer, batch)` updating in place, or a functional
      `step(state, batch) -> (state, metrics)`; a plain loss function works too.
    *example_args: its arguments. Array leaves may be jax/numpy arrays or
      `jax.ShapeDtypeStruct`s; models may come from `nnx.eval_shape`.
    batch_argnums: which arguments are the batch; the last one when None.
  Returns:
    The LayerGraph: layers in program order, edges, inputs with their roles.
  Raises:
    TypeError: the step cannot be traced on shapes (Python control flow on an
      array), or an argument holds a leaf that is not an array.
    ValueError: batch_argnums out of range, or batch leaves whose leading
      (batch) dimensions differ.

  Example:
    model = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
    optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, optax.adamw(1e-3),
                                                       wrt=nnx.Param), model)
    batch = {"x": jax.ShapeDtypeStruct((8, 128), jnp.int32)}
    graph = ua.trace(train_step, model, optimizer, batch)
    print(graph.summary())
  """
  return _trace(step_fn, example_args, batch_argnums, keep_equations=False)[0]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Equation:
  """One primitive equation of the traced program, kept so that ops can run again.

  Attributes:
    eqn: the JAX equation (`jax.extend.core.JaxprEqn`).
    operands: per operand, ("value", id), ("literal", value) or ("const", value).
    out_ids: the value ids of its results (as in `Op.out_ids`).
  """

  eqn: Any
  operands: tuple[tuple[str, Any], ...]
  out_ids: tuple[int, ...]


def trace_program(step_fn: Callable[..., Any], *example_args: Any,
                  batch_argnums: int | Sequence[int] | None = None
                  ) -> tuple[LayerGraph, tuple[Equation, ...]]:
  """`trace`, plus the equations behind the ops: `Op.index` indexes them.

  For running layers on their own (`replay`), e.g. to time them; costs the memory of
  the traced program, which `trace` drops.
  """
  graph, equations = _trace(step_fn, example_args, batch_argnums, keep_equations=True)
  return graph, tuple(equations)


def replay(equations: Sequence[Equation], indices: Sequence[int],
           values: dict[int, Any]) -> dict[int, Any]:
  """Runs `equations[k]` for k in `indices`, in that order, on `values` (id -> array).

  Returns `values` updated with every result. Works under `jax.jit`: the layer's
  program is then one XLA computation. A missing operand raises KeyError naming it.
  """
  env = dict(values)
  for k in indices:
    e = equations[k]
    args = [env[v] if how == "value" else v for how, v in e.operands]
    out = e.eqn.primitive.bind(*args, **e.eqn.primitive.get_bind_params(e.eqn.params))
    env.update(zip(e.out_ids, out if e.eqn.primitive.multiple_results else (out,)))
  return env


def _trace(step_fn, example_args, batch_argnums, *, keep_equations: bool):
  if not callable(step_fn):
    raise TypeError(f"trace: step_fn must be callable, got {type(step_fn).__name__}.")
  fn_name = getattr(step_fn, "__qualname__", None) or getattr(step_fn, "__name__", None) or repr(
      step_fn)
  if not example_args:
    raise TypeError(f"trace({fn_name}) needs the step's example arguments, e.g. "
                    "trace(step, model, optimizer, batch); shapes suffice.")
  batch_argnums = _batch_argnums(batch_argnums, len(example_args))
  leaves, treedefs, counts = _flatten_args(example_args, batch_argnums)
  batch_size = _batch_size(leaves, batch_argnums)
  modules = _Modules.from_args(example_args)
  closed, num_out, written = _make_jaxpr(step_fn, fn_name, leaves, treedefs, counts, modules)
  program = _Program(closed, keep_equations=keep_equations)
  notes = list(program.notes)
  graph = _assemble(program, leaves, batch_argnums, batch_size, modules, num_out, written,
                    fn_name, notes)
  for note in dict.fromkeys(notes):
    warnings.warn(note, stacklevel=3)
  return graph, program.equations


# ---------------------------------------------------------------------------
# Arguments


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


# ---------------------------------------------------------------------------
# NNX module calls as named scopes

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


# ---------------------------------------------------------------------------
# Tracing

_UNTRACEABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                jax.errors.TracerArrayConversionError)


def _make_jaxpr(step_fn, fn_name, leaves, treedefs, counts, modules: _Modules):
  """The step's closed jaxpr over all leaves.

  Its outputs are the step's array leaves, then the leaves it wrote back in place (NNX).
  Returns (closed jaxpr, number of step outputs, {leaf index: output position} of the
  new value of each leaf, written back or returned in the place of its argument).
  """
  layout: dict[str, Any] = {}
  starts = np.cumsum([0] + list(counts)).tolist()

  def traced(*leaves):  # the name "leaves" is parsed from JAX's error messages
    args = [jax.tree_util.tree_unflatten(td, leaves[s:s + n])
            for td, s, n in zip(treedefs, starts, counts)]
    modules.stamp(args)
    out = step_fn(*args)
    out_leaves = [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]
    position = {id(x): k for k, x in enumerate(out_leaves)}
    # A functional step returns each new state in the place of its argument: as the whole
    # output, or as one element of an output tuple, with the argument's structure.
    returned = [out] + (list(out) if isinstance(out, tuple | list) else [])
    updates, written = {}, []
    for td, arg, s, n in zip(treedefs, args, starts, counts):
      now = jax.tree_util.tree_leaves(arg)
      if len(now) == n and any(x is not leaves[s + k] for k, x in enumerate(now)):
        for k, x in enumerate(now):
          if isinstance(x, jax.Array) and x is not leaves[s + k]:
            updates[s + k] = len(out_leaves) + len(written)
            written.append(x)
        continue
      for candidate in returned:
        if jax.tree_util.tree_structure(candidate) == td:
          new = jax.tree_util.tree_leaves(candidate)
          updates.update((s + k, position[id(x)]) for k, x in enumerate(new)
                         if id(x) in position and x is not leaves[s + k])
          break
    layout["num_out"], layout["updates"] = len(out_leaves), updates
    return tuple(out_leaves) + tuple(written)

  with modules.scoped_calls():
    try:
      closed = jax.make_jaxpr(traced)(*[l.spec for l in leaves])
    except _UNTRACEABLE as e:
      raise TypeError(_untraceable_message(fn_name, e, leaves)) from e
  return closed, layout["num_out"], layout["updates"]


def _untraceable_message(fn_name: str, err: Exception, leaves: Sequence[_Leaf]) -> str:
  if isinstance(err, jax.errors.TracerBoolConversionError):
    what = "converts an array to a Python bool (an `if`, `while`, `and` or `assert` on it)"
  elif isinstance(err, jax.errors.TracerIntegerConversionError):
    what = "converts an array to a Python int (range(), list indexing)"
  elif isinstance(err, jax.errors.TracerArrayConversionError):
    what = "converts an array to a NumPy array (np.asarray)"
  else:
    what = "needs the concrete value of an array"
  at = ""
  here = os.path.abspath(__file__)
  for frame in reversed(traceback.extract_tb(err.__traceback__)):
    f = frame.filename
    if os.path.abspath(f) != here and not any(
        f"{os.sep}{lib}{os.sep}" in f for lib in ("jax", "jaxlib", "flax", "optax")):
      at = f" at {f}:{frame.lineno}"
      break
  source = ""
  m = re.search(r"argument leaves\[(\d+)\]", str(err))
  if m and int(m.group(1)) < len(leaves):
    leaf = leaves[int(m.group(1))]
    source = f" The value depends on {_where(leaf.arg_index, leaf.path).rstrip(',')}."
  first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return (f"trace: {fn_name}{at} {what}, but trace() runs the step on shapes only, so no "
          f"array has a value.{source} Use jax.lax.cond, jnp.where or jax.lax.fori_loop "
          "instead of Python control flow on arrays, or make the value a static Python "
          f"constant (close over it). JAX said: {first}")


# ---------------------------------------------------------------------------
# The inlined program

_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                     "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint", "remat",
                     "remat2"})
_REMAT_SCOPE = "rematted_computation"  # the scope jax.checkpoint adds to recomputation

_ARITH = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "floor",
    "ceil", "round", "select_n", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not",
    "xor", "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count",
    "clz", "square", "integer_pow", "is_finite", "nextafter", "real", "imag", "conj", "complex"})
_FREE_ELEMENTWISE = frozenset({"copy", "copy_p", "stop_gradient", "optimization_barrier"})
_TRANSCENDENTAL = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin",
    "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "atan2", "sqrt", "rsqrt", "cbrt",
    "pow", "erf", "erfc", "erf_inv", "lgamma", "digamma", "igamma", "igammac", "polygamma",
    "zeta", "bessel_i0e", "bessel_i1e", "random_gamma_grad", "regularized_incomplete_beta"})
_CONVERT = frozenset({"convert_element_type", "reduce_precision", "bitcast_convert_type"})
_REDUCTION = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                        "reduce_or", "reduce_xor", "argmax", "argmin"})
_SCATTER_ACC = frozenset({"scatter-add", "scatter_add", "scatter-mul", "scatter_mul",
                          "scatter-min", "scatter_min", "scatter-max", "scatter_max"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_KIND_OF = {
    "dot_general": "dot_general", "conv_general_dilated": "conv", "gather": "gather",
    "scatter": "scatter", "dynamic_update_slice": "scatter", "reshape": "reshape",
    "squeeze": "reshape", "expand_dims": "reshape", "transpose": "transpose",
    "broadcast_in_dim": "broadcast", "slice": "slice", "dynamic_slice": "slice",
    "split": "slice", "concatenate": "concatenate",
    **{p: "elementwise" for p in _ARITH | _FREE_ELEMENTWISE | _TRANSCENDENTAL},
    **{p: "convert" for p in _CONVERT}, **{p: "reduction" for p in _REDUCTION},
    **{p: "scatter" for p in _SCATTER_ACC}}
# XLA expands logistic into 1 / (1 + exp(-x)): three flops and one transcendental per element.
_LOGISTIC_FLOPS = 3


class _Eqn:
  __slots__ = ("prim", "kind", "in_ids", "out_ids", "in_types", "out_types", "lits", "params",
               "flops", "trans", "nbytes", "stack", "source")


def _plain(v: Any) -> Any:
  """Plain hashable Python data for a primitive parameter, or _SKIP."""
  if v is None or isinstance(v, bool | int | float | str):
    return v
  if isinstance(v, np.integer | np.floating | np.bool_):
    return v.item()
  if isinstance(v, enum.Enum):
    return v.name
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return np.dtype(v).name
  if hasattr(v, "dtype") and type(v).__name__.endswith("DType"):  # numpy DType classes
    try:
      return np.dtype(v).name
    except TypeError:
      return _SKIP
  if isinstance(v, tuple | list):
    items = tuple(_plain(x) for x in v)
    return _SKIP if any(x is _SKIP for x in items) else items
  return _SKIP


_SKIP = object()


def _op_params(prim: str, params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
  out: dict[str, Any] = {}
  for k, v in params.items():
    if k == "dimension_numbers" and prim == "dot_general":
      (lc, rc), (lb, rb) = v
      out[k] = ((tuple(map(int, lc)), tuple(map(int, rc))), (tuple(map(int, lb)),
                                                              tuple(map(int, rb))))
    elif k == "dimension_numbers" and prim == "conv_general_dilated":
      out[k] = tuple(tuple(int(d) for d in spec) for spec in (v.lhs_spec, v.rhs_spec,
                                                              v.out_spec))
    elif k == "dimension_numbers" and hasattr(v, "_fields"):  # gather / scatter
      for field in v._fields:
        out[field] = _plain(getattr(v, field))
    else:
      p = _plain(v)
      if p is not _SKIP:
        out[k] = p
  return tuple(sorted(out.items()))


def _op_cost(prim: str, params: dict[str, Any], ins: Sequence[TensorInfo],
             outs: Sequence[TensorInfo]) -> tuple[float, float]:
  """(flops, transcendentals) of one primitive, counted as XLA's HloCostAnalysis does."""
  out_size = float(sum(o.size for o in outs))
  if prim == "dot_general":
    (lc, _), _ = params["dimension_numbers"]
    contract = math.prod(ins[0].shape[d] for d in lc)
    return 2.0 * out_size * float(contract), 0.0
  if prim == "conv_general_dilated":
    rhs = ins[1]
    out_features = rhs.shape[params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * out_size * rhs.size / max(out_features, 1), 0.0
  if prim in _ARITH:
    if prim == "integer_pow":  # repeated multiplication, plus a division when negative
      y = int(params.get("y", 2))
      return out_size * (max(abs(y) - 1, 0) + (y < 0)), 0.0
    return out_size, 0.0
  if prim in _TRANSCENDENTAL:
    return (_LOGISTIC_FLOPS * out_size if prim == "logistic" else 0.0), out_size
  if prim in _CONVERT:
    return (0.0 if prim == "bitcast_convert_type" else out_size), 0.0
  if prim in _REDUCTION:
    return float(max(ins[0].size - out_size, 0)), 0.0
  if prim in _SCATTER_ACC:
    return float(ins[2].size) if len(ins) > 2 else 0.0, 0.0
  if prim in _CUMULATIVE:
    return float(ins[0].size), 0.0
  if prim.startswith("reduce_window"):
    window = math.prod(params.get("window_dimensions", (1,)))
    return out_size * float(window), 0.0
  return 0.0, 0.0


def _sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]] | None:
  """(jaxpr, consts) of a call-like equation that is inlined, else None."""
  if eqn.primitive.name not in _INLINE:
    return None
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, jex_core.ClosedJaxpr):
      jaxpr, consts = j.jaxpr, j.consts
    elif isinstance(j, jex_core.Jaxpr):
      jaxpr, consts = j, ()
    else:
      continue
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr, consts
  return None


def _own_stack(name_stack) -> tuple[tuple[bool, str], ...]:
  """(is_transform, name) elements of an equation's name stack.

  A transposed `checkpoint` carries its scopes twice ("transpose(jvp(a))/jvp(a)"); the
  repeat is dropped so that it does not read as a nested scope.
  """
  elems = tuple((type(el).__name__ == "Transform", el.name) for el in name_stack.stack)
  scopes = [k for k, (t, _) in enumerate(elems) if not t]
  half = len(scopes) // 2
  if half and [elems[k] for k in scopes[:half]] == [elems[k] for k in scopes[half:]]:
    drop = set(scopes[half:])
    elems = tuple(e for k, e in enumerate(elems) if k not in drop)
  return elems


def _literal_key(val: Any) -> Any:
  """A cheap, exact stand-in for a literal's value in layer signatures."""
  arr = np.asarray(val)
  if arr.ndim == 0:
    return (arr.dtype.name, arr.item())
  return (arr.dtype.name, arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=8).hexdigest())


def _open(j) -> Any:
  return j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j


class _Program:
  """The step's jaxpr with calls inlined: equations in program order, typed values."""

  def __init__(self, closed, keep_equations: bool = False):
    self.eqns: list[_Eqn] = []
    # With keep_equations, the JAX equation behind each _Eqn and where its operands
    # come from, so that any set of ops can be run again (`replay`).
    self.equations: list[Equation] | None = [] if keep_equations else None
    self.types: list[TensorInfo] = []
    self.notes: list[str] = []
    self._infos: dict[Any, TensorInfo] = {}
    self._costs: dict[int, tuple[float, float, float]] = {}
    jaxpr = closed.jaxpr
    in_ids = [self._new(v.aval) for v in jaxpr.invars]
    self.out_ids = self._walk(jaxpr, in_ids, (), "", closed.consts)

  def info(self, aval) -> TensorInfo:
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    key = (tuple(shape) if shape is not None else None, dtype)
    if key not in self._infos:
      if shape is None or dtype is None:  # tokens and other non-array values
        info = TensorInfo(shape=(), dtype="bool")
      elif jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # PRNG keys: their key data
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        info = TensorInfo(shape=tuple(int(d) for d in data.shape), dtype=np.dtype(data.dtype).name)
      else:
        info = TensorInfo(shape=tuple(int(d) for d in shape), dtype=np.dtype(dtype).name)
      self._infos[key] = info
    return self._infos[key]

  def _new(self, aval) -> int:
    self.types.append(self.info(aval))
    return len(self.types) - 1

  def _walk(self, jaxpr, in_ids: Sequence[int], stack: tuple, source: str,
            consts: Sequence[Any] = (), known: dict | None = None) -> list[int]:
    env: dict[Any, int] = {v: -1 for v in jaxpr.constvars}
    env.update(zip(jaxpr.invars, in_ids))
    const_of = {**dict(zip(jaxpr.constvars, consts)), **(known or {})}
    read = lambda a: -1 if isinstance(a, jex_core.Literal) else env[a]
    for eqn in jaxpr.eqns:
      ids = [read(a) for a in eqn.invars]
      estack = stack + _own_stack(eqn.source_info.name_stack)
      esource = source_info_util.summarize(eqn.source_info) or source
      sub = _sub_jaxpr(eqn)
      if sub is not None:
        # Constants and literals passed into an inlined call are constants inside it.
        passed = {v: a.val if isinstance(a, jex_core.Literal) else const_of.get(a)
                  for v, a in zip(sub[0].invars, eqn.invars) if read(a) == -1}
        outs = self._walk(sub[0], ids, estack, esource, sub[1], passed)
        env.update(zip(eqn.outvars, outs))
        continue
      e = _Eqn()
      e.prim = eqn.primitive.name
      e.kind = _KIND_OF.get(e.prim, "other")
      e.in_ids = tuple(ids)
      e.in_types = tuple(self.info(a.aval) for a in eqn.invars)
      e.out_ids = tuple(self._new(v.aval) for v in eqn.outvars)
      e.out_types = tuple(self.types[i] for i in e.out_ids)
      e.lits = tuple((k, _literal_key(a.val)) for k, a in enumerate(eqn.invars)
                     if isinstance(a, jex_core.Literal))
      bodies = list(jex_core.jaxprs_in_params(eqn.params))
      if bodies:  # loops and other higher-order ops: their bodies tell them apart
        e.lits += tuple(("body", hashlib.blake2b(str(j).encode(), digest_size=8).hexdigest())
                        for j in bodies)
      e.params = _op_params(e.prim, eqn.params)
      e.flops, e.trans, e.nbytes = self._eqn_cost(eqn, e.prim, e.in_types, e.out_types)
      e.stack, e.source = estack, esource
      env.update(zip(eqn.outvars, e.out_ids))
      self.eqns.append(e)
      if self.equations is not None:
        self.equations.append(Equation(eqn=eqn, operands=tuple(
            ("literal", a.val) if isinstance(a, jex_core.Literal) else
            ("value", i) if i != -1 else ("const", const_of.get(a))
            for a, i in zip(eqn.invars, ids)), out_ids=e.out_ids))
    return [read(v) for v in jaxpr.outvars]

  def _eqn_cost(self, eqn, prim, ins, outs) -> tuple[float, float, float]:
    """(flops, transcendentals, bytes); loops: body cost times the trip count."""
    if prim == "scan":
      f, t, b = self._jaxpr_cost(_open(eqn.params["jaxpr"]))
      n = float(eqn.params["length"])
      return f * n, t * n, b * n
    if prim == "while":
      self.notes.append(
          f"trace: a while loop at {source_info_util.summarize(eqn.source_info)} has a trip count "
          "unknown at trace time; its body is costed once. Use jax.lax.scan or fori_loop with "
          "static bounds for exact FLOPs.")
      body = self._jaxpr_cost(_open(eqn.params["body_jaxpr"]))
      cond = self._jaxpr_cost(_open(eqn.params["cond_jaxpr"]))
      return tuple(x + y for x, y in zip(body, cond))
    if prim == "cond":
      return max((self._jaxpr_cost(_open(b)) for b in eqn.params["branches"]),
                 key=lambda c: (c[0], c[2]))
    subs = list(jex_core.jaxprs_in_params(eqn.params))
    if subs and prim not in _KIND_OF:  # shard_map, custom calls...: their bodies, once
      costs = [self._jaxpr_cost(j) for j in subs]
      return tuple(sum(c[k] for c in costs) for k in range(3))
    flops, trans = _op_cost(prim, eqn.params, ins, outs)
    return flops, trans, float(sum(t.nbytes for t in ins) + sum(t.nbytes for t in outs))

  def _jaxpr_cost(self, jaxpr) -> tuple[float, float, float]:
    if id(jaxpr) not in self._costs:
      total = [0.0, 0.0, 0.0]
      for eqn in jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
          c = self._jaxpr_cost(sub[0])
        else:
          ins = [self.info(a.aval) for a in eqn.invars]
          outs = [self.info(v.aval) for v in eqn.outvars]
          c = self._eqn_cost(eqn, eqn.primitive.name, ins, outs)
        total = [x + y for x, y in zip(total, c)]
      self._costs[id(jaxpr)] = tuple(total)
    return self._costs[id(jaxpr)]


# ---------------------------------------------------------------------------
# Phases, layers and ownership

_PHASE_RANK = {"forward": 0, "backward": 1, "optimizer": 2}


def _phases(eqns: Sequence[_Eqn], producer: Sequence[int],
            consumers: Sequence[Sequence[int]]) -> list[str]:
  """forward / backward / optimizer per equation (see the module docstring, step 3)."""
  bwd = [any(t and n == "transpose" for t, n in e.stack) for e in eqns]
  if not any(bwd):
    return ["forward"] * len(eqns)
  jvp = [not b and any(t and n == "jvp" for t, n in e.stack) for e, b in zip(eqns, bwd)]
  differentiated = [b or j for b, j in zip(bwd, jvp)]
  feeds = [False] * len(eqns)  # an untransformed equation the differentiated function reads
  for k in range(len(eqns) - 1, -1, -1):
    if not differentiated[k]:
      feeds[k] = any(differentiated[c] or feeds[c] for o in eqns[k].out_ids for c in consumers[o])
  after_bwd, after_fwd = [False] * len(eqns), [False] * len(eqns)
  for k, e in enumerate(eqns):
    prods = [producer[i] for i in e.in_ids if i >= 0 and producer[i] >= 0]
    after_bwd[k] = bwd[k] or any(after_bwd[p] for p in prods)
    after_fwd[k] = jvp[k] or any(after_fwd[p] for p in prods)
  phases = []
  for k in range(len(eqns)):
    if bwd[k]:
      phases.append("backward")
    elif jvp[k] or feeds[k] or (after_fwd[k] and not after_bwd[k]):
      phases.append("forward")
    else:
      phases.append("optimizer")
  return phases


def _split_call(name: str) -> str:
  """"embed@1" -> "embed": the module path of a call."""
  head, sep, tail = name.rpartition("@")
  return head if sep and tail.isdigit() else name


def _layer_keys(eqns: Sequence[_Eqn], modules: _Modules, fn_name: str,
                notes: list[str]) -> tuple[list[str | None], list[str]]:
  """Per equation: its layer name or None (outside layers), and its innermost module."""
  markers = [[n[len(_MARK):] for t, n in e.stack if not t and n.startswith(_MARK)] for e in eqns]
  if any(markers):
    frontier = modules.frontier()
    while True:
      keys = [next((m for m in ms if _split_call(m) in frontier), None) for ms in markers]
      used = {_split_call(k) for k in keys if k is not None}
      kids = modules.expand_name(next(iter(used))) if len(used) == 1 else set()
      if not kids:
        break
      frontier = (frontier - used) | kids
    return keys, [ms[-1] if ms else "" for ms in markers]
  scopes = [tuple(n for t, n in e.stack if not t and n != _REMAT_SCOPE) for e in eqns]
  distinct = set(scopes)
  frontier = {s[:1] for s in distinct if s}
  expanded = set()
  while True:  # expand the one scope that has sub-scopes (Linen's root module, say)
    parents = [f for f in frontier if any(len(s) > len(f) and s[:len(f)] == f for s in distinct)]
    if len(parents) != 1:
      break
    f = parents[0]
    expanded.add(f)
    frontier = (frontier - {f}) | {s[:len(f) + 1] for s in distinct
                                   if len(s) > len(f) and s[:len(f)] == f}
  tops = {s[:1] for s in distinct if s}
  strip = len(tops) == 1 and tops <= expanded  # a single root scope: leave it out of names
  name_of = {f: "/".join(f[1:] if strip and len(f) > 1 else f) for f in frontier}
  key_of = {s: next((name_of[s[:n]] for n in range(1, len(s) + 1) if s[:n] in frontier), None)
            for s in distinct}
  keys = [key_of[s] for s in scopes]
  if not any(k is not None for k in keys):
    notes.append(
        f"trace: {fn_name} calls no Flax submodule and opens no jax.named_scope, so the whole "
        "step is one layer and cannot be pipelined. Use Flax modules, or wrap the parts in "
        "`with jax.named_scope('name'):` to get layers.")
    keys = [fn_name] * len(eqns)
  return keys, ["/".join(s) for s in scopes]


def _own(eqns: Sequence[_Eqn], phases: Sequence[str], owner: list[int],
         producer: Sequence[int], consumers: Sequence[Sequence[int]],
         param_ids: Sequence[int], updates: dict[int, int]) -> None:
  """Gives every equation outside a layer the nearest layer by dataflow, in place."""
  param_owner: dict[int, int] = {}
  update_of = {u: j for j, u in updates.items() if j in set(param_ids)}

  def recompute_params():
    for j in param_ids:
      fw = [owner[c] for c in consumers[j] if phases[c] == "forward" and owner[c] >= 0]
      param_owner[j] = min(fw) if fw else -1

  def val_owner(i):
    if i < 0:
      return -1
    p = producer[i]
    return owner[p] if p >= 0 else param_owner.get(i, -1)

  def prods(k, forward_only=False):
    return {val_owner(i) for i in eqns[k].in_ids
            if not forward_only or (i >= 0 and producer[i] >= 0
                                    and phases[producer[i]] == "forward")} - {-1}

  def users(k):
    out = {owner[c] for o in eqns[k].out_ids for c in consumers[o]}
    out |= {param_owner.get(update_of[o], -1) for o in eqns[k].out_ids if o in update_of}
    return out - {-1}

  def unique(applies, backwards, candidates):
    def sweep(todo):
      progress = False
      for k in (reversed(todo) if backwards else todo):
        if owner[k] < 0 and phases[k] in applies:
          c = candidates(k)
          if len(c) == 1:
            owner[k], progress = c.pop(), True
      return progress
    return sweep

  def joins(todo):  # a join of several layers' values: the latest layer it reads from
    progress = False
    for k in todo:
      c = prods(k)
      if c and owner[k] < 0:
        owner[k], progress = max(c), True
    return progress

  def shared(todo):  # read by several layers: the earliest, or the layer that ran just before
    last_forward, prev = -1, [-1] * len(eqns)
    for k in range(len(eqns)):
      prev[k] = last_forward
      if phases[k] == "forward" and owner[k] >= 0:
        last_forward = owner[k]
    progress = False
    for k in reversed(todo):
      c = users(k)
      if c and owner[k] < 0:
        if phases[k] == "forward" and prev[k] >= 0:
          c.add(prev[k])
        owner[k], progress = min(c), True
    return progress

  def unconnected(todo):  # dead code: the layer of the nearest equation before it
    last = next((o for o in owner if o >= 0), 0)
    for k in range(len(eqns)):
      if owner[k] < 0:
        owner[k] = last
      last = owner[k]
    return bool(todo)

  # Stages, most certain first; after any progress, start again from the first.
  stages = (
      (unique({"optimizer"}, True, users),  # optimizer ops follow the update they feed
       unique({"backward"}, False, lambda k: prods(k, forward_only=True)),  # residuals
       unique({"forward", "optimizer"}, False, prods),
       unique(set(_PHASES), True, users)),
      (unique({"backward"}, False, prods),),  # cotangents
      (joins,), (shared,), (unconnected,))
  todo = [k for k in range(len(eqns)) if owner[k] < 0]
  while todo:
    for sweeps in stages:
      recompute_params()
      progress = False
      for sweep in sweeps:
        progress |= sweep(todo)
      todo = [k for k in todo if owner[k] < 0]
      if progress:
        break


def _signature(eqns: Sequence[_Eqn], ks: Sequence[int], phases: Sequence[str]) -> str:
  canon: dict[int, int] = {}

  def c(i):
    if i < 0:
      return -1
    if i not in canon:
      canon[i] = len(canon)
    return canon[i]

  items = []
  for k in ks:
    e = eqns[k]
    items.append((e.prim, phases[k], tuple(c(i) for i in e.in_ids),
                  tuple((t.shape, t.dtype) for t in e.in_types), e.lits,
                  tuple(c(o) for o in e.out_ids), tuple((t.shape, t.dtype) for t in e.out_types),
                  e.params))
  return hashlib.blake2b(repr(items).encode(), digest_size=16).hexdigest()


def _assemble(program: _Program, leaves: Sequence[_Leaf], batch_argnums: tuple[int, ...],
              batch_size: int, modules: _Modules, num_out: int, written: dict[int, int],
              fn_name: str, notes: list[str]) -> LayerGraph:
  eqns, types = program.eqns, program.types
  num_values = len(types)
  producer = [-1] * num_values
  consumers: list[list[int]] = [[] for _ in range(num_values)]
  for k, e in enumerate(eqns):
    for i in dict.fromkeys(e.in_ids):
      if i >= 0:
        consumers[i].append(k)
    for o in e.out_ids:
      producer[o] = k
  phases = _phases(eqns, producer, consumers)

  step_outputs = tuple(program.out_ids[:num_out])
  updates = {j: program.out_ids[k] for j, k in written.items()
             if program.out_ids[k] >= 0 and program.out_ids[k] != j}
  roles = []
  for j, leaf in enumerate(leaves):
    if leaf.role is not None:
      roles.append(leaf.role)
    else:
      seen = {phases[c] for c in consumers[j]}
      roles.append("param" if "forward" in seen else
                   "optimizer_state" if "optimizer" in seen else "other")

  keys, module_of = _layer_keys(eqns, modules, fn_name, notes)
  first: dict[str, tuple[int, int]] = {}
  for k, key in enumerate(keys):
    if key is not None:
      rank = (0 if phases[k] == "forward" else 1, k)
      first[key] = min(first.get(key, rank), rank)
  names = sorted(first, key=first.__getitem__)
  index = {n: i for i, n in enumerate(names)}
  owner = [index[key] if key is not None else -1 for key in keys]
  param_ids = [j for j, r in enumerate(roles) if r == "param"]
  if names:
    _own(eqns, phases, owner, producer, consumers, param_ids, updates)

  def first_user(j, forward_only):
    us = [owner[c] for c in consumers[j] if not forward_only or phases[c] == "forward"]
    return min(us) if us else -1

  held: dict[int, list[int]] = collections.defaultdict(list)
  held_state: dict[int, list[int]] = collections.defaultdict(list)
  for j, role in enumerate(roles):
    if role == "param":
      o = first_user(j, True)
      held[o if o >= 0 else first_user(j, False)].append(j)
    elif role == "optimizer_state":
      held_state[first_user(j, False)].append(j)

  def param_info(j):
    return ParamInfo(path=leaves[j].path, arg_index=leaves[j].arg_index, value_id=j,
                     info=types[j], updated_id=updates.get(j, -1))

  per_layer: list[list[int]] = [[] for _ in names]
  for k in range(len(eqns)):
    per_layer[owner[k]].append(k)
  outputs = set(program.out_ids)
  edges: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
  layers = []
  for li, name in enumerate(names):
    ks = sorted(per_layer[li], key=lambda k: (_PHASE_RANK[phases[k]], k))
    ins, outs, act = set(), set(), set()
    flops = dict.fromkeys(_PHASES, 0.0)
    nbytes = dict.fromkeys(_PHASES, 0.0)
    ops = []
    for k in ks:
      e, ph = eqns[k], phases[k]
      flops[ph] += e.flops
      nbytes[ph] += e.nbytes
      for i in e.in_ids:
        if i < 0:
          continue
        p = producer[i]
        if p < 0:
          if i < len(roles) and roles[i] in ("batch", "other"):
            ins.add(i)
            if ph == "backward" and roles[i] == "batch":
              act.add(i)
        elif phases[p] == "forward":
          if owner[p] != li:
            ins.add(i)
            edges[(owner[p], li)].add(i)
          if ph == "backward":
            act.add(i)
      if ph == "forward":
        outs.update(o for o in e.out_ids
                    if o in outputs or any(owner[c] != li for c in consumers[o]))
      ops.append(Op(primitive=e.prim, kind=e.kind, phase=ph, in_ids=e.in_ids, out_ids=e.out_ids,
                    in_types=e.in_types, out_types=e.out_types, params=e.params, flops=e.flops,
                    bytes_accessed=e.nbytes, source=e.source, transcendentals=e.trans,
                    module=module_of[k], index=k))
    params = tuple(param_info(j) for j in sorted(held.get(li, ())))
    state = tuple(param_info(j) for j in sorted(held_state.get(li, ())))
    layers.append(Layer(
        name=name, index=li, signature=_signature(eqns, ks, phases), ops=tuple(ops),
        params=params, input_ids=tuple(sorted(ins)), output_ids=tuple(sorted(outs)),
        flops=flops["forward"], backward_flops=flops["backward"],
        optimizer_flops=flops["optimizer"], bytes_accessed=nbytes["forward"],
        param_bytes=sum(p.info.nbytes for p in params),
        activation_bytes=sum(types[i].nbytes for i in act),
        module_type=modules.types.get(_split_call(name), ""),
        backward_bytes_accessed=nbytes["backward"], optimizer_bytes_accessed=nbytes["optimizer"],
        activation_ids=tuple(sorted(act)), optimizer_state=state,
        optimizer_state_bytes=sum(p.info.nbytes for p in state)))

  for src, dst in edges:
    if src > dst:
      notes.append(f"trace: forward data flows from layer {names[src]!r} back to the earlier "
                   f"layer {names[dst]!r}; pipeline stages assume edges go forward.")
  inputs = tuple(
      InputInfo(path=l.path, arg_index=l.arg_index, value_id=j, info=types[j], role=roles[j],
                updated_id=updates.get(j, -1)) for j, l in enumerate(leaves))
  return LayerGraph(
      layers=tuple(layers),
      edges=tuple(Edge(src=names[s], dst=names[d], value_ids=tuple(sorted(ids)),
                       tensors=tuple(types[i] for i in sorted(ids)))
                  for (s, d), ids in sorted(edges.items())),
      inputs=inputs, batch_argnums=batch_argnums, batch_size=batch_size, tensors=tuple(types),
      output_ids=step_outputs)


# ---------------------------------------------------------------------------
# Summary


def _si(x: float) -> str:
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.0f}"


def _binary(x: float) -> str:
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}B"


def _summary(graph: LayerGraph) -> str:
  kinds = {l.signature for l in graph.layers}
  num_params = sum(p.info.size for l in graph.layers for p in l.params)
  param_bytes = sum(l.param_bytes for l in graph.layers)
  totals = [sum(getattr(l, f) for l in graph.layers)
            for f in ("flops", "backward_flops", "optimizer_flops", "activation_bytes")]
  head = (f"LayerGraph: {len(graph.layers)} layers of {len(kinds)} kinds, {len(graph.edges)} "
          f"edges, batch {graph.batch_size}, {_si(num_params)} params ({_binary(param_bytes)}); "
          f"FLOPs per step: forward {_si(totals[0])}, backward {_si(totals[1])}, "
          f"optimizer {_si(totals[2])}")
  rows = [("#", "layer", "kind", "ops", "params", "param bytes", "fwd FLOPs", "bwd FLOPs",
           "opt FLOPs", "act bytes")]
  for l in graph.layers:
    kind = f"{l.module_type} {l.signature[:6]}".strip()
    rows.append((str(l.index), l.name, kind, str(len(l.ops)),
                 _si(sum(p.info.size for p in l.params)), _binary(l.param_bytes), _si(l.flops),
                 _si(l.backward_flops), _si(l.optimizer_flops), _binary(l.activation_bytes)))
  rows.append(("", "total", "", str(sum(len(l.ops) for l in graph.layers)), _si(num_params),
               _binary(param_bytes), _si(totals[0]), _si(totals[1]), _si(totals[2]),
               _binary(totals[3])))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  left = {1, 2}
  lines = [head]
  for r in rows:
    lines.append("  ".join(v.ljust(w) if c in left else v.rjust(w)
                           for c, (v, w) in enumerate(zip(r, widths))).rstrip())
  return "\n".join(lines)
