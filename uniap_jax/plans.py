"""The Plan: what the planner decided and what it predicts, as plain data.

A Plan is the one object that crosses from planning to running: `apply` reads it and
nothing else. It round-trips through JSON (with a schema version) so that a plan made
once can be shipped to every host of a job, and it prints as a readable summary.

PartitionSpecs are kept twice, on purpose: `param_specs` / `batch_specs` mirror the
step's arguments as pytrees (what a user passes to `jax.jit`), and `leaf_specs` lists
the same specs flat, as (argument index, leaf path, spec). JSON stores the flat form;
`from_json` rebuilds the pytrees as nested dicts keyed by path components, and
`apply` matches leaves by path, so a plan read from disk applies to the same step.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from jax.sharding import PartitionSpec

SCHEMA_VERSION = 1
SCHEDULES = ("gpipe", "1f1b")
COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send")
# "heuristic": a baseline plan that no solver proved (uniap_jax.baselines).
SOLVER_STATUSES = ("optimal", "time_limit", "heuristic")
# What a candidate's name ends with when its layer recomputes its activations
# (`uniap_jax.strategies.Candidate.name`).
REMAT_SUFFIX = " +remat"

LeafSpec = tuple[int, str, PartitionSpec]  # (argument index, "/"-joined leaf path, spec)


_GIB = 2**30


def format_bytes(nbytes: float) -> str:
  """Bytes for a message: GiB down to 0.01 GiB, then MiB, KiB or bytes (so that a small
  limit never reads "0.00 GiB")."""
  for unit, least in (("GiB", 0.01 * _GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(nbytes) >= least:
      size = {"GiB": _GIB, "MiB": 2**20, "KiB": 2**10}[unit]
      return f"{nbytes / size:.2f} {unit}"
  return f"{nbytes:.0f} bytes"


def runtime_executor(schedule: str, num_stages: int, num_microbatches: int) -> str:
  """The pipeline executor `plan.apply` runs a plan's schedule with (`uniap_jax.apply`),
  and so the one its `predicted` runtime figures price.

  GPipe's order (every forward, then every backward) runs as "gpipe-remat": each
  stage stashes its M stage inputs and its backward recomputes the stage's forward
  from them, as GPipe itself does. Autodiff through the tick loop ("gpipe") keeps
  instead every tick's residuals of every layer position, idle ticks included, and
  the tick loop's stacked residuals cost time too: GPT-2 with 4 micro-batches on one
  H100 ran 23% faster in 30% of the memory as "gpipe-remat" (BENCHMARKS.md); on the
  zoo's pipelined plans on CPU it kept the time and cut the memory about 4x.
  1F1B over several stages runs as "1f1b". With one stage there is nothing to
  interleave: 1F1B holds one micro-batch's activations at a time, which
  "gpipe-remat" does too, without the 1F1B table's alternating ticks.
  With one stage and one micro-batch nothing is pipelined and the executor is moot.

  Raises:
    ValueError: an unknown schedule, or counts below 1.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if num_stages < 1 or num_microbatches < 1:
    raise ValueError(f"num_stages and num_microbatches must be >= 1, got {num_stages} and "
                     f"{num_microbatches}")
  if schedule == "1f1b" and num_stages > 1:
    return "1f1b"
  return "gpipe-remat"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Predicted:
  """What the cost model predicts for one training step of the plan.

  Attributes:
    step_time_s: time per iteration: stage times + sends + (c - 1) x the slowest.
    compute_time_s: the slowest stage's compute per micro-batch, forward + backward.
    communication_time_s: the slowest stage's intra-stage communication per micro-batch.
    bubble_time_s: the part of step_time_s that is pipeline fill and drain.
    throughput: samples per second (global batch / step_time_s).
    memory_per_device_bytes: memory of one device, one entry per stage, as the
      solver's per-layer constraint sums it: UniAP's model under objective="paper",
      a per-layer stand-in for the runtime's under "runtime" (what `plan.apply`
      holds is `runtime_memory_per_device_bytes`).
    mfu: model FLOPs utilisation: model FLOPs per step / (step_time_s x devices x peak).
    collectives: bytes one device moves in one step, per collective kind, as this
      package's runtime issues them (`plan.apply` with the plan's schedule, run by
      `runtime_executor`).
    runtime_step_time_s: the step time of that runtime, priced like step_time_s: it
      runs in lockstep ticks in which every device runs every layer position, so with
      pipelining it exceeds the UniAP objective (`cost.runtime_step_time_s`); 0 when
      not computed.
    runtime_memory_per_device_bytes: the peak memory of one device of that runtime,
      one entry per stage (`cost.runtime_memory_bytes`): with pipelining it holds
      parameter stacks, stage buffers and, under GPipe, every tick's residuals, so it
      differs from memory_per_device_bytes (the UniAP paper's per-layer sum, which the
      solver's constraint uses); () when not computed.
  """

  step_time_s: float
  compute_time_s: float
  communication_time_s: float
  bubble_time_s: float
  throughput: float
  memory_per_device_bytes: tuple[int, ...]
  mfu: float
  collectives: Mapping[str, float]
  runtime_step_time_s: float = 0.0
  runtime_memory_per_device_bytes: tuple[int, ...] = ()

  def __post_init__(self):
    if not self.step_time_s > 0:
      raise ValueError(f"step_time_s must be positive, got {self.step_time_s=}")
    runtime_memory = tuple(self.runtime_memory_per_device_bytes)
    if any(isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0
           for m in runtime_memory):
      raise ValueError("runtime_memory_per_device_bytes must hold non-negative byte counts, "
                       f"one per stage, got {self.runtime_memory_per_device_bytes!r}")
    if runtime_memory and len(runtime_memory) != len(self.memory_per_device_bytes):
      raise ValueError(
          f"runtime_memory_per_device_bytes has {len(runtime_memory)} entries but "
          f"memory_per_device_bytes has {len(self.memory_per_device_bytes)}; give one per "
          "stage, or () when not computed.")
    object.__setattr__(self, "runtime_memory_per_device_bytes",
                       tuple(int(m) for m in runtime_memory))
    unknown = set(self.collectives) - set(COLLECTIVE_KINDS)
    if unknown:
      raise ValueError(
          f"Unknown collective kinds {sorted(unknown)}; allowed: {COLLECTIVE_KINDS}")
    object.__setattr__(self, "memory_per_device_bytes",
                       tuple(int(m) for m in self.memory_per_device_bytes))
    object.__setattr__(self, "collectives",
                       {k: float(self.collectives.get(k, 0.0)) for k in COLLECTIVE_KINDS})


