"""Experiment launchers: the plan timeline and picture, paper_tables, scaling."""

import csv
import math
import os
import json
import subprocess
import sys

import pytest

import uniap_jax as ua
from experiments import paper_tables
from experiments import plot
from experiments import scaling
from uniap_jax import baselines
from uniap_jax import plans
from uniap_jax import solver

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(num_stages=2, num_microbatches=3, schedule="gpipe", layer_time_s=1e-3):
  """A hand-made plan: two layers per stage, no specs (the timeline reads none)."""
  names = [[f"blocks/{2 * s}", f"blocks/{2 * s + 1}"] for s in range(num_stages)]
  layers = tuple(plans.LayerPlan(name=n, stage=s, strategy="dp2" if s % 2 else "dp1.tp2",
                                 kind="block", time_s=layer_time_s)
                 for s, stage in enumerate(names) for n in stage)
  return plans.Plan(
      mesh_axes={"pp": num_stages, "dp": 2} if num_stages > 1 else {"dp": 2},
      stages=names, num_microbatches=num_microbatches, schedule=schedule,
      param_specs=({},), batch_specs=({},), leaf_specs=(), activation_specs={},
      layers=layers,
      predicted=plans.Predicted(
          step_time_s=0.01, compute_time_s=0.002, communication_time_s=0.0,
          bubble_time_s=0.002, throughput=300.0, memory_per_device_bytes=(2**30,) * num_stages,
          mfu=0.3, collectives={}),
      solver=plans.SolverStats(status="optimal", gap=0.0, time_s=0.1),
      cluster="cpu-8", global_batch=num_microbatches, batch_argnums=(1,))


# --- plot: timeline ------------------------------------------------------------------


@pytest.mark.parametrize("schedule, rows", [
    # Worked by hand: forward 1 tick, backward 2; GPipe's backwards in reverse order.
    ("gpipe", ["stage 0 |F0F1F2......B2B2B1B1B0B0|",
               "stage 1 |..F0F1F2B2B2B1B1B0B0....|"]),
    # 1F1B: stage 0 warms up with one forward, then alternates; stage 1 alternates.
    ("1f1b", ["stage 0 |F0F1....B0B0F2B1B1..B2B2|",
              "stage 1 |..F0B0B0F1B1B1F2B2B2....|"]),
])
def test_timeline_of_two_stages_and_three_microbatches(schedule, rows):
  text = plot.timeline(_plan(2, 3, schedule))
  lines = text.splitlines()
  assert lines[1:] == rows
  assert schedule in lines[0] and "12 ticks" in lines[0]
  assert "bubble, 25%" in lines[0]  # (S - 1) / (c + S - 1) = 1 / 4


@pytest.mark.parametrize("schedule", plot.SCHEDULES)
@pytest.mark.parametrize("num_stages, num_microbatches", [(1, 1), (1, 4), (2, 1), (3, 5),
                                                         (4, 2), (4, 8)])
def test_schedule_events_are_a_valid_pipeline(schedule, num_stages, num_microbatches):
  s_, c = num_stages, num_microbatches
  events = plot.schedule_events(s_, c, schedule)
  done = {(e.phase, e.stage, e.microbatch): e for e in events}
  assert len(events) == len(done) == 2 * s_ * c  # every pass exactly once
  for s in range(s_):
    mine = sorted((e for e in events if e.stage == s), key=lambda e: e.start)
    assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))  # one pass at a time
    in_flight = peak = 0
    for e in mine:
      in_flight += 1 if e.phase == "forward" else -1
      peak = max(peak, in_flight)
    # GPipe keeps every micro-batch's activations; 1F1B at most the stages from s on.
    assert peak == (c if schedule == "gpipe" else min(c, s_ - s))
  for (phase, s, m), e in done.items():
    if phase == "forward" and s > 0:
      assert e.start >= done[("forward", s - 1, m)].end
    if phase == "backward":
      before = done[("backward", s + 1, m)] if s < s_ - 1 else done[("forward", s, m)]
      assert e.start >= before.end
  # Equal stages: (c + S - 1) x (forward + backward), the textbook fill-and-drain time.
  assert max(e.end for e in events) == (c + s_ - 1) * (plot.FORWARD_TICKS + plot.BACKWARD_TICKS)


def test_timeline_compacts_wide_schedules():
  text = plot.timeline(_plan(4, 32, "1f1b"), max_width=80)
  rows = text.splitlines()[1:]
  assert len(rows) == 4 and all(len(r) <= 80 for r in rows)
  assert set("".join(r.split("|")[1] for r in rows)) <= set("<>=.")
  assert rows[0].split("|")[1].endswith("<") and rows[3].split("|")[1].endswith(".")


