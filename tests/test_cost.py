"""uniap_jax.cost: formulas, CostTables, and agreement with what XLA compiles.

The centre of this file compiles real train steps on the 8 CPU devices under fixed
shardings (data parallel, Megatron tensor parallel, FSDP, 2x4 data x tensor,
sequence parallel, replicated), reads the collectives from the compiled HLO, and
requires them to equal, kind by kind and mesh axes by mesh axes, what the cost model
charges for the candidates those shardings are: the same counts, bytes within 1%.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import hlo
from uniap_jax import strategies
from uniap_jax.cluster import Cluster

CPU8 = Cluster.preset("cpu-8")
A100_2X8 = Cluster.preset("a100-40g-2x8")
R = ()
ALL = (("dp", "tp"),)  # both axes of the 2x4 mesh on one dim


def _identity(name, x):
  del name
  return x


# --- Models: boundaries and (for sequence parallelism) a few internal tensors are
# --- pinned through `hook`, the identity while tracing.

class MLP(nnx.Module):

  def __init__(self, rngs, hook=_identity, hidden=32, ffn=64):
    self.l1 = nnx.Linear(hidden, ffn, rngs=rngs)
    self.l2 = nnx.Linear(ffn, hidden, rngs=rngs)
    self.hook = hook

  def __call__(self, batch):
    y = self.l2(self.hook("l1", jax.nn.relu(self.l1(batch["x"]))))
    return jnp.mean((y - batch["y"]) ** 2)


class Block(nnx.Module):
  """A pre-LN GPT block with separate q/k/v projections and causal attention."""

  def __init__(self, rngs, hook=_identity, dim=64, heads=8):
    self.heads, self.hook = heads, hook
    self.ln1, self.ln2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(dim, dim, rngs=rngs) for _ in range(4))
    self.up, self.down = nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, s, d = x.shape
    h = self.ln1(x)
    split = lambda t: t.reshape(b, s, self.heads, d // self.heads)
    q, k, v = (self.hook(n, split(f(h))) for n, f in (("q", self.q), ("k", self.k),
                                                       ("v", self.v)))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, d)
    x = x + self.o(self.hook("att", a))
    return x + self.down(self.hook("up", jax.nn.gelu(self.up(self.ln2(x)))))


class BlockModel(nnx.Module):
  """One GPT block and a final norm; the loss is a regression on the block's output."""

  def __init__(self, rngs, hook=_identity):
    self.block, self.norm, self.hook = Block(rngs, hook), nnx.LayerNorm(64, rngs=rngs), hook

  def __call__(self, batch):
    y = self.norm(self.hook("block", self.block(batch["x"])))
    return jnp.mean((y - batch["y"]) ** 2)


class Head(nnx.Module):

  def __init__(self, rngs, hook=_identity, dim=64, vocab=64):
    self.ln, self.out, self.hook = nnx.LayerNorm(dim, rngs=rngs), nnx.Linear(dim, vocab,
                                                                             rngs=rngs), hook

  def __call__(self, x, labels):
    logits = self.hook("logits", self.out(self.ln(self.hook("head_in", x))))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class GPT(nnx.Module):
  """Token embedding, one block, a vocabulary head with cross-entropy."""

  def __init__(self, rngs, hook=_identity):
    self.embed, self.block = nnx.Embed(64, 64, rngs=rngs), Block(rngs, hook)
    self.head, self.hook = Head(rngs, hook), hook

  def __call__(self, batch):
    x = self.hook("embed", self.embed(batch["ids"]))
    return self.head(self.hook("block", self.block(x)), batch["labels"])


def _train_step(model, optimizer, batch):
  value, grads = nnx.value_and_grad(lambda m: m(batch))(model)
  optimizer.update(model, grads)
  return value


_BATCHES = {
    MLP: {"x": jax.ShapeDtypeStruct((256, 32), jnp.float32),
          "y": jax.ShapeDtypeStruct((256, 32), jnp.float32)},
    BlockModel: {"x": jax.ShapeDtypeStruct((16, 32, 64), jnp.float32),
                 "y": jax.ShapeDtypeStruct((16, 32, 64), jnp.float32)},
    GPT: {"ids": jax.ShapeDtypeStruct((16, 32), jnp.int32),
          "labels": jax.ShapeDtypeStruct((16, 32), jnp.int32)},
}


def _abstract(model_cls, hook=_identity):
  model = nnx.eval_shape(lambda: model_cls(nnx.Rngs(0), hook))
  optimizer = nnx.eval_shape(
      lambda m: nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param), model)
  return model, optimizer


def _graph(model_cls):
  model, optimizer = _abstract(model_cls)
  return graph_lib.trace(_train_step, model, optimizer, _BATCHES[model_cls])


# --- Choosing the candidate that is a given sharding -------------------------------------

