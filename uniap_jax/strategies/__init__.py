"""Strategies: the candidate shardings of every layer, from its own ops.

For a layer and an intra-stage mesh, `layer_candidates` labels the layer's tensor
dimensions (`_ir`), enumerates which labels each mesh axis splits (`_candidates`),
and evaluates each candidate (`_evaluate`), applying one sharding rule per primitive
family (`_rules`), to find the collectives one device issues, the FLOPs and bytes it
handles per op, and what it holds in memory (its peak from the values' live intervals,
`_liveness`). Seconds are the cost model's business (`uniap_jax.cost`).

Data parallel, FSDP/ZeRO-3, Megatron tensor parallel and sequence parallel come out
as special cases of one mechanism; see `_candidates` for how.
"""

from uniap_jax.strategies._candidates import Assignment as Assignment
from uniap_jax.strategies._candidates import Candidate as Candidate
from uniap_jax.strategies._candidates import ParamGather as ParamGather
from uniap_jax.strategies._candidates import assignments as assignments
from uniap_jax.strategies._evaluate import layer_candidates as layer_candidates
from uniap_jax.strategies._candidates import tensor_layout as tensor_layout
from uniap_jax.strategies._evaluate import unsupported as unsupported
from uniap_jax.strategies._evaluate import value_layouts as value_layouts
from uniap_jax.strategies._ir import FAMILY_OF_PRIMITIVE as FAMILY_OF_PRIMITIVE
from uniap_jax.strategies._ir import LayerIR as LayerIR
from uniap_jax.strategies._ir import batch_dims as batch_dims
from uniap_jax.strategies._ir import analyze as analyze
from uniap_jax.strategies._ir import GraphInfo as GraphInfo
from uniap_jax.strategies._ir import build as build_ir
from uniap_jax.strategies._ir import rebind as rebind
from uniap_jax.strategies._ir import family_of as family_of
from uniap_jax.strategies._layout import Comm as Comm
from uniap_jax.strategies._layout import Layout as Layout
from uniap_jax.strategies._layout import finish as finish
from uniap_jax.strategies._layout import shard_count as shard_count
from uniap_jax.strategies._layout import reshard as reshard
from uniap_jax.strategies._layout import to_spec as to_spec
from uniap_jax.strategies._mesh import MeshAxis as MeshAxis
from uniap_jax.strategies._mesh import MeshShape as MeshShape
from uniap_jax.strategies._mesh import mesh_shapes as mesh_shapes
from uniap_jax.strategies._rules import RULES as RULES
