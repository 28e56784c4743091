"""Solver-chosen plans at pp=1: the applied step compiles the collectives the plan predicts.

tests/test_apply.py checks hand-pinned plans; here `uniap_jax.plan` chooses the
strategies of the toy GPT and MLP (tests/_toy_models.py) on the "cpu-8" cluster, for
batch sizes and widths that make it choose different candidates (replicated, a
sequence-split embedding feeding FSDP blocks, Megatron tensor parallelism, Megatron
with sequence parallelism, FSDP over both axes). Each plan is applied and compiled;
the collectives in `compiled.as_text()` are compared with `plan.predicted.collectives`
(kinds equal, bytes within 1%) and one step's loss, gradients and parameters with one
device. Cases XLA still compiles differently are strict xfails that say why.

A plan from the search pins parameters, the batch and each layer's output. What the
cost model also assumed, and apply pins when the plan names it
(`activation_specs` keys, see `uniap_jax.apply._pins.Pins`):
  - "dst<-src": the layout in which the consumer's candidate takes a boundary value
    whose two sides differ, so that XLA reshards it at the edge, as charged, instead
    of carrying the producer's layout into the consumer;
  - a submodule path ("blocks/0/attn/q"): the output of that call inside a layer, as
    the layer's candidate lays it out (`strategies.value_layouts`); "path<-" the
    argument such a call takes from its caller's own code (the attention's context
    entering attn/o), "path<-src" one from call src laid out otherwise.
  - "param path@gathered": the layout to which a candidate gathers a parameter
    stored split (FSDP) before use, pinned where its module reads it, so that the
    backward reuses the gathered copy instead of gathering it again.
The search derives them from the cost tables (`uniap_jax.search._pins`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import uniap_jax
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import hlo
from uniap_jax import strategies
from uniap_jax.apply import _mesh

import _toy_models as toy

CLUSTER = "cpu-8"
LOSS_RTOL = 1e-4
GRAD_RTOL = PARAM_RTOL = 1e-4
BYTES_RTOL = 0.01


# --- cases ------------------------------------------------------------------------------

def mlp_loss(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


@dataclasses.dataclass(frozen=True)
class Case:
  batch_size: int
  memory_limit_bytes: float | None = None
  model: tuple = ()  # TinyTransformer keyword arguments, as pairs
  mlp: tuple[int, int] | None = None  # (width, hidden) of a toy Mlp instead of the GPT


CASES = {
    # Small enough that the planner keeps everything replicated: no collective at all.
    "replicated": Case(batch_size=8),
    # The embedding splits batch and sequence over dp, hidden over tp; the blocks are
    # FSDP over dp (batch and hidden) and take the embedding's output unsplit over tp.
    "seq-embed-fsdp": Case(batch_size=64),
    # Megatron over all 8 devices (the axis is named "dp"): fc1 split by columns
    # ("dp=kernel:1"), fc2 by rows ("dp=hidden"), one all-reduce of the output.
    "mlp-megatron": Case(batch_size=16, mlp=(64, 1024)),
    # Megatron over tp with sequence parallelism in the blocks ("tp=attn.k:1,down:0,
    # seq"), FSDP over dp; the norm and head split the sequence over tp.
    "megatron-seq": Case(batch_size=16,
                         model=(("dim", 128), ("hidden", (512, 512)), ("seq_len", 32),
                                ("heads", 8))),
    # FSDP over both axes (blocks "dp=batch,attn.k:1 tp=batch,down:0", the embedding
    # table's rows over both), the batch over both, the head's kernel split over dp.
    "fsdp-2d": Case(batch_size=256),
}


def make_model(case):
  if case.mlp is not None:
    width, hidden = case.mlp
    return toy.Mlp(width, hidden, width, rngs=nnx.Rngs(0))
  return toy.TinyTransformer(rngs=nnx.Rngs(0), **dict(case.model))


def make_state(case):
  model = make_model(case)
  optimizer = nnx.Optimizer(model, optax.adamw(toy.LEARNING_RATE, weight_decay=toy.WEIGHT_DECAY),
                            wrt=nnx.Param)
  return model, optimizer


def make_batch(case):
  rng = np.random.default_rng(0)
  if case.mlp is not None:
    width = case.mlp[0]
    return {"x": jnp.asarray(rng.normal(size=(case.batch_size, width)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(case.batch_size, width)), jnp.float32)}
  seq = dict(case.model).get("seq_len", 8)
  vocab = dict(case.model).get("vocab", 64)
  ids = rng.integers(0, vocab, (case.batch_size, seq + 1))
  return {"tokens": jnp.asarray(ids[:, :-1], jnp.int32),
          "labels": jnp.asarray(ids[:, 1:], jnp.int32)}


def step_of(case):
  return toy.nnx_train_step(mlp_loss if case.mlp is not None else toy.lm_loss)


@functools.cache
def planned(name):
  """The solver's plan for a case, with its cost tables and chosen candidate indices."""
  case = CASES[name]
  model, optimizer = make_state(case)
  batch = make_batch(case)
  step = step_of(case)
  cluster = uniap_jax.Cluster.preset(CLUSTER)
  plan = uniap_jax.plan(step, model, optimizer, batch, cluster=cluster, pp=1,
                        num_microbatches=1, memory_limit_bytes=case.memory_limit_bytes,
                        objective="paper")
  graph = graph_lib.trace(step, model, optimizer, batch)
  for mesh in strategies.mesh_shapes(cluster, cluster.num_devices):
    if mesh.as_dict() != plan.mesh_axes:
      continue
    tables = cost.build_cost_tables(graph, cluster, mesh=mesh, num_microbatches=1,
                                    global_batch=plan.global_batch, schedule=plan.schedule,
                                    memory_limit_bytes=case.memory_limit_bytes)
    names = {l.name: [c.name for c in l.candidates] for l in tables.layers}
    if all(l.strategy in names[l.name] for l in plan.layers):
      choice = {l.name: names[l.name].index(l.strategy) for l in plan.layers}
      break
  else:
    raise AssertionError(f"no mesh of the search offers the plan's strategies {plan.layers}")
  return plan, tables, choice