def _pick(layer, params, inputs=None):
  """Index of the first candidate whose parameter specs (by path suffix) and boundary
  input specs are the given ones."""
  for k, cand in enumerate(layer.candidates):
    specs = layer.param_specs(k)
    ok = all(any(p.endswith(suffix) for p in specs) and
             all(specs[p] == spec for p in specs if p.endswith(suffix))
             for suffix, spec in params.items())
    if ok and (inputs is None or tuple(cand.input_specs) == tuple(inputs)):
      return k
  raise AssertionError(f"{layer.name}: no candidate with {params} and inputs {inputs}")


_MEGATRON = {"q/kernel": (None, "tp"), "o/kernel": ("tp",), "up/kernel": (None, "tp"),
             "down/kernel": ("tp",), "ln1/scale": R}
_TP8 = {"q/kernel": (None, "dp"), "o/kernel": ("dp",), "up/kernel": (None, "dp"),
        "down/kernel": ("dp",), "ln1/scale": R}
_FSDP_BLOCK = {"q/kernel": ALL, "up/kernel": ALL, "down/kernel": (None, ALL[0]),
               "ln1/scale": ALL}

# (model, sharding) -> (mesh index in mesh_shapes(cpu-8, 8), {layer: (params, inputs)})
CASES = {
    ("mlp", "dp"): (2, {"l1": ({"kernel": R}, [ALL]), "l2": ({"kernel": R}, [ALL, ALL])}),
    ("mlp", "tp"): (2, {"l1": ({"kernel": (None, "tp")}, [R]),
                        "l2": ({"kernel": ("tp",)}, [(None, "tp"), R])}),
    ("mlp", "dp_tp"): (2, {"l1": ({"kernel": (None, "tp")}, [("dp",)]),
                           "l2": ({"kernel": ("tp",)}, [("dp", "tp"), ("dp",)])}),
    ("mlp", "fsdp"): (2, {"l1": ({"kernel": ALL}, [ALL]),
                          "l2": ({"kernel": ALL}, [ALL, ALL])}),
    ("mlp", "replicated"): (2, {"l1": ({"kernel": R}, [R]), "l2": ({"kernel": R}, [R, R])}),
    ("block", "dp"): (2, {"block": ({"q/kernel": R, "up/kernel": R}, [ALL]),
                          "norm": ({"scale": R}, [ALL, ALL])}),
    ("block", "tp"): (0, {"block": (_TP8, [R]), "norm": ({"scale": R}, [R, R])}),
    ("block", "dp_tp"): (2, {"block": (_MEGATRON, [("dp",)]),
                             "norm": ({"scale": R}, [("dp",), ("dp",)])}),
    ("block", "sp"): (2, {"block": (_MEGATRON, [("dp", "tp")]),
                          "norm": ({"scale": R}, [("dp", "tp"), ("dp", "tp")])}),
    ("block", "fsdp"): (2, {"block": (_FSDP_BLOCK, [ALL]),
                            "norm": ({"scale": ALL}, [ALL, ALL])}),
    ("block", "replicated"): (2, {"block": ({"q/kernel": R, "up/kernel": R}, [R]),
                                  "norm": ({"scale": R}, [R, R])}),
    ("gpt", "dp"): (2, {"embed": ({"embedding": R}, [ALL]),
                        "block": ({"q/kernel": R, "up/kernel": R}, [ALL]),
                        "head": ({"out/kernel": R}, [ALL, ALL])}),
    ("gpt", "tp"): (0, {"embed": ({"embedding": ("dp",)}, [R]), "block": (_TP8, [R]),
                        "head": ({"out/kernel": (None, "dp"), "ln/scale": R}, [R, R])}),
    ("gpt", "dp_tp"): (2, {"embed": ({"embedding": ("tp",)}, [("dp",)]),
                           "block": (_MEGATRON, [("dp",)]),
                           "head": ({"out/kernel": (None, "tp"), "ln/scale": R},
                                    [("dp",), ("dp",)])}),
    # Megatron with sequence parallelism on the whole model: vocabulary-parallel
    # embedding, the block's norms and residuals split along the sequence, and a
    # vocabulary-parallel head and cross-entropy on the gathered sequence. (A
    # vocabulary split on the axis that splits the ids' or labels' sequence is not
    # offered: test_gathers_whose_collectives_xla_decides_otherwise_are_not_offered.)
    ("gpt", "sp"): (2, {"embed": ({"embedding": ("tp",)}, [("dp",)]),
                        "block": (_MEGATRON, [("dp", "tp")]),
                        "head": ({"out/kernel": (None, "tp"), "ln/scale": R},
                                 [("dp",), ("dp",)])}),
    # FSDP with the embedding table split along the vocabulary over the whole mesh:
    # gathered, and its gradient reduce-scattered (test_gathers_whose_collectives_...).
    ("gpt", "fsdp_vocab"): (2, {"embed": ({"embedding": ALL}, [ALL]),
                                "block": (_FSDP_BLOCK, [ALL]),
                                "head": ({"out/kernel": ALL, "ln/scale": ALL}, [ALL, ALL])}),
    ("gpt", "fsdp"): (2, {"embed": ({"embedding": (None, ALL[0])}, [ALL]),
                          "block": (_FSDP_BLOCK, [ALL]),
                          "head": ({"out/kernel": ALL, "ln/scale": ALL}, [ALL, ALL])}),
    ("gpt", "replicated"): (2, {"embed": ({"embedding": R}, [R]),
                                "block": ({"q/kernel": R, "up/kernel": R}, [R]),
                                "head": ({"out/kernel": R}, [R, R])}),
}
MODELS = {"mlp": MLP, "block": BlockModel, "gpt": GPT}


