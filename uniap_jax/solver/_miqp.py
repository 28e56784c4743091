"""The UniAP MIQP on SCIP, linearised: layered placement, edge flows, a max variable.

Variables (every product of binaries is replaced by an exact linear model):
  x[u, i, k] in {0, 1}: layer u on stage i with candidate k (only stages u can reach
    with every stage non-empty, and candidates that fit stage i's memory alone).
  Consecutive layers u, u + 1 (the chain of the layer order): a flow from x[u] to
    x[u + 1] that stays on stage i or moves to i + 1: f[u, i, k, l] and g[u, i, k, l]
    when an edge joins them (so they carry its candidate pair and its cost), stage-only
    flows otherwise. Flow conservation alone makes stages contiguous and non-empty, and
    for a chain without the max term and memory the LP is integral (a shortest path in
    the layered graph): the layered-flow formulation.
  Skip edges u -> v (v > u + 1): z[e, i, j, k, l] >= 0 for u on stage i <= j with
    candidate k and v on stage j with candidate l, whose row and column sums equal
    x[u, i, k] and x[v, j, l] (the pairwise marginal polytope; monotone stages are
    built in). It adds same_stage[k, l] to p_i when i == j and cross_stage[k, l] to each
    o_b with i <= b < j.
  p_i, o_b: stage and send times; t >= every p_i and o_b (and >= a proven lower bound).
Objective: sum p + sum o + (c - 1) t. Times are scaled by the first solution's objective
and memory by the limit, so that SCIP's tolerances act relatively. SCIP runs on one
thread with a fixed seed: the same input gives the same answer.
"""

from __future__ import annotations

import dataclasses
import time as time_lib

import numpy as np
import pyscipopt

from uniap_jax.solver import _tables

# SCIP's random seed shift: fixed, so that the same input gives the same answer.
SEED = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result:
  """SCIP's answer: status in {"optimal", "time_limit", "cutoff"}.

  `stages`/`choice` are None when SCIP found nothing better than `warm` (or time ran
  out first, possibly while the model was still being built: then `nodes` is 0).
  """

  status: str
  stages: np.ndarray | None
  choice: np.ndarray | None
  bound: float
  nodes: int


class _BuildTimeout(Exception):
  """Raised while building the model when the deadline passes."""


def _stage_range(tables: _tables.Tables, u: int) -> range:
  return range(max(0, u - (tables.n - tables.num_stages)), min(u, tables.num_stages - 1) + 1)


def solve_miqp(tables: _tables.Tables, *, warm=None, objective_lb: float = 0.0,
               peak_lb: float = 0.0, cutoff: float = np.inf, deadline: float = np.inf,
               node_limit: int = -1) -> Result:
  """Solves `tables` with SCIP.

  Args:
    tables: the problem (chain or DAG).
    warm: optional (stages, choice) given to SCIP as its first solution.
    objective_lb: a proven lower bound on the optimum, added as a constraint.
    peak_lb: a proven lower bound on max(p, o).
    cutoff: only solutions with a smaller objective are sought ("cutoff" if none).
    deadline: time.perf_counter() value at which SCIP stops.
    node_limit: stop after this many branch-and-bound nodes (-1: none); deterministic,
      unlike the deadline, hence used in tests.
  Returns:
    The Result. Building a large model takes seconds, so the clock is checked while
    building too: past the deadline it returns status "time_limit" with no assignment
    and `objective_lb` as bound (the caller keeps `warm`).
  """
  try:
    return _solve_miqp(tables, warm=warm, objective_lb=objective_lb, peak_lb=peak_lb,
                       cutoff=cutoff, deadline=deadline, node_limit=node_limit)
  except _BuildTimeout:
    return Result(status="time_limit", stages=None, choice=None, bound=objective_lb, nodes=0)


