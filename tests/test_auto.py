"""auto_parallel: plans on first call, reuses, caches on disk, re-plans on new shapes."""

import jax
import numpy as np
import pytest
from flax import nnx

import uniap_jax as ua
from experiments import models

CPU8 = ua.Cluster.preset("cpu-8")
NAME = "gpt2"


def _fresh(batch_size=16):
  model = models.create(NAME, "tiny", seed=0)
  optimizer = models.create_optimizer(model)
  batch = models.example_batch(NAME, "tiny", batch_size)
  return model, optimizer, batch


def _reference_losses(steps):
  model, optimizer, batch = _fresh()
  step = nnx.jit(models.train_step(NAME))
  return [float(step(model, optimizer, batch)) for _ in range(steps)], model


def test_decorator_trains_like_one_device_and_caches_on_disk(tmp_path):
  expected, ref_model = _reference_losses(2)

  @ua.auto_parallel(cluster=CPU8, pp=2, num_microbatches=2, cache_dir=tmp_path)
  def train_step(model, optimizer, batch):
    return models.train_step(NAME)(model, optimizer, batch)

  model, optimizer, batch = _fresh()
  losses = [float(train_step(model, optimizer, batch)) for _ in range(2)]
  np.testing.assert_allclose(losses, expected, rtol=1e-4)
  # The user's model was updated in place, as the undecorated step does.
  got = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
  want = jax.tree_util.tree_leaves(nnx.state(ref_model, nnx.Param))
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
  assert train_step.num_plans == 1
  assert train_step.plan.mesh_axes["pp"] == 2
  assert len(list(tmp_path.glob("plan-*.json"))) == 1

  # A second process (here: a second decorator) finds the plan on disk and does not plan.
  again = ua.auto_parallel(models.train_step(NAME), cluster=CPU8, pp=2, num_microbatches=2,
                           cache_dir=tmp_path)
  again._plan_for(_fresh())  # plan lookup only, no compile
  assert again.num_plans == 0

  # Other options are another cache entry.
  other = ua.auto_parallel(models.train_step(NAME), cluster=CPU8, pp=1, cache_dir=tmp_path)
  other._plan_for(_fresh())
  assert other.num_plans == 1
  assert len(list(tmp_path.glob("plan-*.json"))) == 2


def test_changed_shapes_error_when_asked():
  step = ua.auto_parallel(models.train_step(NAME), cluster=CPU8, pp=1,
                          on_shape_change="error")
  model, optimizer, batch = _fresh()
  step(model, optimizer, batch)
  _, _, small = _fresh(batch_size=8)
  with pytest.raises(ValueError, match=r"shapes changed since the plan was made .*\(16, 16\)"):
    step(model, optimizer, small)


def test_bad_options():
  with pytest.raises(TypeError, match="needs cluster=uniap_jax.Cluster"):
    ua.auto_parallel(models.train_step(NAME), cluster="cpu-8")
  with pytest.raises(ValueError, match="on_shape_change must be"):
    ua.auto_parallel(models.train_step(NAME), cluster=CPU8, on_shape_change="ignore")
  with pytest.raises(ValueError, match=r"objective='fastest'; allowed: 'runtime'"):
    ua.auto_parallel(models.train_step(NAME), cluster=CPU8, objective="fastest")


def test_the_objective_is_part_of_the_cache_key(tmp_path):
  model, optimizer, batch = _fresh()
  graph = ua.trace(models.train_step(NAME), model, optimizer, batch)
  paths = {objective: ua.auto_parallel(models.train_step(NAME), cluster=CPU8,
                                       objective=objective, cache_dir=tmp_path)._cache_path(graph)
           for objective in ("runtime", "paper")}
  default = ua.auto_parallel(models.train_step(NAME), cluster=CPU8, cache_dir=tmp_path)
  assert paths["runtime"] != paths["paper"]
  assert default._cache_path(graph) == paths["runtime"]