def _leaf_path(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path
                  ).removesuffix("/.value")


def _internal_specs(graph, tables, choice, mesh_shape):
  """The candidate's layouts of the block's q, k, v, attention and MLP activations.

  A plan pins parameters and boundary activations; where a candidate resolves a
  conflict differently from XLA's propagation (sequence parallelism: heads or the
  sequence on one axis), pinning these reproduces it (strategies.value_layouts).
  """
  layer = graph.layer("block")
  ir = strategies.build_ir(layer, strategies.analyze(graph))
  layouts = strategies.value_layouts(ir, mesh_shape, tables.layer("block").candidates[
      choice["block"]])
  param = {p.path.split("/")[-2]: p.value_id for p in layer.params if p.path.endswith("kernel")}
  forward = [o.op for o in ir.ops if o.op.phase == "forward"]

  def dot_with(kernel):
    return next(op for op in forward if op.primitive == "dot_general" and param[kernel] in op.in_ids)

  def head_split(kernel):  # the reshape to heads after the projection (and its bias add)
    v = dot_with(kernel).out_ids[0]
    while True:
      op = next(op for op in forward if v in op.in_ids)
      v = op.out_ids[0]
      if op.primitive == "reshape":
        return v

  other = lambda kernel: next(i for i in dot_with(kernel).in_ids if i != param[kernel])
  values = {"q": head_split("q"), "k": head_split("k"), "v": head_split("v"),
            "att": other("o"), "up": other("down")}
  specs = {n: strategies.to_spec(layouts[v], mesh_shape.names) for n, v in values.items()}
  if "head" in choice:  # the logits (after the bias add), as the head's candidate has them
    head = graph.layer("head")
    ir = strategies.build_ir(head, strategies.analyze(graph))
    layouts = strategies.value_layouts(ir, mesh_shape, tables.layer("head").candidates[
        choice["head"]])
    kernel = next(p.value_id for p in head.params if p.path.endswith("out/kernel"))
    forward = [o.op for o in ir.ops if o.op.phase == "forward"]
    dot = next(op for op in forward if op.primitive == "dot_general" and kernel in op.in_ids)
    bias_add = next(op for op in forward if dot.out_ids[0] in op.in_ids and op.primitive == "add")
    specs["logits"] = strategies.to_spec(layouts[bias_add.out_ids[0]], mesh_shape.names)
  return specs


def _compile(model_cls, graph, tables, choice, mesh_shape, pin_internal):
  """The jitted, donated train step under the chosen candidates, compiled."""
  mesh = jax.make_mesh(mesh_shape.sizes, mesh_shape.names,
                       axis_types=(AxisType.Auto,) * len(mesh_shape.sizes))
  params, outputs = {}, {}
  for layer in tables.layers:
    params.update(layer.param_specs(choice[layer.name]))
    outputs[layer.name] = layer.candidates[choice[layer.name]].output_specs[0]
  if "head" in choice:  # the head's input as its candidate takes it (after the edge)
    outputs["head_in"] = tables.layer("head").candidates[choice["head"]].input_specs[0]
  if pin_internal:
    outputs.update(_internal_specs(graph, tables, choice, mesh_shape))
  batch_specs = {}
  for inp in graph.inputs:
    for layer in tables.layers:
      if inp.role == "batch" and inp.value_id in layer.input_ids:
        cand = layer.candidates[choice[layer.name]]
        batch_specs.setdefault(inp.path, cand.input_specs[layer.input_ids.index(inp.value_id)])

  def hook(name, x):
    if name not in outputs:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*outputs[name])))

  model, optimizer = _abstract(model_cls, hook)
  model_def, model_state = nnx.split(model)
  opt_def, opt_state = nnx.split(optimizer)

  def sharding(path, leaf):
    del leaf
    p = _leaf_path(path)
    match = max((k for k in params if p == k or p.endswith("/" + k)), key=len, default=None)
    return NamedSharding(mesh, P(*params[match]) if match else P())

  model_sh = jax.tree_util.tree_map_with_path(sharding, model_state)
  opt_sh = jax.tree_util.tree_map_with_path(sharding, opt_state)
  batch = _BATCHES[model_cls]
  batch_sh = {k: NamedSharding(mesh, P(*batch_specs[k])) for k in batch}

  def step(model_state, opt_state, batch):
    m, o = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)
    value = _train_step(m, o, batch)
    return value, nnx.state(m), nnx.state(o)

  return jax.jit(step, in_shardings=(model_sh, opt_sh, batch_sh),
                 out_shardings=(NamedSharding(mesh, P()), model_sh, opt_sh),
                 donate_argnums=(0, 1)).lower(model_state, opt_state, batch).compile()


