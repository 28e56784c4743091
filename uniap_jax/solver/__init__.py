"""The UniAP solver core: stages and intra-layer candidates chosen jointly.

Bring cost tables (per layer and candidate: time and memory; per edge: resharding and
send times), get the assignment that minimises the GPipe time per iteration under a
per-device memory limit, with a proof of optimality or a gap:

  from uniap_jax import solver
  problem = solver.Problem(
      layers=[solver.Layer(name="l0", time=[1.0, 0.6], memory=[2e9, 5e9]), ...],
      edges=[solver.Edge(src="l0", dst="l1", same_stage=[[0, 0.1], [0.1, 0]],
                         cross_stage=[[0.2, 0.3], [0.3, 0.2]])],
      num_stages=2, num_microbatches=8, memory_limit=12e9)
  sol = solver.solve(problem, time_limit_s=30)
  sol.choice, sol.stage, sol.objective, sol.status, sol.gap, sol.time_s

This package imports numpy and pyscipopt only (no JAX), so user tables solve in
milliseconds. `brute_force` is the exact reference used to test `solve`.
"""

from uniap_jax.solver._brute import brute_force as brute_force
from uniap_jax.solver._problem import Edge as Edge
from uniap_jax.solver._problem import Evaluation as Evaluation
from uniap_jax.solver._problem import Layer as Layer
from uniap_jax.solver._problem import MEMORY_RTOL as MEMORY_RTOL
from uniap_jax.solver._problem import Problem as Problem
from uniap_jax.solver._problem import Solution as Solution
from uniap_jax.solver._problem import evaluate as evaluate
from uniap_jax.solver._solve import solve as solve

__all__ = [
    "Edge",
    "Evaluation",
    "Layer",
    "MEMORY_RTOL",
    "Problem",
    "Solution",
    "brute_force",
    "evaluate",
    "solve",
]
