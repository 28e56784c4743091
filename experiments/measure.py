"""Plans a zoo model on the devices at hand, runs the plan, and sets what ran beside what
the cost model predicted.

  python -m experiments.measure --model=gpt2 --size=paper --batch=8
  python -m experiments.measure --model=gpt2 --size=tiny --cluster=cpu-8 --steps=3
  python -m experiments.measure --model=bert_huge --batch=8 --calibration=calib.json

The model is created with real parameters, planned with `uniap_jax.plan` on the cluster
(`--cluster=devices`, the default: `Cluster.from_devices()`; a preset or a cluster JSON
otherwise), optionally calibrated (`--calibration`, a JSON written by
`experiments.calibrate`), applied with `plan.apply` and run: one untimed step (which
compiles), then `--steps` timed steps, each waited for (`block_until_ready` on the loss
and every parameter and optimizer leaf); the median counts. It prints:

  - time: measured step time against the plan's two predictions, the UniAP objective
    (`predicted.step_time_s`) and the step of our runtime (`runtime_step_time_s`);
  - memory per device: what XLA compiled (arguments + outputs - donated + temporaries,
    `memory_analysis`) and, where the device reports it, the peak it held while the
    steps ran (`memory_stats()["peak_bytes_in_use"]`), against what the plan says its
    runtime holds (`predicted.runtime_memory_per_device_bytes`) and the paper's
    per-layer memory (`predicted.memory_per_device_bytes`);
  - a plain `nnx.jit` of the same step on one device, when the model fits one device,
    as the yardstick of what the plan's runtime adds or saves.

`--out` writes every figure as JSON. Numbers from a CPU host say little about a GPU:
the point of this script is to be run where the cluster really is.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

from collections.abc import Callable, Sequence
import json
import statistics
import sys
import time
from typing import Any

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from flax import nnx
import jax

import uniap_jax as ua
from experiments import clusters
from uniap_jax import profile
from experiments import models

_MODEL = flags.DEFINE_enum("model", "gpt2", models.NAMES, "Zoo model to plan and run.")
_SIZE = flags.DEFINE_enum("size", "paper", ["paper", "tiny"], "Model size.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (samples per step).")
_CLUSTER = flags.DEFINE_string(
    "cluster", "devices",
    "'devices' for Cluster.from_devices(), a preset, or a cluster JSON file.")
_CALIBRATION = flags.DEFINE_string(
    "calibration", None, "A calibration JSON (experiments.calibrate --out) to apply first.")
_PP = flags.DEFINE_integer("pp", None, "Pin the pipeline degree.")
_MICROBATCHES = flags.DEFINE_integer("num_microbatches", None, "Pin the micro-batch count.")
_SCHEDULE = flags.DEFINE_enum("schedule", None, ["gpipe", "1f1b"], "Pin the schedule.")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", 60.0, "Budget of the plan search, seconds.")
_EXECUTOR = flags.DEFINE_enum(
    "executor", None, ["gpipe", "gpipe-remat", "fused", "1f1b"],
    "Run the plan with this pipeline executor instead of its schedule's (plan.apply's "
    "schedule=); the predictions stay those of the plan's own.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after one untimed step).")
_BASELINE = flags.DEFINE_bool(
    "baseline", True, "Also time a plain nnx.jit of the step on one device.")
_OUT = flags.DEFINE_string("out", None, "Write every figure as JSON to this file.")



def _devices(cluster: ua.Cluster) -> list[Any]:
  """The devices the cluster describes: the CPU ones for a CPU cluster, else the default."""
  devices = jax.devices("cpu") if cluster.device_kind == "cpu" else jax.devices()
  if len(devices) < cluster.num_devices:
    raise app.UsageError(f"The cluster {cluster.name} has {cluster.num_devices} devices; "
                         f"JAX sees {len(devices)} here.")
  return devices[:cluster.num_devices]


def _wait(*trees: Any) -> None:
  for leaf in jax.tree.leaves(trees):
    if isinstance(leaf, jax.Array):
      leaf.block_until_ready()


def time_steps_s(step: Callable[..., Any], model: nnx.Module, optimizer: nnx.Optimizer,
                 batch: Any, steps: int) -> tuple[tuple[float, ...], float]:
  """Seconds of each of `steps` calls, each waited for, after one untimed call; then the
  mean seconds per step of `steps` calls dispatched back to back and waited for once, as
  a training loop runs them (the host prepares a step while the device runs the last)."""
  _wait(step(model, optimizer, batch), nnx.state(model), nnx.state(optimizer))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    _wait(step(model, optimizer, batch), nnx.state(model), nnx.state(optimizer))
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  outs = [step(model, optimizer, batch) for _ in range(steps)]
  _wait(outs, nnx.state(model), nnx.state(optimizer))
  return tuple(times), (time.perf_counter() - start) / steps


def compiled_bytes(compiled: Any) -> int | None:
  """Per device: arguments + outputs - donated + temporaries, as XLA compiled them."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def peak_bytes(devices: Sequence[Any]) -> int | None:
  """The most any device held since the process started, where the backend says."""
  peaks = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks)


def _fresh(cluster: ua.Cluster) -> tuple[nnx.Module, nnx.Optimizer, Any]:
  model = models.create(_MODEL.value, _SIZE.value)
  return (model, models.create_optimizer(model),
          models.example_batch(_MODEL.value, _SIZE.value, _BATCH.value))


