"""`solve`: memory check, cutoff check, then the chain DP or SCIP."""

from __future__ import annotations

import logging
import math
import time as time_lib

from uniap_jax.solver import _chain_dp
from uniap_jax.solver import _hub
from uniap_jax.solver import _miqp
from uniap_jax.solver import _one_stage
from uniap_jax.solver import _problem
from uniap_jax.solver import _tables

logger = logging.getLogger(__name__)

METHODS = ("auto", "dp", "miqp")
# Relative tolerance under which a bound proves an objective optimal.
_PROOF_RTOL = 1e-9
# Objectives this close (relative) count as equal when compared with the incumbent:
# different summation orders round differently.
_TIE_RTOL = 1e-12


def solve(problem: _problem.Problem, *, time_limit_s: float = 60.0,
          incumbent: float | None = None, method: str = "auto") -> _problem.Solution:
  """Finds stages and per-layer candidates that minimise the time per iteration.

  What is exact when:
  - Chains (every edge joins neighbours in the layer order), method "auto" or "dp":
    an exact dynamic program (see `_chain_dp`) returns a proven optimum; identical
    consecutive layers are shared, so long runs of equal blocks stay cheap.
  - DAGs (skip edges) on one stage, method "auto": every edge is then local, and an
    exact DP over the layer order that carries the candidates of layers with pending
    edges (see `_one_stage`; at most three at once) returns a proven optimum.
  - DAGs whose skip edges leave a few layers (T5: the encoder output feeds every
    decoder block, position biases every block), method "auto", when the chain with
    flags for those layers stays narrow: a branch and bound over the classes of those
    layers' candidates, one chain DP per node (see `_hub`), gives an assignment and a
    lower bound; when they meet, the assignment is returned as optimal ("hub_dp"),
    otherwise the leaves left open go to SCIP with those layers fixed ("miqp").
  - Other DAGs, method "auto": SCIP solves the MIQP (see `_miqp`) and is the solver
    of record. The chain DP, run on the problem without its skip edges,
    gives SCIP its first solution and a valid bound (skip edges only add time, so the
    relaxation's optimum plus each skip edge's least cost bounds the objective). When
    that bound already meets the first solution, it is returned as optimal.
  - method "miqp": SCIP alone decides, also on chains (the DP gives only the first
    solution), to cross-check the two.
  Every method starts from the leanest assignment (least memory on the fullest stage),
  so a time limit returns an assignment whenever one fits, with status "time_limit"
  and its gap; the clock is also checked while SCIP's model is built. The returned
  objective is recomputed from the tables. Same input, same
  answer (SCIP runs on one thread with a fixed seed), unless the wall-clock limit
  stops a search.

  Args:
    problem: the configuration to solve.
    time_limit_s: wall-clock budget in seconds.
    incumbent: the best objective an outer loop already has. Only strictly better
      assignments are sought; if none exists, status is "cutoff" with `bound` (at least
      incumbent) and no assignment. A cheap bound often decides this at once.
    method: "auto", "dp" (chains only) or "miqp".
  Returns:
    A Solution. Statuses: "optimal", "time_limit", "infeasible" (no assignment fits
    memory: `min_peak_memory` is the least memory any assignment needs on its fullest
    stage, and `message` says so), "cutoff".
  Raises:
    ValueError, TypeError: bad arguments, or method "dp" on a problem with skip edges.

  Example:
    >>> from uniap_jax import solver
    >>> layers = [solver.Layer(name=f"l{i}", time=[1.0, 2.0], memory=[2.0, 1.0]) for i in range(4)]
    >>> problem = solver.Problem(layers=layers, num_stages=2, num_microbatches=4, memory_limit=3.0)
    >>> sol = solver.solve(problem)
    >>> sol.status, sol.objective
    ('optimal', 15.0)

  References: Lin et al., UniAP, CVPR 2025, Sec. 3.3.
  """
  start = time_lib.perf_counter()
  if not isinstance(problem, _problem.Problem):
    raise TypeError(f"solve() takes a solver.Problem, got {type(problem).__name__}.")
  if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not time_limit_s > 0:
    raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}.")
  if incumbent is not None and (isinstance(incumbent, bool) or not isinstance(incumbent, (int, float))
                                or math.isnan(incumbent)):
    raise TypeError(f"incumbent must be a number (an objective) or None, got {incumbent!r}.")
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not one of {METHODS}.")
  position = {layer.name: u for u, layer in enumerate(problem.layers)}
  skips = sum(position[e.dst] - position[e.src] > 1 for e in problem.edges)
  if method == "dp" and skips:
    raise ValueError(
        f"method='dp' solves chains only, but this problem has {skips} edges between "
        f"non-neighbouring layers. Use method='auto' or 'miqp'.")
  deadline = start + time_limit_s
  upper = math.inf if incumbent is None else float(incumbent)
  # An assignment beats the incumbent when it is lower by more than float rounding.
  beat = upper - abs(upper) * _TIE_RTOL if math.isfinite(upper) else upper

  raw = _tables.build(problem)
  peak, _ = _tables.min_peak_memory(raw)

  def finish(status, stages=None, choice=None, *, bound, method_used, message=""):
    elapsed = time_lib.perf_counter() - start
    if stages is None:
      return _problem.Solution(
          choice={}, stage={}, objective=math.inf, status=status, gap=math.inf, time_s=elapsed,
          bound=bound, method=method_used, message=message, min_peak_memory=peak)
    names = [layer.name for layer in problem.layers]
    choice_by_name = {name: int(tables.candidates[u][choice[u]]) for u, name in enumerate(names)}
    stage_by_name = {name: int(stages[u]) for u, name in enumerate(names)}
    evaluation = _problem.evaluate(problem, choice_by_name, stage_by_name)
    objective = evaluation.objective
    if status == "optimal":
      bound, gap = objective, 0.0
    else:
      bound = min(bound, objective)
      gap = (objective - bound) / objective if objective > 0 else 0.0
    if status == "time_limit":
      message = (f"Time limit of {time_limit_s:g} s reached: best objective {objective:.6g}, "
                 f"lower bound {bound:.6g}, gap {gap:.2%}.")
      logger.warning(message)
    return _problem.Solution(
        choice=choice_by_name, stage=stage_by_name, objective=objective, status=status,
        gap=gap, time_s=elapsed, bound=bound, method=method_used, message=message,
        min_peak_memory=peak, stage_times=evaluation.stage_times,
        send_times=evaluation.send_times, stage_memory=evaluation.stage_memory)

  if peak > raw.budget:
    return finish("infeasible", bound=math.inf, method_used="bound", message=(
        f"No assignment fits memory_limit={problem.memory_limit:.6g}: the leanest needs "
        f"{peak:.6g} on its fullest stage ({peak / problem.memory_limit:.2f}x the limit). "
        f"Use more stages, leaner candidates, or a larger memory_limit."))
  trivial = _tables.trivial_bound(raw, _tables.NO_PARTITION_BOUND)
  if trivial >= beat:
    return finish("cutoff", bound=trivial, method_used="bound", message=_cutoff_message(upper, trivial))
  tables = _tables.prune(raw, deadline)
  # Pruning keeps an optimum, so bounds on the pruned tables hold for the problem; the
  # per-stage partition bound is the strong one (often within 1% of the optimum).
  partition = _tables.partition_bound(tables)
  trivial = max(trivial, partition.objective)
  if trivial >= beat:
    return finish("cutoff", bound=trivial, method_used="bound", message=_cutoff_message(upper, trivial))

  # The leanest assignment (least peak memory) is feasible: every method starts from it,
  # so that even a time limit too short for anything else returns an assignment.
  _, lean_stages = _tables.min_peak_memory(tables)
  lean = (lean_stages, _tables.leanest_choice(tables, lean_stages))
  lean_objective = _tables.evaluate(tables, *lean)[0]
  no_time = f"Time limit of {time_limit_s:g} s reached before any assignment beat incumbent={upper:.6g}."

  if tables.is_chain and method != "miqp":
    if lean_objective < beat:
      result = _chain_dp.solve_chain(tables, upper_bound=lean_objective, incumbent=lean,
                                     deadline=deadline, partition=partition)
    else:
      result = _chain_dp.solve_chain(tables, upper_bound=beat, deadline=deadline, partition=partition)
    if result.choice is None:
      if result.timed_out:
        return finish("time_limit", bound=result.bound, method_used="chain_dp", message=no_time)
      bound = max(result.bound, upper)
      return finish("cutoff", bound=bound, method_used="chain_dp", message=_cutoff_message(upper, bound))
    proven = not result.timed_out or result.bound >= result.objective * (1 - _PROOF_RTOL)
    return finish("optimal" if proven else "time_limit", result.stages, result.choice,
                  bound=result.bound, method_used="chain_dp")

  # The DP on the chain relaxation gives the first solution and (method "auto") a bound:
  # skip edges only add time, at least their cheapest entry each.
  relaxed = _chain_dp.solve_chain(tables, upper_bound=beat, deadline=deadline, partition=partition)
  warm, warm_objective = (lean, lean_objective) if lean_objective < beat else (None, math.inf)
  if relaxed.choice is not None:
    objective = _tables.evaluate(tables, relaxed.stages, relaxed.choice)[0]
    if objective < min(warm_objective, beat):
      warm, warm_objective = (relaxed.stages, relaxed.choice), objective

  one_stage = None
  if method == "auto" and _one_stage.supported(tables):  # one stage: every edge is local
    try:
      one_stage = _one_stage.solve_one_stage(
          tables, upper_bound=min(beat, warm_objective), incumbent=warm, deadline=deadline)
    except _one_stage.TooLarge as e:  # Pareto fronts too wide: the methods below
      logger.debug("one-stage sweep given up: %s", e)
  if one_stage is not None:
    objective, found, timed_out = one_stage
    if timed_out:
      if warm is not None:
        return finish("time_limit", *warm, bound=trivial, method_used="one_stage_dp")
      return finish("time_limit", bound=trivial, method_used="one_stage_dp", message=no_time)
    if found is None:
      return finish("cutoff", bound=upper, method_used="one_stage_dp", message=_cutoff_message(upper, upper))
    return finish("optimal", *found, bound=objective, method_used="one_stage_dp")

  objective_lb = trivial
  if method == "auto":
    skip_least = sum(float(min(same.min(), cross.min())) for _, _, same, cross in tables.skips)
    objective_lb = max(relaxed.bound + skip_least, trivial)

  open_gap = objective_lb < min(beat, warm_objective) * (1 - _PROOF_RTOL)
  if method == "auto" and open_gap and _hub.supported(tables):
    # Skip edges leave a few layers: chain DPs over classes of those layers' candidates,
    # and SCIP with them fixed where the DPs' bound does not meet the best assignment.
    hub = _hub.solve_hub(tables, upper_bound=min(beat, warm_objective), incumbent=warm,
                         deadline=deadline, chain_bound=max(relaxed.bound, 0.0))
    if hub.choice is not None:
      warm, warm_objective = (hub.stages, hub.choice), hub.objective
    bound = max(objective_lb, hub.bound)
    used = "miqp" if hub.scip_used else "hub_dp"
    if warm is None:
      if hub.timed_out:
        return finish("time_limit", bound=bound, method_used=used, message=no_time)
      bound = max(bound, upper)
      return finish("cutoff", bound=bound, method_used=used, message=_cutoff_message(upper, bound))
    if bound >= warm_objective * (1 - _PROOF_RTOL):
      return finish("optimal", *warm, bound=bound, method_used=used)
    return finish("time_limit", *warm, bound=bound, method_used=used)

  # SCIP.
  if method == "auto":
    if objective_lb >= upper * (1 - _PROOF_RTOL):
      return finish("cutoff", bound=objective_lb, method_used="bound",
                    message=_cutoff_message(upper, objective_lb))
    if warm is not None and objective_lb >= warm_objective * (1 - _PROOF_RTOL):
      return finish("optimal", *warm, bound=objective_lb, method_used="chain_dp")
  if time_lib.perf_counter() >= deadline:
    if warm is not None:
      return finish("time_limit", *warm, bound=objective_lb, method_used="chain_dp")
    return finish("time_limit", bound=objective_lb, method_used="chain_dp", message=no_time)
  result = _miqp.solve_miqp(
      tables, warm=warm, objective_lb=objective_lb if method == "auto" else 0.0,
      peak_lb=float(tables.time.min(axis=1).max()), cutoff=beat, deadline=deadline)
  best, best_objective = warm, warm_objective
  if result.stages is not None:
    objective, _, _, memory = _tables.evaluate(tables, result.stages, result.choice)
    if not (memory <= tables.budget).all():  # SCIP's tolerance let a stage overflow a hair
      logger.warning("SCIP's solution exceeds the memory limit by a factor %.3g; ignoring it.",
                     float(memory.max() / tables.budget))
    elif objective <= best_objective:
      best, best_objective = (result.stages, result.choice), objective
  bound = max(result.bound, objective_lb)
  if best is not None and best_objective >= beat:  # SCIP's objective limit is not strict
    best = None
  if result.status == "cutoff" or (best is None and result.status == "optimal"):
    bound = max(bound, upper)
    return finish("cutoff", bound=bound, method_used="miqp", message=_cutoff_message(upper, bound))
  if best is None:
    return finish("time_limit", bound=bound, method_used="miqp", message=no_time)
  return finish(result.status, *best, bound=bound, method_used="miqp")


def _cutoff_message(upper: float, bound: float) -> str:
  return (f"No assignment beats incumbent={upper:.6g}: every one costs at least {bound:.6g}.")
