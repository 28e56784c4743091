"""Plain data of a LayerGraph: tensors, ops, layers, edges, inputs."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Literal
import numpy as np

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
    from uniap_jax.graph._summary import summary_table  # pylint: disable=g-import-not-at-top
    return summary_table(self)


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
