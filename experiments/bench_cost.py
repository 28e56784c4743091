"""Times building every cost table the outer search needs, per model.

  python -m experiments.bench_cost [--models=bert_huge,llama_7b] [--cluster=a100-40g-2x8]
      [--global_batch=32] [--pp=1,2,4,8,16]

For each model (paper size, traced on shapes only) and each pipeline degree pp, builds
the CostTables of every intra-stage mesh (`strategies.mesh_shapes`) with pp
micro-batches (so each degree costs its own micro-batch size), sharing one cache, so
identical layers (equal `Layer.signature`) are costed once per mesh and micro-batch
size. Prints the wall time and CPU time of the tables (tracing is timed apart), and
per layer kind the candidates costed and kept after Pareto pruning.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from collections.abc import Sequence
import time

from absl import app
from absl import flags

from experiments import models
from uniap_jax import cost
from uniap_jax import graph as graphlib
from uniap_jax import strategies
from uniap_jax.cluster import Cluster

_MODELS = flags.DEFINE_list("models", ["bert_huge", "llama_7b"], "Models of the zoo.")
_CLUSTER = flags.DEFINE_string("cluster", "a100-40g-2x8", "Cluster preset.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 32, "Samples per step.", lower_bound=1)
_PP = flags.DEFINE_list("pp", ["1", "2", "4", "8", "16"], "Pipeline degrees to cost.")


def bench(name: str, cluster: Cluster, global_batch: int,
          pipeline_degrees: Sequence[int]) -> tuple[dict, list[str]]:
  """Traces `name` and builds its tables; returns timings and per-kind candidate lines."""
  start = time.perf_counter()
  model = models.create(name, "paper", shape_only=True)
  batch = models.example_batch(name, "paper", global_batch, shape_only=True)
  graph = graphlib.trace(models.train_step(name), model, models.create_optimizer(model),
                         batch)
  traced, cpu = time.perf_counter(), time.process_time()
  cache: dict = {}
  rows = []
  num_tables = 0
  for pp in pipeline_degrees:
    for mesh in strategies.mesh_shapes(cluster, cluster.num_devices // pp):
      tables = cost.build_cost_tables(graph, cluster, mesh=mesh, num_stages=pp,
                                      num_microbatches=pp, cache=cache)
      num_tables += 1
      kinds: dict[str, list[str]] = {}
      for layer in tables.layers:
        kinds.setdefault(layer.signature, []).append(
            f"{layer.name}: {layer.num_costed} costed, {len(layer.candidates)} kept")
      per_kind = "; ".join(f"{v[0]}" + (f" (x{len(v)})" if len(v) > 1 else "")
                           for v in kinds.values())
      rows.append(f"  pp={pp:<2d} {str(mesh.as_dict()):<58s} {per_kind}")
  done = time.perf_counter()
  stats = {"trace_s": traced - start, "tables_s": done - traced,
           "tables_cpu_s": time.process_time() - cpu, "tables": num_tables,
           "layers": len(graph.layers),
           "kinds": len({layer.signature for layer in graph.layers})}
  return stats, rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cluster = Cluster.preset(_CLUSTER.value)
  degrees = [int(p) for p in _PP.value if cluster.num_devices % int(p) == 0]
  for name in _MODELS.value:
    stats, rows = bench(name, cluster, _GLOBAL_BATCH.value, degrees)
    print(f"{name} on {cluster.name}, global batch {_GLOBAL_BATCH.value}: "
          f"{stats['tables']} tables in {stats['tables_s']:.2f} s "
          f"({stats['tables_cpu_s']:.2f} s CPU); {stats['layers']} layers of "
          f"{stats['kinds']} kinds; tracing {stats['trace_s']:.2f} s")
    print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
