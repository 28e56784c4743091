"""The outer loop of UniAP and the public `plan()`.

For every configuration — pipeline degree, intra-stage mesh shape, micro-batch count,
schedule — the cost tables become one `solver.Problem`, and the solver returns its
optimum (or proves it cannot beat the best so far). The best configuration becomes a
`Plan`.

What "best" means (`objective=`):
  - "paper": the UniAP objective of the paper (sum of stage times + sends + (c - 1) x
    the slowest: GPipe's time per iteration, `plan.predicted.step_time_s`). The plan
    is the assignment with the least such objective over all configurations.
  - "runtime" (the default): the step time of what `uniap_jax.apply` runs, a
    lockstep SPMD pipeline in which every device runs every layer position in every
    tick (`cost.runtime_step_time_s`, `plan.predicted.runtime_step_time_s`). Within
    a configuration the solver still minimises the paper objective (that is the
    UniAP MIQP); the search then prices the assignment it returns at the runtime's
    step time and keeps the configuration where that is least. So the plan is the
    best configuration by runtime step time among each configuration's
    paper-optimal assignment (the solver's, when several tie): not the assignment
    with the least runtime step time overall, which the MIQP does not model (the
    runtime charges every stage the positions of all stages, so it rewards balanced,
    alike stages rather than the least sum). The two objectives rank schedules very
    differently: 1F1B's runtime runs each micro-batch's forward three times (the
    pass that feeds the loss, the table's forward, the recomputation in its backward
    run) and, in lockstep, about 2M ticks that each last a backward run; where idle
    ticks cannot be skipped (`cluster.skips_idle_work`) every tick runs on every
    device (`cost.runtime_runs`). The paper objective sees none of this.
    The solver gets no cutoff under "runtime" (the runtime incumbent is on another
    scale, and no paper objective provably separates the assignments whose runtime
    could beat it); configurations are pruned by runtime bounds alone. Memory, too,
    follows the runtime under "runtime": the solver's constraint sums a per-layer
    stand-in for what the executor holds (`cost.runtime_layer_memory_bytes`, with
    `CostTables.reserve_bytes` kept free: one micro-batch's activations where the
    executor recomputes from stashed stage inputs, not the paper's micro-batches in
    flight), and an assignment whose `cost.runtime_memory_bytes` (parameter stacks,
    stage buffers, the executor's residuals or stash) exceeds the limit cannot be the
    plan. "paper" uses the paper's per-layer memory only.

Pruning: building every configuration's tables would dominate on large clusters
(hundreds of configurations, each with its own mesh and micro-batch size), so each
configuration is bounded before it is built, cheapest bound first: FLOPs over
devices at peak; its mesh's layers costed once at the largest micro-batch, scaled
down; its own layers' fastest candidates and least memory (no edges); only then
edges, Problem and solver. Configurations wait in a queue ordered by bound, so the
most promising is solved first and every configuration whose bound reaches the
incumbent is skipped unbuilt; under "paper" the solver also receives the incumbent
and stops as soon as it proves that nothing better exists. Under "runtime" the
bounds bound the runtime step time instead (`runtime_bound`: the lockstep program
runs, in every forward and backward run, at least the layers of its busiest stage,
so forward runs x forward compute + backward runs x backward compute of the
fastest candidates, split as evenly as contiguous stages allow, plus the optimizer's
share, is below it): level 0 is the FLOPs bound split by phase; level 1 only
tests memory (scaling a larger micro-batch's Pareto set bounds no phase on its
own); level 2 takes the layers' own candidates, with the collectives every
assignment pays, and is the larger of two bounds: the busiest stage's layers, with
memory respected by a Lagrangian relaxation (the fastest candidates of a large model
do not fit), and the program's positions (`_runtime_position_bound`: every stage's
layers of one kind have positions of their own, so each kind costs its most layers
on one stage, over the contiguous splits that fit memory, plus the stacks'
all-to-alls, the sends of every tick and, under 1F1B, the table forwards of the
positions that feed a send). The same bound on the built tables (a subset of the
candidates) can settle a configuration before its solve. The order is a function
of the inputs alone, so the same inputs give the same plan on every host.

A warm start (`plan_graph(..., incumbent=plan)`, e.g. a baseline's plan) makes that
plan's step time the first incumbent: the search returns it unless it finds a
strictly better plan, so it never reports a worse plan than the one it was given,
however short its time limit.
"""

from uniap_jax.search._bounds import _check_layers as _check_layers
from uniap_jax.search._bounds import _flops_bound as _flops_bound
from uniap_jax.search._bounds import _least_counts as _least_counts
from uniap_jax.search._bounds import _runtime_flops_bound as _runtime_flops_bound
from uniap_jax.search._bounds import _runtime_layer_bound as _runtime_layer_bound
from uniap_jax.search._bounds import _runtime_position_bound as _runtime_position_bound
from uniap_jax.search._bounds import configuration_bound as configuration_bound
from uniap_jax.search._bounds import lower_bound as lower_bound
from uniap_jax.search._bounds import objective_bound as objective_bound
from uniap_jax.search._bounds import phase_flops_bounds as phase_flops_bounds
from uniap_jax.search._bounds import runtime_bound as runtime_bound
from uniap_jax.search._bounds import runtime_lower_bound as runtime_lower_bound
from uniap_jax.search._bounds import to_problem as to_problem
from uniap_jax.search._build import build_plan as build_plan
from uniap_jax.search._build import fingerprint as fingerprint
from uniap_jax.search._configs import MAX_FINE_AXES as MAX_FINE_AXES
from uniap_jax.search._configs import MAX_MICROBATCHES as MAX_MICROBATCHES
from uniap_jax.search._configs import Config as Config
from uniap_jax.search._configs import Progress as Progress
from uniap_jax.search._configs import configurations as configurations
from uniap_jax.search._loop import InfeasibleError as InfeasibleError
from uniap_jax.search._loop import OBJECTIVES as OBJECTIVES
from uniap_jax.search._loop import _Search as _Search
from uniap_jax.search._loop import check_objective as check_objective
from uniap_jax.search._loop import plan as plan
from uniap_jax.search._loop import plan_graph as plan_graph
from uniap_jax.search._loop import solver_stats as solver_stats
