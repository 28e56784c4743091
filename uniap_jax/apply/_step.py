"""`apply_plan`: a user's train step, sharded and pipelined as a plan says, same signature.

The step runs inside one `jax.jit` whose inputs are the step's arrays, placed with the
plan's NamedShardings and donated. NNX arguments (model, optimizer) are split into a
graph definition and state around the jitted core and updated in place afterwards, so
an unmodified `train_step(model, optimizer, batch)` keeps working; a functional
`train_step(state, batch) -> (state, metrics)` gets its new state back, laid out as the
plan says.

While the core is traced, the root model's `__call__` is replaced (for that trace only)
by the plan's forward: with one stage and one micro-batch, the model's own forward with
the layouts the plan names constrained (`_pins.Pins`: each layer's output; where a
boundary's consumer takes the value in another layout, its input too, so that the
reshard happens at the edge; outputs of submodule calls inside a layer, whose
calls are then intercepted as well; and parameters a layer gathers before use, where
its module reads them); otherwise the pipeline of `_pipeline.py`, whose stage bodies
apply the same pins (but the gathered parameters') without the `shard_map`'s manual
axes (`_stage_hooks`). The user's loss, `nnx.value_and_grad` and optimizer run
unchanged around it. Either way,
the calls of the layers the plan recomputes (`LayerPlan.recompute`, the candidates
named "... +remat") run under `jax.checkpoint` (`_program.invoke`), so that their
backward pass keeps only their inputs and runs their forward again, as the cost model
charges it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import logging
import math
import threading
from typing import Any
import warnings

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uniap_jax import cluster as cluster_lib
from uniap_jax import hlo
from uniap_jax import plans
from uniap_jax.apply import _mesh
from uniap_jax.apply import _pins
from uniap_jax.apply import _pipeline
from uniap_jax.apply import _program
from uniap_jax.apply import _stages

logger = logging.getLogger(__name__)

def apply_plan(plan: plans.Plan, step: Callable[..., Any], *,
               devices: Sequence[Any] | None = None, schedule: str | None = None,
               dispatch: str = "uniform", donate: bool = True,
               bubble_value: float = 0.0) -> AppliedStep:
  """Returns `step` sharded and pipelined as `plan` says, with the same signature.

  Args:
    plan: the plan, e.g. from `uniap_jax.plan` or `Plan.from_json`.
    step: an NNX `train_step(model, optimizer, batch)` that updates its arguments in
      place, or a functional `train_step(state, batch) -> (state, metrics)`; the plan's
      `batch_argnums` say which arguments are batch.
    devices: the devices to build the mesh over; default `jax.devices()`.
    schedule: the pipeline executor, overriding the one the plan's schedule runs with
      (`plans.runtime_executor`: "gpipe-remat" for GPipe, "1f1b" for 1F1B over several
      stages): "gpipe" (autodiff through the forward loop), "gpipe-remat" (explicit
      backward, all M stage inputs stashed), "fused" or "1f1b" (explicit tables; see
      `_pipeline.py`). The plan's predictions are for its own executor.
    dispatch: how stages that hold different layers share one program: "uniform"
      (every device runs the same layer sequence, masked; safe with any intra-stage
      sharding) or "switch" (one `lax.switch` branch per stage; cheaper for unlike
      stages, but hangs on CPU when XLA puts a collective-permute inside a stage).
      See `_stages.py`.
    donate: donate the state arguments to the jitted step (their old arrays are freed).
    bubble_value: the value pipeline buffers hold before data arrives; NaN checks that
      bubbles never reach a result.
  Returns:
    An `AppliedStep`: call it like `step`; `.mesh` is the mesh; `.lower(*args)` gives
    the lowered program for inspection.

  Multi-process jobs (`jax.distributed.initialize`): every process applies the same plan
  and calls the step with the same arguments. An argument that is not yet a global
  array is the global value, the same on every process (each process keeps only its
  shards); to feed each process its own data instead, build global arrays with
  `jax.make_array_from_process_local_data` over `.batch_shardings(*args)`. What the
  step returns besides its state comes back fully replicated, readable on every
  process; the model and optimizer hold global arrays afterwards
  (`jax.experimental.multihost_utils.process_allgather` reads them on one host).
  Raises:
    ValueError: the plan needs more devices than there are, or an unknown schedule.
  Example:
    step = plan.apply(train_step)
    loss = step(model, optimizer, batch)  # model and optimizer updated in place
  """
  if schedule is None:
    schedule = plans.runtime_executor(plan.schedule, len(plan.stages), plan.num_microbatches)
  if schedule not in _pipeline.EXECUTORS:
    raise ValueError(f"schedule={schedule!r} is not known; use one of {_pipeline.EXECUTORS}.")
  if dispatch not in _stages.DISPATCHES:
    raise ValueError(f"dispatch={dispatch!r} is not known; use one of {_stages.DISPATCHES}.")
  mesh = _mesh.make_mesh(plan, devices)
  return AppliedStep(plan=plan, step=step, mesh=mesh, executor=schedule, dispatch=dispatch,
                     donate=donate, bubble_value=float(bubble_value))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Prepared:
  """One step signature: how arguments split, their shardings, the jitted core."""

  nnx_args: tuple[int, ...]
  plain_args: tuple[int, ...]
  batch_args: tuple[int, ...]
  root_arg: int | None
  graphdef: Any
  state_shardings: Any
  plain_shardings: tuple[Any, ...]
  batch_shardings: tuple[Any, ...]
  jitted: Any
  flags: dict
  compiled: dict


class AppliedStep:
  """A train step running under a plan; see `apply_plan`."""

  def __init__(self, *, plan: plans.Plan, step: Callable[..., Any], mesh: Mesh, executor: str,
               dispatch: str, donate: bool, bubble_value: float):
    self.plan, self.step, self.mesh = plan, step, mesh
    self.executor, self.dispatch = executor, dispatch
    self.donate, self.bubble_value = donate, bubble_value
    # Layers whose activations the plan recomputes (their calls run under jax.checkpoint).
    self.recomputed = frozenset(l.name for l in plan.layers if l.recompute)
    self._pins = _pins.Pins.of(plan.activation_specs)
    self._cache: dict[Any, _Prepared] = {}
    self.__wrapped__ = step

  @property
  def num_stages(self) -> int:
    return len(self.plan.stages)

  @property
  def compilations(self) -> int:
    """How many programs this step has compiled (one per argument signature)."""
    return sum(len(p.compiled) for p in self._cache.values())

  def __call__(self, *args):
    prepared, state, plain, batch = self._place(args)
    compiled = self._compiled(prepared, state, plain, batch)
    new_state, out = compiled(state, plain, batch)
    if prepared.nnx_args:
      nnx.update(tuple(args[i] for i in prepared.nnx_args), new_state)
    return out

  def batch_shardings(self, *args) -> tuple[Any, ...]:
    """The NamedShardings of the batch arguments (pytrees like them), for these arguments.

    For multi-process input pipelines, e.g.
    `jax.make_array_from_process_local_data(sharding, local_rows)` per leaf.
    """
    prepared, *_ = self._prepare_for(args)
    return prepared.batch_shardings

  def lower(self, *args) -> jax.stages.Lowered:
    """The lowered program for these arguments."""
    prepared, state, plain, batch = self._place(args)
    return prepared.jitted.lower(state, plain, batch)

  def trace(self, *args) -> jax.stages.Traced:
    """The traced program for these arguments; `.jaxpr` shows, for instance, each call of
    a recomputed layer as a `checkpoint` equation."""
    prepared, state, plain, batch = self._place(args)
    return prepared.jitted.trace(state, plain, batch)

  def compile(self, *args) -> jax.stages.Compiled:
    """The compiled program these arguments run (cached); `.as_text()` shows its HLO."""
    prepared, state, plain, batch = self._place(args)
    return self._compiled(prepared, state, plain, batch)

  def _compiled(self, prepared, state, plain, batch):
    key = tuple((x.shape, str(x.dtype), x.sharding) for x in jax.tree.leaves((state, plain, batch)))
    hit = prepared.compiled.get(key)
    if hit is None:
      hit = prepared.jitted.lower(state, plain, batch).compile()
      self._check_ran(prepared)
      self._check_switch(hit)
      prepared.compiled[key] = hit
    return hit

  def _check_switch(self, compiled) -> None:
    """Refuses a "switch" program that would hang on CPU (see _stages.py)."""
    if self.dispatch != "switch" or self.num_stages == 1:
      return
    if self.mesh.devices.flat[0].platform != "cpu":
      return
    colls = hlo.parse(compiled.as_text(), dict(self.mesh.shape))
    inside = sorted({c.axes for c in colls
                     if c.kind == "send" and c.axes != (_mesh.PIPELINE_AXIS,) and c.executions > 1})
    if inside:
      raise NotImplementedError(
          f"With dispatch='switch', XLA moves data with collective-permutes over {inside} "
          "inside a pipeline stage; on CPU those wait for devices of other stages and hang. "
          "Use dispatch='uniform' (the default).")

  # --- arguments ------------------------------------------------------------------------

  def _place(self, args):
    prepared, state, args = self._prepare_for(args)
    state = _mesh.place(state, prepared.state_shardings) if prepared.nnx_args else None
    plain = tuple(_mesh.place(args[i], s)
                  for i, s in zip(prepared.plain_args, prepared.plain_shardings))
    batch = tuple(_mesh.place(args[i], s)
                  for i, s in zip(prepared.batch_args, prepared.batch_shardings))
    return prepared, state, plain, batch

  def _prepare_for(self, args):
    """The prepared signature of `args` (built on first sight), their NNX state, `args`."""
    plan = self.plan
    num_args = len(plan.param_specs) + len(plan.batch_argnums)
    if len(args) != num_args:
      raise TypeError(f"The plan was made for a step with {num_args} arguments "
                      f"({len(plan.param_specs)} state, batch at {plan.batch_argnums}); got "
                      f"{len(args)}.")
    batch_args = tuple(plan.batch_argnums)
    nnx_args = tuple(i for i in range(num_args)
                     if i not in batch_args and isinstance(args[i], nnx.Pytree))
    plain_args = tuple(i for i in range(num_args) if i not in batch_args and i not in nnx_args)
    graphdef, state = (nnx.split(tuple(args[i] for i in nnx_args)) if nnx_args
                       else (None, None))
    key = (graphdef, tuple(jax.tree.structure(args[i]) for i in plain_args + batch_args))
    prepared = self._cache.get(key)
    if prepared is None:
      prepared = self._prepare(args, nnx_args, plain_args, batch_args, graphdef, state)
      self._cache[key] = prepared
    else:
      self._check_batch(args, batch_args)
    return prepared, state, args

  def _check_batch(self, args, batch_args) -> None:
    plan = self.plan
    for i in batch_args:
      specs = _mesh.match_specs(plan, i, args[i])
      dp_axes = _mesh.batch_axes(plan, specs)
      dp = math.prod(plan.mesh_axes[a] for a in dp_axes)
      for (path, leaf), spec in zip(_mesh.paths_and_leaves(args[i]), specs):
        if getattr(leaf, "ndim", 0) >= 1:
          where = f"Batch argument {i}" + (f" leaf {path!r}" if path else "")
          m = plan.num_microbatches if self._pipelined() else 1
          _mesh.check_batch_split(int(leaf.shape[0]), m, dp, where=where)
          if leaf.shape[0] != plan.global_batch:
            warnings.warn(
                f"{where} has batch size {leaf.shape[0]} but the plan was made for "
                f"global_batch={plan.global_batch}; it runs (compiled again for this shape) "
                "but the plan's predictions do not hold. Plan again for this batch size.",
                stacklevel=4)

  def _pipelined(self) -> bool:
    return self.num_stages > 1 or self.plan.num_microbatches > 1

  def _prepare(self, args, nnx_args, plain_args, batch_args, graphdef, state) -> _Prepared:
    plan, mesh = self.plan, self.mesh
    self._check_batch(args, batch_args)
    by_key = {}
    for j, i in enumerate(nnx_args):
      specs = _mesh.match_specs(plan, i, state[j])
      for (path, leaf), spec in zip(_mesh.paths_and_leaves(state[j]), specs):
        if self.num_stages > 1:  # stored split over pp too: see the module docstring
          spec = _mesh.add_axis(spec, leaf.shape, _mesh.PIPELINE_AXIS, plan.mesh_axes)
        by_key[(j, path)] = NamedSharding(mesh, spec)

    def sharding_of(kp, _):
      return by_key[(int(kp[0].key), _mesh.leaf_path(kp[1:]))]
    state_shardings = (jax.tree_util.tree_map_with_path(sharding_of, state) if nnx_args
                       else None)

    def tree_shardings(i):
      specs = _mesh.match_specs(plan, i, args[i])
      leaves, treedef = jax.tree.flatten(args[i])
      return jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])
    plain_shardings = tuple(tree_shardings(i) for i in plain_args)
    batch_shardings = tuple(tree_shardings(i) for i in batch_args)
    root_arg = next((i for i in nnx_args if isinstance(args[i], nnx.Module)), None)
    if root_arg is None and self.recomputed:
      raise NotImplementedError(
          f"The plan recomputes the activations of layers {sorted(self.recomputed)[:4]} "
          "(strategies ending in '+remat'), which apply does by checkpointing those "
          "submodule calls of an NNX model; this step has no NNX model among its "
          "arguments. Pass the model as an NNX module, or plan with more memory per device "
          "(more devices or memory_limit_bytes=) so that no layer needs recomputation.")
    if root_arg is None and self._pipelined():
      raise NotImplementedError(
          "Pipelining (pp > 1 or num_microbatches > 1) needs an NNX model among the step's "
          "arguments: the pipeline splits the model's forward into its submodule calls. "
          "A functional step over a parameter pytree can run plans with pp = 1 and "
          "num_microbatches = 1.")
    flags = {"ran": False}
    root_cls = type(args[root_arg]) if root_arg is not None else None
    step, num_args = self.step, len(args)
    # Across processes, what the step returns besides its state (loss, metrics) is
    # replicated, so that every process can read it (`float(loss)`) like on one host.
    replicate = NamedSharding(mesh, P()) if _mesh.spans_processes(mesh) else None

    def core(state_in, plain_in, batch_in):
      full = [None] * num_args
      objs = nnx.merge(graphdef, state_in) if nnx_args else ()
      for j, i in enumerate(nnx_args):
        full[i] = objs[j]
      for x, i in zip(plain_in, plain_args):
        full[i] = x
      for x, i in zip(batch_in, batch_args):
        full[i] = x
      with self._forward_patch(root_cls, root_arg, flags):
        out = step(*full)
      new_state = None
      if nnx_args:
        _, new_state = nnx.split(objs)
        new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
      out = _constrain_returned_state(out, plain_in, plain_shardings, replicate)
      return new_state, out

    donate = (0, 1) if self.donate else ()
    jitted = jax.jit(core, donate_argnums=donate)
    return _Prepared(nnx_args=nnx_args, plain_args=plain_args, batch_args=batch_args,
                     root_arg=root_arg, graphdef=graphdef, state_shardings=state_shardings,
                     plain_shardings=plain_shardings, batch_shardings=batch_shardings,
                     jitted=jitted, flags=flags, compiled={})

  def _check_ran(self, prepared) -> None:
    if self._pipelined() and not prepared.flags["ran"]:
      raise NotImplementedError(
          "The step never called the model (`model(...)`), so the plan's pipeline did not "
          "run. Pipelining replaces the root model's __call__; call the model itself in the "
          "loss, not one of its other methods.")

  # --- the forward under the plan ------------------------------------------------------

  @contextlib.contextmanager
  def _forward_patch(self, root_cls, root_arg, flags):
    """Replaces `root_cls.__call__` while the step is traced; always restored."""
    if root_cls is None or not (self._pipelined() or self.plan.activation_specs
                                or self.recomputed):
      yield
      return
    own = "__call__" in root_cls.__dict__
    original = root_cls.__dict__["__call__"] if own else None
    forward = root_cls.__call__
    depth = threading.local()
    applied = self

    def patched(model, *args, **kwargs):
      if getattr(depth, "n", 0):
        return forward(model, *args, **kwargs)
      depth.n = 1
      try:
        flags["ran"] = True
        return applied._plan_forward(model, forward, root_arg, args, kwargs)
      finally:
        depth.n = 0

    root_cls.__call__ = patched
    try:
      yield
    finally:
      if own:
        root_cls.__call__ = original
      else:
        del root_cls.__call__

  def _activation_spec(self, name: str, drop: Sequence[str], pins: _pins.Pins | None = None,
                       ) -> P | None:
    """The layout the plan gives the output of call `name`, without the `drop` axes."""
    spec = (pins or self._pins).outputs.get(name)
    return None if spec is None else _pins.drop_spec(spec, drop)

  def _fits(self, x, spec: P) -> bool:
    """Whether `spec` can lay out array `x` (rank and divisibility)."""
    if not hasattr(x, "ndim") or len(spec) > x.ndim:
      return False
    sizes = self.mesh.shape
    return all(x.shape[d] % math.prod(sizes[a] for a in _mesh.spec_axes(e)) == 0
               for d, e in enumerate(spec))

  def _constrain(self, name, out, drop=(), use_mesh=True, pins=None):
    spec = self._activation_spec(name, drop, pins)
    if spec is None:
      return out
    return jax.tree.map(lambda x: self._constrain_to(x, spec, use_mesh), out)

  def _constrain_to(self, x, spec: P, use_mesh: bool = True):
    """`x` laid out by `spec` where it fits; a bare spec (`use_mesh=False`) inside a
    `shard_map`, whose context gives the mesh."""
    if not self._fits(x, spec):
      return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, spec) if use_mesh else spec)

  def _constrain_param(self, path, value, pins=None, use_mesh=True):
    """A parameter as its module reads it: gathered to the layout the plan names
    ("path@gathered"), so that autodiff keeps that copy for the backward pass."""
    spec = (pins or self._pins).params.get(path)
    if spec is None or not self._fits(value, spec):
      return value
    return _pins.forward_only_constraint(value, NamedSharding(self.mesh, spec) if use_mesh else spec)

  def _constrain_inputs(self, name, args, kwargs, producer, pins=None, use_mesh=True):
    """Lays out the arguments of call `name` as its layer's candidate takes them.

    Where a boundary's two sides are laid out differently, the value is constrained
    twice: to the producer's layout at its output (`_constrain`) and to the
    consumer's here, so that XLA reshards it at the edge, as the cost model charges
    it, instead of carrying the producer's layout into the consumer. The argument is
    found by which call produced it; an argument the forward computed itself (a sum
    with a position table, say) is taken when it is the only array argument of
    unknown origin that the spec fits. It is constrained to the producer's layout
    first, as the cost model counts the forward's code between two calls in the
    producer's layer.
    """
    pins = pins or self._pins
    wanted = pins.inputs.get(name)
    if not wanted:
      return args, kwargs
    leaves, treedef = jax.tree.flatten((args, kwargs))
    targets, unknown, left = {}, [], dict(wanted)
    for i, x in enumerate(leaves):
      if not _program._is_array(x):
        continue
      src = producer(x)
      if src == "":  # a parameter the forward read
        continue
      if src is None:
        unknown.append(i)
      elif src in wanted:
        targets[i] = src
        left.pop(src, None)
    if len(left) == 1:
      src = next(iter(left))
      fitting = [i for i in unknown if self._fits(leaves[i], wanted[src])]
      if len(fitting) == 1:
        targets[fitting[0]] = src
    for i, src in targets.items():
      # First in the producer's layout (code of the forward between the two calls,
      # such as adding a position table, belongs to the producer's layer), then in
      # the consumer's.
      for spec in (pins.outputs.get(src), wanted[src]):
        if spec is not None:
          leaves[i] = self._constrain_to(leaves[i], spec, use_mesh)
    return jax.tree.unflatten(treedef, leaves)

  def _plan_forward(self, model, forward, root_arg, args, kwargs):
    if not self._pipelined():
      pins = self._pins
      return _program.transparent_forward(
          model, forward, args, kwargs, lambda name, out: self._constrain(name, out),
          remat=lambda name: name in self.recomputed, before_call=self._constrain_inputs,
          descend=lambda name: name.split("@")[0] in pins.enclosing,
          param=self._constrain_param if pins.params else None)
    return _run_pipelined(self, model, forward, root_arg, args, kwargs)


def _constrain_returned_state(out, plain_in, plain_shardings, replicate=None):
  """Lays a functional step's returned state out like the state it was given.

  With `replicate` (a fully replicated sharding), every other returned array is
  constrained to it.
  """
  if not plain_in and replicate is None:
    return out
  parts = list(out) if isinstance(out, tuple) else [out]
  for k, part in enumerate(parts):
    for x, sh in zip(plain_in, plain_shardings):
      if jax.tree.structure(part) == jax.tree.structure(x) and all(
          getattr(a, "shape", None) == getattr(b, "shape", None)
          for a, b in zip(jax.tree.leaves(part), jax.tree.leaves(x))):
        parts[k] = jax.lax.with_sharding_constraint(part, sh)
        break
    else:
      if replicate is not None:
        parts[k] = jax.tree.map(
            lambda y: jax.lax.with_sharding_constraint(y, replicate)
            if isinstance(y, jax.Array) else y, part)
  return tuple(parts) if isinstance(out, tuple) else parts[0]


def _resolve(root, path: str):
  obj = root
  for part in path.split("/"):
    if isinstance(obj, dict):
      obj = obj[part]
    elif part.isdigit() and not hasattr(obj, part):
      obj = obj[int(part)]
    else:
      obj = getattr(obj, part)
  return obj


def assign_stages(calls: Sequence[_program.Call], stages: Sequence[Sequence[str]]) -> list[int]:
  """The stage of every call, from the plan's layer names (matched in order).

  The k-th call of a module path is named as the graph names its layer: the path for
  k = 0, "path@k" after (T5's shared embedding runs twice: "shared", "shared@1"); a
  hand-written plan may name a repeated call by its bare path. A call the plan does
  not name runs on the stage of the call before it.

  Raises:
    ValueError: the plan names layers the forward does not call, or orders them
      differently.
  """
  entries = [(name, s) for s, names in enumerate(stages) for name in names]
  used = [False] * len(entries)
  out, prev = [], 0
  for call, layer_name in zip(calls, _program.layer_names(calls)):
    hit = next((i for i, (n, _) in enumerate(entries) if not used[i] and n == layer_name),
               None)
    if hit is None:
      hit = next((i for i, (n, _) in enumerate(entries) if not used[i] and n == call.name),
                 None)
    if hit is None:
      logger.info("layer %r is not in the plan's stages; it runs on stage %d", call.name, prev)
      s = prev
    else:
      used[hit] = True
      s = entries[hit][1]
    if s < prev:
      raise ValueError(
          f"Plan does not match this step: layer {call.name!r} is on stage {s} in the plan but "
          f"the forward calls it after layers of stage {prev}. Plan again for this model.")
    out.append(s)
    prev = s
  missing = [n for (n, _), u in zip(entries, used) if not u]
  if missing:
    names = [c.name for c in calls]
    raise ValueError(
        f"Plan does not match this step: the plan's stages name layers {missing[:4]} that the "
        f"model's forward does not call (it calls {names[:3]} ... {names[-2:]}). "
        "Plan again for this model.")
  return out


def recomputed_calls(calls: Sequence[_program.Call], recomputed: Sequence[str] | frozenset,
                     ) -> list[bool]:
  """Per call, whether the plan recomputes its layer's activations.

  The k-th call of a module path is the graph's layer of that path (k = 0) or
  "path@k" (the tracer's name for a module called again).
  """
  return [name in recomputed for name in _program.layer_names(calls)]


def _run_pipelined(applied: AppliedStep, model, forward, root_arg, args, kwargs):
  plan, mesh = applied.plan, applied.mesh
  num_stages, m_count = applied.num_stages, plan.num_microbatches
  leaves, treedef = jax.tree.flatten((args, kwargs))
  positions = [k for k, x in enumerate(leaves) if _program._is_array(x)]
  arrays = [leaves[k] for k in positions]
  if not arrays:
    raise NotImplementedError(f"{type(model).__name__} was called without array inputs; "
                              "the pipeline splits the model's inputs into micro-batches.")
  batch = int(arrays[0].shape[0]) if arrays[0].ndim else 0
  for x in arrays:
    if x.ndim == 0 or x.shape[0] != batch:
      raise NotImplementedError(
          f"{type(model).__name__} was called with inputs of shapes "
          f"{[tuple(a.shape) for a in arrays]}; the pipeline needs every array input to have "
          "the batch as its leading dim.")

  def rebuild(mb_arrays):
    full = list(leaves)
    for k, x in zip(positions, mb_arrays):
      full[k] = x
    return jax.tree.unflatten(treedef, full)

  # Which data-parallel axes the shard_map makes manual: those that split the batch and
  # no pipelined parameter (an FSDP axis stays automatic).
  spec_table = _mesh.plan_leaf_specs(plan)
  batch_specs = [s for (i, _), s in sorted(spec_table.items()) if i in plan.batch_argnums]
  dp_axes = _mesh.batch_axes(plan, batch_specs)
  model_specs = [s for (i, _), s in spec_table.items() if i == root_arg]
  param_axes = {a for s in model_specs for e in s for a in _mesh.spec_axes(e)}
  dp_manual = tuple(a for a in dp_axes if a not in param_axes)
  dp_auto = math.prod(plan.mesh_axes[a] for a in dp_axes if a not in dp_manual)
  dp_all = math.prod(plan.mesh_axes[a] for a in dp_axes)
  _mesh.check_batch_split(batch, m_count, dp_all,
                          where=f"The input of {type(model).__name__}")
  local = batch // (m_count * math.prod(plan.mesh_axes[a] for a in dp_manual))

  holder = []

  def record(mb_arrays):
    a, k = rebuild(mb_arrays)
    holder.append(_program.record(model, forward, a, k))
  jax.eval_shape(record, [jax.ShapeDtypeStruct((local,) + tuple(x.shape[1:]), x.dtype)
                          for x in arrays])
  program = holder[0]
  stage_of_call = assign_stages(program.calls, plan.stages)

  call_leaves, raw = [], []
  for call in program.calls:
    module = _resolve(model, call.name)
    graphdef, state = nnx.split(module)
    flat, state_treedef = jax.tree_util.tree_flatten_with_path(state)
    values = [v for _, v in flat] + [_resolve(model, p).get_value() for p in call.param_refs]
    paths = [f"{call.name}/{_mesh.leaf_path(kp)}" for kp, _ in flat] + list(call.param_refs)
    call_leaves.append((graphdef, jax.tree.structure(state), values, paths))
    raw.append(values)

  def spec_of(path):
    return spec_table.get((root_arg, path), P())
  layout = _pipeline.build_layout(program, stage_of_call, num_stages, call_leaves, spec_of,
                                  recomputed_calls(program.calls, applied.recomputed))
  for aval in layout.final_avals:
    if not aval.shape or aval.shape[0] != local:
      raise NotImplementedError(
          f"{type(model).__name__} returns an array of shape {aval.shape} per micro-batch of "
          f"{local}; the pipeline needs every returned array to have the batch as its "
          "leading dim.")
  manual = ((_mesh.PIPELINE_AXIS,) if num_stages > 1 else ()) + dp_manual
  hooks = _stage_hooks(applied, manual)
  if applied.dispatch == "uniform":
    uniform = _stages.UniformStage(layout, model, forward, rebuild, hooks, manual)
    stage_fns = ()
  else:
    uniform = None
    stage_fns = _stages.switch_stage_fns(layout, model, forward, rebuild, hooks)
  # Idle ticks skip their stage work where collectives allow it (the cost model
  # decides alike from the plan's cluster).
  skip_idle = num_stages > 1 and cluster_lib.skips_idle_work(
      mesh.devices.flat[0].platform,
      [n for a, n in mesh.shape.items() if a not in manual])
  pipeline = _pipeline.Pipeline(layout=layout, stage_fns=stage_fns, uniform=uniform,
                                mesh=mesh if manual else None,
                                num_microbatches=m_count, dp_manual=dp_manual, dp_auto=dp_auto,
                                executor=applied.executor, bubble_value=applied.bubble_value,
                                skip_idle=skip_idle)
  stacks = _pipeline.stack_params(layout, raw, mesh)
  outs = pipeline.run(stacks, arrays)
  return jax.tree.unflatten(program.ret_treedef, outs)


def _stage_hooks(applied: AppliedStep, manual: Sequence[str]) -> _stages.Hooks:
  """The plan's pins for the stage bodies, without the `shard_map`'s manual axes.

  A position of the uniform body runs a different call on each stage: a pin applies
  there when the plan lays out all of them alike (layer outputs, the layouts in which
  consumers take their producers' values, the submodule calls inside the layers).
  """
  # Gathered parameters stay unpinned: the tick loops' autodiff would keep a gathered
  # copy per tick (the cost model has the backward gather them again), and the
  # explicit schedules recompute the stage anyway.
  pins = applied._pins.without(manual, params=False)
  use_mesh = not manual

  def output(names, out):
    if len({pins.outputs.get(n) for n in names}) != 1:
      return out
    return applied._constrain(names[0], out, use_mesh=use_mesh, pins=pins)

  def input_spec(pairs):
    specs = {pins.inputs.get(dst, {}).get(src) for dst, src in pairs}
    return next(iter(specs)) if len(specs) == 1 else None

  def before_call(name, args, kwargs, producer):
    return applied._constrain_inputs(name, args, kwargs, producer, pins=pins,
                                     use_mesh=use_mesh)

  def runner(names):
    view = pins.inside(names)
    if not (view.outputs or view.inputs):
      return None
    path = names[0].split("@")[0]

    def run(module, method, args, kwargs):
      return _program.call_intercepted(
          module, method, args, kwargs, path,
          after_call=lambda n, out: applied._constrain(n, out, use_mesh=use_mesh, pins=view),
          before_call=lambda n, a, kw, producer: applied._constrain_inputs(
              n, a, kw, producer, pins=view, use_mesh=use_mesh),
          descend=lambda n: n.split("@")[0] in view.enclosing)
    return run

  return _stages.Hooks(output=output, input_spec=input_spec,
                       constrain=lambda x, spec: applied._constrain_to(x, spec, use_mesh),
                       before_call=before_call, runner=runner)
