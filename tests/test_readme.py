"""The README's decorator example runs as written."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_decorator_example_runs_and_trains():
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
  (example,) = [b for b in blocks if "auto_parallel" in b]
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  env.pop("XLA_FLAGS", None)  # the example sets its own
  proc = subprocess.run([sys.executable, "-c", example], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  losses = [float(x) for x in lines[:3]]
  assert losses[2] < losses[0]  # three AdamW steps lower the loss
  assert "mesh pp=2" in proc.stdout and "stage 1:" in proc.stdout