_GRAPHS = {}


def _setup(model_name, sharding):
  model_cls = MODELS[model_name]
  if model_name not in _GRAPHS:
    _GRAPHS[model_name] = _graph(model_cls)
  graph = _GRAPHS[model_name]
  mesh_index, selection = CASES[(model_name, sharding)]
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[mesh_index]
  tables = cost.build_cost_tables(graph, CPU8, mesh=mesh_shape, prune=False, recompute=False)
  choice = {name: _pick(tables.layer(name), *sel) for name, sel in selection.items()}
  return model_cls, graph, tables, choice, mesh_shape


FAST = [("mlp", s) for s in ("dp", "tp", "dp_tp", "fsdp", "replicated")] + [
    ("block", s) for s in ("dp", "tp", "dp_tp", "sp", "fsdp", "replicated")] + [
        ("gpt", "dp_tp"), ("gpt", "sp"), ("gpt", "fsdp"), ("gpt", "fsdp_vocab")]
SLOW = [("gpt", "dp"), ("gpt", "tp"), ("gpt", "replicated")]


@pytest.mark.parametrize("model_name,sharding", FAST + [
    pytest.param(*case, marks=pytest.mark.slow) for case in SLOW])
def test_collectives_equal_what_xla_compiles(model_name, sharding):
  model_cls, graph, tables, choice, mesh_shape = _setup(model_name, sharding)
  compiled = _compile(model_cls, graph, tables, choice, mesh_shape,
                      pin_internal=sharding == "sp")
  got = hlo.by_axes(hlo.parse(compiled.as_text(), mesh_shape.as_dict()))
  predicted = cost.collectives_by_stage(tables, choice)[0]
  assert sorted(got) == sorted(k for k, v in predicted.items() if v["count"]), (got, predicted)
  for key, entry in got.items():
    assert predicted[key]["count"] == entry["count"], (key, entry, predicted[key])
    assert predicted[key]["bytes"] == pytest.approx(entry["bytes"], rel=0.01), key
  kinds = cost.predicted_collectives(tables, choice)
  assert kinds == pytest.approx(hlo.bytes_by_kind(hlo.parse(compiled.as_text())), rel=0.01)

  # Memory: what the step holds as arguments is exact; the peak within 10% (the
  # tables are built for cpu-8, so they charge what XLA:CPU keeps: see
  # test_cpu_keeps_the_broadcasts_that_gpu_fuses).
  analysis = compiled.memory_analysis()
  state = sum(l.state_bytes[choice[l.name]] for l in tables.layers)
  assert state + _batch_bytes(graph, tables, choice, mesh_shape) == pytest.approx(
      analysis.argument_size_in_bytes, rel=0.01)
  xla_peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
              analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  model_peak = sum(l.memory_bytes(1, accumulate=False)[choice[l.name]] for l in tables.layers
                   ) + max(l.temp_bytes[choice[l.name]] for l in tables.layers)
  assert model_peak == pytest.approx(xla_peak, rel=0.10)


def test_cpu_keeps_the_broadcasts_that_gpu_fuses(block_graph):
  """XLA:CPU's reduction fusions do not fuse broadcasts: a layer norm's statistics
  and scale, broadcast to [b, s, h] by the forward pass and read again by the
  backward's reductions, are one buffer (CSE) kept between the passes. Tables for a
  GPU assume XLA:GPU fuses them and keep none.

  Under tensor parallelism the block keeps ln1's and ln2's statistics and ln2's
  scale (ln1 computes no input gradient: the block reads the batch), the final
  norm its statistics and scale; under FSDP the scales are gathered anew in each
  pass, so only the statistics are shared. The parametrised comparison with
  compiled.memory_analysis() holds the CPU figures to XLA's.
  """
  gpu = dataclasses.replace(CPU8, device_kind="NVIDIA A100-SXM4-40GB")
  assert (CPU8.platform, gpu.platform, A100_2X8.platform) == ("cpu", "gpu", "gpu")
  bsh = 16 * 32 * 64 * 4
  for sharding, extra in (("tp", {"block": 3 * bsh, "norm": 2 * bsh}),
                          ("fsdp", {"block": 2 * bsh / 8, "norm": bsh / 8})):
    mesh_index, selection = CASES[("block", sharding)]
    mesh_shape = strategies.mesh_shapes(CPU8, 8)[mesh_index]
    on = {c.platform: cost.build_cost_tables(block_graph, c, mesh=mesh_shape, prune=False,
                                             recompute=False) for c in (CPU8, gpu)}
    for name, sel in selection.items():
      cpu_layer, gpu_layer = on["cpu"].layer(name), on["gpu"].layer(name)
      k = _pick(cpu_layer, *sel)
      assert _pick(gpu_layer, *sel) == k
      assert cpu_layer.activation_bytes[k] - gpu_layer.activation_bytes[k] == extra[name]
      assert cpu_layer.state_bytes[k] == gpu_layer.state_bytes[k]


