"""Applying a plan: the user's train step sharded (jit) and pipelined (shard_map).

`apply_plan(plan, step)` (what `Plan.apply` calls) returns a step with the signature of
`step`: NNX steps update their model and optimizer in place, functional steps return
their new state. Across processes (`jax.distributed`) every process applies the same
plan to the same arguments and gets the same replicated metrics back. See `_step.py`
for the wrapping, `_program.py` for how a model's forward is split into stages,
`_pipeline.py` for the executors and `_schedules.py` for the tables.
"""

from uniap_jax.apply._pipeline import EXECUTORS as EXECUTORS
from uniap_jax.apply._step import AppliedStep as AppliedStep
from uniap_jax.apply._step import apply_plan as apply_plan

__all__ = ["EXECUTORS", "AppliedStep", "apply_plan"]
