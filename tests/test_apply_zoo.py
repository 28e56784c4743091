"""Solver-chosen plans on the zoo's tiny models, applied on 8 CPU devices.

tests/test_apply.py runs hand-written pipelined plans on the zoo; here
`uniap_jax.plan` chooses the mesh, the stages and every layer's strategy for the tiny
GPT-2, BERT, ViT, T5 and Llama of `experiments.models`, with the pipeline degree, the
micro-batch count and the schedule pinned. Each plan is checked three ways:

  - it is the plan the case asks for (the pipeline axis, one stage per pipeline rank,
    the schedule and micro-batches; its stages list the model's layers in order), so
    that no case passes by planning something easier;
  - applied, 3 AdamW steps give the losses and parameters of the same steps on one
    device (fp32; pipeline bubbles hold NaN, so a bubble that leaks fails);
  - the collectives XLA compiles for the applied step are those
    `plan.predicted.collectives` charges: kinds equal, bytes within 1%. For pipelined
    runs the one psum over "pp" of the model's outputs lies outside the cost tables by
    design (`uniap_jax.cost._predict`) and is left out of the compiled side, as in
    tests/test_apply.py.

The compiled step's memory is compared with the plan's runtime memory
(`plan.predicted.runtime_memory_per_device_bytes`) for a few cases.

Every (pp, schedule) pair with pp in {1, 2, 4} occurs at least once, and every model
is planned with a pipeline at least once. The default run keeps three cases; the rest
are slow.
"""

import dataclasses
import functools
import types

import jax
import numpy as np
import pytest
from flax import nnx

import uniap_jax
from uniap_jax import hlo
from uniap_jax.apply import _step

from experiments import models

CLUSTER = "cpu-8"
BATCH = 8
STEPS = 3
# Tolerances of tests/test_apply.py: fp32 sums in another order; parameters get an
# absolute term because AdamW divides by sqrt(v).
LOSS_RTOL = 1e-4
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-4
BYTES_RTOL = 0.01


@dataclasses.dataclass(frozen=True)
class Case:
  """What `uniap_jax.plan` is pinned to; it chooses everything else."""

  model: str
  pp: int
  microbatches: int
  schedule: str
  time_limit_s: float = 60.0

  @property
  def id(self) -> str:
    return f"{self.model}-pp{self.pp}-{self.schedule}-m{self.microbatches}"


# T5's pipelined searches do not finish within the default budget on this machine
# (60 s for pp=2); those plans are the best found in 10 s. At pp=1 the search proves its plan optimal in about 8 s.
CASES = [
    Case("gpt2", 1, 1, "gpipe"),
    Case("gpt2", 2, 2, "gpipe"),
    Case("gpt2", 4, 4, "1f1b"),
    Case("bert_huge", 1, 1, "gpipe"),
    Case("bert_huge", 2, 4, "gpipe"),
    Case("bert_huge", 4, 2, "1f1b"),
    # The MLM logits, a model output, are made on stage 1 of 4 and ride buffer slots to
    # the last stage: forward only under 1F1B, both ways under autodiff GPipe.
    Case("bert_huge", 4, 2, "gpipe"),
    Case("vit_huge", 1, 1, "gpipe"),
    Case("vit_huge", 2, 2, "1f1b"),
    Case("vit_huge", 4, 4, "gpipe"),
    Case("llama_7b", 1, 2, "1f1b"),
    Case("llama_7b", 2, 2, "1f1b"),
    Case("llama_7b", 4, 4, "gpipe"),
    Case("t5_large", 1, 1, "gpipe"),
    Case("t5_large", 2, 2, "gpipe", time_limit_s=10.0),
    Case("t5_large", 4, 2, "1f1b", time_limit_s=10.0),
]
BY_ID = {c.id: c for c in CASES}
# The default (not slow) run: a plain jitted step, a 1F1B and a GPipe pipeline.
FAST = {"gpt2-pp1-gpipe-m1", "llama_7b-pp2-1f1b-m2", "vit_huge-pp4-gpipe-m4"}

