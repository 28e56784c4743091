"""UniAP against every baseline on the paper's models and clusters, as tables.

  python -m experiments.paper_tables [--models=bert_huge,llama_7b] [--clusters=env_b]
      [--global_batch=0] [--time_limit_s=5] [--out_dir=paper_tables]

Each model is traced once (shapes only) and the graph is reused on every cluster and by
every method; all methods on one model and cluster, UniAP included, share one cost-table
cache, so the tables UniAP builds first are not built again by the baselines. Every plan is scored by
UniAP's cost model (`uniap_jax.baselines`), so the throughputs are predictions, not
measurements. Writes one CSV per cluster and `paper_tables.md` (the paper's published
cells, reference/uniap.md, beside ours) under --out_dir, and prints the tables.

Determinism: the rows, their order and every choice here are fixed by the flags. The one
wall-clock input is --time_limit_s, the budget of each method on each model and cluster:
a search it cuts short says so in its status ("time_limit", or "no plan" with the
reason), and only those rows can differ between runs.

Warm start: on each model and cluster the baselines run first, and UniAP starts from the
best of their plans (they lie inside its search space). So UniAP never reports a plan
worse than a baseline's, even when its budget runs out; its status then says
"(warm start kept)" if nothing better was found. Its optimisation time is its own
search; the warm start's cost is in the baselines' rows.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import csv
import dataclasses
import logging
import math
import os
import sys
import time

from absl import app
from absl import flags

import uniap_jax as ua
from experiments import clusters as cluster_flags
from experiments import models
from uniap_jax import baselines

PAPER_MODELS = ("bert_huge", "t5_large", "vit_huge", "swin_huge", "llama_7b")
PAPER_CLUSTERS = ("env_a", "env_b", "env_c", "a100-40g-2x8", "h100-80g-8x8", "tpu-v5p-128")
METHODS = ("uniap", *baselines.BASELINES)
TRACE_BATCH = 8  # samples in the traced example batch; plans scale it to the global batch
MIN_GLOBAL_BATCH = 32  # default global batch: this, or one sample per device if more
_GIB = 2**30

# The paper's published cells (reference/uniap.md): (cluster, model, method) -> text.
PUBLISHED: dict[tuple[str, str, str], str] = {
    ("env_b", "bert_huge", "uniap"): "10.77 samples/s",
    ("env_b", "bert_huge", "galvatron"): "6.27 samples/s",
    ("env_b", "bert_huge", "alpa"): "8.95 samples/s",
    ("env_b", "bert_huge", "intra_only"): "2.48 samples/s",
    ("env_b", "bert_huge", "pipeline_only"): "no plan",
    ("env_b", "t5_large", "uniap"): "9.01 samples/s",
    ("env_b", "t5_large", "intra_only"): "2.92 samples/s",
    ("env_b", "t5_large", "pipeline_only"): "no plan",
    ("env_b", "vit_huge", "intra_only"): "out of memory",
    ("env_c", "llama_7b", "uniap"): "4.63 samples/s",
    ("env_c", "llama_7b", "galvatron"): "1.22 samples/s",
    ("env_c", "llama_7b", "alpa"): "n/a",
    ("env_a", "bert_huge", "uniap"): "optimisation 0.37 min",
    ("env_a", "bert_huge", "galvatron"): "optimisation 6.44 min",
    ("env_a", "bert_huge", "alpa"): "optimisation > 40 min",
    ("env_a", "swin_huge", "uniap"): "plan found",
    ("env_a", "swin_huge", "galvatron"): "out of memory",
    ("env_a", "swin_huge", "alpa"): "cannot run",
}

CSV_FIELDS = ("model", "cluster", "global_batch", "method", "feasibility", "status",
              "throughput_samples_per_s", "step_time_s", "memory_per_device_gib",
              "optimisation_time_s", "search_time_s", "gap", "pp", "num_microbatches",
              "schedule", "mesh", "strategy_mix", "note", "paper")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Result:
  """One method on one model and cluster: a table row.

  Attributes:
    feasibility: "ok", or as the paper writes it: "out of memory", "no plan"; or
      "not applicable"; "error" when the method raised (a bug; the log has it).
    status: the plan's solver status ("optimal", "heuristic", "time_limit"), else the
      feasibility ("time_limit" when the budget ran out before any plan).
    optimisation_time_s: the method's solving time, cost tables excluded (as the
      paper's times exclude profiling); search_time_s: the whole call.
    strategy_mix: the most frequent per-layer strategies, "count x strategy".
    note: why there is no plan, in one sentence.
    paper: the paper's published cell for this row, or "".
    plan: the plan itself (not written to the CSV), or None.
  """

  model: str
  cluster: str
  global_batch: int
  method: str
  feasibility: str
  status: str
  throughput: float = 0.0
  step_time_s: float = math.inf
  memory_per_device_bytes: float = 0.0
  optimisation_time_s: float = 0.0
  search_time_s: float = 0.0
  gap: float = math.nan
  pp: int = 0
  num_microbatches: int = 0
  schedule: str = ""
  mesh: str = ""
  strategy_mix: str = ""
  note: str = ""
  paper: str = ""
  plan: ua.Plan | None = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    allowed = ("ok", "out of memory", "no plan", "not applicable", "error")
    if self.feasibility not in allowed:
      raise ValueError(f"feasibility must be one of {allowed}, got {self.feasibility!r}")


def trace_model(name: str, size: str = "paper") -> ua.LayerGraph:
  """Traces a zoo model's train step on shapes only (nothing of its size is allocated)."""
  model = models.create(name, size, shape_only=True)
  optimizer = models.create_optimizer(model)
  batch = models.example_batch(name, size, TRACE_BATCH, shape_only=True)
  return ua.trace(models.train_step(name), model, optimizer, batch)


