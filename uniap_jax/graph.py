"""The LayerGraph: a train step's jaxpr grouped into layers (module calls).

This module is the only jaxpr reader of uniap_jax. Everything downstream
(strategies, costs, solver) sees the plain dataclasses defined here.

Value ids: every tensor the step's jaxpr computes or consumes gets one integer id,
unique across the whole graph. An `Op` names its operands and results by id and
carries their `TensorInfo`, so a sharding rule can follow a tensor from op to op
inside a layer, and a layer's boundary tensors and parameters are named by the
same ids.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
  """Shape and dtype of one tensor, with its size in bytes."""

  shape: tuple[int, ...]
  dtype: str  # numpy dtype name, e.g. "float32", "bfloat16"

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Op:
  """One jaxpr equation, as a sharding rule and the cost model need it.

  Attributes:
    primitive: the jaxpr primitive name, e.g. "dot_general", "add", "reduce_sum".
    kind: the primitive family that decides which sharding rule applies.
    phase: forward, backward (transposed/linearised equations) or optimizer.
    in_ids / out_ids: value ids of operands and results (literals get id -1).
    in_types / out_types: their shapes and dtypes, in the same order.
    params: the primitive's parameters that rules need, as sorted (key, value)
      pairs of plain Python data, e.g. ("dimension_numbers", (((1,), (0,)), ((), ())))
      for dot_general.
    flops: floating point operations of this equation (2mnk for a matmul).
    bytes_accessed: bytes read plus bytes written, for the roofline.
    source: the user's source line, "file.py:88", or "" when unknown.
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

  def param(self, key: str, default: Any = None) -> Any:
    for k, v in self.params:
      if k == key:
        return v
    return default


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParamInfo:
  """One parameter leaf a layer owns.

  Attributes:
    path: "/"-joined pytree path inside its argument, e.g. "blocks/3/mlp/up/kernel".
    arg_index: which argument of the step holds it.
    value_id: the id under which the forward ops consume it.
    info: shape and dtype.
  """

  path: str
  arg_index: int
  value_id: int
  info: TensorInfo


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
  """One module call: the unit the MIQP places on a pipeline stage.

  Attributes:
    name: the module path, e.g. "embed", "blocks/3", "head".
    index: position in the graph's topological order.
    signature: equal for layers with the same computation and shapes.
    ops: every equation attributed to this layer, forward first, in program order.
    params: parameter leaves the layer uses (owned by it; shared parameters go to
      the first layer that uses them).
    input_ids / output_ids: boundary values (activations crossing to/from other
      layers or the step's inputs/outputs), in a deterministic order.
    flops: forward FLOPs; backward_flops and optimizer_flops from their traced
      equations.
    bytes_accessed: forward bytes read + written.
    param_bytes: bytes of all parameters.
    activation_bytes: bytes of forward values the backward pass reads (residuals),
      per step for the traced batch.
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

  def forward_ops(self) -> tuple[Op, ...]:
    return tuple(op for op in self.ops if op.phase == "forward")


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
  """One array leaf of the step's arguments: a parameter, optimizer state or batch leaf."""

  path: str
  arg_index: int
  value_id: int
  info: TensorInfo
  role: Literal["param", "optimizer_state", "batch", "other"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerGraph:
  """A train step as layers and the tensors between them.

  Attributes:
    layers: in topological (program) order; they partition the program's equations.
    edges: forward data dependencies between layers, sorted by (src index, dst index).
    inputs: every array leaf of the step's arguments, in argument order.
    batch_argnums: which arguments are batch (their leading dim is the batch).
    batch_size: the leading dimension of the batch leaves.
  """

  layers: tuple[Layer, ...]
  edges: tuple[Edge, ...]
  inputs: tuple[InputInfo, ...]
  batch_argnums: tuple[int, ...]
  batch_size: int

  def layer(self, name: str) -> Layer:
    for l in self.layers:
      if l.name == name:
        return l
    raise KeyError(f"No layer named {name!r}; layers are {[l.name for l in self.layers]}")