def test_gathers_whose_collectives_xla_decides_otherwise_are_not_offered():
  """A table split along its indexed dim on an axis that also splits the indices.

  With the table split over part of the mesh, XLA's partitioner groups the devices
  instead of gathering the table: the head's take_along_axis on vocabulary-split
  logits with sequence-split labels runs on collective-permutes and all-to-alls over
  the other axis; the embedding's gradient for sequence-split ids is all-reduced whole
  over both axes and then sliced; a vocabulary split over "dp" alone moves shards
  with collective-permutes; split over the whole mesh, with ids split along batch
  and sequence, the gradient is all-reduced whole over each axis. The rules cannot
  say that, so these candidates are left out. Split over the whole mesh, with ids
  split along one dim (FSDP over the vocabulary), it compiles as predicted (the
  ("gpt", "fsdp_vocab") case above).

  The same holds for the table's hidden dim split on an axis that also splits the
  ids (the sequence and the hidden dim on "tp"): XLA gathers the table instead of the
  ids and all-reduces its whole gradient. Only the hidden dim split over the whole
  mesh, with the batch over the same axes (the ("gpt", "fsdp") case), compiles as
  the rules say.
  """
  graph = _GRAPHS.setdefault("gpt", _graph(GPT))
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[2]
  tables = cost.build_cost_tables(graph, CPU8, mesh=mesh_shape, prune=False, recompute=False)
  embed, head = tables.layer("embed"), tables.layer("head")
  seq_ids = [("dp", "tp")]
  with pytest.raises(AssertionError, match="no candidate"):
    _pick(embed, {"embedding": ("tp",)}, seq_ids)  # vocabulary and sequence on "tp"
  with pytest.raises(AssertionError, match="no candidate"):
    _pick(embed, {"embedding": ("dp",)}, [("dp",)])  # vocabulary and batch on "dp"
  with pytest.raises(AssertionError, match="no candidate"):
    _pick(embed, {"embedding": ALL}, seq_ids)  # the whole mesh, ids split along two dims
  with pytest.raises(AssertionError, match="no candidate"):
    _pick(head, {"out/kernel": (None, "tp"), "ln/scale": R}, [seq_ids[0]] * 2)
  with pytest.raises(AssertionError, match="no candidate"):
    _pick(embed, {"embedding": (None, "tp")}, seq_ids)  # hidden and sequence on "tp"
  # What stays: the same layouts without the clash, and the whole-mesh splits.
  _pick(embed, {"embedding": ("tp",)}, [("dp",)])
  _pick(embed, {"embedding": (None, "tp")}, [("dp",)])
  _pick(embed, {"embedding": ALL}, [ALL])
  _pick(embed, {"embedding": (None, ALL[0])}, [ALL])
  _pick(head, {"out/kernel": (None, "tp"), "ln/scale": R}, [("dp",), ("dp",)])
  _pick(head, {"out/kernel": R, "ln/scale": R}, [seq_ids[0]] * 2)


def _batch_bytes(graph, tables, choice, mesh_shape):
  """Bytes per device of the batch leaves, split as their first reader takes them."""
  total = 0.0
  for inp in graph.inputs:
    if inp.role != "batch":
      continue
    layer = next(l for l in tables.layers if inp.value_id in l.input_ids)
    layout = layer.candidates[choice[layer.name]].input_layouts[
        layer.input_ids.index(inp.value_id)]
    total += inp.info.nbytes / strategies.shard_count(layout, mesh_shape.sizes)
  return total


# --- Analytic checks --------------------------------------------------------------------

