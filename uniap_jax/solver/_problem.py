"""Problem and Solution types of the UniAP solver, their checks, and the evaluator.

Units: `time`, `same_stage` and `cross_stage` are seconds per micro-batch on one device;
`memory`, `memory_by_stage` and `memory_limit` are bytes per device. Any other consistent
units work too: the solver only adds, compares and multiplies by the micro-batch count.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

Status = Literal["optimal", "time_limit", "infeasible", "cutoff"]

# A stage fits when its memory is at most memory_limit * (1 + MEMORY_RTOL). The slack only
# absorbs float rounding of sums taken in different orders (solver, brute force, user), so
# that every method agrees on problems whose limit equals some assignment's memory exactly.
MEMORY_RTOL = 1e-9


def _as_table(value, *, ndim: int, what: str, fix: str) -> np.ndarray:
  """Returns `value` as a float array of `ndim` dims with finite, non-negative entries."""
  if isinstance(value, (str, bytes)) or value is None:
    raise TypeError(f"{what} must be a sequence of numbers, got {value!r} ({type(value).__name__}). {fix}")
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must hold numbers only, got {value!r}. {fix}") from e
  if array.ndim != ndim or 0 in array.shape:
    kind = "a non-empty list of numbers" if ndim == 1 else f"a non-empty {ndim}-D table"
    raise ValueError(f"{what} must be {kind}, got shape {array.shape}. {fix}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{what} must be finite, got {value!r}. {fix}")
  if np.any(array < 0):
    raise ValueError(f"{what} must be non-negative, got {value!r}. {fix}")
  return array


def _as_tuple(array: np.ndarray):
  """Nested tuples of Python floats (`tolist` converts in C: a T5 problem's edge tables
  hold tens of millions of entries)."""
  if array.ndim == 1:
    return tuple(array.tolist())
  return tuple(map(tuple, array.tolist()))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Layer:
  """One layer of the model with its intra-layer candidates.

  Attributes:
    name: unique name, used in edges and in the solution's dicts.
    time: per candidate, seconds per micro-batch on one device of its stage
      (compute plus intra-layer communication).
    memory: per candidate, bytes per device when the layer sits on a stage.
    memory_by_stage: optional table [num_stages][candidates] that replaces `memory` on
      each stage, for schedules whose memory depends on the stage (1F1B keeps
      num_stages - i micro-batches in flight on stage i).
  """

  name: str
  time: Sequence[float]
  memory: Sequence[float]
  memory_by_stage: Sequence[Sequence[float]] | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise TypeError(f"Layer name must be a non-empty string, got {self.name!r}.")
    fix = f"Give one entry per candidate of layer {self.name!r}."
    time = _as_table(self.time, ndim=1, what=f"Layer {self.name!r}: time", fix=fix)
    memory = _as_table(self.memory, ndim=1, what=f"Layer {self.name!r}: memory", fix=fix)
    if memory.shape != time.shape:
      raise ValueError(
          f"Layer {self.name!r}: memory has {memory.size} entries but time has {time.size}; "
          f"{fix}")
    object.__setattr__(self, "time", _as_tuple(time))
    object.__setattr__(self, "memory", _as_tuple(memory))
    if self.memory_by_stage is not None:
      by_stage = _as_table(
          self.memory_by_stage, ndim=2, what=f"Layer {self.name!r}: memory_by_stage",
          fix="Give one row per stage and one column per candidate.")
      if by_stage.shape[1] != time.size:
        raise ValueError(
            f"Layer {self.name!r}: memory_by_stage has shape {by_stage.shape}, expected "
            f"(num_stages, {time.size}) for {time.size} candidates.")
      object.__setattr__(self, "memory_by_stage", _as_tuple(by_stage))

  @property
  def num_candidates(self) -> int:
    return len(self.time)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
  """A tensor that layer `src` produces and layer `dst` consumes.

  Attributes:
    src, dst: layer names; `src` must come before `dst` in Problem.layers.
    same_stage: [src candidate][dst candidate] resharding seconds when both layers sit on
      one stage; it adds to that stage's time.
    cross_stage: [src candidate][dst candidate] seconds to send the tensor (forward and
      backward) from one stage to the next; an edge that spans k stage boundaries pays it
      once at each of them (a pipeline forwards the tensor stage by stage).
  """

  src: str
  dst: str
  same_stage: Sequence[Sequence[float]]
  cross_stage: Sequence[Sequence[float]]

  def __post_init__(self):
    for role in ("src", "dst"):
      value = getattr(self, role)
      if not isinstance(value, str) or not value:
        raise TypeError(f"Edge {role} must be a layer name (non-empty string), got {value!r}.")
    what = f"Edge {self.src!r} -> {self.dst!r}"
    fix = "Index it as [src candidate][dst candidate]."
    same = _as_table(self.same_stage, ndim=2, what=f"{what}: same_stage", fix=fix)
    cross = _as_table(self.cross_stage, ndim=2, what=f"{what}: cross_stage", fix=fix)
    object.__setattr__(self, "same_stage", _as_tuple(same))
    object.__setattr__(self, "cross_stage", _as_tuple(cross))


def _positive_int(value, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__}).")
  if value < 1:
    raise ValueError(f"{what} must be at least 1, got {value}.")
  return int(value)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
  """One UniAP configuration: layers, edges, stage and micro-batch counts, memory limit.

  Layers must be listed in a topological order, and stages are contiguous in that
  order: layer u's stage is at most layer v's whenever u comes before v. This is what
  the paper's contiguity means for a model's layer order, and it makes every edge go
  forward (same stage or a later one). Every stage gets at least one layer.

  Stage time p_i = sum of the chosen `time` of the layers on stage i plus the chosen
  `same_stage` entry of every edge inside stage i. Send time o_j (boundary between
  stage j and j + 1) = sum of the chosen `cross_stage` entry of every edge that spans
  that boundary. Objective (time per iteration, GPipe) = sum_i p_i + sum_j o_j +
  (num_microbatches - 1) * max(all p_i and o_j). A stage's memory, the sum of its
  layers' chosen `memory` (or `memory_by_stage[i]`), must not exceed `memory_limit`.
  """

  layers: Sequence[Layer]
  edges: Sequence[Edge] = ()
  num_stages: int = 1
  num_microbatches: int = 1
  memory_limit: float = math.inf

  def __post_init__(self):
    layers = tuple(self.layers)
    edges = tuple(self.edges)
    for layer in layers:
      if not isinstance(layer, Layer):
        raise TypeError(f"Problem.layers must hold solver.Layer objects, got {type(layer).__name__}.")
    for edge in edges:
      if not isinstance(edge, Edge):
        raise TypeError(f"Problem.edges must hold solver.Edge objects, got {type(edge).__name__}.")
    if not layers:
      raise ValueError("Problem.layers is empty; give at least one layer.")
    num_stages = _positive_int(self.num_stages, "num_stages")
    num_microbatches = _positive_int(self.num_microbatches, "num_microbatches")
    if isinstance(self.memory_limit, bool) or not isinstance(self.memory_limit, (int, float, np.number)):
      raise TypeError(f"memory_limit must be a number of bytes, got {self.memory_limit!r}.")
    memory_limit = float(self.memory_limit)
    if not memory_limit > 0:
      raise ValueError(f"memory_limit must be positive (math.inf for none), got {memory_limit}.")
    if num_stages > len(layers):
      raise ValueError(
          f"num_stages={num_stages} exceeds the {len(layers)} layers; every stage needs a "
          f"layer. Use num_stages <= {len(layers)}.")
    position = {}
    for u, layer in enumerate(layers):
      if layer.name in position:
        raise ValueError(
            f"Layer name {layer.name!r} appears twice (positions {position[layer.name]} "
            f"and {u}); names must be unique.")
      position[layer.name] = u
      if layer.memory_by_stage is not None and len(layer.memory_by_stage) != num_stages:
        raise ValueError(
            f"Layer {layer.name!r}: memory_by_stage has {len(layer.memory_by_stage)} rows, "
            f"expected num_stages={num_stages}.")
    seen = set()
    for edge in edges:
      for role in ("src", "dst"):
        name = getattr(edge, role)
        if name not in position:
          lower = {other.lower(): other for other in position}
          close = difflib.get_close_matches(name.lower(), list(lower), n=1)
          hint = f" Did you mean {lower[close[0]]!r}?" if close else ""
          known = ", ".join(repr(n) for n in list(position)[:8]) + (", ..." if len(position) > 8 else "")
          raise ValueError(
              f"Edge {edge.src!r} -> {edge.dst!r}: unknown {role} layer {name!r}.{hint} "
              f"Layers are {known}.")
      u, v = position[edge.src], position[edge.dst]
      if u == v:
        raise ValueError(f"Edge {edge.src!r} -> {edge.dst!r} is a self-loop; drop it.")
      if u > v:
        raise ValueError(
            f"Edge {edge.src!r} -> {edge.dst!r} goes backwards: {edge.dst!r} is layer {v} "
            f"but {edge.src!r} is layer {u}. List layers in a topological order.")
      if (u, v) in seen:
        raise ValueError(f"Edge {edge.src!r} -> {edge.dst!r} appears twice; merge the tables into one edge.")
      seen.add((u, v))
      expected = (layers[u].num_candidates, layers[v].num_candidates)
      for table in ("same_stage", "cross_stage"):
        shape = np.shape(getattr(edge, table))
        if shape != expected:
          raise ValueError(
              f"Edge {edge.src!r} -> {edge.dst!r}: {table} has shape {shape}, expected "
              f"{expected} for {expected[0]} and {expected[1]} candidates.")
    object.__setattr__(self, "layers", layers)
    object.__setattr__(self, "edges", edges)
    object.__setattr__(self, "num_stages", num_stages)
    object.__setattr__(self, "num_microbatches", num_microbatches)
    object.__setattr__(self, "memory_limit", memory_limit)

  def stage_memory_table(self, u: int) -> tuple[tuple[float, ...], ...]:
    """Layer u's memory per [stage][candidate]."""
    layer = self.layers[u]
    if layer.memory_by_stage is not None:
      return layer.memory_by_stage
    return (layer.memory,) * self.num_stages


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Solution:
  """What `solve` (or `brute_force`) found.

  Attributes:
    choice: layer name -> chosen candidate index (empty when no solution is returned).
    stage: layer name -> stage index, 0-based, non-decreasing in layer order, no stage
      empty (empty when no solution is returned).
    objective: time per iteration of this assignment (math.inf when none).
    status: "optimal" (proven), "time_limit" (best found, see gap), "infeasible" (no
      assignment fits memory; see min_peak_memory and message) or "cutoff" (proven that
      no assignment beats the `incumbent` passed to solve; see bound).
    gap: (objective - bound) / objective; 0 when optimal, math.inf without a solution.
    time_s: wall-clock seconds spent in the call.
    bound: proven lower bound on the optimal objective.
    method: what decided the status: "chain_dp" (the exact chain DP; on a DAG, the
      bound from its chain relaxation met the assignment), "one_stage_dp" (the exact DP
      for one stage), "hub_dp" (chain DPs with the sources of skip edges fixed),
      "miqp" (SCIP), "bound" (a bound alone: infeasible or cutoff before any search),
      "brute_force".
    message: a readable reason for infeasible, cutoff and time_limit; empty otherwise.
    min_peak_memory: the least memory any assignment needs on its fullest stage (bytes).
    stage_times: p_i of the returned assignment, per stage.
    send_times: o_j of the returned assignment, per boundary.
    stage_memory: memory of the returned assignment, per stage.
  """

  choice: dict[str, int]
  stage: dict[str, int]
  objective: float
  status: Status
  gap: float
  time_s: float
  bound: float = 0.0
  method: str = ""
  message: str = ""
  min_peak_memory: float = 0.0
  stage_times: tuple[float, ...] = ()
  send_times: tuple[float, ...] = ()
  stage_memory: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
  """An assignment's cost under Problem's semantics."""

  objective: float
  stage_times: tuple[float, ...]
  send_times: tuple[float, ...]
  stage_memory: tuple[float, ...]
  fits: bool


