"""Times the UniAP solver on synthetic transformer cost tables.

  python -m experiments.bench_solver [--suite=all|targets|devices|scaling|dag|zoo]
      [--time_limit_s=60] [--cross_check]
  python -m experiments.bench_solver --suite=zoo --model=t5_large --cluster=env_c --pp=2

A model is embed + N identical blocks + head (T5-like: plus decoder blocks that the
last encoder block also feeds, a DAG). Each stage's devices take, per layer, a candidate
(dp, tp, fsdp, recompute) with dp * tp = devices per stage and tp inside a node. Times:
roofline at 50% of peak plus ring collectives (fast links inside a node, slow across);
memory: fp32 Adam state plus activations of the micro-batches in flight (GPipe: all;
1F1B: num_stages - i on stage i, through memory_by_stage); blocks reshard when their
batch split differs.

Suites. "targets": whole outer loops as a planner runs them (every stage count dividing
the devices, micro-batch counts dividing the batch, GPipe and 1F1B; one Problem each,
the best objective so far passed as `incumbent`), and the same loops with every
configuration solved to optimality (no incumbent). "devices": the 80-block model's
outer loop on 8 to 1024 devices. "scaling": single problems, N = 8..128 blocks.
"dag": the T5-like DAG (one source layer feeds every decoder block: the chain DPs with
that layer's candidate classes fixed by a branch and bound, SCIP only where their bound
does not meet). "zoo": a zoo
model's real cost tables (traced and costed here, not timed), one Problem per
configuration of the outer loop, each solved alone (no incumbent). --cross_check
re-solves the smaller scaling and dag problems with SCIP alone (method="miqp") and
reports whether its optimum matches. "all" runs every suite but "zoo".
"""

from collections.abc import Sequence
import math
import time

from absl import app
from absl import flags

from uniap_jax import solver

_SUITE = flags.DEFINE_enum("suite", "all", ["all", "targets", "devices", "scaling", "dag", "zoo"],
                           "What to run.")
