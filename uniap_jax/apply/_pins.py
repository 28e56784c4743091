"""The plan's pinned layouts (`Plan.activation_specs`), read by call name.

`uniap_jax.search._pins` writes them from the cost tables; `_step.py` applies them with
sharding constraints, in the plain jitted step and, without the `shard_map`'s manual
axes, in the pipeline's stage bodies.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from uniap_jax.apply import _mesh

# Key suffix of a gathered parameter's layout, as `uniap_jax.search._pins.GATHERED`.
GATHERED = "@gathered"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Pins:
  """The plan's `activation_specs`, read by call name.

  Keys: "src->dst", the layout of layer src's output (the boundary value as its
  producer's candidate lays it out); "dst<-src", the layout in which layer dst's
  candidate takes that value; a plain module path ("blocks/3/attn/q"), the output of
  that submodule call inside a layer, as the layer's candidate lays it out (the
  cost model's internal layouts, `strategies.value_layouts`, where XLA's own
  propagation could choose others); "path<-src" for such a call takes an argument
  from call src, "path<-" one its caller's own code computed (an attention's
  context before its output projection, say).

  "param path@gathered" ("blocks/0/up/kernel@gathered"): the layout to which the
  layer's candidate gathers a parameter stored split before reading it; pinned where
  the module reads it (without a pipeline only: see `_step._stage_hooks`).

  Attributes:
    outputs: call name -> layout of its output.
    inputs: call name -> {producing call -> layout in which the call takes its output}.
    params: parameter path -> the layout its module reads it in.
    enclosing: module paths with pinned calls or parameter reads below them: their
      calls run with their own submodule calls intercepted (`_program.call_through`).
  """

  outputs: dict[str, P]
  inputs: dict[str, dict[str, P]]
  params: dict[str, P]
  enclosing: frozenset[str]

  @classmethod
  def of(cls, activation_specs) -> Pins:
    outputs, inputs, params = {}, {}, {}
    for key in sorted(activation_specs):
      spec = activation_specs[key]
      if key.endswith(GATHERED):
        params[key[:-len(GATHERED)]] = spec
      elif "->" in key:
        src, _ = key.split("->", 1)
        outputs.setdefault(src, spec)
      elif "<-" in key:
        dst, src = key.split("<-", 1)
        inputs.setdefault(dst, {})[src] = spec
      else:
        outputs[key] = spec
    return cls._make(outputs, inputs, params)

  @classmethod
  def _make(cls, outputs, inputs, params=None) -> Pins:
    params = params or {}
    enclosing = set()
    for name in {*outputs, *inputs, *params}:
      parts = name.split("@")[0].split("/")
      enclosing.update("/".join(parts[:k]) for k in range(1, len(parts)))
    return cls(outputs=outputs, inputs=inputs, params=params, enclosing=frozenset(enclosing))

  def without(self, drop: Sequence[str], *, params: bool = True) -> Pins:
    """The same pins with the mesh axes `drop` left out (inside a `shard_map` only its
    automatic axes may appear in a constraint); with `params=False`, no parameter's."""
    return Pins._make({k: drop_spec(v, drop) for k, v in self.outputs.items()},
                       {k: {s: drop_spec(v, drop) for s, v in d.items()}
                        for k, d in self.inputs.items()},
                       {k: drop_spec(v, drop) for k, v in self.params.items()} if params
                       else {})

  def inside(self, layers: Sequence[str]) -> Pins:
    """The pins of submodule calls inside layers `layers` on which all of them agree,
    named as inside the first (the module a uniform position runs)."""
    bases = [name.split("@")[0] for name in layers]

    def relative(table, base):
      return {k[len(base):]: v for k, v in table.items() if k.startswith(base + "/")}

    def local(src, base):  # a producer inside the layer, or "" (the layer's own code)
      return src[len(base):] if src.startswith(base + "/") else None if src else ""

    outs = [relative(self.outputs, b) for b in bases]
    prms = [relative(self.params, b) for b in bases]
    ins = []
    for b in bases:
      table = {}
      for dst, srcs in relative(self.inputs, b).items():
        kept = {local(src, b): v for src, v in srcs.items()}
        kept.pop(None, None)
        table[dst] = kept
      ins.append(table)
    rep = bases[0]
    outputs = {rep + k: v for k, v in outs[0].items() if all(o.get(k) == v for o in outs)}
    params = {rep + k: v for k, v in prms[0].items() if all(o.get(k) == v for o in prms)}
    inputs = {}
    for dst, srcs in ins[0].items():
      agreed = {(rep + src if src else ""): v for src, v in srcs.items()
                if all(t.get(dst, {}).get(src) == v for t in ins)}
      if agreed:
        inputs[rep + dst] = agreed
    return Pins._make(outputs, inputs, params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def forward_only_constraint(x, sharding):
  """`x` laid out by `sharding`; its cotangent is left free.

  The transpose of a plain constraint would pin the gradient of a gathered
  parameter to the gathered layout too, making XLA all-reduce it in full where
  the cost model reduce-scatters it into the stored shards.
  """
  return jax.lax.with_sharding_constraint(x, sharding)


def _forward_only_fwd(x, sharding):
  return jax.lax.with_sharding_constraint(x, sharding), None


def _forward_only_bwd(sharding, _, g):
  return (g,)


forward_only_constraint.defvjp(_forward_only_fwd, _forward_only_bwd)


def drop_spec(spec: P, drop: Sequence[str]) -> P:
  """`spec` without the mesh axes `drop`."""
  return P(*[drop_axes(e, drop) for e in spec]) if drop else spec


def drop_axes(entry, drop):
  axes = tuple(a for a in _mesh.spec_axes(entry) if a not in drop)
  return None if not axes else axes[0] if len(axes) == 1 else axes
