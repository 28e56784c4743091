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
    runs two things lie outside the cost tables by design (`uniap_jax.cost._predict`):
    the one psum over "pp" of the model's outputs, and the loss's 4-byte means, run
    once per step outside the pipeline. Both are left out of the compiled side, as in
    tests/test_apply.py. Cases whose compiled collectives differ from the prediction
    are strict xfails that state the measured difference.

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
# Bytes are per device and step, measured on this case's compiled HLO.
_TIED_TABLE = (
    "The head is tied to the token embedding, whose table the plan splits over hidden "
    "(P(None, axis)); the head's einsum reads the whole table, so XLA all-gathers it "
    "(256 x 64 x 4 = 65536 B) once per step, which no candidate charges")
# An embedding whose output the plan splits over hidden, inside a pipeline: the runtime
# model charges the edge's all-gather once per forward run (tick).
_BACKWARD_GATHERS = (
    "the embedding's hidden-split output is all-gathered once per forward tick, as "
    "charged, and twice more per backward tick, at the transposes of the edge's "
    "sharding constraints ('transpose(jvp())/.../sharding_constraint')")
COLLECTIVES_XFAIL: dict[str, str] = {
    "gpt2-pp1-gpipe-m1": (
        f"{_TIED_TABLE}: all-gather 98304 B compiled against 32768 B predicted (the "
        "embedding output's gather alone)."),
    "bert_huge-pp1-gpipe-m1": (
        f"{_TIED_TABLE} (BERT's MLM decoder): all-gather 98304 B compiled against "
        "32768 B predicted."),
    "gpt2-pp2-gpipe-m2": (
        f"{_TIED_TABLE}; and {_BACKWARD_GATHERS}: all-gather 212992 B (9 x 16384 B + "
        "65536 B) against 49152 B (3 x 16384 B); all-to-all over pp 474624 B against "
        "441856 B."),
    "bert_huge-pp2-gpipe-m4": (
        f"{_TIED_TABLE}; and {_BACKWARD_GATHERS}: all-gather over tp 188416 B (15 x "
        "8192 B + 65536 B) against 40960 B (5 x 8192 B); all-to-all over pp 619024 B "
        "against 553488 B."),
    "llama_7b-pp4-gpipe-m4": (
        "Untied head, embedding alone on stage 0 with its output split over hidden: "
        "the stage buffers carry that layout (half-size sends, as predicted), and "
        "each tick of the forward loop gathers the stage input once for every block "
        "position that can read it (blocks/0 and blocks/1: 2 gathers) and the backward "
        "loop once more, where one gather per forward run is charged: all-gather over "
        "dp 172032 B (21 x 8192 B) against 57344 B (7 x 8192 B); sends and "
        "all-to-alls exact."),
    "gpt2-pp4-1f1b-m4": (
        "The head is tied to the token embedding, whose table the plan splits over "
        "hidden; here XLA contracts the head's einsum ('bld,vd->blv') over the split "
        "table and all-reduces the partial logits in every forward tick: 7 "
        "all-reduces over dp of 32768 B (f32[2,16,256]) that the plan does not predict "
        "at all. The embedding's hidden-split output is gathered 84 times (2 per "
        "forward tick, 5 per tick of the 1F1B table: 688128 B) against 35 charged "
        "(286720 B); all-to-all over pp 548352 B against 482816 B; sends exact."),
    "bert_huge-pp4-1f1b-m2": (
        "Stages [embed], [blocks/0], [blocks/1, mlm_head, pooler], [nsp_head]. The MLM "
        "logits, a model output made on stage 2, ride a pipeline buffer slot of their "
        "own (f32[4,16,256], 65536 B) in every tick, 5 forward and 10 in the 1F1B "
        "table: sends over pp 1200648 B against 217700 B predicted (+983040 B = 15 x "
        "65536 B, uncharged). Also all-gather over dp 802816 B against 409600 B (the "
        "tied MLM decoder table, 65536 B, and the embedding's hidden-split output "
        "gathered 45 times, 16384 B each, against 25 charged), all-to-all over pp "
        "601856 B against 536336 B; all-reduces exact."),
    "t5_large-pp2-gpipe-m2": (
        "T5's shared embedding, split over hidden ('dp=hidden tp=hidden'), is called "
        "twice and read again by the tied head: all-gather over (dp, tp) 147456 B (9 "
        "gathers) against 98304 B, 3 all-reduces over (dp, tp) of 196608 B that the "
        "plan does not predict, all-to-all over pp 1940992 B against 1875456 B; sends "
        "exact."),
    "t5_large-pp4-1f1b-m2": (
        "T5's shared embedding split over hidden ('dp=hidden') on stages 0 and 2: "
        "all-gather over dp 1638400 B (100 gathers) against 409600 B, 5 all-reduces "
        "over dp (327680 B) not predicted, all-to-all over pp 1053696 B against "
        "1908224 B; sends exact."),
    "vit_huge-pp2-1f1b-m2": (
        "The patch embedding splits hidden over dp ('dp=hidden'), the blocks take the "
        "batch over dp: XLA reshards between them with 37 all-to-alls over dp "
        "(615680 B) in the 1F1B ticks, so all-to-all totals 1036496 B against 770256 B "
        "predicted; sends exact, all-reduce within 1%."),
}


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


@functools.cache
def outcome(case_id):
  """The plan applied (NaN bubbles), compiled, and run for STEPS steps."""
  case = BY_ID[case_id]
  model, optimizer, batch = make(case.model)
  applied = planned(case_id).apply(models.train_step(case.model), bubble_value=float("nan"))
  colls = hlo.parse(applied.compile(model, optimizer, batch).as_text(),
                    dict(applied.mesh.shape))
  losses = [float(applied(model, optimizer, batch)) for _ in range(STEPS)]
  return Outcome(losses=losses, params=param_leaves(model), collectives=colls,
                 compilations=applied.compilations)


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
  psum over "pp" of the model's outputs and the loss's means (4 bytes, once a step)."""
  if not pipelined(case):
    return []
  outputs = [c for c in collectives
             if c.kind == "all-reduce" and c.axes == ("pp",) and c.executions == 1]
  losses = [c for c in collectives if c.kind == "all-reduce" and c.bytes == 4
            and c.executions == 1 and c not in outputs]
  assert len(losses) <= 2, losses
  return outputs + losses


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
