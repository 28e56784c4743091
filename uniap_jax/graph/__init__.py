"""The LayerGraph: a train step's jaxpr grouped into layers (module calls).

This package is the only jaxpr reader of uniap_jax. Everything downstream
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

from collections.abc import Callable, Sequence
import os
from typing import Any
import warnings

from jax.extend import source_info_util

from uniap_jax.graph._args import _batch_argnums
from uniap_jax.graph._args import _batch_size
from uniap_jax.graph._args import _flatten_args
from uniap_jax.graph._args import leaf_path as leaf_path
from uniap_jax.graph._layers import _assemble
from uniap_jax.graph._modules import _Modules
from uniap_jax.graph._program import _make_jaxpr
from uniap_jax.graph._program import _Program
from uniap_jax.graph._types import Edge as Edge
from uniap_jax.graph._types import Equation as Equation
from uniap_jax.graph._types import InputInfo as InputInfo
from uniap_jax.graph._types import Layer as Layer
from uniap_jax.graph._types import LayerGraph as LayerGraph
from uniap_jax.graph._types import Op as Op
from uniap_jax.graph._types import OpKind as OpKind
from uniap_jax.graph._types import ParamInfo as ParamInfo
from uniap_jax.graph._types import Phase as Phase
from uniap_jax.graph._types import Role as Role
from uniap_jax.graph._types import TensorInfo as TensorInfo

# Source lines of equations name the user's code, not this tracer's call wrappers (as
# flax registers its own files): every file of this package is excluded.
source_info_util.register_exclusion(os.path.dirname(os.path.abspath(__file__)))

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