def test_schedule_events_rejects_bad_input():
  with pytest.raises(ValueError, match="schedule='interleaved'"):
    plot.schedule_events(2, 2, "interleaved")
  with pytest.raises(ValueError, match="num_microbatches must be a positive int"):
    plot.schedule_events(2, 0, "gpipe")
  with pytest.raises(ValueError, match="one positive duration per stage"):
    plot.schedule_events(2, 2, "gpipe", forward=[1.0])


def test_plan_events_are_to_scale():
  plan = _plan(2, 4, "gpipe", layer_time_s=3e-3)  # 6 ms per stage: 2 forward, 4 backward
  events = plot.plan_events(plan)
  assert {round(e.duration * 1e3, 9) for e in events if e.phase == "forward"} == {2.0}
  assert {round(e.duration * 1e3, 9) for e in events if e.phase == "backward"} == {4.0}


# --- plot: picture -------------------------------------------------------------------


def test_save_png_writes_a_picture(tmp_path):
  pytest.importorskip("matplotlib")
  path = tmp_path / "plan.png"
  plot.save_png(_plan(3, 4, "1f1b"), str(path))
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_missing_matplotlib_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
  with pytest.raises(ImportError, match=r"pip install -e '\.\[experiments\]'"):
    plot.save_png(_plan(), "unused.png")


# --- scaling helpers -----------------------------------------------------------------


def _layer(name, t):
  return solver.Layer(name=name, time=[t, 2 * t], memory=[2.0, 1.0])


def _edge(src, dst, x=0.1):
  return solver.Edge(src=src, dst=dst, same_stage=[[0, x], [x, 0]],
                     cross_stage=[[x, 2 * x], [2 * x, x]])


def _bert_like(times=(2.0, 3.0, 3.0, 4.0)):
  """embed, blocks (first, middle..., last), head; the pooler reads the last block."""
  blocks = [f"blocks/{i}" for i in range(len(times))]
  layers = ([_layer("embed", 1.0)] + [_layer(b, t) for b, t in zip(blocks, times)]
            + [_layer("head", 5.0), _layer("pooler", 0.5)])
  costs = [0.2] + [0.3] * (len(blocks) - 3) + [0.35]  # first->, middle->middle, ->last
  edges = ([_edge("embed", blocks[0])]
           + [_edge(a, b, x) for a, b, x in zip(blocks, blocks[1:], costs)]
           + [_edge(blocks[-1], "head"), _edge(blocks[-1], "pooler", 0.4)])
  return solver.Problem(layers=layers, edges=edges, num_stages=2, num_microbatches=4)


def test_repeat_blocks_to_the_same_count_is_the_identity():
  p = _bert_like()
  again = scaling.repeat_blocks(p, 4)
  assert again.layers == p.layers
  assert set(again.edges) == set(p.edges)


def test_repeat_blocks_deepens_the_middle():
  again = scaling.repeat_blocks(_bert_like(), 6)
  names = [l.name for l in again.layers]
  assert names == ["embed"] + [f"blocks/{i}" for i in range(6)] + ["head", "pooler"]
  times = {l.name: l.time[0] for l in again.layers}
  assert [times[f"blocks/{i}"] for i in range(6)] == [2.0, 3.0, 3.0, 3.0, 3.0, 4.0]
  pairs = {(e.src, e.dst): e.same_stage[0][1] for e in again.edges}
  assert pairs == {("embed", "blocks/0"): 0.1, ("blocks/0", "blocks/1"): 0.2,
                   ("blocks/1", "blocks/2"): 0.3, ("blocks/2", "blocks/3"): 0.3,
                   ("blocks/3", "blocks/4"): 0.3, ("blocks/4", "blocks/5"): 0.35,
                   ("blocks/5", "head"): 0.1, ("blocks/5", "pooler"): 0.4}
  assert solver.solve(again).objective > solver.solve(_bert_like()).objective


def test_repeat_blocks_rejects_what_it_cannot_copy():
  with pytest.raises(ValueError, match="needs >= 2 blocks"):
    scaling.repeat_blocks(_bert_like(), 1)
  # Three different blocks: no middle -> middle edge to copy.
  with pytest.raises(ValueError, match="no edge between blocks 1 apart fits"):
    scaling.repeat_blocks(_bert_like((2.0, 3.0, 4.0)), 5)