# What can rank configurations (see `uniap_jax.search`).
OBJECTIVES = ("runtime", "paper")

# SolverStats fields that measure the planner's run rather than decide anything.
WALL_CLOCK_FIELDS = ("time_s", "search_time_s")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SolverStats:
  """How the plan was found: the solver's status, optimality gap and wall times.

  time_s counts the solver alone, summed over the outer loop's configurations;
  search_time_s the whole loop, building cost tables included (tracing excluded).
  objective says what ranked the configurations: "runtime" (the step time of what
  `apply` runs, `Predicted.runtime_step_time_s`) or "paper" (the UniAP objective,
  `Predicted.step_time_s`). warm_start: the plan is the warm start the search was
  given (a baseline's, say); nothing strictly better was found.
  """

  status: str
  gap: float
  time_s: float
  search_time_s: float = 0.0
  configurations: int = 1  # outer-loop configurations considered
  skipped: int = 0  # configurations pruned by their lower bound
  objective: str = "paper"
  warm_start: bool = False

  def __post_init__(self):
    if self.status not in SOLVER_STATUSES:
      raise ValueError(f"status must be one of {SOLVER_STATUSES}, got {self.status!r}")
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerPlan:
  """One layer's placement and strategy, for the summary and for apply.

  Attributes:
    name: the layer's name in the LayerGraph ("blocks/3").
    stage: its pipeline stage (0-based).
    strategy: a readable name of its chosen candidate, e.g. "dp4.tp2(col,row)".
    kind: the layer's signature, so identical layers group in the summary.
    time_s: compute + intra-layer communication per micro-batch, forward + backward.
    memory_bytes: its share of the stage's per-device memory.
    recompute: the layer keeps only its inputs for the backward pass and runs its
      forward again there (activation recomputation); `apply` wraps its calls in
      `jax.checkpoint`. A strategy named "... +remat" implies it (`recomputes`), so
      plans that only name their candidates, and JSON written before this field,
      say it too.
  """

  name: str
  stage: int
  strategy: str
  kind: str = ""
  time_s: float = 0.0
  memory_bytes: int = 0
  recompute: bool = False

  def __post_init__(self):
    object.__setattr__(self, "recompute", recomputes(self.strategy, self.recompute))