def _ratio(a: float | None, b: float | None) -> str:
  return f"{a / b:.2f}" if a and b else "-"


def _mib(x: float | None) -> str:
  return "-" if x is None else f"{x / 2**20:,.1f} MiB"


def main(argv):
  del argv
  cluster = clusters.from_flag(_CLUSTER.value)
  if _CALIBRATION.value:
    with open(_CALIBRATION.value, encoding="utf-8") as f:
      cluster = profile.Calibration.from_json(f.read()).apply(cluster)
  devices = _devices(cluster)
  step_fn = models.train_step(_MODEL.value)
  model, optimizer, batch = _fresh(cluster)
  start = time.perf_counter()
  try:
    plan = ua.plan(step_fn, model, optimizer, batch, cluster=cluster, pp=_PP.value,
                   num_microbatches=_MICROBATCHES.value, schedule=_SCHEDULE.value,
                   time_limit_s=_TIME_LIMIT.value)
  except ValueError as e:
    sys.exit(f"{_MODEL.value} ({_SIZE.value}) on {cluster.name}: {e}")
  plan_s = time.perf_counter() - start
  applied = plan.apply(step_fn, devices=devices, schedule=_EXECUTOR.value)
  memory_compiled = compiled_bytes(applied.compile(model, optimizer, batch))
  times, streamed_s = time_steps_s(applied, model, optimizer, batch, _STEPS.value)
  peak = peak_bytes(devices)
  measured_s = statistics.median(times)
  p = plan.predicted
  # What plan.apply holds, where the plan says (plans before it was predicted: the
  # paper's per-layer memory).
  predicted_memory = max(p.runtime_memory_per_device_bytes or p.memory_per_device_bytes)
  result: dict[str, Any] = dict(
      model=_MODEL.value, size=_SIZE.value, batch=_BATCH.value, cluster=cluster.name,
      device_kind=devices[0].device_kind, calibrated=bool(_CALIBRATION.value),
      mesh_axes=dict(plan.mesh_axes), num_stages=len(plan.stages),
      num_microbatches=plan.num_microbatches, schedule=plan.schedule, plan_s=plan_s,
      executor=applied.executor, times_s=list(times), measured_s=measured_s,
      streamed_s=streamed_s, predicted_step_time_s=p.step_time_s,
      predicted_runtime_s=p.runtime_step_time_s,
      predicted_memory_bytes=list(p.memory_per_device_bytes),
      predicted_runtime_memory_bytes=list(p.runtime_memory_per_device_bytes),
      compiled_memory_bytes=memory_compiled, peak_memory_bytes=peak)
  baseline_s = baseline_streamed_s = None
  if _BASELINE.value and cluster.num_devices == 1:
    del model, optimizer, batch, applied  # free the planned step's state first
    with jax.default_device(devices[0]):
      model, optimizer, batch = _fresh(cluster)
      base_times, baseline_streamed_s = time_steps_s(
          nnx.jit(step_fn), model, optimizer, batch, _STEPS.value)
      baseline_s = statistics.median(base_times)
  result.update(plain_jit_s=baseline_s, plain_jit_streamed_s=baseline_streamed_s)

  print(f"{_MODEL.value} ({_SIZE.value}), batch {_BATCH.value}, on {cluster.name} "
        f"({devices[0].device_kind}{', calibrated' if _CALIBRATION.value else ''}); "
        f"planned in {plan_s:.1f} s: mesh {dict(plan.mesh_axes)}, {len(plan.stages)} "
        f"stage(s), {plan.num_microbatches} micro-batch(es), {plan.schedule}, run by "
        f"the {result['executor']!r} executor")
  rows = [
      ("step time, each waited for", f"{measured_s * 1e3:.2f} ms (median of {len(times)})",
       ""),
      ("step time, streamed", f"{streamed_s * 1e3:.2f} ms (mean of {len(times)})", ""),
      ("  predicted, UniAP objective", f"{p.step_time_s * 1e3:.2f} ms",
       _ratio(measured_s, p.step_time_s)),
      ("  predicted, our runtime", f"{p.runtime_step_time_s * 1e3:.2f} ms",
       _ratio(measured_s, p.runtime_step_time_s)),
      ("  plain nnx.jit, one device", "-" if baseline_s is None else
       f"{baseline_s * 1e3:.2f} ms", _ratio(measured_s, baseline_s)),
      ("  plain nnx.jit, streamed", "-" if baseline_streamed_s is None else
       f"{baseline_streamed_s * 1e3:.2f} ms", _ratio(streamed_s, baseline_streamed_s)),
      ("memory per device, predicted", _mib(predicted_memory), ""),
      ("  paper's per-layer memory", _mib(max(p.memory_per_device_bytes)),
       _ratio(memory_compiled, max(p.memory_per_device_bytes))),
      ("  compiled (memory_analysis)", _mib(memory_compiled),
       _ratio(memory_compiled, predicted_memory)),
      ("  peak in use while running", _mib(peak), _ratio(peak, predicted_memory)),
  ]
  print(f"{'':32} {'value':>28} {'measured / this':>22}")
  for name, value, ratio in rows:
    print(f"{name:32} {value:>28} {ratio:>22}")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(f"figures written to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