def check_assignment(problem: Problem, choice: Mapping[str, int], stage: Mapping[str, int]) -> None:
  """Raises ValueError unless (choice, stage) is a well-formed assignment of `problem`."""
  names = [layer.name for layer in problem.layers]
  for what, mapping in (("choice", choice), ("stage", stage)):
    missing = [name for name in names if name not in mapping]
    extra = sorted(set(mapping) - set(names))
    if missing or extra:
      raise ValueError(f"{what} must map every layer name; missing {missing}, unknown {extra}.")
  for layer in problem.layers:
    k = choice[layer.name]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < layer.num_candidates:
      raise ValueError(
          f"choice[{layer.name!r}]={k!r} is not a candidate index in [0, {layer.num_candidates}).")
  stages = [stage[name] for name in names]
  for name, s in zip(names, stages):
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < problem.num_stages:
      raise ValueError(f"stage[{name!r}]={s!r} is not a stage index in [0, {problem.num_stages}).")
  if any(b < a for a, b in zip(stages, stages[1:])):
    raise ValueError(f"Stages must be non-decreasing in layer order, got {stages}.")
  if sorted(set(stages)) != list(range(problem.num_stages)):
    raise ValueError(f"Every one of the {problem.num_stages} stages needs a layer, got stages {stages}.")