def recomputes(strategy: str, recompute: bool = False) -> bool:
  """Whether a layer with this strategy name (and flag) recomputes its activations."""
  return bool(recompute) or strategy.endswith(REMAT_SUFFIX)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """Mesh, PartitionSpecs, stages and micro-batches for one train step, with predictions.

  Attributes:
    mesh_axes: axis name -> size; the product is the cluster's device count. A "pp"
      axis is present when the plan pipelines.
    stages: one list of layer names per stage, in order.
    num_microbatches: micro-batches per step.
    schedule: "gpipe" or "1f1b".
    param_specs: one pytree of PartitionSpec per non-batch argument.
    batch_specs: one pytree of PartitionSpec per batch argument.
    leaf_specs: the same specs flat: (argument index, leaf path, spec), sorted.
    activation_specs: layouts `apply` pins with sharding constraints: the boundary
      value between layers ("src->dst") as its producer lays it out, and as its
      consumer takes it ("dst<-src"); inside a layer, a submodule call's output (its
      path, "blocks/0/attn/q") and arguments entering one ("path<-src", "path<-"
      when the layer's own code made it), and a parameter where its module reads it
      after the candidate's all-gathers ("blocks/0/mlp/up/kernel@gathered"); see
      `uniap_jax.search._pins`.
    layers: per layer: stage, strategy, time and memory.
    predicted: the cost model's predictions.
    solver: the solver's status, gap and time.
    cluster: the cluster preset or name the plan was made for.
    global_batch: samples per step.
    batch_argnums: which arguments of the step are batch.
    fingerprint: a hash of the traced program, so a plan applied to another model is
      caught.
    leaf_shapes: (argument index, leaf path, shape) of every leaf the plan was made
      for, so that applying it to another model names the first mismatching leaf.
  """

  mesh_axes: Mapping[str, int]
  stages: Sequence[Sequence[str]]
  num_microbatches: int
  schedule: str
  param_specs: tuple[Any, ...]
  batch_specs: tuple[Any, ...]
  leaf_specs: tuple[LeafSpec, ...]
  activation_specs: Mapping[str, PartitionSpec]
  layers: tuple[LayerPlan, ...]
  predicted: Predicted
  solver: SolverStats
  cluster: str
  global_batch: int
  batch_argnums: tuple[int, ...]
  fingerprint: str = ""
  leaf_shapes: tuple[tuple[int, str, tuple[int, ...]], ...] = ()

  def __post_init__(self):
    for name, size in self.mesh_axes.items():
      if not isinstance(size, int) or size < 1:
        raise ValueError(f"mesh_axes[{name!r}] must be a positive int, got {size!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.num_microbatches < 1:
      raise ValueError(f"num_microbatches must be >= 1, got {self.num_microbatches}")
    if not self.stages or any(len(s) == 0 for s in self.stages):
      raise ValueError(f"every stage needs at least one layer, got {self.stages!r}")
    pp = self.mesh_axes.get("pp", 1)
    if pp != len(self.stages):
      raise ValueError(
          f"mesh_axes['pp']={pp} but the plan has {len(self.stages)} stages; they must agree")
    if self.global_batch % self.num_microbatches:
      raise ValueError(f"global_batch={self.global_batch} does not split into "
                       f"num_microbatches={self.num_microbatches}")
    object.__setattr__(self, "mesh_axes", {k: int(v) for k, v in self.mesh_axes.items()})
    object.__setattr__(self, "stages", [list(s) for s in self.stages])
    object.__setattr__(self, "leaf_specs", tuple(sorted(self.leaf_specs, key=lambda x: x[:2])))
    object.__setattr__(self, "leaf_shapes", tuple(sorted(
        ((int(a), str(p), tuple(int(d) for d in shape)) for a, p, shape in self.leaf_shapes),
        key=lambda x: x[:2])))

  @property
  def num_devices(self) -> int:
    n = 1
    for size in self.mesh_axes.values():
      n *= size
    return n

  def apply(self, step, **kwargs):
    """Returns `step` sharded and pipelined as this plan says (see uniap_jax.apply)."""
    from uniap_jax import apply as apply_lib  # the one documented backward edge
    return apply_lib.apply_plan(self, step, **kwargs)

  # --- JSON -----------------------------------------------------------------------

  def to_json(self) -> str:
    """Serialises the plan; `Plan.from_json(plan.to_json())` equals the plan."""
    payload = {
        "schema_version": SCHEMA_VERSION,
        "mesh_axes": dict(self.mesh_axes),
        "stages": [list(s) for s in self.stages],
        "num_microbatches": self.num_microbatches,
        "schedule": self.schedule,
        "leaf_specs": [[i, path, _spec_to_json(s)] for i, path, s in self.leaf_specs],
        "num_param_args": len(self.param_specs),
        "activation_specs": {k: _spec_to_json(v) for k, v in sorted(self.activation_specs.items())},
        "layers": [dataclasses.asdict(l) for l in self.layers],
        "predicted": {
            **dataclasses.asdict(self.predicted),
            "memory_per_device_bytes": list(self.predicted.memory_per_device_bytes),
            "runtime_memory_per_device_bytes": list(
                self.predicted.runtime_memory_per_device_bytes),
            "collectives": dict(self.predicted.collectives),
        },
        "solver": dataclasses.asdict(self.solver),
        "cluster": self.cluster,
        "global_batch": self.global_batch,
        "batch_argnums": list(self.batch_argnums),
        "fingerprint": self.fingerprint,
        "leaf_shapes": [[a, p, list(shape)] for a, p, shape in self.leaf_shapes],
    }
    return json.dumps(payload, indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> Plan:
    """Reads a plan written by `to_json`; pytrees of specs come back as nested dicts."""
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"Plan JSON does not parse: {e}") from None
    if not isinstance(d, dict):
      raise ValueError(f"Plan JSON must be an object, got {type(d).__name__}")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
      raise ValueError(f"Plan JSON has schema_version={version!r}; this uniap_jax reads "
                       f"{SCHEMA_VERSION}. Plan again with this version.")
    missing = [k for k in ("mesh_axes", "stages", "num_microbatches", "schedule", "leaf_specs",
                           "layers", "predicted", "solver", "cluster", "global_batch",
                           "batch_argnums") if k not in d]
    if missing:
      raise ValueError(f"Plan JSON lacks fields {missing}")
    leaf_specs = tuple((int(i), str(p), _spec_from_json(s)) for i, p, s in d["leaf_specs"])
    batch_argnums = tuple(int(i) for i in d["batch_argnums"])
    num_args = d.get("num_param_args", 0) + len(batch_argnums)
    trees = specs_to_trees(leaf_specs, num_args)
    param_specs = tuple(t for i, t in enumerate(trees) if i not in batch_argnums)
    batch_specs = tuple(trees[i] for i in batch_argnums)
    pred = dict(d["predicted"])
    pred["memory_per_device_bytes"] = tuple(pred["memory_per_device_bytes"])
    # Written before the field existed: not computed.
    pred["runtime_memory_per_device_bytes"] = tuple(
        pred.get("runtime_memory_per_device_bytes", ()))
    return cls(
        mesh_axes={str(k): int(v) for k, v in d["mesh_axes"].items()},
        stages=[list(s) for s in d["stages"]],
        num_microbatches=int(d["num_microbatches"]),
        schedule=d["schedule"],
        param_specs=param_specs,
        batch_specs=batch_specs,
        leaf_specs=leaf_specs,
        activation_specs={k: _spec_from_json(v) for k, v in d.get("activation_specs", {}).items()},
        layers=tuple(LayerPlan(**l) for l in d["layers"]),
        predicted=Predicted(**pred),
        solver=SolverStats(**d["solver"]),
        cluster=d["cluster"],
        global_batch=int(d["global_batch"]),
        batch_argnums=batch_argnums,
        fingerprint=d.get("fingerprint", ""),
        leaf_shapes=tuple((a, p, tuple(shape)) for a, p, shape in d.get("leaf_shapes", ())),
    )

  def __eq__(self, other):
    """Same decisions and predictions; the planner's wall-clock times do not count, so
    that every host of a job, planning on its own, holds an equal plan."""
    if not isinstance(other, Plan):
      return NotImplemented
    return _without_wall_clock(self.to_json()) == _without_wall_clock(other.to_json())

  __hash__ = None

  # --- summary ----------------------------------------------------------------------

  def summary(self) -> str:
    """A readable report: mesh, stages with their layers and strategies, predictions."""
    p = self.predicted
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_axes.items())
    lines = [
        f"Plan for {self.cluster}: {self.num_devices} devices, mesh {mesh}",
        f"  global batch {self.global_batch}, {self.num_microbatches} micro-batches, "
        f"schedule {self.schedule}",
        f"  step {_fmt_time(p.step_time_s)}, of which bubble {_fmt_time(p.bubble_time_s)}; "
        f"{p.throughput:.2f} samples/s, MFU {100 * p.mfu:.1f}%",
        f"  slowest stage, per micro-batch: compute {_fmt_time(p.compute_time_s)}, "
        f"communication {_fmt_time(p.communication_time_s)}",
    ]
    if p.runtime_step_time_s and (len(self.stages) > 1 or self.solver.objective == "runtime"):
      how = ""
      if len(self.stages) > 1 or self.num_microbatches > 1:  # else nothing is pipelined
        executor = runtime_executor(self.schedule, len(self.stages), self.num_microbatches)
        how = f" (executor {executor!r})"
      lines.append(f"  uniap_jax.apply runs it{how} in {_fmt_time(p.runtime_step_time_s)} per "
                   f"step ({p.runtime_step_time_s / p.step_time_s:.2f}x the UniAP objective)")
    if p.runtime_memory_per_device_bytes:
      lines.append(f"  it holds {format_bytes(max(p.runtime_memory_per_device_bytes))} per "
                   f"device at most (the solver's per-layer memory: "
                   f"{format_bytes(max(p.memory_per_device_bytes))})")
    ranked = ("the runtime step time" if self.solver.objective == "runtime"
              else "the UniAP objective")
    lines += [
        f"  solver: {self.solver.status}, gap {100 * self.solver.gap:.2f}%, "
        f"{self.solver.time_s:.2f} s solving, {self.solver.search_time_s:.2f} s searching "
        f"{self.solver.configurations} configurations ({self.solver.skipped} pruned)",
        f"  configurations ranked by {ranked}"
        + ("; the warm-start plan: nothing strictly better found" if self.solver.warm_start
           else ""),
    ]
    by_stage: dict[int, list[LayerPlan]] = {}
    for l in self.layers:
      by_stage.setdefault(l.stage, []).append(l)
    for s, names in enumerate(self.stages):
      mem = p.memory_per_device_bytes[s] if s < len(p.memory_per_device_bytes) else 0
      lines.append(f"  stage {s}: {len(names)} layers ({_span(names)}), "
                   f"memory {format_bytes(mem)} per device")
      for run in _runs(by_stage.get(s, [])):
        first, last = run[0], run[-1]
        label = first.name if len(run) == 1 else f"{first.name} .. {last.name} ({len(run)}x)"
        t = sum(l.time_s for l in run)
        strategy = first.strategy
        if first.recompute and not strategy.endswith(REMAT_SUFFIX):
          strategy += REMAT_SUFFIX
        lines.append(f"    {label:<36} {strategy:<42} {_fmt_time(t)}")
    coll = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in p.collectives.items() if v)
    lines.append(f"  collectives per device and step: {coll or 'none'}")
    return "\n".join(lines)