@functools.cache
def compiled_collectives(name):
  plan, *_ = planned(name)
  case = CASES[name]
  model, optimizer = make_state(case)
  applied = plan.apply(step_of(case))
  text = applied.compile(model, optimizer, make_batch(case)).as_text()
  return hlo.parse(text, dict(applied.mesh.shape))


def strategies_of(name):
  plan, *_ = planned(name)
  return {l.name: l.strategy for l in plan.layers}


# --- the plans are the ones the cases describe --------------------------------------------


def test_cases_cover_sequence_and_tensor_parallel_choices():
  assert set(strategies_of("replicated").values()) == {"replicated"}
  seq = strategies_of("seq-embed-fsdp")
  assert seq["embed"] == "dp=batch,seq tp=hidden", seq
  assert seq["blocks/0"] == "dp=batch,hidden", seq
  assert strategies_of("mlp-megatron") == {"fc1": "dp=kernel:1", "fc2": "dp=hidden"}


@pytest.mark.slow
def test_wide_case_chooses_megatron_with_sequence_parallelism():
  chosen = strategies_of("megatron-seq")
  assert chosen["blocks/0"] == "dp=batch,hidden tp=attn.k:1,down:0,seq", chosen
  assert chosen["norm"] == "dp=batch tp=seq", chosen


# --- plan against compile ---------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "replicated",
    "seq-embed-fsdp",
    "mlp-megatron",
    # Exact only with the gathered kernels pinned (see the test below).
    pytest.param("megatron-seq", marks=pytest.mark.slow),
    pytest.param("fsdp-2d", marks=pytest.mark.slow),
])
def test_chosen_plan_compiles_its_predicted_collectives(name):
  plan, *_ = planned(name)
  got = hlo.bytes_by_kind(compiled_collectives(name))
  want = {k: v for k, v in plan.predicted.collectives.items() if v}
  assert sorted(got) == sorted(want), (got, want)
  for kind, value in want.items():
    assert got[kind] == pytest.approx(value, rel=BYTES_RTOL), (kind, got, want)


@pytest.mark.slow
def test_gathered_parameters_are_kept_for_the_backward():
  """FSDP kernels gathered over dp once per step, as the candidates charge it: the plan
  pins each gathered parameter where its module reads it ("path@gathered", the stored
  spec without the gathered axes), so that autodiff keeps the gathered copy for the
  backward. Without those pins XLA gathers every kernel again in the backward pass."""
  plan, tables, choice = planned("megatron-seq")
  assert plan.activation_specs["blocks/0/mlp/up/kernel@gathered"] == P(None, "tp")
  assert plan.activation_specs["blocks/0/mlp/down/kernel@gathered"] == P("tp", None)
  key = ("all-gather", ("dp",))
  want = cost.collectives_by_stage(tables, choice, {n: 0 for n in choice})[0][key]
  assert hlo.by_axes(compiled_collectives("megatron-seq"))[key]["bytes"] == pytest.approx(
      want["bytes"], rel=BYTES_RTOL)
  bare = dataclasses.replace(plan, activation_specs={
      k: v for k, v in plan.activation_specs.items() if not k.endswith("@gathered")})
  case = CASES["megatron-seq"]
  model, optimizer = make_state(case)
  applied = bare.apply(step_of(case))
  colls = hlo.parse(applied.compile(model, optimizer, make_batch(case)).as_text(),
                    dict(applied.mesh.shape))
  assert hlo.by_axes(colls)[key]["bytes"] > 1.5 * want["bytes"]


