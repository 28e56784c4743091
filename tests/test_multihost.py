"""Multi-host: two processes on localhost plan alike and train like one process.

Each process of `_multihost_worker.py` sees 4 CPU devices and joins the other through
`jax.distributed.initialize` (gloo collectives), so the pipeline's two stages run in
two processes and its sends cross between them. Both plan on their own; their plans
must be identical, and the losses and parameters after two steps must equal the same
plan applied to 8 devices in this one process and a plain single-device run.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from flax import nnx
import jax
import numpy as np
import pytest

import _multihost_worker as worker
from uniap_jax import plans

NUM_PROCESSES = 2
# Generous: both processes compile the pipeline on a shared 2-core machine.
WORKER_TIMEOUT_S = 240
LOSS_RTOL = 1e-4
# AdamW divides by sqrt(v): a rounding difference in a near-zero gradient moves a
# parameter by up to a learning-rate step, hence the absolute term.
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-4
REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
  env = dict(os.environ)
  # This process's 8 virtual devices are not the workers' business: they set 4 each.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def _run_workers(out_dir: pathlib.Path, schedule: str) -> None:
  """Runs the processes to the end; on any failure kills the rest and shows all stderr."""
  port = _free_port()
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    log = open(out_dir / f"stderr-{i}.txt", "w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "_multihost_worker.py"), str(i),
         str(NUM_PROCESSES), str(port), str(out_dir), schedule],
        cwd=REPO, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True))
  deadline = time.monotonic() + WORKER_TIMEOUT_S
  failed = None
  try:
    while any(p.poll() is None for p in procs):
      bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if bad:
        failed = f"process {bad[0]} exited with code {procs[bad[0]].returncode}"
        break
      if time.monotonic() > deadline:
        failed = f"the processes did not finish within {WORKER_TIMEOUT_S} s"
        break
      time.sleep(0.2)
    else:
      bad = [i for i, p in enumerate(procs) if p.returncode != 0]
      if bad:
        failed = f"process {bad[0]} exited with code {procs[bad[0]].returncode}"
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    outputs = []
    for i, log in enumerate(logs):
      log.seek(0)
      text = "".join(line for line in log if "[Gloo]" not in line)
      outputs.append(f"--- process {i} (exit code {procs[i].returncode}) ---\n{text[-6000:]}")
      log.close()
  if failed:
    pytest.fail(f"{failed}.\n" + "\n".join(outputs), pytrace=False)


def _train_here(step) -> tuple[list[float], dict[str, np.ndarray]]:
  model, optimizer = worker.make_state()
  batch = worker.make_batch()
  losses = [float(step(model, optimizer, batch)) for _ in range(worker.STEPS)]
  return losses, worker.flat_params(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("schedule", ["gpipe", pytest.param("1f1b", marks=pytest.mark.slow)])
def test_two_processes_plan_alike_and_train_like_one(tmp_path, schedule):
  _run_workers(tmp_path, schedule)

  texts = [(tmp_path / f"plan-{i}.json").read_text() for i in range(NUM_PROCESSES)]
  plan = plans.Plan.from_json(texts[0])
  assert plans.Plan.from_json(texts[1]) == plan  # wall-clock solver times aside
  for i in range(NUM_PROCESSES):  # process 1 was handed another plan to agree on
    assert plans.Plan.from_json((tmp_path / f"agreed-{i}.json").read_text()) == plan
  assert plan.mesh_axes["pp"] == worker.PP and plan.schedule == schedule
  assert plan.num_devices == NUM_PROCESSES * worker.DEVICES_PER_PROCESS

  # The same plan on this process's 8 devices, and the step on one device.
  assert jax.device_count() == plan.num_devices
  want_losses, want_params = _train_here(plan.apply(worker.train_step))
  one_losses, one_params = _train_here(nnx.jit(worker.train_step))
  np.testing.assert_allclose(want_losses, one_losses, rtol=LOSS_RTOL)

  for i in range(NUM_PROCESSES):
    run = json.loads((tmp_path / f"run-{i}.json").read_text())
    # One process per stage: the sends between stages cross processes.
    assert run["stage_processes"] == [[s] for s in range(worker.PP)]
    # Host data and process-local global arrays in the same layout share one program.
    assert run["compilations"] == 1
    np.testing.assert_allclose(run["losses"], want_losses, rtol=LOSS_RTOL,
                               err_msg=f"losses of process {i}")
    with np.load(tmp_path / f"params-{i}.npz") as got:
      assert sorted(got.files) == sorted(want_params)
      for path, want in want_params.items():
        np.testing.assert_allclose(got[path], want, rtol=PARAM_RTOL, atol=PARAM_ATOL,
                                   err_msg=f"parameter {path} of process {i}")
        np.testing.assert_allclose(got[path], one_params[path], rtol=PARAM_RTOL,
                                   atol=PARAM_ATOL,
                                   err_msg=f"parameter {path} of process {i} vs one device")