class FusedAttention(nnx.Module):
  """Megatron's layer: one fused QKV projection [d, 3, heads, head_dim]."""

  def __init__(self, rngs, dim=64, heads=8):
    init = nnx.initializers.normal(0.02)
    self.qkv = nnx.Param(init(rngs.params(), (dim, 3, heads, dim // heads)))
    self.out = nnx.Param(init(rngs.params(), (heads, dim // heads, dim)))
    self.ln1, self.ln2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    qkv = jnp.einsum("bsd,dthk->bsthk", self.ln1(x), self.qkv[...])
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    p = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k), axis=-1)
    x = x + jnp.einsum("bhqs,bshk,hkd->bqd", p, v, self.out[...])
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class FusedModel(nnx.Module):

  def __init__(self, rngs, hook=_identity):
    self.layer, self.norm, self.hook = FusedAttention(rngs), nnx.LayerNorm(64, rngs=rngs), hook

  def __call__(self, batch):
    return jnp.mean((self.norm(self.hook("layer", self.layer(batch["x"]))) - batch["y"]) ** 2)


def test_megatron_layer_communicates_four_all_reduces_of_bsh():
  """Shoeybi et al. 2019, Sec. 3: two all-reduces forward, two backward, of b*s*h each."""
  b, s, h = 16, 32, 64
  _BATCHES[FusedModel] = {"x": jax.ShapeDtypeStruct((b, s, h), jnp.float32),
                          "y": jax.ShapeDtypeStruct((b, s, h), jnp.float32)}
  graph = _graph(FusedModel)
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[0]
  tables = cost.build_cost_tables(graph, CPU8, mesh=mesh_shape, prune=False, recompute=False)
  layer = tables.layer("layer")
  k = _pick(layer, {"qkv": (None, None, "dp"), "out": ("dp",), "up/kernel": (None, "dp"),
                    "down/kernel": ("dp",)}, [R])
  per_microbatch = [c for c in layer.candidates[k].comms if not c.per_step]
  assert [(c.kind, c.phase, c.count) for c in per_microbatch] == [
      ("all-reduce", "backward", 2), ("all-reduce", "forward", 2)]
  assert all(c.bytes == b * s * h * 4 for c in per_microbatch)
  choice = {"layer": k, "norm": _pick(tables.layer("norm"), {"scale": R}, [R, R])}
  compiled = _compile(FusedModel, graph, tables, choice, mesh_shape, pin_internal=False)
  got = hlo.by_axes(hlo.parse(compiled.as_text(), mesh_shape.as_dict()))
  assert got == {("all-reduce", ("dp",)): {"count": 4, "bytes": 4 * b * s * h * 4}}


def test_model_state_of_a_7_5b_model_in_mixed_precision():
  """ZeRO (Rajbhandari et al. 2020), Fig. 1: 7.5B params, Adam, 64 devices."""
  replicated = cost.model_state_bytes(7.5e9, "bfloat16")
  zero3 = cost.model_state_bytes(7.5e9, "bfloat16", shard_degree=64)
  assert replicated == pytest.approx(120e9)
  assert zero3 == pytest.approx(1.875e9)
  assert round(zero3 / 1e9, 1) == 1.9
  assert cost.MIXED_PRECISION_ADAM_BYTES_PER_PARAM == 16
  assert cost.model_state_bytes(1.0, "float32") == 16  # fp32: no master copy needed


def test_untraced_optimizer_state_follows_the_mixed_precision_count():
  """A loss-only step (no optimizer) gets AdamW's state: 12 bytes per fp32 param."""
  model, _ = _abstract(MLP)
  grad_step = lambda m, batch: nnx.grad(lambda m: m(batch))(m)
  graph = graph_lib.trace(grad_step, model, _BATCHES[MLP])
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[0]
  tables = cost.build_cost_tables(graph, CPU8, mesh=mesh_shape, prune=False, recompute=False)
  l1 = tables.layer("l1")
  k = _pick(l1, {"kernel": R, "bias": R}, [("dp",)])
  params = 32 * 64 + 64
  assert l1.state_bytes[k] == params * (4 + 8)


# --- Formulas ---------------------------------------------------------------------------

def test_collectives_pay_the_slowest_level_they_span():
  nvlink, ib = A100_2X8.levels
  nbytes = 1e8
  inside = cost.collective_time_s("all-reduce", nbytes, (8, 1), A100_2X8.levels)
  across = cost.collective_time_s("all-reduce", nbytes, (8, 2), A100_2X8.levels)
  ring = 2 * 7 / 8 * nbytes / nvlink.bandwidth_bytes_per_s + 2 * 7 * nvlink.latency_s
  assert inside == pytest.approx(ring)
  # Hierarchical: after a reduce-scatter inside the node, 1/8 of the data crosses IB.
  assert across == pytest.approx(ring + 2 * 0.5 * nbytes / 8 / ib.bandwidth_bytes_per_s
                                 + 2 * ib.latency_s)
  assert cost.collective_time_s("all-gather", nbytes, (8, 1), A100_2X8.levels) == \
      pytest.approx(ring / 2)
  assert cost.collective_time_s("all-reduce", nbytes, (1, 1), A100_2X8.levels) == 0
  assert cost.send_time_s(nbytes, 8, A100_2X8) == pytest.approx(
      nbytes / ib.bandwidth_bytes_per_s + ib.latency_s)
  assert cost.send_time_s(nbytes, 1, A100_2X8) < cost.send_time_s(nbytes, 8, A100_2X8)


def test_roofline_takes_the_slower_of_compute_and_memory():
  flops = np.array([1e12, 1e3])
  nbytes = np.array([1e3, 1e9])
  t = cost.roofline_time_s(flops, nbytes, ["bfloat16", "bfloat16"], A100_2X8)
  eff = A100_2X8.compute_efficiency
  assert t[0] == pytest.approx(1e12 / A100_2X8.peak_flops("bfloat16") / eff)
  # The FLOP efficiency scales compute only; memory-bound ops run at the bandwidth.
  assert t[1] == pytest.approx(1e9 / A100_2X8.memory_bandwidth_bytes_per_s)


def test_in_flight_micro_batches_per_schedule():
  assert [cost.microbatches_in_flight("gpipe", 8, 4, s) for s in range(4)] == [8] * 4
  assert [cost.microbatches_in_flight("1f1b", 8, 4, s) for s in range(4)] == [4, 3, 2, 1]
  assert [cost.microbatches_in_flight("1f1b", 2, 4, s) for s in range(4)] == [2, 2, 2, 1]
  with pytest.raises(ValueError, match="schedule='zb'; allowed: gpipe, 1f1b"):
    cost.microbatches_in_flight("zb", 8, 4, 0)


# --- CostTables -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def block_graph():
  if "block" not in _GRAPHS:
    _GRAPHS["block"] = _graph(BlockModel)
  return _GRAPHS["block"]


def test_pareto_pruning_keeps_every_undominated_candidate(block_graph):
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[2]
  full = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, prune=False)
  kept = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape)
  for lf, lk in zip(full.layers, kept.layers):
    assert 0 < len(lk.candidates) < len(lf.candidates) == lk.num_costed
    # With one micro-batch the solver sees a candidate's time (per micro-batch plus
    # per step) and its memory (state plus the larger of gradients and activations).
    vec = lambda l, k: np.array([l.microbatch_time_s[k] + l.step_time_s[k],
                                 l.state_bytes[k] + max(l.grad_bytes[k],
                                                        l.activation_bytes[k])])
    kept_names = {c.name for c in lk.candidates}
    for i, c in enumerate(lf.candidates):
      if c.name in kept_names:
        continue
      # A pruned candidate is dominated by a kept one with the same boundary layouts.
      assert any(np.all(vec(lk, j) <= vec(lf, i)) for j, d in enumerate(lk.candidates)
                 if d.boundary_key == c.boundary_key), c.name


def test_tables_scale_to_micro_batches_and_split_step_costs(block_graph):
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[2]
  one = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, prune=False)
  two = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, prune=False,
                               num_microbatches=2)
  assert two.microbatch_size == 8 and one.microbatch_size == 16
  a, b = one.layer("block"), two.layer("block")
  assert [c.name for c in a.candidates] == [c.name for c in b.candidates]
  for k in range(len(a.candidates)):
    assert b.state_bytes[k] == a.state_bytes[k]
    assert b.step_time_s[k] == pytest.approx(a.step_time_s[k], rel=1e-9)
    assert b.activation_bytes[k] < a.activation_bytes[k]
    assert b.microbatch_time_s[k] < a.microbatch_time_s[k]
  # Gradient accumulation keeps gradients next to the activations.
  m = two.memory_by_stage("block")[0][0]
  assert m == b.state_bytes[0] + b.grad_bytes[0] + 2 * b.activation_bytes[0]
  assert two.solver_time_s("block")[0] == pytest.approx(
      b.microbatch_time_s[0] + b.step_time_s[0] / 2)
  with pytest.raises(ValueError, match="global_batch=16 does not split into "
                     "num_microbatches=3"):
    cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, num_microbatches=3)