def _solve_miqp(tables, *, warm, objective_lb, peak_lb, cutoff, deadline, node_limit) -> Result:
  def check_clock():
    if time_lib.perf_counter() >= deadline:
      raise _BuildTimeout

  check_clock()
  n, num_stages, c = tables.n, tables.num_stages, tables.num_microbatches
  warm_objective = _tables.evaluate(tables, *warm)[0] if warm is not None else 0.0
  scale_t = warm_objective if warm_objective > 0 else max(_tables.trivial_bound(tables), 1e-12)
  scale_m = tables.budget if np.isfinite(tables.budget) else None
  time = tables.time / scale_t
  model = pyscipopt.Model("uniap")
  model.hideOutput()
  model.setParam("randomization/randomseedshift", SEED)
  model.setParam("parallel/maxnthreads", 1)
  model.setParam("lp/threads", 1)
  # Measured here: on random DAGs of 2-8 layers SCIP's root cut loop (cmir above all)
  # tails off for seconds while branching closes the gap in milliseconds; on T5-like
  # DAGs (48 blocks) default presolving spends seconds probing a million implications.
  model.setSeparating(pyscipopt.SCIP_PARAMSETTING.OFF)
  model.setParam("limits/nodes", node_limit)
  model.setPresolve(pyscipopt.SCIP_PARAMSETTING.FAST)

  stages_of = [_stage_range(tables, u) for u in range(n)]
  fits = [{i: [k for k in range(tables.num_candidates[u]) if tables.memory[i, u, k] <= tables.budget]
           for i in stages_of[u]} for u in range(n)]
  x = {}
  for u in range(n):
    check_clock()
    for i in stages_of[u]:
      for k in fits[u][i]:
        x[u, i, k] = model.addVar(vtype="B", name=f"x_{u}_{i}_{k}")
  layer_keys = [[key for key in x if key[0] == u] for u in range(n)]
  y = {(u, i): pyscipopt.quicksum(x[u, i, k] for k in fits[u][i]) for u in range(n) for i in stages_of[u]}
  for u in range(n):
    model.addCons(pyscipopt.quicksum(y[u, i] for i in stages_of[u]) == 1)

  stage_terms = [[time[u, k] * x[u, i, k] for (u, i, k) in x if i == s] for s in range(num_stages)]
  send_terms = [[] for _ in range(max(num_stages - 1, 0))]
  values = []  # warm start: (variable, what it means)

  # Consecutive layers: flows.
  for u in range(n - 1):
    check_clock()
    same = tables.chain_same[u] / scale_t
    cross = tables.chain_cross[u] / scale_t
    both = [i for i in stages_of[u] if i in stages_of[u + 1]]
    step = [i for i in stages_of[u] if i + 1 in stages_of[u + 1]]
    out_flow = {key: [] for key in layer_keys[u]}
    in_flow = {key: [] for key in layer_keys[u + 1]}
    if tables.chain_edge[u] and (same.any() or cross.any()):
      for i in both:
        for k in fits[u][i]:
          for l in fits[u + 1][i]:
            var = model.addVar(lb=0, ub=1, name=f"f_{u}_{i}_{k}_{l}")
            out_flow[u, i, k].append(var)
            in_flow[u + 1, i, l].append(var)
            if same[k, l]:
              stage_terms[i].append(same[k, l] * var)
            values.append((var, ("same", u, i, k, l)))
      for i in step:
        for k in fits[u][i]:
          for l in fits[u + 1][i + 1]:
            var = model.addVar(lb=0, ub=1, name=f"g_{u}_{i}_{k}_{l}")
            out_flow[u, i, k].append(var)
            in_flow[u + 1, i + 1, l].append(var)
            if cross[k, l]:
              send_terms[i].append(cross[k, l] * var)
            values.append((var, ("cross", u, i, k, l)))
      for key, flows in list(out_flow.items()) + list(in_flow.items()):
        model.addCons(pyscipopt.quicksum(flows) == x[key])
    else:
      stay = {i: model.addVar(lb=0, ub=1, name=f"F_{u}_{i}") for i in both}
      move = {i: model.addVar(lb=0, ub=1, name=f"G_{u}_{i}") for i in step}
      for i, var in stay.items():
        values.append((var, ("stay", u, i)))
      for i, var in move.items():
        values.append((var, ("move", u, i)))
      for i in stages_of[u]:
        model.addCons(pyscipopt.quicksum([v for j, v in stay.items() if j == i] +
                                         [v for j, v in move.items() if j == i]) == y[u, i])
      for i in stages_of[u + 1]:
        model.addCons(pyscipopt.quicksum([v for j, v in stay.items() if j == i] +
                                         [v for j, v in move.items() if j + 1 == i]) == y[u + 1, i])

  # Skip edges: one weight per (stage of u, stage of v, candidate of u, candidate of v)
  # with both marginals, the tightest pairwise model.
  for e, (u, v, same, cross) in enumerate(tables.skips):
    check_clock()
    same, cross = same / scale_t, cross / scale_t
    if not (same.any() or cross.any()):
      continue
    rows = {key: [] for key in layer_keys[u]}
    cols = {key: [] for key in layer_keys[v]}
    for i in stages_of[u]:
      for j in stages_of[v]:
        if j < i:
          continue
        for k in fits[u][i]:
          for l in fits[v][j]:
            var = model.addVar(lb=0, ub=1, name=f"z_{e}_{i}_{j}_{k}_{l}")
            rows[u, i, k].append(var)
            cols[v, j, l].append(var)
            values.append((var, ("pair", u, v, i, j, k, l)))
            if i == j and same[k, l]:
              stage_terms[i].append(same[k, l] * var)
            elif i < j and cross[k, l]:
              for b in range(i, j):
                send_terms[b].append(cross[k, l] * var)
    for key, terms in list(rows.items()) + list(cols.items()):
      model.addCons(pyscipopt.quicksum(terms) == x[key])

  # Branch first on layers with many skip edges (T5's encoder output feeds every decoder
  # layer): once a hub is fixed, its pairwise weights collapse to exact linear costs.
  degree = np.zeros(n, dtype=np.int64)
  for u, v, _, _ in tables.skips:
    degree[u] += 1
    degree[v] += 1
  for (u, i, k), var in x.items():
    if degree[u] > 1:
      model.chgVarBranchPriority(var, int(degree[u]))

  # Memory.
  if scale_m is not None:
    for s in range(num_stages):
      check_clock()
      terms = [tables.memory[s, u, k] / scale_m * var for (u, i, k), var in x.items() if i == s]
      model.addCons(pyscipopt.quicksum(terms) <= 1)

  # Times, the max, the objective.
  peak = model.addVar(lb=peak_lb / scale_t, name="peak")
  p = [model.addVar(lb=0, name=f"p_{s}") for s in range(num_stages)]
  o = [model.addVar(lb=0, name=f"o_{b}") for b in range(num_stages - 1)]
  for var, terms in zip(p + o, stage_terms + send_terms):
    model.addCons(var == pyscipopt.quicksum(terms))
    model.addCons(peak >= var)
  objective = pyscipopt.quicksum(p) + pyscipopt.quicksum(o) + (c - 1) * peak
  if objective_lb > 0:
    model.addCons(objective >= objective_lb / scale_t)
  model.setObjective(objective, "minimize")
  if np.isfinite(cutoff):
    model.setObjlimit(cutoff / scale_t)

  if warm is not None:
    _add_warm_start(model, tables, warm, x, values, p, o, peak, scale_t)
  check_clock()
  # What is left of the budget after building goes to SCIP.
  model.setParam("limits/time", min(max(deadline - time_lib.perf_counter(), 1e-3), 1e20))
  model.optimize()
  status = model.getStatus()
  nodes = model.getNNodes()
  bound = model.getDualbound() * scale_t
  # With an objective limit SCIP says "infeasible" when nothing beats it, even if it
  # stored solutions that do not.
  if status in ("infeasible", "inforunbd") or (model.getNSols() == 0 and status == "optimal"):
    if not np.isfinite(cutoff):
      raise RuntimeError("SCIP found no assignment although the leanest one fits; please report this.")
    return Result(status="cutoff", stages=None, choice=None, bound=cutoff, nodes=nodes)
  if model.getNSols() == 0:
    return Result(status="time_limit", stages=None, choice=None, bound=bound, nodes=nodes)
  sol = model.getBestSol()
  stages = np.zeros(n, dtype=np.int64)
  choice = np.zeros(n, dtype=np.int64)
  for (u, i, k), var in x.items():
    if model.getSolVal(sol, var) > 0.5:
      stages[u], choice[u] = i, k
  # Every other stop (time, node or memory limit) leaves a gap: "time_limit".
  return Result(status="optimal" if status == "optimal" else "time_limit",
                stages=stages, choice=choice, bound=bound, nodes=nodes)


