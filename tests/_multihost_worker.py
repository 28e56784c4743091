"""One process of the multi-process test (tests/test_multihost.py), and its model.

`python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR SCHEDULE`, with
the repository root on PYTHONPATH, joins the other processes through
`jax.distributed.initialize` (CPU, DEVICES_PER_PROCESS devices each, gloo collectives
across processes), plans the model on its own with the pipeline schedule SCHEDULE
("gpipe" or "1f1b"), applies the plan to the mesh over all processes' devices, trains
STEPS steps and writes to OUT_DIR:
`plan-<id>.json`, `run-<id>.json` (losses, the processes of each pipeline stage, the
number of programs compiled) and `params-<id>.npz` (the trained parameters, gathered
from every process).

The test imports this module for `Net`, `make_state`, `make_batch` and `train_step`,
so that its single-process run trains exactly the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

DEVICES_PER_PROCESS = 4
BATCH, FEATURES, WIDTH, BLOCKS = 16, 8, 16, 2
PP, MICROBATCHES, STEPS = 2, 2, 2
LEARNING_RATE = 1e-2
# Seconds a process waits for the others to join before giving up.
INIT_TIMEOUT_S = 60


class Block(nnx.Module):
  """Residual MLP block."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.down(jax.nn.relu(self.up(x)))


class Net(nnx.Module):
  """input projection, BLOCKS residual blocks, scalar head: four layers to split in two."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.inp = nnx.Linear(FEATURES, WIDTH, rngs=rngs)
    self.blocks = nnx.List([Block(WIDTH, rngs=rngs) for _ in range(BLOCKS)])
    self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.inp(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def loss_fn(model: Net, batch: dict[str, jax.Array]) -> jax.Array:
  return jnp.mean((model(batch["x"])[:, 0] - batch["y"]) ** 2)


def train_step(model: Net, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


def _optimizer(model: Net) -> nnx.Optimizer:
  return nnx.Optimizer(model, optax.adamw(LEARNING_RATE), wrt=nnx.Param)


def make_state(*, shape_only: bool = False) -> tuple[Net, nnx.Optimizer]:
  """The model (seed 0) and its AdamW optimizer; abstract with `shape_only`."""
  if shape_only:
    model = nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0)))
    return model, nnx.eval_shape(_optimizer, model)
  model = Net(rngs=nnx.Rngs(0))
  return model, _optimizer(model)


def make_batch(*, shape_only: bool = False) -> dict[str, np.ndarray | jax.ShapeDtypeStruct]:
  """The global batch: numpy data from a fixed seed, the same in every process."""
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(BATCH, FEATURES)).astype(np.float32),
           "y": rng.normal(size=(BATCH,)).astype(np.float32)}
  if shape_only:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  return batch


def flat_params(params: nnx.State) -> dict[str, np.ndarray]:
  """Path -> host value of every leaf of `nnx.state(model, nnx.Param)`."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(kp): np.asarray(v) for kp, v in flat}


def process_rows(sharding: jax.sharding.Sharding, x: np.ndarray) -> np.ndarray:
  """The rows of the global `x` that this process's devices hold under `sharding`."""
  rows = [index[0] for index in sharding.addressable_devices_indices_map(x.shape).values()]
  start = min(r.start or 0 for r in rows)
  stop = max(x.shape[0] if r.stop is None else r.stop for r in rows)
  return x[start:stop]


def main(process_id: int, num_processes: int, port: int, out_dir: pathlib.Path,
         schedule: str) -> None:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=INIT_TIMEOUT_S)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import uniap_jax as ua  # pylint: disable=g-import-not-at-top
  from uniap_jax import auto  # pylint: disable=g-import-not-at-top

  if jax.process_count() != num_processes or jax.local_device_count() != DEVICES_PER_PROCESS:
    raise RuntimeError(f"expected {num_processes} processes of {DEVICES_PER_PROCESS} devices, "
                       f"got {jax.process_count()} of {jax.local_device_count()}")

  # Each process plans on its own, from shapes, for all processes' devices.
  cluster = ua.Cluster.from_devices(jax.devices())
  plan = ua.plan(train_step, *make_state(shape_only=True), make_batch(shape_only=True),
                 cluster=cluster, pp=PP, num_microbatches=MICROBATCHES, schedule=schedule)
  (out_dir / f"plan-{process_id}.json").write_text(plan.to_json())
  # auto_parallel settles on process 0's plan, whatever each process found.
  mine = plan if process_id == 0 else dataclasses.replace(
      plan, num_microbatches=plan.num_microbatches * 2)
  agreed = auto.same_on_every_process(mine)
  (out_dir / f"agreed-{process_id}.json").write_text(agreed.to_json())

  model, optimizer = make_state()
  batch = make_batch()
  step = plan.apply(train_step)
  # The first step takes the global batch, the same here as in every process; the
  # others only this process's rows of it, as a multi-host input pipeline reads them.
  losses = [float(step(model, optimizer, batch))]
  shardings = step.batch_shardings(model, optimizer, batch)[0]
  local = jax.tree.map(
      lambda s, x: jax.make_array_from_process_local_data(s, process_rows(s, x), x.shape),
      shardings, batch)
  losses += [float(step(model, optimizer, local)) for _ in range(STEPS - 1)]
  # Which processes hold each pipeline stage's devices.
  by_stage = np.moveaxis(step.mesh.devices, step.mesh.axis_names.index("pp"), 0)
  stage_processes = [sorted({d.process_index for d in row.flat}) for row in by_stage]
  (out_dir / f"run-{process_id}.json").write_text(
      json.dumps({"losses": losses, "stage_processes": stage_processes,
                  "compilations": step.compilations}))

  # The parameters are global arrays now, each process holding its stage's shards.
  gathered = multihost_utils.process_allgather(nnx.state(model, nnx.Param), tiled=True)
  np.savez(out_dir / f"params-{process_id}.npz", **flat_params(gathered))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]),
       sys.argv[5])
