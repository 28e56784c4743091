"""Baseline planners, scored by UniAP's own cost model so that comparisons are fair.

Each baseline restricts the search the way a known system or practice does, and
every plan it returns is scored by `solver.evaluate` on the very `solver.Problem`
that `search.plan_graph` solves for that configuration (same CostTables, same
objective, same memory limit). Its configurations come from `search.configurations`
with the same knobs. UniAP's search space therefore contains every baseline's, and
its proven optimum is never slower than any baseline.

| name            | pipeline                         | intra-stage strategy per layer           |
|-----------------|----------------------------------|------------------------------------------|
| `data_parallel` | none                             | data parallel (parameters replicated)    |
| `fsdp`          | none                             | batch split, parameters sharded (ZeRO-3) |
| `megatron`      | dp x tp x pp grid, uniform split | DP on the outer axis, TP on the inner    |
| `pipeline_only` | degree searched, exact split     | data parallel in every stage             |
| `intra_only`    | none                             | free: UniAP's MIQP with one stage        |
| `alpa`          | split by DP over layer estimates | free, each stage optimised on its own    |
| `galvatron`     | fixed split balancing parameters | free, per stage under its memory         |

Candidates are recognised by what they split (their `assignment` against the layer's
batch and parameter labels) and by their parameter specs, not by their names.

A plan's `solver.status` is "optimal" where the method solved its own restricted
problem exactly in every configuration it visited (`pipeline_only`, `intra_only`),
"heuristic" otherwise. A heuristic plan's `gap` is measured against the cost model's
simple lower bound (fastest candidates, perfectly balanced stages) over the
configurations the method visited; it proves nothing about the method's own space.
A method that finds no plan within memory raises `search.InfeasibleError` ("out of
memory", as the paper reports it).

References: Lin et al., UniAP, CVPR 2025, Sec. 4 (baselines and ablations);
Shoeybi et al., Megatron-LM, 2019; Narayanan et al., SC 2021 (3D parallelism);
Rajbhandari et al., ZeRO, SC 2020; Zheng et al., Alpa, OSDI 2022;
Miao et al., Galvatron, VLDB 2023.
"""

from uniap_jax.baselines._compare import Row as Row
from uniap_jax.baselines._compare import compare as compare
from uniap_jax.baselines._compare import describe as describe
from uniap_jax.baselines._compare import format_table as format_table
from uniap_jax.baselines._methods import BASELINES as BASELINES
from uniap_jax.baselines._methods import PlanFn as PlanFn
from uniap_jax.baselines._methods import alpa as alpa
from uniap_jax.baselines._methods import data_parallel as data_parallel
from uniap_jax.baselines._methods import fsdp as fsdp
from uniap_jax.baselines._methods import galvatron as galvatron
from uniap_jax.baselines._methods import intra_only as intra_only
from uniap_jax.baselines._methods import megatron as megatron
from uniap_jax.baselines._methods import pipeline_only as pipeline_only

__all__ = [
    "BASELINES",
    "PlanFn",
    "Row",
    "alpa",
    "compare",
    "data_parallel",
    "describe",
    "format_table",
    "fsdp",
    "galvatron",
    "intra_only",
    "megatron",
    "pipeline_only",
]
