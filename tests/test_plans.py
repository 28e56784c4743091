"""Plan: validation, JSON round trip, specs as pytrees, summary."""

import json

import pytest
from jax.sharding import PartitionSpec as P

from uniap_jax import plans


def _plan(**overrides):
  leaf_specs = (
      (0, "blocks/0/kernel", P(None, "tp")),
      (0, "blocks/1/kernel", P("tp", None)),
      (0, "embed/embedding", P(("dp", "tp"), None)),
      (1, "", P("dp", None)),
  )
  trees = plans.specs_to_trees(leaf_specs, 2)
  kwargs = dict(
      mesh_axes={"pp": 2, "dp": 2, "tp": 2},
      stages=[["embed", "blocks/0"], ["blocks/1"]],
      num_microbatches=4,
      schedule="gpipe",
      param_specs=(trees[0],),
      batch_specs=(trees[1],),
      leaf_specs=leaf_specs,
      activation_specs={"blocks/0->blocks/1": P("dp", None, None)},
      layers=(
          plans.LayerPlan(name="embed", stage=0, strategy="vocab/tp", kind="a", time_s=1e-3,
                          memory_bytes=10),
          plans.LayerPlan(name="blocks/0", stage=0, strategy="dp2.tp2", kind="b", time_s=2e-3),
          plans.LayerPlan(name="blocks/1", stage=1, strategy="dp2.tp2", kind="b", time_s=2e-3),
      ),
      predicted=plans.Predicted(
          step_time_s=0.02, compute_time_s=0.003, communication_time_s=0.001,
          bubble_time_s=0.003, throughput=1600.0, memory_per_device_bytes=(2**30, 2**29),
          mfu=0.41, collectives={"all-reduce": 1e6, "send": 2e5}),
      solver=plans.SolverStats(status="optimal", gap=0.0, time_s=0.1, configurations=7,
                               skipped=3),
      cluster="cpu-8",
      global_batch=32,
      batch_argnums=(1,),
      fingerprint="abc123",
      leaf_shapes=((0, "blocks/0/kernel", (4, 8)), (1, "", (32, 4))),
  )
  kwargs.update(overrides)
  return plans.Plan(**kwargs)


def test_json_round_trip_is_exact():
  plan = _plan()
  again = plans.Plan.from_json(plan.to_json())
  assert again == plan
  assert again.to_json() == plan.to_json()
  assert again.param_specs[0]["blocks"]["0"]["kernel"] == P(None, "tp")
  assert again.param_specs[0]["embed"]["embedding"] == P(("dp", "tp"), None)
  assert again.batch_specs[0] == P("dp", None)
  assert again.leaf_shapes == ((0, "blocks/0/kernel", (4, 8)), (1, "", (32, 4)))
  assert again.predicted.collectives["all-reduce"] == 1e6
  assert again.predicted.collectives["all-gather"] == 0.0


def test_num_devices_and_summary():
  plan = _plan()
  assert plan.num_devices == 8
  text = plan.summary()
  assert "stage 0: 2 layers" in text and "stage 1: 1 layers" in text
  assert "dp2.tp2" in text and "optimal" in text and "MFU 41.0%" in text


@pytest.mark.parametrize("overrides,match", [
    (dict(schedule="interleaved"), "schedule must be one of"),
    (dict(num_microbatches=0), "num_microbatches must be >= 1"),
    (dict(stages=[["embed", "blocks/0", "blocks/1"]]), r"mesh_axes\['pp'\]=2 but the plan has 1"),
    (dict(stages=[["embed"], []]), "every stage needs at least one layer"),
    (dict(global_batch=30), "does not split into num_microbatches=4"),
    (dict(mesh_axes={"pp": 2, "dp": 0}), r"mesh_axes\['dp'\] must be a positive int"),
])
def test_invalid_plans_are_rejected(overrides, match):
  with pytest.raises(ValueError, match=match):
    _plan(**overrides)


def test_bad_json_is_rejected_with_reason():
  with pytest.raises(ValueError, match="does not parse"):
    plans.Plan.from_json("{not json")
  d = json.loads(_plan().to_json())
  d["schema_version"] = 99
  with pytest.raises(ValueError, match="schema_version=99"):
    plans.Plan.from_json(json.dumps(d))
  del d["schema_version"]
  d["schema_version"] = plans.SCHEMA_VERSION
  del d["stages"]
  with pytest.raises(ValueError, match=r"lacks fields \['stages'\]"):
    plans.Plan.from_json(json.dumps(d))


def test_predicted_rejects_unknown_collective():
  with pytest.raises(ValueError, match="Unknown collective kinds"):
    plans.Predicted(step_time_s=1.0, compute_time_s=0, communication_time_s=0, bubble_time_s=0,
                    throughput=1, memory_per_device_bytes=(1,), mfu=0.1,
                    collectives={"broadcast": 1.0})


def test_plans_differing_only_in_planner_wall_clock_are_equal():
  plan = _plan()
  slower = _plan(solver=plans.SolverStats(status="optimal", gap=0.0, time_s=1.1,
                                          search_time_s=9.0, configurations=7, skipped=3))
  assert slower == plan
  assert _plan(solver=plans.SolverStats(status="optimal", gap=0.0, time_s=0.1,
                                        configurations=8, skipped=3)) != plan
  assert _plan(num_microbatches=8) != plan


def test_layer_recompute_round_trips_and_follows_the_strategy_name():
  layers = (
      plans.LayerPlan(name="embed", stage=0, strategy="vocab/tp", kind="a"),
      plans.LayerPlan(name="blocks/0", stage=0, strategy="dp2.tp2 +remat", kind="b"),
      plans.LayerPlan(name="blocks/1", stage=1, strategy="hand", kind="b", recompute=True),
  )
  plan = _plan(layers=layers)
  assert [l.recompute for l in plan.layers] == [False, True, True]
  again = plans.Plan.from_json(plan.to_json())
  assert again == plan
  assert [l.recompute for l in again.layers] == [False, True, True]
  # JSON written before the field existed still loads; "+remat" names still recompute.
  d = json.loads(plan.to_json())
  for layer in d["layers"]:
    del layer["recompute"]
  old = plans.Plan.from_json(json.dumps(d))
  assert [l.recompute for l in old.layers] == [False, True, False]
  assert "hand +remat" in plan.summary()
