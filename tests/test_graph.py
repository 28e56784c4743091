"""Tests of uniap_jax.graph: tracing train steps into layer graphs, on shapes only."""

import collections
import re
import warnings

from flax import nnx
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _toy_models as toy
from uniap_jax import graph as graphlib

F32 = jnp.float32
LM_LAYERS = ["embed", "blocks/0", "blocks/1", "blocks/2", "norm", "head"]
# The calls jax.make_jaxpr leaves in a jaxpr that the tracer inlines.
CALLS = {"jit", "pjit", "closed_call", "custom_jvp_call", "custom_vjp_call", "checkpoint",
         "remat2"}


def _spec(*shape, dtype=F32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _count_equations(jaxpr) -> int:
  """Equations after inlining calls; loops and conditionals count once."""
  total = 0
  for eqn in jaxpr.eqns:
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if eqn.primitive.name in CALLS and sub is not None:
      total += _count_equations(sub.jaxpr if isinstance(sub, jex_core.ClosedJaxpr) else sub)
    else:
      total += 1
  return total


def _lm_step_graph(**model_kwargs):
  model = toy.abstract_model(toy.TinyTransformer, **model_kwargs)
  optimizer = toy.abstract_optimizer(model)
  return graphlib.trace(toy.nnx_train_step(toy.lm_loss), model, optimizer, toy.lm_batch())


@pytest.fixture(scope="module")
def lm_graph():
  return _lm_step_graph()


def _xla_flops(fn, *args):
  lowered = jax.jit(fn).lower(*args)
  costs = [lowered.cost_analysis(), lowered.compile().cost_analysis()]
  costs = [c[0] if isinstance(c, list) else c for c in costs]  # a list in some versions
  return costs[0]["flops"], costs[1]["flops"], costs[1].get("transcendentals", 0.0)


# ---------------------------------------------------------------------------
# Layers, ops, FLOPs


def test_nnx_mlp_layers_params_and_matmul_flops():
  batch, din, dh, dout = 5, 8, 16, 4
  model = toy.abstract_model(toy.Mlp, din=din, dhidden=dh, dout=dout)
  graph = graphlib.trace(lambda m, x: m(x), model, _spec(batch, din))
  assert [l.name for l in graph.layers] == ["fc1", "fc2"]
  assert [l.module_type for l in graph.layers] == ["Linear", "Linear"]
  fc1, fc2 = graph.layers
  dots = [op for op in fc1.ops if op.primitive == "dot_general"]
  assert len(dots) == 1
  assert dots[0].kind == "dot_general"
  assert dots[0].param("dimension_numbers") == (((1,), (0,)), ((), ()))
  assert dots[0].flops == 2 * batch * din * dh
  assert dots[0].bytes_accessed == 4 * (batch * din + din * dh + batch * dh)
  # fc1: matmul, bias add, and the relu its caller applies (attributed by dataflow).
  assert fc1.flops == 2 * batch * din * dh + batch * dh + batch * dh
  assert fc2.flops == 2 * batch * dh * dout + batch * dout
  assert [p.path for p in fc1.params] == ["fc1/bias", "fc1/kernel"]
  assert fc1.param_bytes == 4 * (din * dh + dh)
  assert all(op.phase == "forward" for l in graph.layers for op in l.ops)
  assert fc1.backward_flops == fc1.optimizer_flops == fc1.activation_bytes == 0
  assert [(e.src, e.dst, e.tensors) for e in graph.edges] == [
      ("fc1", "fc2", (graphlib.TensorInfo(shape=(batch, dh), dtype="float32"),))]
  assert graph.batch_size == batch and graph.batch_argnums == (1,)
  # Concrete arguments trace the same way, on their shapes.
  concrete = toy.Mlp(din, dh, dout, rngs=nnx.Rngs(0))
  again = graphlib.trace(lambda m, x: m(x), concrete, jnp.zeros((batch, din)))
  assert [l.signature for l in again.layers] == [l.signature for l in graph.layers]


def test_conv_flops_and_dimension_numbers():
  conv = nnx.eval_shape(lambda: nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0)))
  with pytest.warns(UserWarning, match="one layer"):
    graph = graphlib.trace(lambda m, x: m(x), conv, _spec(2, 10, 10, 3))
  (op,) = [op for op in graph.layers[0].ops if op.kind == "conv"]
  assert op.flops == 2 * (2 * 10 * 10 * 8) * (3 * 3 * 3)
  lhs, rhs, out = op.param("dimension_numbers")
  assert lhs == out == (0, 3, 1, 2) and rhs == (3, 2, 0, 1)  # NHWC, HWIO
  assert op.param("window_strides") == (1, 1) and op.param("feature_group_count") == 1
  assert op.param("padding") == ((1, 1), (1, 1))