def default_global_batch(cluster: ua.Cluster) -> int:
  """MIN_GLOBAL_BATCH, or one sample per device when the cluster is larger."""
  return max(MIN_GLOBAL_BATCH, cluster.num_devices)


def strategy_mix(plan: ua.Plan, top: int = 3) -> str:
  """The plan's most frequent per-layer strategies, e.g. "32x dp=batch tp=hidden; 2x dp=batch"."""
  counts = collections.Counter(l.strategy for l in plan.layers)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  text = "; ".join(f"{n}x {s}" for s, n in ranked[:top])
  return text + (f"; +{len(ranked) - top} more" if len(ranked) > top else "")


def _from_row(row: baselines.Row, **common) -> Result:
  plan = row.plan
  if plan is None:
    feasibility = row.status if row.status in ("out of memory", "not applicable") else "no plan"
    return Result(feasibility=feasibility, status=row.status, search_time_s=row.search_time_s,
                  note=row.description.split(". ")[0], **common)
  return Result(
      feasibility="ok", status=row.status, throughput=plan.predicted.throughput,
      step_time_s=plan.predicted.step_time_s,
      memory_per_device_bytes=float(max(plan.predicted.memory_per_device_bytes)),
      optimisation_time_s=plan.solver.time_s, search_time_s=row.search_time_s,
      gap=plan.solver.gap, pp=len(plan.stages), num_microbatches=plan.num_microbatches,
      schedule=plan.schedule, mesh=" ".join(f"{k}{v}" for k, v in plan.mesh_axes.items()),
      strategy_mix=strategy_mix(plan), plan=plan, **common)


def compare_methods(graph: ua.LayerGraph, cluster: ua.Cluster, *, model: str,
                    methods: Sequence[str] = METHODS, global_batch: int,
                    time_limit_s: float, cache: dict | None = None,
                    warm_start: Sequence[ua.Plan] = ()) -> list[Result]:
  """Every method on one traced model and cluster, one Result each, in `methods` order.

  The baselines run first; UniAP starts from the best of their plans and `warm_start`
  (see `baselines.compare`). A method that finds no plan becomes a row that says why
  (out of memory, no plan of its kind, or its time limit ran out first), never an
  exception. `cache` holds every method's cost tables; share it only between calls on
  the same graph and cluster.
  """
  cache = {} if cache is None else cache
  found = list(warm_start)
  out = {}
  for method in sorted(methods, key=lambda m: m == "uniap"):
    common = dict(model=model, cluster=cluster.name, global_batch=global_batch,
                  method=method, paper=PUBLISHED.get((cluster.name, model, method), ""))
    start = time.perf_counter()
    try:
      (row,) = baselines.compare(graph, cluster, methods=[method], global_batch=global_batch,
                                 time_limit_s=time_limit_s, cache=cache,
                                 warm_start=found if method == "uniap" else ())
    except ValueError as e:  # the budget ran out before any plan, or nothing to search
      timed_out = "time_limit_s" in str(e)
      out[method] = Result(feasibility="no plan", status="time_limit" if timed_out else "no plan",
                           search_time_s=time.perf_counter() - start,
                           note=str(e).split(". ")[0], **common)
      continue
    except Exception as e:  # a bug in the library: one row says so, the table goes on
      logging.exception("%s on %s with %s failed", model, cluster.name, method)
      out[method] = Result(feasibility="error", status="error",
                           search_time_s=time.perf_counter() - start,
                           note=f"{type(e).__name__}: {e}".split("\n")[0], **common)
      continue
    out[method] = _from_row(row, **common)
    if row.plan is not None:
      found.append(row.plan)
  return [out[m] for m in methods]


