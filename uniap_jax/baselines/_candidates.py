"""Recognising candidates by what they split: data parallel, FSDP, Megatron.

A candidate's `assignment` names, per mesh axis, the layer's labels it splits; the
layer's IR says which labels are batch dims and which are parameter dims. Names of
candidates are never parsed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import strategies

# Layer name -> (batch label names, parameter label names).
Roles = Mapping[str, tuple[frozenset[str], frozenset[str]]]
# Layer name -> indices of the candidates a method allows, in candidate order.
Allowed = Mapping[str, Sequence[int]]


def label_roles(graph: graph_lib.LayerGraph, cache: dict) -> Roles:
  """Which of each layer's labels are batch dims and which parameter dims (cached)."""
  key = ("baselines", "label_roles")
  roles = cache.get(key)
  if roles is None:
    info = strategies.analyze(graph)
    by_signature: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    roles = {}
    for layer in graph.layers:
      got = by_signature.get(layer.signature)
      if got is None:
        ir = strategies.build_ir(layer, info)
        names = ir.label_names
        got = by_signature[layer.signature] = (
            frozenset(names[l] for l in ir.batch_labels),
            frozenset(names[l] for l in ir.param_labels - ir.batch_labels))
      roles[layer.name] = got
    cache[key] = roles
  return roles


def _axes_of(spec: tuple) -> set[str]:
  """Mesh axis names a PartitionSpec (as a tuple of entries) splits over."""
  out = set()
  for entry in spec:
    if entry is None:
      continue
    out.update(entry if isinstance(entry, tuple) else (entry,))
  return out


def is_data_parallel(cand: strategies.Candidate, batch: frozenset[str],
                     mesh: strategies.MeshShape) -> bool:
  """Every axis splits the batch and nothing else; parameters replicated; no remat."""
  if cand.recompute or any(_axes_of(s) for s in cand.param_specs):
    return False
  return all(set(labels) == (batch if axis.size > 1 else set())
             for axis, labels in zip(mesh.axes, cand.assignment))


def is_fsdp(cand: strategies.Candidate, batch: frozenset[str], params: frozenset[str],
            mesh: strategies.MeshShape) -> bool:
  """One axis that splits the batch and parameter dims (ZeRO-3); no remat."""
  if cand.recompute or len(mesh.axes) != 1:
    return False
  labels = set(cand.assignment[0])
  extra = labels - batch
  return (batch <= labels and bool(extra) and extra <= params
          and any(_axes_of(s) for s in cand.param_specs))


def is_megatron(cand: strategies.Candidate, batch: frozenset[str],
                mesh: strategies.MeshShape) -> bool:
  """Outer axis: the batch only (parameters never split over it); inner axis: model
  dims only (Megatron column/row splits, with or without sequence parallelism)."""
  if mesh.kind == "flat":
    return is_data_parallel(cand, batch, mesh)
  if mesh.kind != "dp_tp":
    return False
  if set(cand.assignment[0]) != batch or set(cand.assignment[-1]) & batch:
    return False
  return not any(mesh.axes[0].name in _axes_of(s) for s in cand.param_specs)


def family(tables: cost.CostTables, roles: Roles,
           keep: Callable[[strategies.Candidate, frozenset[str], frozenset[str]], bool]
           ) -> dict[str, tuple[int, ...]]:
  """Layer name -> indices of its candidates that `keep(cand, batch, params)` accepts."""
  out = {}
  for layer in tables.layers:
    batch, params = roles[layer.name]
    out[layer.name] = tuple(k for k, c in enumerate(layer.candidates) if keep(c, batch, params))
  return out


def data_parallel_family(tables: cost.CostTables, roles: Roles) -> dict[str, tuple[int, ...]]:
  return family(tables, roles, lambda c, b, p: is_data_parallel(c, b, tables.mesh))


def fsdp_family(tables: cost.CostTables, roles: Roles) -> dict[str, tuple[int, ...]]:
  return family(tables, roles, lambda c, b, p: is_fsdp(c, b, p, tables.mesh))


def megatron_family(tables: cost.CostTables, roles: Roles) -> dict[str, tuple[int, ...]]:
  return family(tables, roles, lambda c, b, p: is_megatron(c, b, tables.mesh))


def missing(allowed: Allowed, what: str, tables: cost.CostTables) -> str:
  """Why some layer has no allowed candidate, or "" when every layer has one."""
  empty = [n for n, ks in allowed.items() if not ks]
  if not empty:
    return ""
  return (f"no {what} candidate for layer(s) {', '.join(map(repr, empty[:3]))} on mesh "
          f"{tables.mesh.as_dict()} with micro-batches of {tables.microbatch_size} (the "
          "batch or parameter dims do not split that many ways)")
