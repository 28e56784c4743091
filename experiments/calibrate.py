"""Calibrates a cluster's cost-model figures on the devices at hand and prints them.

  python -m experiments.calibrate --cluster=cpu-8 --out=calib.json
  python -m experiments.calibrate --cluster=devices --out=calib.json --reuse
  python -m experiments.calibrate --cluster=cpu-8 --model=gpt2 --size=tiny

With --model, the zoo model's own layer kinds are timed too (whole on one device and
under their fastest candidates) and the compute efficiency is fitted to them.

Prints the cluster's analytic figures beside the fitted ones and every measured
time beside what the cost model predicts before and after calibration.
"""

import os

# 8 virtual CPU devices for the cpu-8 cluster; must be set before jax is imported
# (it changes nothing on GPU or TPU hosts).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax

from experiments import clusters
from uniap_jax import profile

_CLUSTER = flags.DEFINE_string(
    "cluster", "cpu-8",
    "Cluster preset, a cluster JSON file, or 'devices' for Cluster.from_devices().")
_OUT = flags.DEFINE_string("out", None, "Write the calibration as JSON to this file.")
_REUSE = flags.DEFINE_bool(
    "reuse", False, "Reuse --out if it holds a calibration of these devices.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per operation (median).")
_ITERATIONS = flags.DEFINE_integer("iterations", 10, "Collectives per timed program.")
_SIZES = flags.DEFINE_list(
    "sizes_bytes", [], "Per-device collective sizes in bytes; empty: by platform.")
_MATMULS = flags.DEFINE_list("matmul_sizes", [], "Square matmul sides; empty: by platform.")
_ELEMENTWISE = flags.DEFINE_list(
    "elementwise_bytes", [], "Elementwise operand bytes per device; empty: by platform.")
_MODEL = flags.DEFINE_string(
    "model", None, "Zoo model whose layer kinds to time as well (experiments.models.NAMES).")
_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "paper"], "Size of --model.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch of --model's layers.")
_CANDIDATES = flags.DEFINE_integer("max_candidates", 2, "Candidates timed per layer kind.")



def _ints(values: list[str]) -> tuple[int, ...] | None:
  return tuple(int(float(v)) for v in values) or None


def main(argv):
  del argv
  cluster = clusters.from_flag(_CLUSTER.value)
  devices = jax.devices("cpu") if cluster.device_kind == "cpu" else jax.devices()
  options = dict(sizes_bytes=_ints(_SIZES.value), matmul_sizes=_ints(_MATMULS.value),
                 elementwise_bytes=_ints(_ELEMENTWISE.value), repeats=_REPEATS.value,
                 iterations=_ITERATIONS.value)
  if _MODEL.value:
    from experiments import models  # pylint: disable=g-import-not-at-top
    if _MODEL.value not in models.NAMES:
      raise app.UsageError(f"--model={_MODEL.value!r}; known: {', '.join(models.NAMES)}.")
    model = models.create(_MODEL.value, size=_SIZE.value, shape_only=True)
    args = (model, models.create_optimizer(model),
            models.example_batch(_MODEL.value, size=_SIZE.value, batch_size=_BATCH.value,
                                 shape_only=True))
    options.update(layers=(models.train_step(_MODEL.value), args),
                   max_candidates=_CANDIDATES.value)
  if _REUSE.value and _OUT.value:
    calibration = profile.calibrate_cached(cluster, _OUT.value, devices, **options)
  else:
    calibration = profile.calibrate(cluster, devices, **options)
    if _OUT.value:
      with open(_OUT.value, "w", encoding="utf-8") as f:
        f.write(calibration.to_json())
  print(calibration.summary(cluster))
  if _OUT.value:
    print(f"calibration written to {_OUT.value}; apply it with "
          "profile.Calibration.from_json(text).apply(cluster)")


if __name__ == "__main__":
  app.run(main)