def evaluate(problem: Problem, choice: Mapping[str, int], stage: Mapping[str, int]) -> Evaluation:
  """Cost of an assignment: stage times, send times, memory and the objective.

  Args:
    problem: the configuration.
    choice: layer name -> candidate index.
    stage: layer name -> stage index (non-decreasing in layer order, no stage empty).
  Returns:
    An Evaluation; `fits` says whether every stage is within memory_limit.
  Raises:
    ValueError: the assignment is malformed.
  """
  check_assignment(problem, choice, stage)
  num_stages = problem.num_stages
  p = [0.0] * num_stages
  o = [0.0] * max(num_stages - 1, 0)
  memory = [0.0] * num_stages
  for u, layer in enumerate(problem.layers):
    s, k = stage[layer.name], choice[layer.name]
    p[s] += layer.time[k]
    memory[s] += problem.stage_memory_table(u)[s][k]
  for edge in problem.edges:
    su, sv = stage[edge.src], stage[edge.dst]
    k, l = choice[edge.src], choice[edge.dst]
    if su == sv:
      p[su] += edge.same_stage[k][l]
    else:
      for j in range(su, sv):
        o[j] += edge.cross_stage[k][l]
  objective = sum(p) + sum(o) + (problem.num_microbatches - 1) * max(p + o)
  limit = problem.memory_limit * (1 + MEMORY_RTOL)
  return Evaluation(
      objective=objective, stage_times=tuple(p), send_times=tuple(o),
      stage_memory=tuple(memory), fits=all(m <= limit for m in memory))
