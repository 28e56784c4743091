"""Plans a zoo model on a cluster and prints the plan.

  python -m experiments.plan --model=llama_7b --cluster=a100-40g-4x4 --global_batch=32 --out=plan.json
"""

import sys
import time

from absl import app
from absl import flags
from rich.progress import Progress

import uniap_jax as ua
from experiments import clusters
from uniap_jax import search
from experiments import models
from experiments import plot

_MODEL = flags.DEFINE_enum("model", "gpt2", models.NAMES, "Zoo model to plan.")
_SIZE = flags.DEFINE_enum("size", "paper", ["paper", "tiny"], "Model size.")
_CLUSTER = flags.DEFINE_string(
    "cluster", "a100-40g-2x8",
    f"Cluster preset ({', '.join(ua.Cluster.presets())}), a cluster JSON file, or 'devices' "
    "(Cluster.from_devices()).")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 16, "Samples per step.")
_PP = flags.DEFINE_integer("pp", None, "Pin the pipeline degree.")
_MICROBATCHES = flags.DEFINE_integer("num_microbatches", None, "Pin the micro-batch count.")
_SCHEDULE = flags.DEFINE_enum("schedule", None, ["gpipe", "1f1b"], "Pin the schedule.")
_MEMORY = flags.DEFINE_float("memory_limit_gib", None, "Override the per-device memory limit.")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", 300.0, "Budget of the whole search, seconds.")
_OBJECTIVE = flags.DEFINE_enum(
    "objective", "runtime", list(search.OBJECTIVES),
    "What ranks the configurations: 'runtime', the step time of the pipeline "
    "plan.apply runs; 'paper', the UniAP objective (GPipe's time per iteration).")
_OUT = flags.DEFINE_string("out", None, "Write the plan as JSON to this file.")
_PLOT = flags.DEFINE_string(
    "plot", None, "Draw the plan (pipeline Gantt chart and per-layer strategies) to this "
    "PNG file; needs matplotlib: pip install -e '.[experiments]'.")



def main(argv):
  del argv
  if _PLOT.value:
    plot.check_matplotlib()  # fail before planning, not after
  cluster = clusters.from_flag(_CLUSTER.value)
  model = models.create(_MODEL.value, _SIZE.value, shape_only=True)
  optimizer = models.create_optimizer(model)
  batch = models.example_batch(_MODEL.value, _SIZE.value, _GLOBAL_BATCH.value, shape_only=True)
  start = time.perf_counter()
  with Progress(transient=True) as bar:
    task = bar.add_task("configurations", total=None)

    def report(p):
      best = "-" if p.incumbent == float("inf") else f"{p.incumbent * 1e3:.2f} ms"
      bar.update(task, total=p.total, completed=p.done,
                 description=f"{p.config.describe()} {p.status}, best {best}")

    try:
      plan = ua.plan(
          models.train_step(_MODEL.value), model, optimizer, batch, cluster=cluster,
          pp=_PP.value, num_microbatches=_MICROBATCHES.value, schedule=_SCHEDULE.value,
          memory_limit_bytes=_MEMORY.value * 2**30 if _MEMORY.value else None,
          time_limit_s=_TIME_LIMIT.value, objective=_OBJECTIVE.value, progress=report)
    except ValueError as e:  # no plan fits, budget too short, bad knobs: the message says
      sys.exit(f"{_MODEL.value} ({_SIZE.value}) on {cluster.name}: {e}")
  print(f"{_MODEL.value} ({_SIZE.value}) on {cluster.name}, planned in "
        f"{time.perf_counter() - start:.1f} s (tracing included)")
  print(plan.summary())
  print(plot.timeline(plan))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(plan.to_json())
    print(f"plan written to {_OUT.value}")
  if _PLOT.value:
    plot.save_png(plan, _PLOT.value)
    print(f"plan drawn to {_PLOT.value}")


if __name__ == "__main__":
  app.run(main)