_MODEL = flags.DEFINE_string("model", "t5_large", "zoo suite: model name (experiments.models).")
_CLUSTER = flags.DEFINE_string("cluster", "env_c", "zoo suite: cluster preset.")
_PP = flags.DEFINE_integer("pp", None, "zoo suite: pin the pipeline degree.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 16, "zoo suite: samples per step.")
_TIME_LIMIT_S = flags.DEFINE_float("time_limit_s", 60.0, "Solver budget per Problem.")
_CROSS_CHECK = flags.DEFINE_bool("cross_check", False, "Re-solve small problems with SCIP.")

# name: (blocks, hidden, MLP matrices x width, seq, vocab, devices, devices per node,
#        peak flop/s, memory bytes, intra-node and inter-node bytes/s, global batch).
# Devices from shared/reference/hardware.md: BERT-Huge on 8 x 12 GB fp32 GPUs (the
# paper's EnvB hint; TITAN Xp, PCIe); Llama-7B on 4 nodes x 4 A100-40G (TF32, NVLink,
# InfiniBand HDR); Llama-70B on 1024 TPU v5p (bf16, ICI).
MODELS = {
    "bert_huge_8": (32, 1280, 2 * 5120, 512, 30522, 8, 8, 12.1e12, 12e9, 12e9, 12.5e9, 32),
    "llama_7b_16": (32, 4096, 3 * 11008, 2048, 32000, 16, 4, 156e12, 40e9, 300e9, 25e9, 32),
    "llama_70b_1024": (80, 8192, 3 * 28672, 4096, 32000, 1024, 4, 459e12, 95e9, 90e9, 90e9, 1024),
}


def candidates(devices: int, per_node: int):
  """(dp, tp, fsdp, recompute) with dp * tp = devices and tp inside a node."""
  out = []
  for tp in (1, 2, 4, 8):
    if tp <= min(devices, per_node) and devices % tp == 0:
      dp = devices // tp
      for fsdp in (False, True) if dp > 1 else (False,):
        out += [(dp, tp, fsdp, False), (dp, tp, fsdp, True)]
  return out


def transformer_problem(model, blocks, stages, micro, schedule="gpipe", decoder_blocks=0,
                        devices=None):
  """Embed, `blocks` blocks, `decoder_blocks` decoder blocks fed by the last block, head."""
  _, h, mlp, seq, vocab, n_dev, per_node, peak, mem, bw_in, bw_out, batch = MODELS[model]
  n_dev = devices or n_dev
  d = n_dev // stages
  cands = candidates(d, per_node)
  mb = batch / micro
  bw_dp = bw_in if d <= per_node else bw_out
  act = mb * seq * h * 2  # bytes of one micro-batch's boundary activation (16-bit)

  def layer(name, params, flops):
    t, m_static, m_act = [], [], []
    for dp, tp, fsdp, recompute in cands:
      comm = 4 * 2 * (tp - 1) / tp * act / dp / bw_in if tp > 1 else 0.0
      grads = 2 * params / tp * (dp - 1) / dp / bw_dp
      comm += 1.5 * grads if fsdp else grads / micro  # FSDP gathers every micro-batch
      t.append((4 if recompute else 3) * flops / (d * peak * 0.5) + comm)
      m_static.append(16 * params / tp / (dp if fsdp else 1))  # fp32 Adam
      m_act.append((2 if recompute else 17 / tp) * act / dp)
    if schedule == "gpipe":
      return solver.Layer(name=name, time=t, memory=[s + micro * a for s, a in zip(m_static, m_act)])
    by_stage = [[s + min(micro, stages - i) * a for s, a in zip(m_static, m_act)] for i in range(stages)]
    return solver.Layer(name=name, time=t, memory=by_stage[0], memory_by_stage=by_stage)

  block_params = 4 * h * h + h * mlp
  block_flops = 2 * block_params * mb * seq + 4 * mb * seq * seq * h
  layers = [layer("embed", vocab * h, 2 * mb * seq * h)]
  layers += [layer(f"block{i}", block_params, block_flops) for i in range(blocks)]
  layers += [layer(f"decoder{i}", block_params * 5 // 4, block_flops * 5 // 4)
             for i in range(decoder_blocks)]  # cross-attention adds a quarter
  layers.append(layer("head", vocab * h, 2 * vocab * h * mb * seq))
  reshard = [[0.0 if a[0] == b[0] else act / min(a[0], b[0]) / bw_in for b in cands] for a in cands]
  send = [[2 * act / a[0] / bw_out + r for r in row] for a, row in zip(cands, reshard)]
  edges = [solver.Edge(src=x.name, dst=y.name, same_stage=reshard, cross_stage=send)
           for x, y in zip(layers, layers[1:])]
  edges += [solver.Edge(src=f"block{blocks - 1}", dst=f"decoder{i}", same_stage=reshard,
                        cross_stage=send) for i in range(1, decoder_blocks)]
  return solver.Problem(layers=layers, edges=edges, num_stages=stages, num_microbatches=micro,
                        memory_limit=mem)


def outer_loop(model, time_limit_s, *, devices=None, use_incumbent=True):
  """Solves every (schedule, stages, micro-batches) configuration; returns stats."""
  blocks, batch = MODELS[model][0], MODELS[model][11]
  n_dev = devices or MODELS[model][5]
  stage_counts = [s for s in (2 ** k for k in range(12)) if n_dev % s == 0 and s <= blocks + 2]
  micro_counts = [m for m in (2 ** k for k in range(8)) if batch % m == 0]
  best, solve_s, counts, worst_gap = math.inf, 0.0, {}, 0.0
  for schedule in ("gpipe", "1f1b"):
    for stages in stage_counts:
      for micro in micro_counts:
        problem = transformer_problem(model, blocks, stages, micro, schedule, devices=n_dev)
        sol = solver.solve(problem, time_limit_s=time_limit_s,
                           incumbent=best if use_incumbent else None)
        solve_s += sol.time_s
        counts[sol.status] = counts.get(sol.status, 0) + 1
        if sol.status in ("optimal", "time_limit"):
          best = min(best, sol.objective)
          worst_gap = max(worst_gap, sol.gap)
  return (f"best {best:.4g} s/iter, solver {solve_s:.2f} s, {len(stage_counts) * len(micro_counts) * 2} "
          f"configurations {counts}, worst gap {worst_gap:.2g}")


def row(name, blocks, stages, micro, schedule, decoder_blocks=0, cross_check=False):
  problem = transformer_problem(name, blocks, stages, micro, schedule, decoder_blocks=decoder_blocks)
  sol = solver.solve(problem, time_limit_s=_TIME_LIMIT_S.value)
  check = ""
  if cross_check:
    ref = solver.solve(problem, time_limit_s=_TIME_LIMIT_S.value, method="miqp")
    same = abs(ref.objective - sol.objective) <= 1e-6 * sol.objective
    check = f"miqp {ref.status} {'same' if same else 'DIFFERENT'} {ref.time_s:.2f}s"
  print(f"{name:>12} {blocks:>4}+{decoder_blocks:<3} S={stages:<3} c={micro:<3} {schedule:>5} "
        f"{sol.method:>8} {sol.status:>10} gap {sol.gap:<7.1e} {sol.time_s:>7.3f} s "
        f"obj {sol.objective:.5g} {check}", flush=True)


def zoo(model_name, cluster_name, pp, global_batch, time_limit_s):
  """Solves every configuration of a zoo model's outer loop alone; prints one row each."""
  import os
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  import uniap_jax as ua
  from uniap_jax import cost
  from uniap_jax import graph as graph_lib
  from uniap_jax import search
  from experiments import models

  cluster = ua.Cluster.preset(cluster_name)
  model = models.create(model_name, "paper", shape_only=True)
  batch = models.example_batch(model_name, "paper", global_batch, shape_only=True)
  graph = graph_lib.trace(models.train_step(model_name), model, models.create_optimizer(model), batch)
  cache, total_s, statuses = {}, 0.0, {}
  for config in search.configurations(graph, cluster, pp=pp, global_batch=global_batch):
    try:
      tables = cost.build_cost_tables(
          graph, cluster, mesh=config.mesh, num_stages=config.num_stages,
          num_microbatches=config.num_microbatches, global_batch=global_batch,
          schedule=config.schedule, cache=cache)
    except ValueError:
      continue
    if (any(not l.candidates for l in tables.layers) or tables.over_limit
        or tables.reserve_bytes >= tables.memory_limit_bytes):
      continue  # the outer loop skips it before solving
    sol = solver.solve(search.to_problem(tables), time_limit_s=time_limit_s)
    total_s += sol.time_s
    statuses[sol.status] = statuses.get(sol.status, 0) + 1
    print(f"{config.describe():>48} {sol.method:>12} {sol.status:>10} gap {sol.gap:<7.1e} "
          f"{sol.time_s:>7.3f} s obj {sol.objective:.5g}", flush=True)
  print(f"{model_name} on {cluster_name} (pp={pp}): solver {total_s:.2f} s over {statuses}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  suite, limit = _SUITE.value, _TIME_LIMIT_S.value
  if suite in ("targets", "all"):
    for model in MODELS:
      for use in (True, False):
        start = time.perf_counter()
        stats = outer_loop(model, limit, use_incumbent=use)
        print(f"outer loop {model} ({'with incumbent' if use else 'all solved'}): {stats}; "
              f"wall {time.perf_counter() - start:.2f} s incl. building tables", flush=True)
  if suite in ("devices", "all"):
    for devices in (8, 32, 128, 512, 1024):
      print(f"outer loop llama_70b on {devices} devices: "
            f"{outer_loop('llama_70b_1024', limit, devices=devices)}", flush=True)
  if suite in ("scaling", "all"):
    for blocks in (8, 16, 32, 64, 128):
      for stages in (1, 2, 4, 8):
        for micro, schedule in ((1, "gpipe"), (8, "gpipe"), (32, "gpipe"), (8, "1f1b")):
          row("bert_huge_8", blocks, stages, micro, schedule,
              cross_check=_CROSS_CHECK.value and blocks <= 16 and stages <= 4)
  if suite in ("dag", "all"):
    for stages in (1, 2, 4, 8):
      for micro in (1, 8):
        row("bert_huge_8", 24, stages, micro, "gpipe", decoder_blocks=24,
            cross_check=_CROSS_CHECK.value)
  if suite == "zoo":
    zoo(_MODEL.value, _CLUSTER.value, _PP.value, _GLOBAL_BATCH.value, limit)


if __name__ == "__main__":
  app.run(main)
