"""uniap_jax: an automatic parallelism planner for JAX (UniAP on SCIP)."""