def test_backward_time_comes_from_the_traced_backward(block_graph):
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[0]
  tables = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, prune=False,
                                  recompute=False)
  layer = tables.layer("block")
  cand = layer.candidates[0]
  per_op = cost.roofline_time_s(cand.op_flops, cand.op_bytes, cand.op_dtype, CPU8)
  phase = np.array(cand.op_phase)
  comm = sum(cost.comm_time_s(c, mesh_shape, CPU8) * c.count for c in cand.comms
             if not c.per_step)
  assert layer.microbatch_time_s[0] == pytest.approx(
      per_op[phase == "forward"].sum() + per_op[phase == "backward"].sum() + comm)
  backward_flops = cand.op_flops[phase == "backward"].sum()
  forward_flops = cand.op_flops[phase == "forward"].sum()
  assert 1.5 < backward_flops / forward_flops < 2.5  # traced, not assumed


def test_edges_charge_resharding_both_ways(block_graph):
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[2]
  tables = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, num_stages=1)
  (edge,) = tables.edges
  src, dst = tables.layer(edge.src), tables.layer(edge.dst)
  assert edge.same_stage_s.shape == (len(src.candidates), len(dst.candidates))
  for a, cs in enumerate(src.candidates):
    for b, cd in enumerate(dst.candidates):
      if cs.output_layouts[0] == cd.input_layouts[0]:
        assert edge.same_stage_s[a, b] == 0
      assert edge.cross_stage_s[a, b] > edge.same_stage_s[a, b]
  assert np.any(edge.same_stage_s > 0)


