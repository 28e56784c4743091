"""A LayerGraph as a readable table."""

from __future__ import annotations


from uniap_jax.graph._types import LayerGraph

def _si(x: float) -> str:
  for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.2f}{unit}"
  return f"{x:.0f}"


def _binary(x: float) -> str:
  for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}B"


def summary_table(graph: LayerGraph) -> str:
  kinds = {l.signature for l in graph.layers}
  num_params = sum(p.info.size for l in graph.layers for p in l.params)
  param_bytes = sum(l.param_bytes for l in graph.layers)
  totals = [sum(getattr(l, f) for l in graph.layers)
            for f in ("flops", "backward_flops", "optimizer_flops", "activation_bytes")]
  head = (f"LayerGraph: {len(graph.layers)} layers of {len(kinds)} kinds, {len(graph.edges)} "
          f"edges, batch {graph.batch_size}, {_si(num_params)} params ({_binary(param_bytes)}); "
          f"FLOPs per step: forward {_si(totals[0])}, backward {_si(totals[1])}, "
          f"optimizer {_si(totals[2])}")
  rows = [("#", "layer", "kind", "ops", "params", "param bytes", "fwd FLOPs", "bwd FLOPs",
           "opt FLOPs", "act bytes")]
  for l in graph.layers:
    kind = f"{l.module_type} {l.signature[:6]}".strip()
    rows.append((str(l.index), l.name, kind, str(len(l.ops)),
                 _si(sum(p.info.size for p in l.params)), _binary(l.param_bytes), _si(l.flops),
                 _si(l.backward_flops), _si(l.optimizer_flops), _binary(l.activation_bytes)))
  rows.append(("", "total", "", str(sum(len(l.ops) for l in graph.layers)), _si(num_params),
               _binary(param_bytes), _si(totals[0]), _si(totals[1]), _si(totals[2]),
               _binary(totals[3])))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  left = {1, 2}
  lines = [head]
  for r in rows:
    lines.append("  ".join(v.ljust(w) if c in left else v.rjust(w)
                           for c, (v, w) in enumerate(zip(r, widths))).rstrip())
  return "\n".join(lines)