NUMERICS_XFAIL: dict[str, str] = {}
# Plan against compile: where the compiled collectives differ from the prediction.
# Bytes are per device and step, measured on this case's compiled HLO. (Tied embedding
# tables are kept whole in every layer that reads them, `strategies._candidates`, and a
# tied head's table has a stack slot of its own in a pipeline; pipelined tables offer
# no candidate whose output takes a split from a parameter, such as an embedding
# "dp=hidden", `Candidate.splits_new_dims`; model outputs made before the last stage
# ride buffer slots, `Candidate.model_outputs`; parameter stacks group layers by
# `cost.stack_key`, as apply groups calls.) None differs at present.
COLLECTIVES_XFAIL: dict[str, str] = {}


def case_params(case_ids, xfails):
  """pytest params: slow unless in FAST, strict xfail where `xfails` says why."""
  out = []
  for case_id in case_ids:
    marks = [] if case_id in FAST else [pytest.mark.slow]
    if case_id in xfails:
      raises = ValueError if case_id in NUMERICS_XFAIL else AssertionError  # apply refuses
      marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=xfails[case_id]))
    out.append(pytest.param(case_id, marks=marks, id=case_id))
  return out


# --- planning, applying, running --------------------------------------------------------


def make(name):
  model = models.create(name, "tiny")
  return model, models.create_optimizer(model), models.example_batch(name, "tiny", BATCH)


def param_leaves(model):
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


@functools.cache
def reference(name):
  """Losses and parameters after STEPS steps on one device."""
  model, optimizer, batch = make(name)
  step = nnx.jit(models.train_step(name))
  losses = [float(step(model, optimizer, batch)) for _ in range(STEPS)]
  return losses, param_leaves(model)


@functools.cache
def planned(case_id):
  case = BY_ID[case_id]
  return uniap_jax.plan(models.train_step(case.model), *make(case.model),
                        cluster=uniap_jax.Cluster.preset(CLUSTER), pp=case.pp,
                        num_microbatches=case.microbatches, schedule=case.schedule,
                        time_limit_s=case.time_limit_s)


@dataclasses.dataclass(frozen=True)
class Outcome:
  losses: list[float]
  params: list[tuple[str, np.ndarray]]
  collectives: list[hlo.Collective]
  compilations: int
  memory_bytes: int  # per device, from XLA's memory_analysis of the compiled step


@functools.cache
def outcome(case_id):
  """The plan applied (NaN bubbles), compiled, and run for STEPS steps."""
  case = BY_ID[case_id]
  model, optimizer, batch = make(case.model)
  applied = planned(case_id).apply(models.train_step(case.model), bubble_value=float("nan"))
  compiled = applied.compile(model, optimizer, batch)
  colls = hlo.parse(compiled.as_text(), dict(applied.mesh.shape))
  m = compiled.memory_analysis()
  memory = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
  losses = [float(applied(model, optimizer, batch)) for _ in range(STEPS)]
  return Outcome(losses=losses, params=param_leaves(model), collectives=colls,
                 compilations=applied.compilations, memory_bytes=memory)


def layer_names(name):
  """The model's layers as the planner names them: "path@k" for a path's k-th repeat."""
  seen, out = {}, []
  for n in make(name)[0].layer_names():
    k = seen.get(n, 0)
    seen[n] = k + 1
    out.append(n if k == 0 else f"{n}@{k}")
  return out


def check_plan_is_the_case(case, plan):
  """The pinned knobs hold, and the stages cover the model's layers in call order."""
  assert plan.mesh_axes.get("pp", 1) == case.pp, plan.mesh_axes
  assert int(np.prod(list(plan.mesh_axes.values()))) == 8, plan.mesh_axes
  assert len(plan.stages) == case.pp and all(plan.stages), plan.stages
  assert plan.schedule == case.schedule
  assert plan.num_microbatches == case.microbatches
  assert [n for stage in plan.stages for n in stage] == layer_names(case.model), plan.stages
  assert [l.stage for l in plan.layers] == [s for s, names in enumerate(plan.stages)
                                           for _ in names]


def pipelined(case):
  return case.pp > 1 or case.microbatches > 1


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", case_params(BY_ID, NUMERICS_XFAIL))
def test_chosen_zoo_plan_matches_one_device(case_id):
  case = BY_ID[case_id]
  plan = planned(case_id)
  check_plan_is_the_case(case, plan)
  got = outcome(case_id)
  if case.pp > 1:  # the pipeline ran: activations moved between stages
    assert ("send", ("pp",)) in hlo.by_axes(got.collectives)
  ref_losses, ref_params = reference(case.model)
  assert np.all(np.isfinite(got.losses)), got.losses
  np.testing.assert_allclose(got.losses, ref_losses, rtol=LOSS_RTOL)
  assert [p for p, _ in got.params] == [p for p, _ in ref_params]
  for (path, a), (_, b) in zip(got.params, ref_params):
    assert np.all(np.isfinite(a)), path
    np.testing.assert_allclose(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=path)
  assert got.compilations == 1