def test_scaled_cluster_rebuilds_the_presets():
  base = ua.Cluster.preset("h100-80g-8x8")
  assert scaling.scaled_cluster(base, 64) == base
  assert scaling.scaled_cluster(base, 8) == ua.Cluster.preset("h100-80g-1x8")
  big = scaling.scaled_cluster(base, 1024)
  assert (big.num_devices, big.num_nodes, big.name) == (1024, 128, "h100-80g-128x8")
  with pytest.raises(ValueError, match="multiple of 8"):
    scaling.scaled_cluster(base, 12)
  with pytest.raises(ValueError, match="needs a preset of nodes"):
    scaling.scaled_cluster(ua.Cluster.preset("tpu-v5p-128"), 64)


# --- paper_tables helpers --------------------------------------------------------------


def test_every_failure_becomes_a_row(monkeypatch):
  def fake_compare(graph, cluster, *, methods, **kwargs):
    method = methods[0]
    if method == "uniap":
      raise ValueError("uniap: time_limit_s=5 ran out before any plan was found. Raise it.")
    if method == "fsdp":
      raise TypeError("'NoneType' object is not subscriptable")
    return (baselines.Row(method=method, status="out of memory", step_time_s=math.inf,
                          throughput=0.0, memory_per_device_bytes=0.0,
                          optimisation_time_s=0.0, search_time_s=0.1,
                          description=f"{method}: out of memory: needs 31.20 GiB. Try more."),)

  monkeypatch.setattr(paper_tables.baselines, "compare", fake_compare)
  rows = paper_tables.compare_methods(None, ua.Cluster.preset("env_b"), model="bert_huge",
                                      methods=["uniap", "fsdp", "pipeline_only"],
                                      global_batch=32, time_limit_s=5.0)
  got = [(r.method, r.feasibility, r.status) for r in rows]
  assert got == [("uniap", "no plan", "time_limit"), ("fsdp", "error", "error"),
                 ("pipeline_only", "out of memory", "out of memory")]
  assert rows[1].note == "TypeError: 'NoneType' object is not subscriptable"
  assert rows[2].note == "pipeline_only: out of memory: needs 31.20 GiB"
  assert rows[2].paper == "no plan"  # the paper's cell for this row


def test_markdown_puts_the_papers_cells_beside_ours():
  ours = paper_tables.Result(
      model="bert_huge", cluster="env_b", global_batch=32, method="uniap", feasibility="ok",
      status="optimal", throughput=10.5, memory_per_device_bytes=2**31, pp=2,
      num_microbatches=8, schedule="gpipe", mesh="pp2 dp4", strategy_mix="34x dp=b0",
      paper=paper_tables.PUBLISHED[("env_b", "bert_huge", "uniap")])
  text = paper_tables.markdown([ours], time_limit_s=5.0)
  assert "### env_b, 8 x " in text
  assert ("| bert_huge | uniap | ok | 10.50 | 2.00 | 0.00 | optimal | pp=2, c=8 gpipe, "
          "pp2 dp4; 34x dp=b0 | 10.77 samples/s |") in text


def test_markdown_says_how_far_a_stopped_search_is_from_proven():
  stopped = paper_tables.Result(
      model="bert_huge", cluster="env_b", global_batch=32, method="uniap", feasibility="ok",
      status="time_limit", gap=0.1234, throughput=10.5, memory_per_device_bytes=2**31,
      pp=2, num_microbatches=8, schedule="gpipe", mesh="pp2 dp4", strategy_mix="34x dp=b0")
  text = paper_tables.markdown([stopped], time_limit_s=5.0)
  assert "| time_limit (gap 12.3%) |" in text


def test_uniap_against_best_picks_the_fastest_feasible_baseline():
  common = dict(model="bert_huge", cluster="env_b", global_batch=32)
  rows = [
      paper_tables.Result(method="uniap", feasibility="ok", status="time_limit (warm start kept)",
                          gap=0.05, throughput=12.0, **common),
      paper_tables.Result(method="megatron", feasibility="ok", status="heuristic",
                          throughput=11.0, **common),
      paper_tables.Result(method="pipeline_only", feasibility="ok", status="optimal",
                          throughput=12.0, **common),
      paper_tables.Result(method="fsdp", feasibility="out of memory", status="out of memory",
                          **common),
  ]
  lines = paper_tables.uniap_against_best(rows).splitlines()
  assert lines[2] == ("| env_b | bert_huge | 12.00 | time_limit (warm start kept) (gap 5.0%) "
                      "| pipeline_only | 12.00 |")
  assert len(lines) == 3


