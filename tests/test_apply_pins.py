"""The plan's pins inside pipelines: XLA reshards where the cost model charges it.

A plan from the search pins, besides each layer's output, the layout in which a
consumer's candidate takes a boundary value ("dst<-src") and the submodule calls
inside layers ("blocks/0/up", "blocks/0/down<-"); see `uniap_jax.search._pins`.
Inside a pipeline's `shard_map` they are applied without the manual axes ("pp" and
the manual data-parallel ones), in every executor and both dispatches.

The case: tests/test_apply.py's TinyGPT at pp=2 over {"dp": 2, "tp": 2}, two blocks per
stage, alternating a sequence-split block ("dp=batch tp=seq") and a Megatron block
("dp=batch tp=down:0"), so that in each stage adjacent layers lay out their boundary
differently (the Megatron block gathers its input over "tp" at the edge) and the
boundary between the stages does too.
"""

import dataclasses
import functools

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from uniap_jax import cost
from uniap_jax import hlo
from uniap_jax import plans
from uniap_jax.apply import _pins

import test_apply as base

BLOCKS = {"blocks/0": "dp=batch tp=seq", "blocks/1": "dp=batch tp=down:0",
          "blocks/2": "dp=batch tp=seq", "blocks/3": "dp=batch tp=down:0"}
MICROBATCHES = 2
BYTES_RTOL = 0.01


def strategy(name):
  return BLOCKS.get(name) or base.MEGATRON_STAGES[name]


@functools.cache
def planned(schedule):
  return base.built_plan(mesh_axes={"dp": 2, "tp": 2}, stages=base.stages_of([2, 2]),
                         microbatches=MICROBATCHES, schedule=schedule, strategy=strategy)


def without_pins(plan):
  """The plan with only its layer outputs pinned ("src->dst")."""
  return dataclasses.replace(plan, activation_specs={
      k: v for k, v in plan.activation_specs.items() if "->" in k})


def applied_and_collectives(plan, executor, dispatch="uniform"):
  model, optimizer = base.make_state()
  batch = base.make_batch(plan.global_batch)
  applied = plan.apply(base.train_step, schedule=executor, dispatch=dispatch,
                       bubble_value=float("nan"))
  colls = hlo.parse(applied.compile(model, optimizer, batch).as_text(),
                    dict(applied.mesh.shape))
  return applied, (model, optimizer, batch), colls


def split_outside(colls):
  """The collectives the cost model counts, and the one outside it: the psum of the
  model's outputs over "pp" (the loss's mean, once per step, is counted)."""
  outputs = [c for c in colls if c.kind == "all-reduce" and c.axes == ("pp",)]
  return [c for c in colls if c not in outputs], outputs


def mismatches(colls, want):
  """(kind, axes) entries whose count or bytes differ from `want`."""
  got = hlo.by_axes(colls)
  out = {}
  for key in set(got) | set(want):
    g, w = got.get(key), want.get(key)
    if g is None or w is None or g["count"] != w["count"] or (
        abs(g["bytes"] - w["bytes"]) > BYTES_RTOL * w["bytes"]):
      out[key] = (g, w)
  return out


def test_the_plan_pins_different_layouts_on_both_sides_of_each_boundary():
  plan, *_ = planned("gpipe")
  specs = plan.activation_specs
  assert specs["blocks/0->blocks/1"] == P("dp", "tp")  # sequence split over tp
  assert specs["blocks/1<-blocks/0"] == P("dp")  # gathered over tp at the edge
  assert specs["blocks/1->blocks/2"] == P("dp")  # across the stages: sent whole
  assert specs["blocks/2<-blocks/1"] == P("dp", "tp")
  assert specs["blocks/1/up"] == P("dp", None, "tp")  # inside the Megatron block


def check_exact(plan, tables, choice, stage_of, executor):
  applied, args, colls = applied_and_collectives(plan, executor)
  inside, outputs = split_outside(colls)
  assert len(outputs) == 1, outputs
  want = cost.collectives_by_stage(tables, choice, stage_of, executor=executor)[0]
  assert ("all-gather", ("tp",)) in want and ("all-reduce", ("tp",)) in want
  assert not mismatches(inside, want)
  if executor == plans.runtime_executor(plan.schedule, len(plan.stages),
                                        plan.num_microbatches):  # the plan's own
    by_kind = hlo.bytes_by_kind(inside)
    predicted = {k: v for k, v in plan.predicted.collectives.items() if v}
    assert sorted(by_kind) == sorted(predicted), (by_kind, predicted)
    for kind, value in predicted.items():
      assert by_kind[kind] == pytest.approx(value, rel=BYTES_RTOL), (kind, by_kind, predicted)
  return applied, args


@pytest.mark.parametrize("executor", [
    "gpipe-remat",  # what the plan's GPipe schedule runs as
    pytest.param("gpipe", marks=pytest.mark.slow),
    pytest.param("1f1b", marks=pytest.mark.slow),
])
def test_pinned_pipeline_compiles_the_predicted_collectives_and_matches_one_device(executor):
  """Every (kind, axes): counts exact, bytes within 1%; then 3 AdamW steps of that
  compiled step against one device."""
  plan, tables, choice, stage_of = planned("1f1b" if executor == "1f1b" else "gpipe")
  applied, args = check_exact(plan, tables, choice, stage_of, executor)
  base.run_and_compare(applied, *args)


def test_without_the_pins_xla_reshards_elsewhere():
  """The same plan with only the layer outputs pinned: XLA carries the sequence split
  into the Megatron blocks (reduce-scatters over tp, more all-gathers and fewer
  all-reduce bytes) instead of gathering at the edge."""
  plan, tables, choice, stage_of = planned("gpipe")
  _, _, colls = applied_and_collectives(without_pins(plan), "gpipe")
  inside, _ = split_outside(colls)
  want = cost.collectives_by_stage(tables, choice, stage_of, executor="gpipe")[0]
  assert set(mismatches(inside, want)) & {("all-gather", ("tp",)), ("all-reduce", ("tp",))}


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["gpipe", "fused", "gpipe-remat"])
def test_pinned_pipeline_with_switch_dispatch_matches_one_device(executor):
  plan, *_ = planned("gpipe")
  applied, args, _ = applied_and_collectives(plan, executor, dispatch="switch")
  base.run_and_compare(applied, *args)


# --- the pins as a uniform position sees them ---------------------------------------


def test_pins_inside_layers_agree_across_the_stages_of_a_position():
  pins = _pins.Pins.of({
      "blocks/0/up": P("dp", None, "tp"), "blocks/2/up": P("dp", None, "tp"),
      "blocks/0/down": P("dp"), "blocks/2/down": P("dp", "tp"),
      "blocks/0/down<-": P("dp", "tp"), "blocks/2/down<-": P("dp", "tp"),
      "blocks/0/down<-blocks/0/up": P("dp"), "blocks/1<-blocks/0": P("dp")})
  view = pins.without(("pp", "dp")).inside(["blocks/2", "blocks/0"])
  assert view.outputs == {"blocks/2/up": P(None, None, "tp")}  # down disagrees
  assert view.inputs == {"blocks/2/down": {"": P(None, "tp")}}
  assert "blocks/2" in view.enclosing and "blocks/0" not in view.enclosing
  assert pins.inside(["blocks/1"]).outputs == {}  # a boundary pin is not inside a layer