def _add_warm_start(model, tables, warm, x, values, p, o, peak, scale_t):
  """Gives SCIP the assignment `warm` with every auxiliary variable set to match."""
  stages, choice = warm
  _, stage_times, send_times, _ = _tables.evaluate(tables, stages, choice)
  sol = model.createSol()
  for (u, i, k), var in x.items():
    if stages[u] == i and choice[u] == k:
      model.setSolVal(sol, var, 1.0)
  for var, key in values:
    kind, u = key[0], key[1]
    if kind in ("same", "cross"):
      _, _, i, k, l = key
      on = (stages[u] == i and choice[u] == k and choice[u + 1] == l and
            stages[u + 1] == (i if kind == "same" else i + 1))
    elif kind in ("stay", "move"):
      i = key[2]
      on = stages[u] == i and stages[u + 1] == (i if kind == "stay" else i + 1)
    else:  # pair
      _, _, v, i, j, k, l = key
      on = stages[u] == i and stages[v] == j and choice[u] == k and choice[v] == l
    if on:
      model.setSolVal(sol, var, 1.0)
  for var, value in zip(p + o, list(stage_times) + list(send_times)):
    model.setSolVal(sol, var, value / scale_t)
  model.setSolVal(sol, peak, max(list(stage_times) + list(send_times)) / scale_t)
  model.addSol(sol, free=True)
