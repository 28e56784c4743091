"""uniap_jax: an automatic parallelism planner for JAX (UniAP on SCIP).

  import uniap_jax as ua
  cluster = ua.Cluster.preset("a100-40g-2x8")
  plan = ua.plan(train_step, model, optimizer, batch, cluster=cluster)
  print(plan.summary())
"""

from uniap_jax import solver as solver
from uniap_jax.auto import auto_parallel as auto_parallel
from uniap_jax.cluster import Cluster as Cluster
from uniap_jax.graph import LayerGraph as LayerGraph
from uniap_jax.graph import trace as trace
from uniap_jax.plans import Plan as Plan
from uniap_jax.search import plan as plan

__all__ = ["Cluster", "LayerGraph", "Plan", "auto_parallel", "plan", "solver", "trace"]