def test_train_step_layers_phases_and_optimizer_attribution(lm_graph):
  assert [l.name for l in lm_graph.layers] == LM_LAYERS
  assert [l.index for l in lm_graph.layers] == list(range(len(LM_LAYERS)))
  for layer in lm_graph.layers:
    phases = {op.phase for op in layer.ops}
    assert phases == {"forward", "backward", "optimizer"}, layer.name
    ranks = [("forward", "backward", "optimizer").index(op.phase) for op in layer.ops]
    assert ranks == sorted(ranks), f"{layer.name}: ops are not forward first"
    assert layer.flops > 0 and layer.backward_flops > 0 and layer.optimizer_flops > 0
  for name in ("blocks/0", "blocks/1", "blocks/2"):
    block = lm_graph.layer(name)
    dots = collections.Counter(op.phase for op in block.ops if op.primitive == "dot_general")
    # 6 projections and 2 attention einsums; each has two gradients.
    assert dots == {"forward": 8, "backward": 16}
    assert {op.module.split("/")[2] for op in block.forward_ops() if op.kind == "dot_general"
            and op.module.count("/") >= 2} == {"attn", "mlp"}
  # Every parameter belongs to exactly one layer, the one whose module holds it; its
  # update is computed by that layer's optimizer ops, from that layer's moments.
  owned = [p.path for l in lm_graph.layers for p in l.params]
  params = [i.path for i in lm_graph.inputs if i.role == "param"]
  assert sorted(owned) == sorted(params)
  assert lm_graph.layer("embed").params[0].path == "embed/embedding"
  assert "pos" in [p.path for p in lm_graph.layer("embed").params]  # a root parameter
  for layer in lm_graph.layers:
    produced = {o for op in layer.optimizer_ops() for o in op.out_ids}
    for p in layer.params:
      assert p.updated_id in produced, p.path
      if p.path.startswith("blocks/"):
        assert p.path.startswith(layer.name + "/")
    suffixes = {s.path.split("/", 3)[-1] for s in layer.optimizer_state
                if "/mu/" in s.path or "/nu/" in s.path}
    assert suffixes == {p.path for p in layer.params}, layer.name
  block = lm_graph.layer("blocks/1")
  assert "blocks/1/mlp/up/kernel" in [p.path for p in block.params]
  assert block.param_bytes == sum(p.info.nbytes for p in block.params)
  assert block.optimizer_state_bytes == 2 * block.param_bytes
  # The global step counts (optax's and nnx.Optimizer's) are somewhere, exactly once.
  counts = [s.path for l in lm_graph.layers for s in l.optimizer_state if "/mu/" not in s.path
            and "/nu/" not in s.path]
  assert sorted(counts) == ["opt_state/0/count", "step"]


def test_layers_partition_the_program():
  model = toy.abstract_model(toy.TinyTransformer)
  optimizer = toy.abstract_optimizer(model)
  step = toy.nnx_train_step(toy.lm_loss)
  graph = graphlib.trace(step, model, optimizer, toy.lm_batch())
  fresh_model = toy.abstract_model(toy.TinyTransformer)  # make_jaxpr leaks tracers into it
  jaxpr = jax.make_jaxpr(step)(fresh_model, toy.abstract_optimizer(fresh_model), toy.lm_batch())
  indices = sorted(op.index for l in graph.layers for op in l.ops)
  assert indices == list(range(_count_equations(jaxpr.jaxpr)))


def test_identical_blocks_share_a_signature_and_others_do_not(lm_graph):
  sigs = {l.name: l.signature for l in lm_graph.layers}
  assert sigs["blocks/0"] == sigs["blocks/1"] == sigs["blocks/2"]
  assert len(set(sigs.values())) == 4
  wider = _lm_step_graph(hidden=(64, 64, 96))
  wide_sigs = {l.name: l.signature for l in wider.layers}
  assert wide_sigs["blocks/0"] == wide_sigs["blocks/1"] != wide_sigs["blocks/2"]
  assert wide_sigs["blocks/0"] == sigs["blocks/0"]  # independent of value ids elsewhere