def _runs(layers: Sequence[LayerPlan]) -> list[list[LayerPlan]]:
  """Groups consecutive layers of the same kind and strategy."""
  runs: list[list[LayerPlan]] = []
  for l in layers:
    prev = runs[-1][-1] if runs else None
    if prev and l.kind and (prev.kind, prev.strategy, prev.recompute) == (
        l.kind, l.strategy, l.recompute):
      runs[-1].append(l)
    else:
      runs.append([l])
  return runs


def _span(names: Sequence[str]) -> str:
  return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def _fmt_time(t: float) -> str:
  if t >= 1:
    return f"{t:.3f} s"
  if t >= 1e-3:
    return f"{t * 1e3:.2f} ms"
  return f"{t * 1e6:.1f} us"


def _spec_to_json(spec: PartitionSpec) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


def _spec_from_json(entries: Sequence) -> PartitionSpec:
  if not isinstance(entries, list):
    raise ValueError(f"a PartitionSpec must be a JSON list, got {entries!r}")
  return PartitionSpec(*[tuple(e) if isinstance(e, list) else e for e in entries])


def specs_to_trees(leaf_specs: Sequence[LeafSpec], num_args: int) -> tuple[Any, ...]:
  """Rebuilds one nested dict of PartitionSpecs per argument from flat leaf specs.

  A leaf at path "" (the argument is itself one array) becomes the spec itself.
  """
  trees: list[Any] = [{} for _ in range(num_args)]
  for arg, path, spec in leaf_specs:
    if not 0 <= arg < num_args:
      raise ValueError(f"leaf spec for argument {arg} but the step has {num_args} arguments")
    if path == "":
      trees[arg] = spec
      continue
    node = trees[arg]
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = spec
  return tuple(trees)


def _without_wall_clock(plan_json: str) -> dict:
  d = json.loads(plan_json)
  for key in WALL_CLOCK_FIELDS:
    d["solver"].pop(key, None)
  return d
