"""How UniAP's optimisation time and gap grow with layers and with devices.

  python -m experiments.scaling [--layers=8,16,32,64,128] [--devices=8,32,128,512,1024]
      [--time_limit_s=5] [--out_dir=scaling]

Each point is one configuration's MIQP (one `solver.Problem`), built from real cost
tables (`cost.build_cost_tables` on a traced zoo model), solved by `solver.solve`:
- layers: the model's repeated block is repeated n times (first and last blocks
  kept, the middle one copied, edges between blocks re-created), so the costs are the
  real ones of that block and only the depth changes; Llama-7B is a chain (exact chain
  DP), BERT-Huge a DAG (its pooler reads the last block: SCIP);
- devices: clusters of n devices built from a preset's nodes (`scaled_cluster`).
Columns also give the size of the outer loop at that point (configurations the planner
would visit), since the paper's optimisation time is roughly that count times one MIQP.
Writes scaling.csv and scaling.png under --out_dir.

Determinism: everything here is fixed by the flags; the solver's wall-clock limit is
the one exception, and a point it stops says so ("time_limit" and its gap).
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import dataclasses
import math
import os
import re
import time

from absl import app
from absl import flags

import uniap_jax as ua
from experiments import models
from experiments import paper_tables
from experiments import plot
from uniap_jax import cost
from uniap_jax import search
from uniap_jax import solver
from uniap_jax import strategies

BLOCK = re.compile(r"^blocks/(\d+)$")  # the zoo's repeated blocks (one module call each)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Point:
  """One solved configuration.

  Attributes:
    sweep: "layers" or "devices".
    blocks: the model's repeated blocks (transformer layers); layers: all layers of
      the problem (blocks, embeddings, heads); candidates: the most any layer offers.
    configurations: outer-loop configurations the planner visits for this model size
      and cluster (`search.configurations`; for the layers sweep, of the traced model).
    solve_time_s: `solver.solve` wall time; tables_time_s: building the cost tables.
  """

  sweep: str
  model: str
  cluster: str
  devices: int
  blocks: int
  layers: int
  pp: int
  mesh: str
  num_microbatches: int
  candidates: int
  status: str
  method: str
  solve_time_s: float
  gap: float
  objective_s: float
  tables_time_s: float
  configurations: int


def scaled_cluster(base: ua.Cluster, num_devices: int) -> ua.Cluster:
  """`base`'s nodes, as many as `num_devices` needs (one partial node when fewer).

  Raises:
    ValueError: `base` is not nodes on one inner and one outer level, or the count
      does not fill whole nodes.
  """
  per_node = base.devices_per_node
  if len(base.levels) != 2 or base.levels[0].size != per_node:
    raise ValueError(f"scaled_cluster needs a preset of nodes (one level inside a node, one "
                     f"across), got {base.name!r} with levels "
                     f"{[(l.name, l.size) for l in base.levels]}; use e.g. 'h100-80g-8x8'.")
  if num_devices < 1 or (num_devices > per_node and num_devices % per_node):
    raise ValueError(f"num_devices={num_devices} must be at most {per_node} or a multiple "
                     f"of {per_node} (devices per node of {base.name!r}).")
  nodes = max(num_devices // per_node, 1)
  inner = dataclasses.replace(base.levels[0], size=min(num_devices, per_node))
  levels = (inner,) if nodes == 1 else (inner, dataclasses.replace(base.levels[1], size=nodes))
  prefix = base.name.rsplit("-", 1)[0]
  return dataclasses.replace(base, name=f"{prefix}-{nodes}x{inner.size}", num_nodes=nodes,
                             devices_per_node=inner.size, levels=levels)


def _role(i: int, n: int) -> str:
  return "first" if i == 0 else "last" if i == n - 1 else "middle"


def repeat_blocks(problem: solver.Problem, num_blocks: int) -> solver.Problem:
  """The problem with its `blocks/<i>` layers repeated to `num_blocks`.

  New block i copies the original block of its role: the first, the last, or (middle)
  the second. An edge between a block and another layer is copied to every new block
  of the same role. An edge from block j to block j + d becomes one from every block i
  to i + d, with the tables of the original edge between the blocks that i and i + d
  copy, or else of one whose ends hold the same tables as those blocks. With three or
  more original blocks nothing is guessed; with two, the new middle blocks copy the
  first and get no edges from other layers.

  Raises:
    ValueError: fewer than 2 blocks asked or present, blocks not contiguous, or no
      original edge fits a new pair of blocks.
  """
  index = {l.name: int(m.group(1)) for l in problem.layers if (m := BLOCK.match(l.name))}
  positions = [u for u, l in enumerate(problem.layers) if l.name in index]
  old = len(positions)
  if num_blocks < 2 or old < 2:
    raise ValueError(f"repeat_blocks needs >= 2 blocks, the problem has {old} and "
                     f"{num_blocks} were asked.")
  if positions != list(range(positions[0], positions[0] + old)):
    raise ValueError("repeat_blocks needs the blocks contiguous in the layer order.")
  by_index = {index[problem.layers[u].name]: problem.layers[u] for u in positions}
  source = {"first": 0, "middle": 1 if old > 2 else 0, "last": old - 1}
  copy_of = [source[_role(i, num_blocks)] for i in range(num_blocks)]
  blocks = [dataclasses.replace(by_index[j], name=f"blocks/{i}") for i, j in enumerate(copy_of)]
  layers = (list(problem.layers[:positions[0]]) + blocks
            + list(problem.layers[positions[-1] + 1:]))
  edges: dict[tuple[str, str], solver.Edge] = {}

  def add(edge: solver.Edge, src: str, dst: str) -> None:
    edges.setdefault((src, dst), dataclasses.replace(edge, src=src, dst=dst))

  def tables(j: int) -> solver.Layer:
    return dataclasses.replace(by_index[j], name="_")

  between: dict[tuple[int, int], solver.Edge] = {}
  for edge in problem.edges:
    j, k = index.get(edge.src), index.get(edge.dst)
    if j is None and k is None:
      add(edge, edge.src, edge.dst)
    elif j is not None and k is not None:
      between[(j, k)] = edge
    else:
      role = _role(j if k is None else k, old)
      for i in range(num_blocks):
        if _role(i, num_blocks) == role:
          add(edge, f"blocks/{i}" if k is None else edge.src,
              edge.dst if k is None else f"blocks/{i}")
  for d in sorted({k - j for j, k in between}):
    for i in range(num_blocks - d):
      a, b = copy_of[i], copy_of[i + d]
      edge = between.get((a, b)) or next(
          (e for (j, k), e in sorted(between.items())
           if k - j == d and tables(j) == tables(a) and tables(k) == tables(b)), None)
      if edge is None:
        raise ValueError(f"repeat_blocks: no edge between blocks {d} apart fits blocks/{i} "
                         f"-> blocks/{i + d} (copies of blocks {a} and {b}); give the "
                         "problem more blocks.")
      add(edge, f"blocks/{i}", f"blocks/{i + d}")
  order = {l.name: u for u, l in enumerate(layers)}
  return dataclasses.replace(
      problem, layers=layers,
      edges=sorted(edges.values(), key=lambda e: (order[e.src], order[e.dst])))


def pick_mesh(cluster: ua.Cluster, stage_devices: int) -> strategies.MeshShape:
  """dp x tp with tp as large as one node allows (Megatron's rule), else flat."""
  meshes = strategies.mesh_shapes(cluster, stage_devices, fine=False)
  inside = [m for m in meshes if m.kind == "dp_tp" and m.sizes[-1] <= cluster.devices_per_node]
  return max(inside, key=lambda m: m.sizes[-1]) if inside else meshes[0]


def configuration_problem(graph: ua.LayerGraph, cluster: ua.Cluster, *, pp: int,
                          num_microbatches: int, global_batch: int,
                          cache: dict | None = None
                          ) -> tuple[solver.Problem | None, strategies.MeshShape, float]:
  """One configuration's Problem (mesh from `pick_mesh`, GPipe) and its tables' build time.

  The Problem is None when the tables alone show that nothing fits: a layer over the
  memory limit on its own, or transient memory that leaves no room (as the planner's
  outer loop skips such configurations without solving).
  """
  mesh = pick_mesh(cluster, cluster.num_devices // pp)
  start = time.perf_counter()
  tables = cost.build_cost_tables(graph, cluster, mesh=mesh, num_stages=pp,
                                  num_microbatches=num_microbatches,
                                  global_batch=global_batch, cache=cache)
  elapsed = time.perf_counter() - start
  if (tables.over_limit or tables.reserve_bytes >= tables.memory_limit_bytes
      or any(not l.candidates for l in tables.layers)):
    return None, mesh, elapsed
  return search.to_problem(tables), mesh, elapsed


def solve_point(problem: solver.Problem, *, sweep: str, model: str, cluster: ua.Cluster,
                mesh: strategies.MeshShape, tables_time_s: float, configurations: int,
                time_limit_s: float) -> Point:
  """Solves one Problem and records it."""
  sol = solver.solve(problem, time_limit_s=time_limit_s)
  return Point(
      sweep=sweep, model=model, cluster=cluster.name, devices=cluster.num_devices,
      blocks=sum(bool(BLOCK.match(l.name)) for l in problem.layers),
      layers=len(problem.layers), pp=problem.num_stages, mesh=_mesh_text(mesh),
      num_microbatches=problem.num_microbatches,
      candidates=max(l.num_candidates for l in problem.layers), status=sol.status,
      method=sol.method, solve_time_s=sol.time_s, gap=sol.gap, objective_s=sol.objective,
      tables_time_s=tables_time_s, configurations=configurations)


def _mesh_text(mesh: strategies.MeshShape) -> str:
  return " ".join(f"{k}{v}" for k, v in mesh.as_dict().items())


def _unsolved(graph: ua.LayerGraph, blocks: int, *, sweep: str, model: str,
              cluster: ua.Cluster, pp: int, mesh: strategies.MeshShape,
              num_microbatches: int, tables_time_s: float, configurations: int) -> Point:
  """A point whose cost tables already show that nothing fits memory."""
  others = sum(not BLOCK.match(l.name) for l in graph.layers)
  return Point(sweep=sweep, model=model, cluster=cluster.name, devices=cluster.num_devices,
               blocks=blocks, layers=blocks + others, pp=pp, mesh=_mesh_text(mesh),
               num_microbatches=num_microbatches, candidates=0, status="infeasible",
               method="tables", solve_time_s=0.0, gap=math.inf, objective_s=math.inf,
               tables_time_s=tables_time_s, configurations=configurations)


def layer_sweep(graph: ua.LayerGraph, cluster: ua.Cluster, *, model: str,
                blocks: Sequence[int], stages: Sequence[int], num_microbatches: int,
                global_batch: int, time_limit_s: float) -> list[Point]:
  """Solver time and gap as the model's blocks are repeated to each count in `blocks`."""
  configurations = len(search.configurations(graph, cluster, global_batch=global_batch))
  cache: dict = {}
  points = []
  for pp in stages:
    base, mesh, tables_s = configuration_problem(
        graph, cluster, pp=pp, num_microbatches=num_microbatches, global_batch=global_batch,
        cache=cache)
    for n in blocks:
      if base is None:
        points.append(_unsolved(graph, n, sweep="layers", model=model, cluster=cluster, pp=pp,
                                mesh=mesh, num_microbatches=num_microbatches,
                                tables_time_s=tables_s, configurations=configurations))
        continue
      problem = repeat_blocks(base, n)
      if pp > len(problem.layers):
        continue
      points.append(solve_point(problem, sweep="layers", model=model, cluster=cluster,
                                mesh=mesh, tables_time_s=tables_s,
                                configurations=configurations, time_limit_s=time_limit_s))
  return points


def device_sweep(graph: ua.LayerGraph, base: ua.Cluster, *, model: str,
                 devices: Sequence[int], stages: Sequence[int], num_microbatches: int,
                 global_batch: int, time_limit_s: float) -> list[Point]:
  """Solver time and gap on clusters of each size in `devices` (`scaled_cluster`).

  global_batch 0: default_global_batch of each cluster.
  """
  points = []
  for n in devices:
    cluster = scaled_cluster(base, n)
    batch = global_batch or paper_tables.default_global_batch(cluster)
    configurations = len(search.configurations(graph, cluster, global_batch=batch))
    cache: dict = {}
    for pp in stages:
      if n % pp or pp > len(graph.layers):
        continue
      problem, mesh, tables_s = configuration_problem(
          graph, cluster, pp=pp, num_microbatches=num_microbatches, global_batch=batch,
          cache=cache)
      if problem is None:
        blocks = sum(bool(BLOCK.match(l.name)) for l in graph.layers)
        points.append(_unsolved(graph, blocks, sweep="devices", model=model, cluster=cluster,
                                pp=pp, mesh=mesh, num_microbatches=num_microbatches,
                                tables_time_s=tables_s, configurations=configurations))
        continue
      points.append(solve_point(problem, sweep="devices", model=model, cluster=cluster,
                                mesh=mesh, tables_time_s=tables_s,
                                configurations=configurations, time_limit_s=time_limit_s))
  return points


def write_csv(points: Sequence[Point], path: str) -> None:
  fields = [f.name for f in dataclasses.fields(Point)]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    for p in points:
      writer.writerow([f"{v:.6g}" if isinstance(v, float) else v
                       for v in dataclasses.astuple(p)])


def save_png(points: Sequence[Point], path: str) -> None:
  """Solver time against layers (left) and devices (right), one line per model and pp;
  hollow markers: stopped by the time limit."""
  plot.check_matplotlib()
  from matplotlib.figure import Figure  # lazy: the experiments extra

  fig = Figure(figsize=(12, 4.5), layout="constrained")
  for ax, sweep, x in zip(fig.subplots(1, 2), ("layers", "devices"), ("blocks", "devices")):
    pts = [p for p in points if p.sweep == sweep]
    for key in dict.fromkeys((p.model, p.pp) for p in pts):
      line = sorted((p for p in pts if (p.model, p.pp) == key), key=lambda p: getattr(p, x))
      xs, ys = [getattr(p, x) for p in line], [max(p.solve_time_s, 1e-4) for p in line]
      (handle,) = ax.plot(xs, ys, marker="o", label=f"{key[0]}, pp={key[1]}")
      stopped = [(a, b) for a, b, p in zip(xs, ys, line) if p.status == "time_limit"]
      if stopped:
        ax.scatter(*zip(*stopped), s=90, facecolors="none", edgecolors=handle.get_color())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    where = pts[0].cluster if sweep == "layers" and pts else "clusters of whole nodes"
    ax.set_xlabel(f"{'transformer blocks' if x == 'blocks' else x} ({where})")
    ax.set_ylabel("solver time per configuration (s)")
    ax.set_title(f"UniAP MIQP time against {x} (hollow: stopped by the time limit)",
                 fontsize=10)
    if pts:
      ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The launcher's flags, defined only when it runs as a program, so that importing
  this module (tests, other launchers) never clashes with another launcher's flags."""
  flags.DEFINE_list("layer_models", ["llama_7b", "bert_huge"],
                    "Zoo models whose blocks are repeated (layers sweep).")
  flags.DEFINE_list("layers", ["8", "16", "32", "64", "128"],
                    "Layers (transformer blocks) of the layers sweep.")
  flags.DEFINE_string("layer_cluster", "env_c", "Cluster preset of the layers sweep.")
  flags.DEFINE_list("layer_pp", ["1", "4"], "Pipeline degrees of the layers sweep.")
  flags.DEFINE_string("device_model", "llama_7b", "Zoo model of the devices sweep.")
  flags.DEFINE_list("devices", ["8", "32", "128", "512", "1024"],
                    "Device counts of the devices sweep.")
  flags.DEFINE_string("device_base", "h100-80g-8x8",
                      "Preset whose nodes build the devices sweep's clusters.")
  flags.DEFINE_list("device_pp", ["1", "8"], "Pipeline degrees of the devices sweep.")
  flags.DEFINE_integer("num_microbatches", 8, "Micro-batches of every point.", lower_bound=1)
  flags.DEFINE_integer("global_batch", 0, "Samples per step; 0: "
                       f"{paper_tables.MIN_GLOBAL_BATCH} or one per device, whichever is "
                       "larger.", lower_bound=0)
  flags.DEFINE_enum("size", "paper", list(models.SIZES), "Model size ('tiny' for tests).")
  flags.DEFINE_float("time_limit_s", 5.0, "Solver budget per point, seconds.",
                     lower_bound=0.01)
  flags.DEFINE_string("out_dir", "scaling", "Directory for scaling.csv and scaling.png.")
  flags.DEFINE_bool("png", True, "Also draw scaling.png (needs matplotlib).")


def _ints(values: Sequence[str], flag: str) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{flag} takes integers, got {','.join(values)}") from None
  if any(v < 1 for v in out):
    raise app.UsageError(f"--{flag} takes positive integers, got {out}")
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.png:
    plot.check_matplotlib()
  from rich.progress import Progress  # the experiments extra

  blocks, layer_pp = _ints(FLAGS.layers, "layers"), _ints(FLAGS.layer_pp, "layer_pp")
  devices, device_pp = _ints(FLAGS.devices, "devices"), _ints(FLAGS.device_pp, "device_pp")
  layer_cluster = ua.Cluster.preset(FLAGS.layer_cluster)
  knobs = dict(num_microbatches=FLAGS.num_microbatches, time_limit_s=FLAGS.time_limit_s)
  start = time.perf_counter()
  points: list[Point] = []
  with Progress() as bar:
    task = bar.add_task("scaling", total=len(FLAGS.layer_models) + bool(devices))
    for name in FLAGS.layer_models:
      bar.update(task, description=f"layers: {name} on {layer_cluster.name}")
      points += layer_sweep(
          paper_tables.trace_model(name, FLAGS.size), layer_cluster, model=name,
          blocks=blocks, stages=layer_pp, **knobs,
          global_batch=FLAGS.global_batch or paper_tables.default_global_batch(layer_cluster))
      bar.advance(task)
    if devices:
      bar.update(task, description=f"devices: {FLAGS.device_model}")
      points += device_sweep(
          paper_tables.trace_model(FLAGS.device_model, FLAGS.size),
          ua.Cluster.preset(FLAGS.device_base), model=FLAGS.device_model, devices=devices,
          stages=device_pp, global_batch=FLAGS.global_batch, **knobs)
      bar.advance(task)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  csv_path = os.path.join(FLAGS.out_dir, "scaling.csv")
  write_csv(points, csv_path)
  print(f"{'sweep':<8} {'model':<10} {'cluster':<16} {'blocks':>6} {'pp':>3} {'cands':>5} "
        f"{'status':<10} {'method':<12} {'solve s':>8} {'gap':>8} {'tables s':>8} {'configs':>7}")
  for p in points:
    print(f"{p.sweep:<8} {p.model:<10} {p.cluster:<16} {p.blocks:>6} {p.pp:>3} "
          f"{p.candidates:>5} {p.status:<10} {p.method:<12} {p.solve_time_s:>8.2f} "
          f"{p.gap:>8.2g} {p.tables_time_s:>8.2f} {p.configurations:>7}")
  if FLAGS.png:
    save_png(points, os.path.join(FLAGS.out_dir, "scaling.png"))
  print(f"wrote {csv_path}{' and scaling.png' if FLAGS.png else ''}; "
        f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
