"""The cost model: seconds and bytes of every layer's candidates, as CostTables.

Analytic by default: roofline compute per op from its FLOPs and bytes with the
cluster's peaks (backward from the traced backward ops), alpha-beta collectives per
topology level, memory of parameters, gradients, optimizer state and the activations
of the micro-batches in flight. `build_cost_tables` produces the tables one
configuration of the outer search turns into a `uniap_jax.solver.Problem`;
`predicted_collectives` sums a chosen plan's collectives as XLA's HLO shows them
(per micro-batch as the paper prices them, or tick by tick as `uniap_jax.apply`'s
pipeline executors run them).
"""

from uniap_jax.cost._formulas import MIXED_PRECISION_ADAM_BYTES_PER_PARAM as MIXED_PRECISION_ADAM_BYTES_PER_PARAM
from uniap_jax.cost._formulas import collective_time_s as collective_time_s
from uniap_jax.cost._formulas import comm_time_s as comm_time_s
from uniap_jax.cost._formulas import model_state_bytes as model_state_bytes
from uniap_jax.cost._formulas import roofline_time_s as roofline_time_s
from uniap_jax.cost._formulas import send_time_s as send_time_s
from uniap_jax.cost._memory import linear_memory_bytes as linear_memory_bytes
from uniap_jax.cost._memory import runtime_memory_bytes as runtime_memory_bytes
from uniap_jax.cost._memory import runtime_memory_terms as runtime_memory_terms
from uniap_jax.cost._memory import stash_slots as stash_slots
from uniap_jax.cost._predict import EXECUTORS as EXECUTORS
from uniap_jax.cost._predict import collectives_by_stage as collectives_by_stage
from uniap_jax.cost._predict import inside_comms as inside_comms
from uniap_jax.cost._predict import manual_axes as manual_axes
from uniap_jax.cost._predict import predicted_collectives as predicted_collectives
from uniap_jax.cost._predict import runtime_run_split as runtime_run_split
from uniap_jax.cost._predict import runtime_runs as runtime_runs
from uniap_jax.cost._predict import runtime_skips_idle as runtime_skips_idle
from uniap_jax.cost._predict import runtime_step_time_s as runtime_step_time_s
from uniap_jax.cost._predict import runtime_ticks as runtime_ticks
from uniap_jax.cost._tables import CostTables as CostTables
from uniap_jax.cost._tables import EdgeCosts as EdgeCosts
from uniap_jax.cost._tables import LayerCosts as LayerCosts
from uniap_jax.cost._tables import SCHEDULES as SCHEDULES
from uniap_jax.cost._tables import build_cost_tables as build_cost_tables
from uniap_jax.cost._tables import flops_time_bounds as flops_time_bounds
from uniap_jax.cost._tables import layer_costs as layer_costs
from uniap_jax.cost._tables import layer_memory_bytes as layer_memory_bytes
from uniap_jax.cost._tables import microbatches_in_flight as microbatches_in_flight
from uniap_jax.cost._tables import over_limit as over_limit
from uniap_jax.cost._tables import reserve_bytes as reserve_bytes
from uniap_jax.cost._tables import runtime_layer_memory_bytes as runtime_layer_memory_bytes
from uniap_jax.cost._tables import runtime_reserve_bytes as runtime_reserve_bytes
from uniap_jax.cost._tables import stack_key as stack_key
