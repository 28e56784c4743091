"""Pipeline ticks that skip idle work: the table executors run a tick's stage work under
`lax.cond` where it is safe, and the cost model charges what then runs.

Numerics against one device (3 AdamW steps, fp32, NaN bubbles), the conditional in
the compiled program exactly where `skips_idle_work` allows it, compiled collectives
against the predicted ones, and the cost model's tick arithmetic against the
executors' own schedule tables.
"""

import dataclasses
import itertools

import numpy as np
import pytest

import uniap_jax
from uniap_jax import cluster as cluster_lib
from uniap_jax import cost
from uniap_jax import graph as graph_lib
from uniap_jax import hlo
from uniap_jax import strategies
from uniap_jax.cost import _predict
from uniap_jax.apply import _schedules

import test_apply as base

GRID = [(s, m) for s in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 5, 8, 16) if s * m > 1]


def tick_classes(table):
  """(both, mixed, forward only, backward only) ticks of a table, as the busiest
  device runs them: a forward and a backward on one device; a forward on one and a
  backward on another; forwards only; backward runs only."""
  f, b = table.forward >= 0, table.backward >= 0
  both = (f & b).any(axis=1)
  any_f, any_b = f.any(axis=1), b.any(axis=1)
  assert (any_f | any_b).all()  # no tick is idle everywhere
  return (int(both.sum()), int((~both & any_f & any_b).sum()),
          int((~both & any_f & ~any_b).sum()), int((~both & ~any_f & any_b).sum()))


def executor_tables(executor, stages, m):
  """The loops the executor runs: (forward pass, then the table its backward rule runs),
  or autodiff GPipe's forward loop and its transpose."""
  if executor in ("gpipe", "gpipe-remat"):
    return _schedules.forward_only(stages, m), _schedules.backward_only(stages, m)
  return _schedules.forward_only(stages, m), _schedules.table(executor, stages, m)


@pytest.mark.parametrize("executor", cost.EXECUTORS)
def test_tick_counts_are_the_schedule_tables_own(executor):
  for stages, m in GRID:
    forward_pass, table = executor_tables(executor, stages, m)
    assert tick_classes(forward_pass) == (0, 0, forward_pass.ticks, 0)
    for skip in (False, True):
      got = cost.runtime_ticks(executor, stages, m, skip_idle=skip)
      assert got[0] == forward_pass.ticks
      if executor in ("gpipe", "gpipe-remat"):
        want = (0, 0, 0, table.ticks)  # every backward tick has a busy device
      elif skip:
        want = tick_classes(table)
      else:
        want = (table.ticks, 0, 0, 0)  # every device runs every entry
      assert got[1:] == want, (executor, stages, m, skip)


@pytest.mark.parametrize("executor", ["gpipe-remat", "fused", "1f1b"])
def test_skipping_devices_run_each_micro_batch_once_per_loop(executor):
  """With skipping, one device runs M forwards per pass, and M table forwards, M
  recomputations and M backward runs: the paper's counts, plus the forward pass."""
  for stages, m in GRID:
    forward_pass, table = executor_tables(executor, stages, m)
    for s in range(stages):  # every stage holds each micro-batch once per loop
      assert sorted(forward_pass.forward[:, s][forward_pass.forward[:, s] >= 0]) == list(
          range(m))
      assert sorted(table.backward[:, s][table.backward[:, s] >= 0]) == list(range(m))
    table_forwards = m if table.has_forward else 0
    forward, backward, permutes = cost.runtime_runs(executor, stages, m, skip_idle=True)
    assert (forward, backward) == (m + table_forwards + m, m)
    assert permutes == cost.runtime_runs(executor, stages, m)[2]  # every tick, as before
    passes, tables_f, recompute, backward_runs, _ = cost.runtime_run_split(
        executor, stages, m, skip_idle=True)
    assert (passes, tables_f, recompute, backward_runs) == (m, table_forwards, m, m)


def test_idle_work_is_skipped_where_collectives_in_a_branch_cannot_hang():
  sizes = [(), (1,), (2,), (1, 1), (1, 4), (2, 2)]
  for platform, axes in itertools.product(["cpu", "gpu", "tpu", "cuda", "metal"], sizes):
    got = cluster_lib.skips_idle_work(platform, axes)
    assert got == (platform not in ("cpu", "metal") or all(n == 1 for n in axes))


def compiled_text(applied, model, optimizer, batch):
  return applied.compile(model, optimizer, batch).as_text()


def conditionals(text):
  return text.count(" conditional(")


