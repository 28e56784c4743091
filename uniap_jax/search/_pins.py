"""Layouts `apply` must pin beyond layer outputs, so that XLA compiles what was charged.

The cost tables charge a boundary's resharding at the edge and a layer's collectives
for the internal layouts its candidate chose (`strategies.value_layouts`). XLA's own
propagation does otherwise when only layer outputs are pinned: it carries a producer's
layout into the consumer, or lays out a sequence-parallel block's insides its own way.
These keys of `Plan.activation_specs` (read by `apply._pins.Pins`) pin the rest:
  - "dst<-src": the layout in which dst's candidate takes the value from src;
  - a submodule path ("blocks/0/attn/q"): the output of that call inside a layer;
  - "path<-src": an argument that call takes from submodule src's output where the
    two layouts differ; "path<-": one made by the layer's own code (the attention's
    context entering attn/o, say);
  - "param path@gathered" ("blocks/0/mlp/up/kernel@gathered"): the layout to which
    the layer's candidate gathers a parameter stored split (FSDP / ZeRO) before its
    forward reads it (`Candidate.param_gathers`): its stored spec without the axes
    it is all-gathered over. Pinned where the module reads the parameter, so that
    autodiff keeps the gathered copy for the backward instead of XLA gathering it
    again there, as the cost model charges one gather per micro-batch. (Pipelines
    leave them out: the cost model has autodiff GPipe gather again in the backward.)
"""

from __future__ import annotations

from collections.abc import Mapping

from jax.sharding import PartitionSpec

from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import strategies


def consumer_specs(tables: cost.CostTables, choice: Mapping[str, int]) -> dict[str, PartitionSpec]:
  """"dst<-src" -> the layout in which dst's chosen candidate takes the edge's value."""
  out = {}
  for edge in tables.edges:
    dst = tables.layer(edge.dst)
    specs = dict(zip(dst.input_ids, dst.candidates[choice[edge.dst]].input_specs))
    value = next((v for v in edge.value_ids if v in specs), None)
    if value is not None:
      out[f"{edge.dst}<-{edge.src}"] = PartitionSpec(*specs[value])
  return out


def internal_specs(graph: graph_lib.LayerGraph, tables: cost.CostTables,
                   choice: Mapping[str, int]) -> dict[str, PartitionSpec]:
  """Submodule calls inside each layer, laid out as the layer's chosen candidate says.

  A submodule gets a key when exactly one forward value made inside it is read outside
  it (its output); an argument entering a submodule gets one when its layout differs
  from its producer's pin, or when the layer's own code made it. Pinning each of q, k
  and v's shared input separately would make XLA gather it three times: values already
  laid out so by their producer's pin are left alone.
  """
  info = strategies.analyze(graph)
  out: dict[str, PartitionSpec] = {}
  for layer in graph.layers:
    if layer.name not in choice:
      continue
    cand = tables.layer(layer.name).candidates[choice[layer.name]]
    ir = strategies.build_ir(layer, info, microbatch=tables.microbatch_size)
    layouts = strategies.value_layouts(ir, tables.mesh, cand)
    spec = lambda v: PartitionSpec(*strategies.to_spec(layouts[v], tables.mesh.names))
    base = layer.name.split("@")[0]
    forward = [o.op for o in ir.ops if o.op.phase == "forward"]
    producer = {v: op.module for op in forward for v in op.out_ids}
    modules = sorted({op.module for op in forward if op.module.startswith(base + "/")})

    def inside(m: str, module: str) -> bool:
      return m == module or m.startswith(module + "/")

    output_of: dict[int, str] = {}
    for module in modules:
      made = {v for op in forward if inside(op.module, module) for v in op.out_ids}
      leaving: list[int] = []
      for op in forward:
        if not inside(op.module, module):
          leaving += [v for v in op.in_ids if v in made and v not in leaving]
      leaving += [v for v in ir.output_ids if v in made and v not in leaving]
      if len(leaving) == 1:
        out[module] = spec(leaving[0])
        output_of.setdefault(leaving[0], module)
    for module in modules:
      entering: list[int] = []
      for op in forward:
        if inside(op.module, module):
          entering += [v for v in op.in_ids
                       if v in producer and not inside(producer[v], module) and v not in entering]
      for v in entering:
        src = output_of.get(v, "")
        if src and out[src] == spec(v):
          continue  # already laid out so by its producer's pin
        if src or inside(producer[v], base):
          out[f"{module}<-{src}"] = spec(v)
  return out


GATHERED = "@gathered"


def gather_specs(tables: cost.CostTables, choice: Mapping[str, int]) -> dict[str, PartitionSpec]:
  """"param path@gathered" -> the layout each chosen candidate gathers a parameter to.

  Only gathers made of all-gathers: the stored spec without their axes. A parameter
  two layers read (a tied embedding) is left alone: `apply` pins a parameter where it
  is read, and the two reads may want different layouts.
  """
  readers: dict[str, int] = {}
  for layer in tables.layers:
    for path in set(layer.param_paths):
      readers[path] = readers.get(path, 0) + 1
  out: dict[str, PartitionSpec] = {}
  for layer in tables.layers:
    cand = layer.candidates[choice[layer.name]]
    for gather in cand.param_gathers:
      if (readers[layer.param_paths[gather.param]] > 1 or not gather.comms
          or any(c.kind != "all-gather" for c in gather.comms)):
        continue
      axes = {a for c in gather.comms for a in c.axes}
      entries = []
      for entry in cand.param_specs[gather.param]:
        kept = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,))
                     if a is not None and a not in axes)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
      out[layer.param_paths[gather.param] + GATHERED] = PartitionSpec(*entries)
  return out


def pins(graph: graph_lib.LayerGraph, tables: cost.CostTables,
         choice: Mapping[str, int]) -> dict[str, PartitionSpec]:
  """Every pin of this module for one configuration's chosen candidates."""
  return {**consumer_specs(tables, choice), **internal_specs(graph, tables, choice),
          **gather_specs(tables, choice)}