# --- launchers, end to end (own processes: each defines its absl flags) ----------------


def _run(module, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  done = subprocess.run([sys.executable, "-m", module, *flags], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_paper_tables_tiny_run(tmp_path):
  out = _run("experiments.paper_tables", "--models=gpt2", "--size=tiny", "--clusters=cpu-8",
             "--global_batch=4", f"--out_dir={tmp_path}", "--time_limit_s=120")
  rows = _rows(tmp_path / "cpu-8.csv")
  assert [r["method"] for r in rows] == ["uniap", *baselines.BASELINES]
  assert {r["feasibility"] for r in rows} <= {"ok", "out of memory", "no plan", "not applicable"}
  # 4 samples do not split over 8 devices: pure data parallelism has no plan.
  by = {r["method"]: r for r in rows}
  assert by["data_parallel"]["feasibility"] == "no plan"
  uniap = by["uniap"]
  assert uniap["feasibility"] == "ok" and uniap["status"].startswith("optimal"), uniap["status"]
  # UniAP's search space holds every baseline's plan, under the same cost model.
  best = float(uniap["throughput_samples_per_s"])
  for r in rows:
    if r["feasibility"] == "ok":
      assert float(r["throughput_samples_per_s"]) <= best * (1 + 1e-6), r["method"]
  markdown = (tmp_path / "paper_tables.md").read_text()
  tables, short = markdown.split("UniAP beside the best baseline:")
  assert "### cpu-8" in tables and tables.count("| gpt2 |") == len(rows)
  assert short.count("| cpu-8 | gpt2 |") == 1
  assert "| gpt2 | uniap | ok |" in out


def test_scaling_tiny_grid(tmp_path):
  _run("experiments.scaling", "--size=tiny", "--layer_models=llama_7b", "--layers=2,5",
       "--layer_pp=1,2", "--devices=8,16", "--device_base=a100-40g-2x8", "--device_pp=1",
       f"--out_dir={tmp_path}", "--time_limit_s=60", "--nopng")
  rows = _rows(tmp_path / "scaling.csv")
  layers = [r for r in rows if r["sweep"] == "layers"]
  assert [(r["blocks"], r["pp"]) for r in layers] == [("2", "1"), ("5", "1"), ("2", "2"),
                                                       ("5", "2")]
  assert [int(r["layers"]) - int(r["blocks"]) for r in layers] == [3] * 4  # embed, norm, head
  devices = [r for r in rows if r["sweep"] == "devices"]
  assert [r["devices"] for r in devices] == ["8", "16"]
  assert all(r["status"] == "optimal" and float(r["gap"]) == 0 for r in rows)
  assert not (tmp_path / "scaling.png").exists()


def test_plan_launcher_says_why_no_plan_fits_without_a_traceback():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  done = subprocess.run(
      [sys.executable, "-m", "experiments.plan", "--model=gpt2", "--size=tiny",
       "--cluster=cpu-8", "--global_batch=8", "--memory_limit_gib=0.0001", "--time_limit_s=60"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert "gpt2 (tiny) on cpu-8: No plan fits" in done.stderr, done.stderr[-3000:]
  limit_kib = 0.0001 * 2**30 / 1024  # --memory_limit_gib, as the message prints it
  assert f"per device; the limit is {limit_kib:.2f} KiB" in done.stderr


def test_measure_runs_the_plan_and_sets_it_beside_the_predictions(tmp_path):
  out_json = tmp_path / "measure.json"
  out = _run("experiments.measure", "--model=gpt2", "--size=tiny", "--cluster=cpu-8",
             "--batch=8", "--steps=2", "--time_limit_s=60", f"--out={out_json}")
  figures = json.loads(out_json.read_text())
  assert figures["cluster"] == "cpu-8" and figures["executor"] == "gpipe-remat"
  assert len(figures["times_s"]) == 2 and all(t > 0 for t in figures["times_s"])
  assert figures["streamed_s"] > 0
  # The plan on 8 CPU devices: its compiled memory is what XLA reports for the applied
  # step, and the predictions are the plan's own.
  assert figures["compiled_memory_bytes"] > 0
  assert figures["predicted_memory_bytes"] and figures["predicted_step_time_s"] > 0
  assert len(figures["predicted_runtime_memory_bytes"]) == figures["num_stages"]
  assert figures["plain_jit_s"] is None  # no one-device yardstick for 8 devices
  assert "step time, each waited for" in out and "compiled (memory_analysis)" in out
