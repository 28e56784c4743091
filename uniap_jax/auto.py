"""`auto_parallel`: the decorator that plans on first call, caches, and runs sharded.

The one module that sees both planning and running (DESIGN.md): on the first call it
traces the step on its arguments' shapes, plans (or loads a cached plan), applies the
plan and runs. Later calls with the same argument shapes reuse the applied step; a
call with other shapes plans again (or raises, with `on_shape_change="error"`).

The plan cache lives in `cache_dir` (default: the UNIAP_CACHE_DIR environment
variable, read when the decorator is created; no caching when neither is set). Its key
hashes the traced program, the cluster and the planning options, so a changed model,
cluster or knob never reuses a stale plan.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from uniap_jax import cluster as cluster_lib
from uniap_jax import graph as graph_lib
from uniap_jax import plans
from uniap_jax import search

logger = logging.getLogger(__name__)

CACHE_ENV = "UNIAP_CACHE_DIR"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Options:
  pp: int | None = None
  num_microbatches: int | None = None
  schedule: str | None = None
  memory_limit_bytes: float | None = None
  time_limit_s: float = 60.0
  global_batch: int | None = None
  objective: str = "runtime"


class AutoParallel:
  """A train step that plans itself on first call; see `auto_parallel`.

  Attributes:
    plan: the plan in use (None before the first call).
    num_plans: how many times this step planned (cache hits do not count).
  """

  def __init__(self, step: Callable[..., Any], *, cluster: cluster_lib.Cluster,
               batch_argnums: Sequence[int] | None, options: _Options,
               cache_dir: str | os.PathLike | None, on_shape_change: str,
               apply_kwargs: dict[str, Any]):
    self._step = step
    self._cluster = cluster
    self._batch_argnums = batch_argnums
    self._options = options
    self._cache_dir = pathlib.Path(cache_dir) if cache_dir else None
    self._on_shape_change = on_shape_change
    self._apply_kwargs = apply_kwargs
    self._shapes: Any = None
    self._applied: Callable[..., Any] | None = None
    self.plan: plans.Plan | None = None
    self.num_plans = 0
    functools.update_wrapper(self, step)

  def __call__(self, *args: Any) -> Any:
    shapes = _shape_signature(args)
    if self._applied is None or shapes != self._shapes:
      if self._applied is not None and self._on_shape_change == "error":
        raise ValueError(
            f"auto_parallel({getattr(self._step, '__name__', 'step')}): the arguments' shapes "
            f"changed since the plan was made ({_first_difference(self._shapes, shapes)}). "
            "Pass on_shape_change='replan' to plan again, or keep the shapes fixed.")
      self.plan = self._plan_for(args)
      self._applied = self.plan.apply(self._step, **self._apply_kwargs)
      self._shapes = shapes
    return self._applied(*args)

  def _plan_for(self, args: Sequence[Any]) -> plans.Plan:
    graph = graph_lib.trace(self._step, *args, batch_argnums=self._batch_argnums)
    path = self._cache_path(graph)
    if path is not None and path.exists() and jax.process_count() == 1:
      try:
        plan = plans.Plan.from_json(path.read_text())
      except ValueError as e:
        logger.warning("Ignoring unreadable cached plan %s: %s", path, e)
      else:
        if plan.fingerprint == search.fingerprint(graph):
          logger.info("Loaded plan from %s", path)
          return plan
    plan = same_on_every_process(search.plan_graph(graph, self._cluster, args=args,
                                                   **dataclasses.asdict(self._options)))
    self.num_plans += 1
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(".tmp")
      tmp.write_text(plan.to_json())
      tmp.replace(path)
    return plan

  def _cache_path(self, graph: graph_lib.LayerGraph) -> pathlib.Path | None:
    if self._cache_dir is None:
      return None
    key = hashlib.sha256(json.dumps({
        "program": search.fingerprint(graph),
        "cluster": self._cluster.to_json(),
        "options": dataclasses.asdict(self._options),
        "plan_schema": plans.SCHEMA_VERSION,
    }, sort_keys=True).encode()).hexdigest()[:24]
    return self._cache_dir / f"plan-{key}.json"


def auto_parallel(step: Callable[..., Any] | None = None, *, cluster: cluster_lib.Cluster,
                  batch_argnums: Sequence[int] | None = None, pp: int | None = None,
                  num_microbatches: int | None = None, schedule: str | None = None,
                  memory_limit_bytes: float | None = None, time_limit_s: float = 60.0,
                  global_batch: int | None = None, objective: str = "runtime",
                  cache_dir: str | os.PathLike | None = None,
                  on_shape_change: str = "replan", **apply_kwargs: Any):
  """Makes a train step plan itself on first call and run sharded and pipelined.

  Usable directly, `step = auto_parallel(train_step, cluster=c)`, or as a decorator,
  `@auto_parallel(cluster=c)`. The step keeps its signature: an NNX
  `train_step(model, optimizer, batch)` still updates model and optimizer in place; a
  functional `train_step(state, batch)` still returns its new state.

  Args:
    step: the train step; its last argument is the batch unless batch_argnums says.
    cluster: the machines to plan for, e.g. Cluster.from_devices().
    batch_argnums: which arguments are batch.
    pp, num_microbatches, schedule, memory_limit_bytes, time_limit_s, global_batch,
      objective: the knobs of `uniap_jax.plan` ("runtime", the default, ranks
      configurations by the step time of the pipeline this decorator runs).
    cache_dir: where plans are cached across runs; default $UNIAP_CACHE_DIR, if set.
    on_shape_change: "replan" (default) or "error" when argument shapes change.
    **apply_kwargs: passed to `Plan.apply` (e.g. devices=).
  Returns:
    The wrapped step (or a decorator when `step` is None).
  Raises:
    ValueError: a bad option; planning errors surface on the first call.
  """
  if not isinstance(cluster, cluster_lib.Cluster):
    raise TypeError("auto_parallel needs cluster=uniap_jax.Cluster (e.g. "
                    f"Cluster.preset('cpu-8') or Cluster.from_devices()), got {cluster!r}")
  if on_shape_change not in ("replan", "error"):
    raise ValueError(f"on_shape_change must be 'replan' or 'error', got {on_shape_change!r}")
  search.check_objective(objective)
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_ENV) or None
  options = _Options(pp=pp, num_microbatches=num_microbatches, schedule=schedule,
                     memory_limit_bytes=memory_limit_bytes, time_limit_s=time_limit_s,
                     global_batch=global_batch, objective=objective)

  def wrap(fn: Callable[..., Any]) -> AutoParallel:
    return AutoParallel(fn, cluster=cluster, batch_argnums=batch_argnums, options=options,
                        cache_dir=cache_dir, on_shape_change=on_shape_change,
                        apply_kwargs=apply_kwargs)

  return wrap if step is None else wrap(step)


def _shape_signature(args: Sequence[Any]) -> tuple:
  """Paths, shapes and dtypes of every array leaf: what a plan depends on."""
  out = []
  for i, arg in enumerate(args):
    for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
      shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
      dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
      out.append((i, jax.tree_util.keystr(path), shape, dtype))
  return tuple(out)


def _first_difference(old: tuple, new: tuple) -> str:
  for a, b in zip(old, new):
    if a != b:
      return f"argument {a[0]} leaf {a[1]!r} was {a[2]} {a[3]}, now {b[2]} {b[3]}"
  return f"{len(old)} leaves before, {len(new)} now"


def same_on_every_process(plan: plans.Plan) -> plans.Plan:
  """Process 0's plan, on every process of a multi-process job.

  Hosts that plan on their own agree when the search is proven optimal, but a time
  limit reached at different points can leave them with different plans, and steps
  compiled from different plans would wait on each other's collectives forever. A
  plan that differs from process 0's is replaced by it, with a warning.
  """
  if jax.process_count() == 1:
    return plan
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.frombuffer(plan.to_json().encode(), dtype=np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.array(mine.size, np.int64)))
  padded = np.zeros(size, np.uint8)
  padded[:min(size, mine.size)] = mine[:size]
  text = bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode()
  chosen = plans.Plan.from_json(text)
  if chosen != plan:
    logger.warning("Process %d planned differently from process 0 (%s); using process 0's "
                   "plan.", jax.process_index(), plan.solver.status)
  return chosen
