"""The outer loop of UniAP and the public `plan()`.

For every configuration — pipeline degree, intra-stage mesh shape, micro-batch count,
schedule — the cost tables become one `solver.Problem`, and the solver returns its
optimum (or proves it cannot beat the best so far). The best configuration becomes a
`Plan`.

Pruning: building every configuration's tables would dominate on large clusters
(hundreds of configurations, each with its own mesh and micro-batch size), so each
configuration is bounded before it is built, cheapest bound first: FLOPs over
devices at peak; its mesh's layers costed once at the largest micro-batch, scaled
down; its own layers' fastest candidates and least memory (no edges); only then
edges, Problem and solver. Configurations wait in a queue ordered by bound, so the
most promising is solved first and every configuration whose bound reaches the
incumbent is skipped unbuilt; the solver also receives the incumbent and stops as
soon as it proves that nothing better exists. The order is a function of the
inputs alone, so the same inputs give the same plan on every host.
"""

from uniap_jax.search._bounds import _check_layers as _check_layers
from uniap_jax.search._bounds import configuration_bound as configuration_bound
from uniap_jax.search._bounds import lower_bound as lower_bound
from uniap_jax.search._bounds import objective_bound as objective_bound
from uniap_jax.search._bounds import to_problem as to_problem
from uniap_jax.search._build import build_plan as build_plan
from uniap_jax.search._build import fingerprint as fingerprint
from uniap_jax.search._configs import MAX_FINE_AXES as MAX_FINE_AXES
from uniap_jax.search._configs import MAX_MICROBATCHES as MAX_MICROBATCHES
from uniap_jax.search._configs import Config as Config
from uniap_jax.search._configs import Progress as Progress
from uniap_jax.search._configs import configurations as configurations
from uniap_jax.search._loop import InfeasibleError as InfeasibleError
from uniap_jax.search._loop import _Search as _Search
from uniap_jax.search._loop import plan as plan
from uniap_jax.search._loop import plan_graph as plan_graph