def _csv_value(value) -> str:
  if isinstance(value, float):
    return "" if math.isnan(value) or math.isinf(value) else f"{value:.6g}"
  return str(value)


def write_csv(results: Sequence[Result], path: str) -> None:
  """One line per Result, columns CSV_FIELDS (memory in GiB, times in seconds)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_FIELDS)
    for r in results:
      values = dataclasses.asdict(r)
      values["throughput_samples_per_s"] = r.throughput
      values["memory_per_device_gib"] = r.memory_per_device_bytes / _GIB
      writer.writerow([_csv_value(values[k]) for k in CSV_FIELDS])


def markdown(results: Sequence[Result], *, time_limit_s: float) -> str:
  """One Markdown table per cluster: our predictions, with the paper's cells beside."""
  lines = []
  for cluster in dict.fromkeys(r.cluster for r in results):
    rows = [r for r in results if r.cluster == cluster]
    c = ua.Cluster.preset(cluster) if cluster in ua.Cluster.presets() else None
    about = f", {c.num_devices} x {c.device_kind}" if c else ""
    lines += [f"### {cluster}{about}, global batch {rows[0].global_batch}", "",
              "| model | method | feasibility | samples/s | GiB/device | opt. s | status "
              "| plan (pp, micro-batches, mesh; strategy mix) | paper |",
              "|---|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
      if r.feasibility == "ok":
        plan = (f"pp={r.pp}, c={r.num_microbatches} {r.schedule}, {r.mesh}; "
                f"{r.strategy_mix}")
        cells = (f"{r.throughput:.2f}", f"{r.memory_per_device_bytes / _GIB:.2f}",
                 f"{r.optimisation_time_s:.2f}")
      else:
        plan, cells = r.note.replace("|", "/"), ("-", "-", "-")
      # A search its budget stopped says how far from proven it is.
      status = (f"{r.status} (gap {100 * r.gap:.1f}%)"
                if r.status.startswith("time_limit") and math.isfinite(r.gap) else r.status)
      lines.append(f"| {r.model} | {r.method} | {r.feasibility} | {' | '.join(cells)} | "
                   f"{status} | {plan} | {r.paper} |")
    lines.append("")
  lines.append(f"Predicted by UniAP's cost model; each method had {time_limit_s:g} s per "
               "model and cluster (opt. s: solver time, cost tables excluded).")
  return "\n".join(lines)


def uniap_against_best(results: Sequence[Result]) -> str:
  """Per model and cluster, UniAP beside the best baseline (highest throughput), as a
  Markdown table: the short form of the per-method tables."""
  pairs = collections.defaultdict(dict)
  for r in results:
    pairs[(r.cluster, r.model)][r.method] = r
  lines = ["| cluster | model | UniAP samples/s | UniAP status | best baseline | its samples/s |",
           "|---|---|---:|---|---|---:|"]
  for (cluster, model), by_method in pairs.items():
    ours = by_method.get("uniap")
    others = [r for m, r in by_method.items() if m != "uniap" and r.feasibility == "ok"]
    best = max(others, key=lambda r: r.throughput, default=None)
    if ours is None:
      continue
    tput = f"{ours.throughput:.2f}" if ours.feasibility == "ok" else "-"
    status = (f"{ours.status} (gap {100 * ours.gap:.1f}%)"
              if ours.status.startswith("time_limit") and math.isfinite(ours.gap)
              else ours.status)
    lines.append(f"| {cluster} | {model} | {tput} | {status} | "
                 f"{best.method if best else '-'} | {f'{best.throughput:.2f}' if best else '-'} |")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The launcher's flags, defined only when it runs as a program, so that importing
  this module (tests, other launchers) never clashes with another launcher's flags."""
  flags.DEFINE_list("models", list(PAPER_MODELS),
                    f"Zoo models to plan (any of {', '.join(models.NAMES)}).")
  flags.DEFINE_list("clusters", list(PAPER_CLUSTERS),
                    "Cluster presets, or cluster JSON files (ending in .json).")
  flags.DEFINE_list("methods", list(METHODS), f"Methods to compare: {', '.join(METHODS)}.")
  flags.DEFINE_enum("size", "paper", list(models.SIZES), "Model size ('tiny' for tests).")
  flags.DEFINE_integer("global_batch", 0, f"Samples per step; 0: {MIN_GLOBAL_BATCH} or one "
                       "per device, whichever is larger, per cluster.", lower_bound=0)
  flags.DEFINE_float("time_limit_s", 5.0, "Budget of each method on each model and cluster, "
                     "seconds (its whole search, cost tables included; a search it stops "
                     "shows 'time_limit' and its gap). Proving UniAP optimal took 12 s for "
                     "BERT-Huge on env_a, 31 s for Llama-7B on env_c (bench_plan), over 10 "
                     "minutes for BERT-Huge on env_b.",
                     lower_bound=0.01)
  flags.DEFINE_string("out_dir", "paper_tables",
                      "Directory for <cluster>.csv and paper_tables.md.")



def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from rich.progress import Progress  # the experiments extra

  unknown = [m for m in FLAGS.methods if m not in METHODS]
  if unknown:
    raise app.UsageError(f"Unknown --methods {unknown}; known: {', '.join(METHODS)}.")
  clusters = [cluster_flags.from_flag(c) for c in FLAGS.clusters]
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  results: dict[str, list[Result]] = {c.name: [] for c in clusters}
  start = time.perf_counter()
  steps = len(FLAGS.models) * (1 + len(clusters) * len(FLAGS.methods))
  with Progress() as bar:
    task = bar.add_task("tracing", total=steps)
    for name in FLAGS.models:
      bar.update(task, description=f"tracing {name}")
      t0 = time.perf_counter()
      graph = trace_model(name, FLAGS.size)
      bar.console.print(f"{name}: traced {len(graph.layers)} layers in "
                        f"{time.perf_counter() - t0:.1f} s")
      bar.advance(task)
      for cluster in clusters:
        t0, cache, pair = time.perf_counter(), {}, {}
        for method in sorted(FLAGS.methods, key=lambda m: m == "uniap"):  # see compare_methods
          bar.update(task, description=f"{name} on {cluster.name}: {method}")
          (pair[method],) = compare_methods(
              graph, cluster, model=name, methods=[method], time_limit_s=FLAGS.time_limit_s,
              global_batch=FLAGS.global_batch or default_global_batch(cluster), cache=cache,
              warm_start=[r.plan for r in pair.values() if r.plan is not None])
          bar.advance(task)
        results[cluster.name] += [pair[m] for m in FLAGS.methods]
        # Written after every pair, so that a long run cut short keeps what it found.
        write_csv(results[cluster.name], os.path.join(FLAGS.out_dir, f"{cluster.name}.csv"))
        bar.console.print(f"{name} on {cluster.name}: {time.perf_counter() - t0:.1f} s")
  every = [r for rows in results.values() for r in rows]
  text = markdown(every, time_limit_s=FLAGS.time_limit_s)
  if "uniap" in FLAGS.methods and len(FLAGS.methods) > 1:
    text += "\n\nUniAP beside the best baseline:\n\n" + uniap_against_best(every)
  md_path = os.path.join(FLAGS.out_dir, "paper_tables.md")
  with open(md_path, "w") as f:
    f.write(f"`python -m experiments.paper_tables {' '.join(sys.argv[1:])}`\n\n{text}\n")
  print(text)
  print(f"\nwrote {md_path} and {len(results)} CSV file(s) in {FLAGS.out_dir}/; "
        f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