def test_boundary_with_different_layouts_reshards_at_the_edge():
  """The embedding's output is split over tp (hidden), the first block's candidate
  takes it unsplit: one all-gather over tp at the edge, as charged, and no all-to-all
  or collective-permute from XLA carrying the tp split into the block."""
  plan, tables, choice = planned("seq-embed-fsdp")
  assert plan.activation_specs["embed->blocks/0"] == P("dp", None, "tp")
  assert plan.activation_specs["blocks/0<-embed"] == P("dp")
  colls = compiled_collectives("seq-embed-fsdp")
  got = hlo.bytes_by_kind(colls)
  want = {k: v for k, v in plan.predicted.collectives.items() if v}
  assert sorted(got) == sorted(want), (got, want)
  assert got["all-gather"] == pytest.approx(want["all-gather"], rel=BYTES_RTOL)
  by_axes = hlo.by_axes(colls)
  edge = cost.collectives_by_stage(tables, choice, {n: 0 for n in choice}, executor="gpipe")[0]
  assert by_axes[("all-gather", ("tp",))]["bytes"] == pytest.approx(
      edge[("all-gather", ("tp",))]["bytes"], rel=BYTES_RTOL)


def test_plan_without_the_consumer_pin_carries_the_split_into_the_block():
  """The failure the consumer-side pin fixes: with only the producer's layout pinned,
  XLA keeps the tp split inside the first block (tp all-gathers, all-reduces and
  collective-permutes there) instead of one all-gather at the edge."""
  plan, *_ = planned("seq-embed-fsdp")
  bare = dataclasses.replace(plan, activation_specs={
      k: v for k, v in plan.activation_specs.items() if "<-" not in k and "->" in k})
  case = CASES["seq-embed-fsdp"]
  model, optimizer = make_state(case)
  applied = bare.apply(step_of(case))
  colls = hlo.parse(applied.compile(model, optimizer, make_batch(case)).as_text(),
                    dict(applied.mesh.shape))
  want = {k: v for k, v in plan.predicted.collectives.items() if v}
  assert sorted(hlo.bytes_by_kind(colls)) != sorted(want)


# --- numerics ---------------------------------------------------------------------------


def params_of(model):
  return dict(_mesh.paths_and_leaves(jax.tree.map(np.asarray, nnx.state(model, nnx.Param))))


def gradients_of(optimizer):
  """AdamW's first moment after one step: (1 - b1) x the gradient, leaf by leaf."""
  return {p: np.asarray(x) for p, x in _mesh.paths_and_leaves(nnx.state(optimizer))
          if "mu" in p.split("/")}


@pytest.mark.parametrize("name", [
    "replicated", "seq-embed-fsdp", "mlp-megatron",
    pytest.param("megatron-seq", marks=pytest.mark.slow),
    pytest.param("fsdp-2d", marks=pytest.mark.slow),
])
def test_chosen_plan_matches_one_device(name):
  """One AdamW step: the loss, the gradients and the parameters of one device.

  Gradients are compared through AdamW's first moment (fp32 sums in another order:
  rtol 1e-4, plus an absolute term of 1e-5 of the leaf's largest gradient). The
  parameters get one learning-rate step of absolute tolerance: AdamW divides by
  sqrt(v), so a gradient element near zero turns a rounding difference into up to
  one learning-rate step.
  """
  plan, *_ = planned(name)
  case = CASES[name]
  batch = make_batch(case)
  model, optimizer = make_state(case)
  ref_loss = float(nnx.jit(step_of(case))(model, optimizer, batch))
  ref_params, ref_grads = params_of(model), gradients_of(optimizer)
  model, optimizer = make_state(case)
  loss = float(plan.apply(step_of(case))(model, optimizer, batch))
  np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
  grads = gradients_of(optimizer)
  assert sorted(grads) == sorted(ref_grads) and grads
  for path, want in ref_grads.items():
    np.testing.assert_allclose(grads[path], want, rtol=GRAD_RTOL,
                               atol=1e-5 * float(np.abs(want).max()), err_msg=path)
  params = params_of(model)
  for path, want in ref_params.items():
    np.testing.assert_allclose(params[path], want, rtol=PARAM_RTOL,
                               atol=toy.LEARNING_RATE, err_msg=path)
