"""The public surface: exactly the names DESIGN.md promises, and nothing else."""

import uniap_jax as ua

EXPECTED = sorted(["Cluster", "LayerGraph", "Plan", "auto_parallel", "plan", "solver", "trace"])


def test_all_is_pinned():
  assert sorted(ua.__all__) == EXPECTED


def test_every_exported_name_exists():
  for name in ua.__all__:
    assert getattr(ua, name) is not None, name


def test_planning_ranks_by_the_runtime_by_default():
  import inspect
  from uniap_jax import search
  for fn in (ua.plan, ua.auto_parallel, search.plan_graph):
    assert inspect.signature(fn).parameters["objective"].default == "runtime", fn