def test_a_layer_that_fits_nowhere_is_reported_with_its_least_memory(block_graph):
  mesh_shape = strategies.mesh_shapes(CPU8, 8)[2]
  tables = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape,
                                  memory_limit_bytes=100_000)
  names = [n for n, _ in tables.over_limit]
  assert "block" in names
  least = dict(tables.over_limit)["block"]
  block = tables.layer("block")
  assert least == pytest.approx(min(m + t for m, t in zip(block.memory_bytes(1, False),
                                                          block.temp_bytes)))
  with pytest.raises(ValueError, match=r"'block' needs \d+\.\d\d GiB at least"):
    tables.check_memory()
  roomy = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape)
  assert roomy.over_limit == ()
  roomy.check_memory()


def test_stages_and_mesh_must_cover_the_cluster(block_graph):
  mesh_shape = strategies.mesh_shapes(CPU8, 4)[0]
  with pytest.raises(ValueError, match="num_stages=1 x 4 devices per stage"):
    cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape)
  tables = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, num_stages=2,
                                  num_microbatches=4, schedule="1f1b")
  by_stage = tables.memory_by_stage("block")
  assert len(by_stage) == 2 and all(x >= y for x, y in zip(*by_stage))


def test_predicted_collectives_count_sends_between_stages(block_graph):
  mesh_shape = strategies.mesh_shapes(CPU8, 4)[0]
  tables = cost.build_cost_tables(block_graph, CPU8, mesh=mesh_shape, num_stages=2,
                                  num_microbatches=4, prune=False, recompute=False)
  block, norm = tables.layer("block"), tables.layer("norm")
  choice = {"block": _pick(block, {"q/kernel": R}, [("dp",)]),
            "norm": _pick(norm, {"scale": R}, [("dp",), ("dp",)])}
  by_stage = cost.collectives_by_stage(tables, choice, {"block": 0, "norm": 1})
  activation = (16 // 4) * 32 * 64 * 4 / 4  # one micro-batch of [b, s, h] fp32, split over 4
  assert by_stage[0][("send", ("pp",))] == {"count": 4, "bytes": 4 * activation}
  assert by_stage[1][("send", ("pp",))] == {"count": 4, "bytes": 4 * activation}
  kinds = cost.predicted_collectives(tables, choice, {"block": 0, "norm": 1})
  assert kinds["send"] == 4 * activation
  assert kinds["all-reduce"] > 0


# --- Pipelined configurations: what the tables offer and how stacks group -------------


def _zoo_graph(name):
  from experiments import models as zoo  # pylint: disable=g-import-not-at-top
  model = zoo.create(name, "tiny", shape_only=True)
  batch = zoo.example_batch(name, "tiny", 8, shape_only=True)
  return graph_lib.trace(zoo.train_step(name), model, zoo.create_optimizer(model), batch)


def test_pipelined_tables_leave_out_outputs_split_from_parameters():
  """Llama's embedding may split its output over hidden ('dp=hidden') in a plain jit;
  in a pipeline XLA reshards that output more often than charged, so pipelined tables
  do not offer it (nor any candidate flagged `splits_new_dims`)."""
  graph = _zoo_graph("llama_7b")
  mesh8 = next(m for m in strategies.mesh_shapes(CPU8, 8) if m.as_dict() == {"dp": 8})
  mesh4 = next(m for m in strategies.mesh_shapes(CPU8, 4) if m.as_dict() == {"dp": 4})
  cache = {}
  plain = cost.build_cost_tables(graph, CPU8, mesh=mesh8, cache=cache)
  assert any(c.splits_new_dims for c in plain.layer("embed").candidates)
  for stages, micro, mesh in ((1, 2, mesh8), (2, 1, mesh4), (2, 2, mesh4)):
    for prune in (True, False):
      tables = cost.build_cost_tables(graph, CPU8, mesh=mesh, num_stages=stages,
                                      num_microbatches=micro, prune=prune, cache=cache)
      for layer in tables.layers:
        assert layer.candidates, layer.name
        assert not any(c.splits_new_dims for c in layer.candidates), (layer.name, stages)
      for edge in tables.edges:  # the edge tables follow the kept candidates
        assert edge.same_stage_s.shape == (len(tables.layer(edge.src).candidates),
                                           len(tables.layer(edge.dst).candidates))


def test_stack_keys_group_layers_as_apply_groups_calls():
  """T5's first and second decoder blocks differ in signature (autodiff attributes the
  accumulation of the encoder output's cotangent to the first), but run the same
  forward over the same parameters: one kind of stacks in apply, one stack key here.
  The encoder's and the decoder's position biases compute different things."""
  graph = _zoo_graph("t5_large")
  layer = {l.name: l for l in graph.layers}
  d0, d1 = layer["decoder_blocks/0"], layer["decoder_blocks/1"]
  assert d0.signature != d1.signature
  assert cost.stack_key(d0) == cost.stack_key(d1)
  assert cost.stack_key(layer["encoder_blocks/0"]) == cost.stack_key(layer["encoder_blocks/1"])
  assert cost.stack_key(d0) != cost.stack_key(layer["encoder_blocks/0"])
  assert (cost.stack_key(layer["encoder_position_bias"])
          != cost.stack_key(layer["decoder_position_bias"]))
