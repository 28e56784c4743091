"""Times tracing one model's train step into a LayerGraph, on shapes only.

  python -m experiments.bench_trace [--model=llama_7b] [--size=paper] [--batch_size=8]
      [--seq_len=2048] [--rows=8]

Prints the wall time of model creation and of `trace` (and trace's CPU time, which
other processes on the machine do not inflate), the process's peak resident
memory (nothing is allocated: Llama-7B's 27 GB of float32 parameters never exist), and
the first rows of the graph's summary.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from collections.abc import Sequence
import resource
import sys
import time

from absl import app
from absl import flags

from experiments import models
from uniap_jax import graph as graphlib

_MODEL = flags.DEFINE_enum("model", "llama_7b", list(models.NAMES), "Model of the zoo to trace.")
_SIZE = flags.DEFINE_enum("size", "paper", list(models.SIZES), "Its configuration.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples in the batch.", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per example; the config's when unset.")
_ROWS = flags.DEFINE_integer("rows", 8, "Summary lines to print.", lower_bound=0)


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def bench(name: str, size: str, batch_size: int, seq_len: int | None) -> tuple[dict, str]:
  """Creates the model shape-only and traces its train step; returns timings and summary."""
  start = time.perf_counter()
  model = models.create(name, size, shape_only=True)
  optimizer = models.create_optimizer(model)
  batch = models.example_batch(name, size, batch_size, shape_only=True, seq_len=seq_len)
  created, cpu = time.perf_counter(), time.process_time()
  graph = graphlib.trace(models.train_step(name), model, optimizer, batch)
  traced = time.perf_counter()
  stats = {"create_s": created - start, "trace_s": traced - created,
           "trace_cpu_s": time.process_time() - cpu,
           "peak_rss_bytes": peak_rss_bytes(), "layers": len(graph.layers),
           "ops": sum(len(l.ops) for l in graph.layers)}
  return stats, graph.summary()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  stats, summary = bench(_MODEL.value, _SIZE.value, _BATCH_SIZE.value, _SEQ_LEN.value)
  print(f"{_MODEL.value} ({_SIZE.value}), batch {_BATCH_SIZE.value}: create "
        f"{stats['create_s']:.2f} s, trace {stats['trace_s']:.2f} s "
        f"({stats['trace_cpu_s']:.2f} s CPU), peak RSS "
        f"{stats['peak_rss_bytes'] / 2**30:.2f} GiB, {stats['layers']} layers, "
        f"{stats['ops']} ops")
  print("\n".join(summary.splitlines()[:_ROWS.value]))


if __name__ == "__main__":
  app.run(main)
