"""What a chosen plan's collectives add up to, counted as XLA's HLO shows them.

Kinds "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send"; bytes are
the larger of a collective's operand and result on one device, summed over one step
(`uniap_jax.hlo` counts compiled programs the same way, so the two compare directly).
"""

from __future__ import annotations

from collections.abc import Mapping

from uniap_jax import strategies
from uniap_jax.cost import _tables

Summary = dict[tuple[str, tuple[str, ...]], dict[str, float]]


def _add(out: Summary, kind: str, axes: tuple[str, ...], nbytes: float, count: float) -> None:
  entry = out.setdefault((kind, axes), {"count": 0, "bytes": 0.0})
  entry["count"] += count
  entry["bytes"] += nbytes * count


def _reshard_into(out: Summary, src: strategies.Layout, dst: strategies.Layout, nbytes: float,
                  mesh: strategies.MeshShape, count: float) -> None:
  comms, _ = strategies.reshard(src, dst, nbytes, mesh.sizes)
  for kind, axes, b in comms:
    _add(out, kind, tuple(mesh.names[a] for a in axes), b, count)


def collectives_by_stage(tables: _tables.CostTables, choice: Mapping[str, int],
                         stage_of: Mapping[str, int] | None = None) -> tuple[Summary, ...]:
  """Per stage: (kind, mesh axes) -> {"count", "bytes"} one device of the stage issues
  in one step. Sends carry the pipeline axis "pp"."""
  stage_of = stage_of or {l.name: 0 for l in tables.layers}
  c = tables.num_microbatches
  out: list[Summary] = [{} for _ in range(tables.num_stages)]
  for layer in tables.layers:
    cand = layer.candidates[choice[layer.name]]
    stage = out[stage_of[layer.name]]
    for comm in cand.comms:
      _add(stage, comm.kind, comm.axes, comm.bytes, comm.count * (1 if comm.per_step else c))
  layers = {l.name: l for l in tables.layers}
  sizes = tables.mesh.sizes
  for edge in tables.edges:
    src, dst = layers[edge.src], layers[edge.dst]
    cs, cd = src.candidates[choice[src.name]], dst.candidates[choice[dst.name]]
    s_src, s_dst = stage_of[src.name], stage_of[dst.name]
    for v in edge.value_ids:
      if v not in src.output_ids or v not in dst.input_ids:
        continue
      i, j = src.output_ids.index(v), dst.input_ids.index(v)
      nbytes = src.output_nbytes[i]
      ls, ld = cs.output_layouts[i], cd.input_layouts[j]
      if s_src == s_dst:
        _reshard_into(out[s_src], ls, ld, nbytes, tables.mesh, c)  # the activation
        _reshard_into(out[s_src], ld, ls, nbytes, tables.mesh, c)  # its cotangent
        continue
      hops = s_dst - s_src
      _add(out[s_src], "send", ("pp",), nbytes / strategies.shard_count(ls, sizes), c * hops)
      _add(out[s_dst], "send", ("pp",), nbytes / strategies.shard_count(ld, sizes), c * hops)
      _reshard_into(out[s_dst], ls, ld, nbytes, tables.mesh, c)
      _reshard_into(out[s_src], ld, ls, nbytes, tables.mesh, c)
  return tuple(out)


def predicted_collectives(tables: _tables.CostTables, choice: Mapping[str, int],
                          stage_of: Mapping[str, int] | None = None) -> dict[str, float]:
  """kind -> bytes one device moves in one step (the busiest stage's device per kind).

  Args:
    tables: the configuration's cost tables.
    choice: layer name -> index into its `LayerCosts.candidates`.
    stage_of: layer name -> stage; default everything on stage 0.
  Returns:
    DESIGN.md's `predicted.collectives`: kinds with nonzero bytes only.
  """
  out: dict[str, float] = {}
  for stage in collectives_by_stage(tables, choice, stage_of):
    per_kind: dict[str, float] = {}
    for (kind, _), entry in stage.items():
      per_kind[kind] = per_kind.get(kind, 0.0) + entry["bytes"]
    for kind, b in per_kind.items():
      out[kind] = max(out.get(kind, 0.0), b)
  return {k: v for k, v in sorted(out.items()) if v > 0}
