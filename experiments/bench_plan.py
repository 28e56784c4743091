"""Times the whole UniAP outer loop on the solver speed targets.

  python -m experiments.bench_plan                       # all targets
  python -m experiments.bench_plan --targets=bert_huge:env_a:16

Prints, per target, the solver's time summed over the outer loop (`plan.solver.time_s`:
tracing and cost tables excluded), the whole search's wall time (cost tables included)
and its CPU time (steadier on a shared machine), status and gap. The configurations are
ranked by the paper's objective (`--objective=paper`, the UniAP time per iteration the
speed targets were set with). `--verbose` prints each configuration the loop settles, with
the seconds since the previous one (solving and costing it), to show which dominate.
"""

import time

from absl import app
from absl import flags

import uniap_jax as ua
from experiments import models
from uniap_jax import graph as graph_lib
from uniap_jax import search

# model:cluster:global_batch, with the targets for solver time.
DEFAULT_TARGETS = ("bert_huge:env_a:16", "llama_7b:env_c:32", "llama_70b:tpu-v5p-2048:1024")

_TARGETS = flags.DEFINE_list("targets", list(DEFAULT_TARGETS), "model:cluster:global_batch")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", 1800.0, "Budget of each whole search.")
_OBJECTIVE = flags.DEFINE_enum("objective", "paper", ["paper", "runtime"],
                               "What ranks the configurations (plan_graph's objective=).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print every configuration settled, with its time.")


def _reporter():
  """A progress callback printing each configuration not pruned, and the time it took."""
  last = [time.perf_counter()]

  def report(p: search.Progress) -> None:
    now = time.perf_counter()
    if p.status != "pruned":
      print(f"  {p.done}/{p.total} {p.config.describe()}: {p.status}, {now - last[0]:.2f} s, "
            f"bound {p.bound:.6g}, incumbent {p.incumbent:.6g}", flush=True)
    last[0] = now

  return report


def main(argv):
  del argv
  for target in _TARGETS.value:
    name, cluster_name, batch = target.split(":")
    cluster = ua.Cluster.preset(cluster_name)
    model = models.create(name, "paper", shape_only=True)
    optimizer = models.create_optimizer(model)
    example = models.example_batch(name, "paper", int(batch), shape_only=True)
    t0 = time.perf_counter()
    graph = graph_lib.trace(models.train_step(name), model, optimizer, example)
    trace_s = time.perf_counter() - t0
    cpu0 = time.process_time()
    plan = search.plan_graph(graph, cluster, args=(model, optimizer, example),
                             time_limit_s=_TIME_LIMIT.value, objective=_OBJECTIVE.value,
                             progress=_reporter() if _VERBOSE.value else None)
    cpu_s = time.process_time() - cpu0
    s = plan.solver
    print(f"{name} on {cluster_name} ({cluster.num_devices} devices), global batch {batch}: "
          f"solver {s.time_s:.2f} s, search {s.search_time_s:.1f} s (CPU {cpu_s:.1f} s), "
          f"trace {trace_s:.1f} s; "
          f"{s.status}, gap {100 * s.gap:.2f}%, {s.configurations} configurations "
          f"({s.skipped} pruned); plan {plan.mesh_axes}, {plan.num_microbatches} micro-batches, "
          f"{plan.schedule}, {plan.predicted.throughput:.2f} samples/s", flush=True)


if __name__ == "__main__":
  app.run(main)