SKIP_CASES = [
    pytest.param([1, 3], 4, "1f1b", id="pp2-uneven-1f1b"),
    pytest.param([1, 1, 1, 1], 2, "fused", id="pp4-fused"),
    pytest.param([2, 2], 2, "gpipe-remat", id="pp2-gpipe-remat", marks=pytest.mark.slow),
    pytest.param([2, 1, 1, 0], 4, "1f1b", id="pp4-1f1b", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("counts,microbatches,executor", SKIP_CASES)
def test_skipping_pipelines_match_one_device(counts, microbatches, executor):
  """pp x dp with "dp" manual: no automatic axis, so CPU skips idle ticks; the
  forward pass, the table's forwards and its backward runs each sit in a conditional,
  and the permutes still run in every tick."""
  stages = len(counts)
  dp = 8 // stages
  model, optimizer = base.make_state()
  batch = base.make_batch()
  plan = base.hand_plan((model, optimizer, batch), mesh_axes={"pp": stages, "dp": dp},
                        stages=base.stages_of(counts), num_microbatches=microbatches)
  applied = plan.apply(base.train_step, schedule=executor, bubble_value=float("nan"))
  base.run_and_compare(applied, model, optimizer, batch)
  text = compiled_text(applied, model, optimizer, batch)
  loops = 3 if executor in ("fused", "1f1b") else 2
  assert conditionals(text) == loops
  colls = hlo.parse(text, dict(applied.mesh.shape))
  sends = [c for c in colls if c.kind == "send" and c.executions > 1]
  assert sum(c.executions for c in sends) == base.expected_permutes(executor, stages,
                                                                    microbatches)


def test_no_conditional_with_a_tensor_parallel_axis_on_cpu():
  """"tp" stays automatic inside the stages: its collectives would sit inside the
  conditional, which can hang on CPU, so the executor runs every tick's work."""
  model, optimizer = base.make_state()
  batch = base.make_batch()
  plan = base.hand_plan((model, optimizer, batch), mesh_axes={"pp": 2, "dp": 2, "tp": 2},
                        stages=base.stages_of([2, 2]), num_microbatches=2,
                        param_spec=base.megatron)
  applied = plan.apply(base.train_step, schedule="1f1b")
  text = compiled_text(applied, model, optimizer, batch)
  assert conditionals(text) == 0
  assert ("all-reduce", ("tp",)) in hlo.by_axes(hlo.parse(text, dict(applied.mesh.shape)))


def dp_plan(executor, recompute=()):
  schedule = "1f1b" if executor == "1f1b" else "gpipe"
  return base.built_plan(
      mesh_axes={"dp": 4}, stages=base.stages_of([2, 2]), microbatches=4, schedule=schedule,
      strategy=lambda n: "dp=batch" + (" +remat" if n in recompute else ""))


@pytest.mark.parametrize("executor,recompute", [
    pytest.param("1f1b", ("blocks/0", "blocks/2"), id="1f1b-remat-blocks"),
    pytest.param("fused", (), id="fused", marks=pytest.mark.slow),
])
def test_skipping_pipeline_compiles_exactly_the_predicted_collectives(executor, recompute):
  """The cost model decides to skip as apply does, and every compiled (kind, axes)
  agrees with what it counts: exact counts, bytes within 1%."""
  plan, tables, choice, stage_of = dp_plan(executor, recompute)
  assert cost.runtime_skips_idle(tables, choice, executor)
  want = cost.collectives_by_stage(tables, choice, stage_of, executor=executor)[0]
  model, optimizer = base.make_state()
  batch = base.make_batch(plan.global_batch)
  applied = plan.apply(base.train_step, schedule=executor)
  text = compiled_text(applied, model, optimizer, batch)
  assert conditionals(text) == 3
  got = hlo.by_axes(hlo.parse(text, dict(applied.mesh.shape)))
  assert got.pop(("all-reduce", ("pp",)))["count"] == 1  # the model's outputs
  assert set(got) == set(want), (got, want)
  for key in want:
    assert got[key]["count"] == want[key]["count"], (key, got[key], want[key])
    assert got[key]["bytes"] == pytest.approx(want[key]["bytes"], rel=0.01), key


def test_runtime_charges_the_busiest_device_of_each_tick(monkeypatch):
  """The runtime's 1F1B time is the forward pass plus, per table tick, what its busiest
  device runs (tick classes read off the table here): per-run figures recovered by
  pricing one tick of each class at a time."""
  plan, tables, choice, stage_of = dp_plan("1f1b")
  s, m = tables.num_stages, tables.num_microbatches
  real = cost.runtime_ticks

  def priced(ticks):
    monkeypatch.setattr(_predict, "runtime_ticks", lambda *a, **k: ticks)
    try:
      return cost.runtime_step_time_s(tables, choice, stage_of, executor="1f1b",
                                      skip_idle=True)
    finally:
      monkeypatch.setattr(_predict, "runtime_ticks", real)
  once = priced((0, 0, 0, 0, 0))
  pass_s = priced((1, 0, 0, 0, 0)) - once
  table_forward_s = priced((0, 0, 0, 1, 0)) - once
  backward_run_s = priced((0, 0, 0, 0, 1)) - once
  assert 0 < table_forward_s < pass_s < backward_run_s  # norm and head feed no send
  assert priced((0, 1, 0, 0, 0)) - once == pytest.approx(table_forward_s + backward_run_s)
  assert priced((0, 0, 1, 0, 0)) - once == pytest.approx(backward_run_s)
  both, mixed, forward_only, backward_only = tick_classes(_schedules.table("1f1b", s, m))
  assert both == 0  # classic 1F1B: one operation per stage and tick
  skip = cost.runtime_step_time_s(tables, choice, stage_of, executor="1f1b")
  assert skip == pytest.approx(
      once + (m + s - 1) * pass_s + forward_only * table_forward_s
      + (mixed + backward_only) * backward_run_s, rel=1e-12)
  # Without skipping every device runs a forward and a backward in each of the ticks.
  ticks = _schedules.table("1f1b", s, m).ticks
  full = cost.runtime_step_time_s(tables, choice, stage_of, executor="1f1b", skip_idle=False)
  assert full == pytest.approx(
      once + (m + s - 1) * pass_s + ticks * (table_forward_s + backward_run_s), rel=1e-12)
  assert skip < full
  # The paper's GPipe objective is still below: lockstep 1F1B keeps its forward pass
  # and one operation per tick.
  assert plan.predicted.step_time_s < skip


def test_skipping_never_slows_a_plan_without_gathers():
  """Without parameter gathers inside the stages, the ticks that skip cost at most what
  they did: "gpipe-remat" (a busy device in every tick) keeps its time exactly,
  "fused" and "1f1b" get faster."""
  _, tables, choice, stage_of = dp_plan("1f1b")
  for executor in cost.EXECUTORS:
    on, off = (cost.runtime_step_time_s(tables, choice, stage_of, executor=executor,
                                        skip_idle=k) for k in (True, False))
    if executor in ("gpipe", "gpipe-remat"):
      assert on == pytest.approx(off, rel=1e-12)
    else:
      assert on < off
    assert np.isfinite(on)


def test_gpu_skips_with_a_tensor_parallel_axis_and_counts_active_ticks_only():
  """On GPU the same megatron plan skips (a "tp" group shares its stage, so all its
  devices take one branch): its layers' collectives run once per micro-batch and
  loop instead of once per tick, the permutes and once-per-step collectives stay."""
  cluster = uniap_jax.Cluster.preset("a100-40g-1x8")
  model, optimizer = base.make_state()
  graph = graph_lib.trace(base.train_step, model, optimizer, base.make_batch())
  mesh = next(m for m in strategies.mesh_shapes(cluster, 4)
              if m.as_dict() == {"dp": 2, "tp": 2})
  tables = cost.build_cost_tables(graph, cluster, mesh=mesh, num_stages=2,
                                  num_microbatches=4, global_batch=base.BATCH,
                                  schedule="1f1b", prune=False)
  choice = {l.name: [c.name for c in l.candidates].index(base.megatron_strategy(l.name))
            for l in tables.layers}
  stage_of = {n: s for s, names in enumerate(base.stages_of([2, 2])) for n in names}
  assert "tp" not in _predict.manual_axes(tables, choice)
  assert cost.runtime_skips_idle(tables, choice, "1f1b")
  cpu_tables = dataclasses.replace(tables, cluster=uniap_jax.Cluster.preset("cpu-8"))
  assert not cost.runtime_skips_idle(cpu_tables, choice, "1f1b")
  on, off = (cost.collectives_by_stage(tables, choice, stage_of, executor="1f1b",
                                       skip_idle=k)[0] for k in (True, False))
  assert on == cost.collectives_by_stage(tables, choice, stage_of, executor="1f1b")[0]
  assert set(on) == set(off)
  assert on[("send", ("pp",))] == off[("send", ("pp",))]
  assert on[("all-to-all", ("pp",))] == off[("all-to-all", ("pp",))]  # once per step
  tp_on, tp_off = on[("all-reduce", ("tp",))], off[("all-reduce", ("tp",))]
  assert 0 < tp_on["count"] < tp_off["count"]
  assert (cost.runtime_step_time_s(tables, choice, stage_of, executor="1f1b")
          < cost.runtime_step_time_s(tables, choice, stage_of, executor="1f1b",
                                     skip_idle=False))