def test_flops_match_xla_cost_analysis():
  model = toy.abstract_model(toy.TinyTransformer, vocab=128, dim=64, hidden=(256, 256),
                             seq_len=16)
  optimizer = toy.abstract_optimizer(model)
  batch = toy.lm_batch(4, 16)
  step = toy.nnx_train_step(toy.lm_loss)
  graph = graphlib.trace(step, model, optimizer, batch)
  ours = sum(l.flops + l.backward_flops + l.optimizer_flops for l in graph.layers)
  ours_transcendentals = sum(op.transcendentals for l in graph.layers for op in l.ops)

  # jax.jit drops in-place NNX updates it does not return: return the new state.
  def functional(m, o, b):
    return step(m, o, b), nnx.state(m), nnx.state(o)

  unoptimized, compiled, transcendentals = _xla_flops(functional, model, optimizer, batch)
  assert ours == pytest.approx(compiled, rel=0.05)
  assert ours == pytest.approx(unoptimized, rel=0.02)  # same HLO before XLA's rewrites
  assert ours_transcendentals == pytest.approx(transcendentals, rel=0.05)


@pytest.mark.parametrize("fn, args", [
    (lambda x: jax.nn.gelu(x), (_spec(16, 64),)),
    (lambda x: jax.nn.softmax(x, axis=-1), (_spec(16, 64),)),
    (lambda x: jnp.sum(x, axis=1), (_spec(16, 64),)),
    (lambda x, w: jnp.einsum("bij,bjk->bik", x, w), (_spec(3, 4, 5), _spec(3, 5, 6))),
])
def test_per_op_flops_match_xla(fn, args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # one layer
    graph = graphlib.trace(fn, *args, batch_argnums=0)
  unoptimized, compiled, _ = _xla_flops(fn, *args)
  assert graph.layers[0].flops == pytest.approx(compiled, rel=0.01)


# ---------------------------------------------------------------------------
# Other front ends


def test_linen_train_step():
  model = toy.LinenModel()
  x, y = _spec(4, 8), _spec(4, 4)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  tx = optax.adamw(1e-3)
  opt_state = jax.eval_shape(tx.init, params)
  graph = graphlib.trace(toy.linen_train_step(model, tx), params, opt_state, {"x": x, "y": y})
  assert [l.name for l in graph.layers] == ["inp", "block_0", "block_1", "out"]
  assert [p.path for p in graph.layer("block_1").params] == [
      "params/block_1/Dense_0/bias", "params/block_1/Dense_0/kernel",
      "params/block_1/Dense_1/bias", "params/block_1/Dense_1/kernel"]
  roles = collections.Counter((i.arg_index, i.role) for i in graph.inputs)
  assert roles == {(0, "param"): 12, (1, "optimizer_state"): 25, (2, "batch"): 2}
  # The functional step returns new params: they are its updates.
  assert all(p.updated_id >= 0 for l in graph.layers for p in l.params)
  assert graph.layer("block_0").signature == graph.layer("block_1").signature
  assert {op.phase for op in graph.layer("out").ops} == {"forward", "backward", "optimizer"}


def test_plain_function_named_scopes_are_layers():
  params, x = toy.plain_params(), _spec(4, 8)
  graph = graphlib.trace(jax.grad(toy.plain_scoped), params, x)
  assert [l.name for l in graph.layers] == ["first", "second", "third"]
  assert [(e.src, e.dst) for e in graph.edges] == [("first", "second"), ("second", "third")]
  assert [p.path for p in graph.layer("second").params] == ["w2"]
  assert all(l.backward_flops > 0 for l in graph.layers)


def _nested_scopes(x):
  with jax.named_scope("model"):
    with jax.named_scope("p"):
      x = jnp.tanh(x)
    with jax.named_scope("q"):
      x = jnp.tanh(x)
  return x.sum()


def _scopes_and_loss(x):
  with jax.named_scope("a"):
    x = jnp.tanh(x)
  with jax.named_scope("b"):
    with jax.named_scope("x"):
      x = jnp.tanh(x)
    with jax.named_scope("y"):
      x = jnp.tanh(x)
  with jax.named_scope("loss"):
    return x.sum()


@pytest.mark.parametrize("fn, layers", [
    (_nested_scopes, ["p", "q"]),  # a single root scope is expanded and left out of names
    (_scopes_and_loss, ["a", "b/x", "b/y", "loss"]),  # the one scope with sub-scopes
])
def test_nested_named_scopes(fn, layers):
  graph = graphlib.trace(jax.grad(fn), _spec(3))
  assert [l.name for l in graph.layers] == layers


def test_plain_function_without_scopes_is_one_layer_with_a_warning():
  params, x = toy.plain_params(), _spec(4, 8)
  with pytest.warns(UserWarning, match=r"plain_unscoped .* one layer .*named_scope"):
    graph = graphlib.trace(toy.plain_unscoped, params, x)
  assert [l.name for l in graph.layers] == ["plain_unscoped"]
  assert sum(op.kind == "dot_general" for op in graph.layers[0].ops) == 3


def test_encoder_output_is_a_skip_edge_to_every_decoder_layer():
  model = toy.abstract_model(toy.Seq2Seq, depth=3)
  graph = graphlib.trace(toy.nnx_train_step(toy.seq2seq_loss), model, toy.abstract_optimizer(model),
                   toy.seq2seq_batch())
  names = [l.name for l in graph.layers]
  assert names == ["embed", "encoder/blocks/0", "encoder/blocks/1", "encoder/blocks/2",
                   "encoder/norm", "embed@1", "decoder/blocks/0", "decoder/blocks/1",
                   "decoder/blocks/2", "decoder/norm", "head"]
  from_encoder = [e for e in graph.edges if e.src == "encoder/norm"]
  assert [e.dst for e in from_encoder] == [f"decoder/blocks/{i}" for i in range(3)]
  memory = {e.value_ids for e in from_encoder}
  assert len(memory) == 1  # the same tensor, not a chain
  assert from_encoder[0].tensors == (graphlib.TensorInfo(shape=(2, 8, 32), dtype="float32"),)
  index = {n: i for i, n in enumerate(names)}
  assert all(index[e.src] < index[e.dst] for e in graph.edges)
  assert [(e.src, e.dst) for e in graph.edges] == sorted(
      ((e.src, e.dst) for e in graph.edges), key=lambda sd: (index[sd[0]], index[sd[1]]))
  assert graph.layer("embed@1").params == ()  # the shared table belongs to the first call


# ---------------------------------------------------------------------------
# Tensors, inputs, activations


def test_inputs_roles_ids_and_types(lm_graph):
  assert [i.value_id for i in lm_graph.inputs] == list(range(len(lm_graph.inputs)))
  roles = collections.Counter((i.arg_index, i.role) for i in lm_graph.inputs)
  num_params = sum(1 for _ in jax.tree.leaves(nnx.state(toy.abstract_model(toy.TinyTransformer),
                                                        nnx.Param)))
  assert roles[(0, "param")] == num_params
  assert roles[(1, "optimizer_state")] == 2 * num_params + 2  # mu, nu, two counts
  assert roles[(2, "batch")] == 2
  assert lm_graph.batch_argnums == (2,) and lm_graph.batch_size == 2
  for i in lm_graph.inputs:
    assert lm_graph.tensor(i.value_id) == i.info
  embed = lm_graph.inputs[[i.path for i in lm_graph.inputs].index("embed/embedding")].info
  assert embed == graphlib.TensorInfo(shape=(64, 32), dtype="float32")
  for layer in lm_graph.layers:
    for op in layer.ops:
      for i, t in zip(op.in_ids + op.out_ids, op.in_types + op.out_types):
        if i >= 0:
          assert lm_graph.tensor(i) == t
  assert len(lm_graph.output_ids) == 1 and lm_graph.tensor(lm_graph.output_ids[0]).shape == ()


def test_activation_bytes_are_forward_values_the_backward_reads(lm_graph):
  for layer in lm_graph.layers:
    forward_values = {o for op in layer.forward_ops() for o in op.out_ids}
    bound = sum(lm_graph.tensor(i).nbytes for i in forward_values | set(layer.input_ids))
    assert 0 < layer.activation_bytes <= bound, layer.name
    read_by_backward = {i for op in layer.backward_ops() for i in op.in_ids}
    assert set(layer.activation_ids) <= read_by_backward
    assert layer.activation_bytes == sum(lm_graph.tensor(i).nbytes for i in layer.activation_ids)
  # The embedding's backward (a scatter-add) keeps only the token ids.
  assert lm_graph.layer("embed").activation_bytes == 2 * 8 * 4
  block = lm_graph.layer("blocks/0")
  assert block.activation_bytes > block.param_bytes / 10
  assert block.input_ids and block.output_ids


def test_rematerialised_blocks_keep_only_their_inputs():
  class Stack(nnx.Module):
    def __init__(self, remat, rngs):
      self.remat = remat
      self.blocks = nnx.List([toy.Block(32, 4, 64, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
      for block in self.blocks:
        x = nnx.remat(lambda b, v: b(v))(block, x) if self.remat else block(x)
      return x.sum()

  x = _spec(2, 8, 32)
  graphs = [graphlib.trace(lambda m, x: nnx.grad(lambda m: m(x))(m),
                           nnx.eval_shape(lambda: Stack(remat, nnx.Rngs(0))), x)
            for remat in (False, True)]
  plain, remat = (g.layer("blocks/0") for g in graphs)
  assert remat.activation_ids == remat.input_ids == (graphs[1].inputs[-1].value_id,)
  assert remat.activation_bytes == 2 * 8 * 32 * 4 < plain.activation_bytes
  # The recomputation runs in the backward pass (the forward pass no longer computes the
  # derivatives' factors ahead either).
  assert remat.flops <= plain.flops
  assert remat.flops + remat.backward_flops > plain.flops + plain.backward_flops


def test_jitted_steps_are_traced_through():
  model = toy.abstract_model(toy.TinyTransformer)
  optimizer = toy.abstract_optimizer(model)
  graph = graphlib.trace(nnx.jit(toy.nnx_train_step(toy.lm_loss)), model, optimizer,
                         toy.lm_batch())
  assert [l.name for l in graph.layers] == LM_LAYERS
  assert len({graph.layer(f"blocks/{i}").signature for i in range(3)}) == 1


# ---------------------------------------------------------------------------
# Loops and calls


def test_scan_while_and_cond_are_single_ops_with_body_costs():
  n, trips = 8, 5
  matmul_flops = 2 * n * n * n

  def fn(x):
    with jax.named_scope("loops"):
      y = jax.lax.scan(lambda c, _: (c @ c, None), x, length=trips)[0]
      y = jax.lax.cond(y.sum() > 0, lambda a: a @ a, lambda a: a + 1.0, y)
      z = jax.lax.while_loop(lambda c: c[1] < c[0].sum(), lambda c: (c[0] @ c[0], c[1] + 1.0),
                             (y, 0.0))[0]
    return z

  with pytest.warns(UserWarning, match="while loop .* body is costed once"):
    graph = graphlib.trace(fn, _spec(n, n))
  ops = {op.primitive: op for op in graph.layers[0].ops}
  assert ops["scan"].flops == trips * matmul_flops
  assert ops["cond"].flops == matmul_flops  # the costlier branch
  assert matmul_flops <= ops["while"].flops < 2 * matmul_flops
  assert ops["scan"].param("length") == trips


def test_calls_are_inlined_into_primitives():
  @jax.custom_vjp
  def f(x):
    return jnp.sin(x)

  f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (c * g,))

  def loss(x):
    with jax.named_scope("a"):
      x = jax.jit(lambda v: v * 2.0)(x)
      x = jax.checkpoint(lambda v: jnp.tanh(v) @ v)(x)
    with jax.named_scope("b"):
      return f(x).sum()

  graph = graphlib.trace(jax.grad(loss), _spec(4, 4))
  prims = {op.primitive for l in graph.layers for op in l.ops}
  assert not prims & CALLS
  assert {"mul", "tanh", "dot_general", "sin"} <= prims
  assert [l.name for l in graph.layers] == ["a", "b"]


# ---------------------------------------------------------------------------
# The caller's objects, the summary


def test_trace_leaves_arguments_and_classes_untouched():
  model = toy.abstract_model(toy.TinyTransformer)
  optimizer = toy.abstract_optimizer(model)
  before = jax.tree_util.tree_structure((model, optimizer))
  call = nnx.Linear.__dict__["__call__"]
  graphlib.trace(toy.nnx_train_step(toy.lm_loss), model, optimizer, toy.lm_batch())
  assert jax.tree_util.tree_structure((model, optimizer)) == before
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((model, optimizer)))
  assert nnx.Linear.__dict__["__call__"] is call
  assert not any(hasattr(m, "_uniap_jax_module_path") for _, m in nnx.iter_modules(model))


def test_summary_lists_every_layer_and_totals(lm_graph):
  text = lm_graph.summary()
  lines = text.splitlines()
  assert lines[0].startswith("LayerGraph: 6 layers of 4 kinds, 5 edges, batch 2")
  assert len(lines) == 2 + len(lm_graph.layers) + 1
  for layer, line in zip(lm_graph.layers, lines[2:]):
    assert line.split()[:3] == [str(layer.index), layer.name, layer.module_type]
  assert lines[-1].split()[0] == "total"
  assert re.search(r"\b29\.\d\dK\b", lines[-1])  # parameters of the default toy model


# ---------------------------------------------------------------------------
# Bad input


class _NotAPytree(nnx.Module, pytree=False):

  def __call__(self, x):
    return x


def _branchy(params, x):
  y = x @ params["w1"]
  if y.sum() > 0:
    return y.sum()
  return -y.sum()


def _int_of_array(params, x):
  return x[: int(params["w1"][0, 0])].sum()


@pytest.mark.parametrize("fn, args, kwargs, error, match", [
    (_branchy, (toy.plain_params(), _spec(4, 8)), {}, TypeError,
     r"_branchy at .*test_graph\.py:\d+ converts an array to a Python bool.*jax\.lax\.cond"),
    (_int_of_array, (toy.plain_params(), _spec(4, 8)), {}, TypeError,
     r"_int_of_array .*argument 0, leaf 'w1'"),
    (toy.plain_scoped, (toy.plain_params(), {"x": _spec(4, 8), "name": "hello"}), {}, TypeError,
     r"argument 1, leaf 'name', is not an array: str"),
    (toy.plain_scoped, ({"w1": object()}, _spec(4, 8)), {}, TypeError,
     r"argument 0, leaf 'w1', is not an array: object"),
    (toy.plain_scoped, (toy.plain_params(), {"a": _spec(4, 8), "b": _spec(3, 8)}), {}, ValueError,
     r"disagree on the batch size .*3 for argument 1, leaf 'b'; 4 for argument 1, leaf 'a'"),
    (toy.plain_scoped, (toy.plain_params(), _spec(4, 8)), {"batch_argnums": 2}, ValueError,
     r"batch_argnums=2 is out of range for 2 example argument"),
    (toy.plain_scoped, (toy.plain_params(), _spec(4, 8)), {"batch_argnums": "x"}, TypeError,
     r"batch_argnums must hold ints"),
    (toy.plain_scoped, (toy.plain_params(), _spec()), {}, ValueError,
     r"argument 1 is a scalar; every batch leaf needs a leading batch dimension"),
    (toy.plain_scoped, (), {}, TypeError, r"needs the step's example arguments"),
    ("not a function", (_spec(4),), {}, TypeError, r"step_fn must be callable"),
    (lambda m, x: m(x), (_NotAPytree(), _spec(3, 2)), {}, TypeError,
     r"argument 0 is an NNX module that is not a pytree \(_NotAPytree, pytree=False\)"),
])
def test_bad_input_is_a_clear_error(fn, args, kwargs, error, match):
  with pytest.raises(error, match=match):
    graphlib.trace(fn, *args, **kwargs)


def test_batch_argnums_picks_the_batch():
  params, x = toy.plain_params(), _spec(4, 8)
  graph = graphlib.trace(toy.plain_scoped, params, x, batch_argnums=-1)
  assert graph.batch_argnums == (1,) and graph.batch_size == 4
  graph = graphlib.trace(lambda x, params: toy.plain_scoped(params, x), x, params, batch_argnums=0)
  assert [i.role for i in graph.inputs] == ["batch", "param", "param", "param"]


def test_graph_types_validate():
  info = graphlib.TensorInfo(shape=(2, 3), dtype="bfloat16")
  assert info.nbytes == 12 and info.size == 6
  with pytest.raises(ValueError, match="in_ids but"):
    graphlib.Op(primitive="add", kind="elementwise", phase="forward", in_ids=(1,), out_ids=(),
                in_types=(), out_types=())
  with pytest.raises(ValueError, match="kind='matmul'"):
    graphlib.Op(primitive="dot", kind="matmul", phase="forward", in_ids=(), out_ids=(),
                in_types=(), out_types=())


# ---------------------------------------------------------------------------
# The model zoo


def _unique_names(names):
  seen = collections.Counter()
  out = []
  for n in names:
    out.append(f"{n}@{seen[n]}" if seen[n] else n)
    seen[n] += 1
  return out


@pytest.mark.parametrize("name", ["bert_huge", "t5_large", "vit_huge", "swin_huge", "llama_7b",
                                  "gpt2", "llama_70b"])
def test_zoo_tiny_models(name):
  models = pytest.importorskip("experiments.models")
  model = models.create(name, "tiny", shape_only=True)
  batch = models.example_batch(name, "tiny", 2, shape_only=True)
  graph = graphlib.trace(models.train_step(name), model, models.create_optimizer(model), batch)
  assert [l.name for l in graph.layers] == _unique_names(model.layer_names())
  assert sum(p.info.size for l in graph.layers for p in l.params) == models.count_params(model)
  blocks = [l for l in graph.layers if l.name.startswith("blocks/")]
  if name != "swin_huge":  # Swin's stages differ in shape
    assert len({l.signature for l in blocks}) <= 1
  if name == "t5_large":
    assert [e.dst for e in graph.edges if e.src == "encoder_norm"] == [
        "decoder_blocks/0", "decoder_blocks/1"]


def test_llama_7b_traces_on_shapes():
  models = pytest.importorskip("experiments.models")
  model = models.create("llama_7b", "paper", shape_only=True)
  batch = models.example_batch("llama_7b", "paper", 8, shape_only=True)
  graph = graphlib.trace(models.train_step("llama_7b"), model, models.create_optimizer(model), batch)
  assert len(graph.layers) == 35 and graph.batch_size == 8
  assert len({l.signature for l in graph.layers[1:33]}) == 1
  num_params = sum(p.info.size for l in graph.layers for p in l.params)
  assert num_params == pytest.approx(6738e6, rel=0.005)
  tokens = 8 * 2048
  forward = sum(l.flops for l in graph.layers)
  # 2 FLOPs per parameter and token in the matmuls, plus attention's 4 * seq * dim per
  # token and layer (scores and weighted sum, causal mask not exploited).
  expected = 2 * (num_params - 32000 * 4096) * tokens + 4 * 2048 * 4096 * 32 * tokens
  assert forward == pytest.approx(expected, rel=0.02)
  assert sum(l.backward_flops for l in graph.layers) == pytest.approx(2 * forward, rel=0.02)


# --- replaying the traced program ------------------------------------------------------------


def test_replaying_every_equation_reproduces_the_step():
  """trace_program's equations, run in op order on real leaves, give the step's results."""
  model = toy.TinyTransformer(hidden=(64, 48), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  batch = {"tokens": jnp.arange(16).reshape(2, 8) % 64, "labels": jnp.ones((2, 8), jnp.int32)}
  step = toy.nnx_train_step(toy.lm_loss)
  graph, equations = graphlib.trace_program(step, model, optimizer, batch)
  assert graph == graphlib.trace(step, model, optimizer, batch)
  ops = sorted((op for l in graph.layers for op in l.ops), key=lambda o: o.index)
  assert [op.index for op in ops] == list(range(len(equations)))
  leaves = (jax.tree.leaves(nnx.state(model)) + jax.tree.leaves(nnx.state(optimizer))
            + jax.tree.leaves(batch))
  assert len(leaves) == len(graph.inputs)
  env = jax.jit(lambda v: graphlib.replay(equations, range(len(equations)), v))(
      dict(enumerate(leaves)))
  loss = step(model, optimizer, batch)  # updates model and optimizer in place
  assert float(env[graph.output_ids[0]]) == pytest.approx(float(loss), rel=1e-6)
  new_leaves = jax.tree.leaves(nnx.state(model)) + jax.tree.leaves(nnx.state(optimizer))
  updated = [p for p in graph.inputs if p.updated_id >= 0]
  assert updated
  for p in updated:
    np.testing.assert_allclose(env[p.updated_id], new_leaves[p.value_id], rtol=1e-5, atol=1e-6)