def outside_the_tables(case, collectives):
  """The compiled collectives the cost tables do not count, for a pipelined step: the
  psum over "pp" of the model's outputs (the loss's own collectives are charged, once
  a step)."""
  if not pipelined(case):
    return []
  return [c for c in collectives
          if c.kind == "all-reduce" and c.axes == ("pp",) and c.executions == 1]


@pytest.mark.parametrize("case_id", case_params(BY_ID, COLLECTIVES_XFAIL))
def test_chosen_zoo_plan_compiles_its_predicted_collectives(case_id):
  case = BY_ID[case_id]
  plan = planned(case_id)
  check_plan_is_the_case(case, plan)
  colls = outcome(case_id).collectives
  outside = outside_the_tables(case, colls)
  got = hlo.bytes_by_kind([c for c in colls if c not in outside])
  want = {k: v for k, v in plan.predicted.collectives.items() if v}
  detail = (got, want, hlo.by_axes(colls))
  assert sorted(got) == sorted(want), detail
  for kind, value in want.items():
    assert got[kind] == pytest.approx(value, rel=BYTES_RTOL), (kind, *detail)


@pytest.mark.parametrize("second", ["shared@1", "shared"])
def test_stages_name_the_second_call_of_a_module_as_the_search_does(second):
  """T5 calls its shared embedding twice: stages as the search writes them (the
  tracer's "path@k" for the k-th repeated call) or by the bare path, as a hand-written
  plan may, are matched against the calls the forward makes (each named by its
  module path)."""
  calls = [types.SimpleNamespace(name=n) for n in ("shared", "encoder", "shared", "decoder")]
  stages = [["shared", "encoder"], [second, "decoder"]]
  assert _step.assign_stages(calls, stages) == [0, 0, 1, 1]


# Memory: what XLA allocates per device for the compiled step (arguments + outputs -
# donated + temporaries) against the plan's runtime memory
# (`plan.predicted.runtime_memory_per_device_bytes`, `cost.runtime_memory_bytes`):
# one SPMD program allocates alike on every device, so every stage's figure is
# compared with it, within 10% as in tests/test_cost.py. The plain jitted step
# (pp=1, one micro-batch) holds the paper's memory, which it is also compared with.
# Measured compiled/runtime ratios (8 CPU devices, batch 8): Llama pp=2 1F1B m=2 1.04,
# ViT pp=4 GPipe m=4 1.05, BERT pp=2 GPipe m=4 1.02, GPT-2 pp=4 1F1B m=4 0.95, BERT
# pp=4 1F1B m=2 0.95, Llama pp=4 GPipe m=4 1.07, where the paper's memory gave 1.19,
# 2.20, 2.21, 0.99, 0.96, 3.09; GPT-2 pp=1 holds the paper's memory.
MEMORY_XFAIL: dict[str, str] = {}
MEMORY_CASES = ["gpt2-pp1-gpipe-m1", "llama_7b-pp2-1f1b-m2", "vit_huge-pp4-gpipe-m4",
                "bert_huge-pp2-gpipe-m4", "gpt2-pp4-1f1b-m4", "bert_huge-pp4-1f1b-m2",
                "llama_7b-pp4-gpipe-m4"]
MEMORY_RTOL = 0.10


@pytest.mark.parametrize("case_id", case_params(MEMORY_CASES, MEMORY_XFAIL))
def test_chosen_zoo_plan_memory_matches_compiled(case_id):
  case = BY_ID[case_id]
  plan = planned(case_id)
  check_plan_is_the_case(case, plan)
  runtime = plan.predicted.runtime_memory_per_device_bytes
  assert len(runtime) == case.pp
  compiled = outcome(case_id).memory_bytes
  for stage, predicted in enumerate(runtime):
    assert compiled == pytest.approx(predicted, rel=MEMORY_RTOL), (stage, runtime)
  if not pipelined(case):  # the plain jitted step: the paper's memory is what runs
    assert runtime == plan.predicted.memory_per_device_bytes
