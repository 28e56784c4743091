"""The memory a plan's runtime holds: per device, what `uniap_jax.apply` allocates.

The UniAP paper's memory (`CostTables.memory_by_stage`, what the solver's constraint
sums) charges each stage its own layers: parameters, optimizer state and gradients,
and each layer's activations times the micro-batches in flight. With one stage and one
micro-batch that is what runs (a plain `jax.jit` of the step). A pipelined plan runs
as one lockstep SPMD program (`uniap_jax.apply`): every device compiles the same
buffers, so its memory is the same on every stage, and it holds things the paper's
sum does not know about:

  - the state stored split over "pp" (each device keeps a 1/S share of every leaf) and
    gathered each step into per-stage parameter stacks `[S, C, ...]`, C the most calls
    of a kind any stage runs (free slots are zeros but real memory), a tied table's
    copy among the stacks of the layer it is passed to, and the stacks' gradients;
  - under the "uniform" dispatch every device runs every layer position of the stages'
    common supersequence in every tick, idle or not, so what a tick keeps for the
    backward pass is the sum over all positions, not the stage's own layers;
  - autodiff GPipe ("gpipe") keeps every tick's residuals: M + S - 1 ticks (idle ticks
    included) of every position's activations and of the parameter slices the
    backward reads (a position's parameters are a per-tick value, sliced from the
    stacks and masked, so the scan stacks a copy of them per tick);
  - the table executors ("gpipe-remat", "fused", "1f1b") keep a stash of K stage
    inputs per buffer slot (M, fused's min(M, 2S - 3), 1F1B's min(M, S)), one arrived
    cotangent per slot, and the activations of one stage run (each backward entry's
    `jax.vjp` recomputes the stage from its stashed input);
  - the cotangents of the model's outputs for all M micro-batches.

The solver cannot sum this figure per layer (it is the same on every device and
takes maxima over stages and positions); under objective="runtime" its constraint
sums `cost.runtime_layer_memory_bytes` instead, a per-layer stand-in built from the
same terms (tables built with `executor=`), and the search checks this figure last.

`runtime_memory_bytes` sums these from the cost tables' per-candidate numbers
(`LayerCosts.state_bytes`, `grad_bytes`, `activation_bytes`, `temp_bytes`, the
boundary values' bytes, and the positions, stacks and buffer slots `cost._predict`
derives from the tables as the runtime groups calls). Every term is a buffer the
compiled program holds (checked on compiled HLO: the tick loops' carried residuals,
stacks, accumulators and stashes); nothing is fitted.

Approximate, and where:
  - XLA reuses temporaries: a transient working set is charged once, the largest
    `temp_bytes` of any position; the backward's cotangents of activations inside a
    run are not charged apart.
  - A position's activations are the tables' (`Candidate.activation_bytes`): what a
    layer keeps inside one jit, where XLA recomputes cheap residuals within the
    backward's fusions (`strategies._liveness`). That holds for a table executor's
    `jax.vjp`, but autodiff GPipe's tick loop keeps the residuals JAX's
    linearisation saves, which XLA cannot recompute across the loop: a tanh GELU's
    intermediates, a layer norm's centred input. There the figure is low for such
    layers (tests/test_apply.py's TinyGPT blocks keep six [micro-batch, sequence,
    4 x hidden] values per tick where the tables charge four: compiled/predicted 1.27
    for a Megatron plan, 1.14 with its blocks recomputed), by an error GPipe
    multiplies by its M + S - 1 ticks. A per-candidate figure of JAX's saved
    residuals in the tables would close it.
  - The parameter slices a GPipe tick keeps are charged in full for a position whose
    inputs include another layer's output (the backward reads its matmul kernels;
    biases and norm offsets, which it does not read, are a few percent) and not at
    all for one that reads only batch leaves (no input cotangent to form).
  - The stored state's 1/S share is exact only for leaves with a dim that S divides
    (`apply._mesh.add_axis`); the optimizer's temporaries are not charged.
  - The loss (outside the pipeline, on all M micro-batches) is not charged apart from
    the outputs' cotangents. Under autodiff GPipe with large model outputs (an LM's
    logits) the peak comes while the loss's backward runs, next to every tick's
    residuals and the stacks: GPT-2 on two stages at a 16-sample batch compiles to
    1.2-1.3x this figure (tests/test_cost_memory.py), about half of the gap the
    residuals above.
  - Measured on 8 CPU devices (tests/test_apply_zoo.py, tests/test_cost_memory.py):
    within 10% of XLA's `memory_analysis` for the zoo's pipelined plans (1F1B and
    GPipe) and for the table executors on GPT-2 and TinyGPT; low for GPipe as said;
    with one stage and several micro-batches about 10% low.
"""

from __future__ import annotations

from collections.abc import Mapping

from uniap_jax import strategies
from uniap_jax.cost import _predict
from uniap_jax.cost import _tables


def stash_slots(executor: str, num_stages: int, num_microbatches: int) -> int:
  """Stage inputs a table executor keeps per buffer slot (`apply._schedules` sizes them
  from the table's intervals): "gpipe-remat" every micro-batch's, "fused"
  min(M, max(2S - 3, 1)), "1f1b" min(M, S); autodiff "gpipe" keeps no stash (its
  stage inputs are among every tick's residuals)."""
  if executor not in _predict.EXECUTORS:
    raise ValueError(f"executor={executor!r}; allowed: {', '.join(_predict.EXECUTORS)}.")
  m, s = num_microbatches, num_stages
  if executor == "gpipe":
    return 0
  if executor == "gpipe-remat":
    return m
  if executor == "fused":
    return min(m, max(2 * s - 3, 1))
  return min(m, s)


def linear_memory_bytes(tables: _tables.CostTables, choice: Mapping[str, int],
                        stage_of: Mapping[str, int] | None = None) -> tuple[int, ...]:
  """Per stage, the per-layer memory of the stage's own layers (`memory_by_stage`, what
  the solver's constraint sums: the paper's, or the runtime model's per-layer stand-in
  when the tables have an `executor`) plus the largest transient working set among
  them."""
  stage_of = stage_of or {l.name: 0 for l in tables.layers}
  out = []
  for s in range(tables.num_stages):
    total = transient = 0.0
    for l in tables.layers:
      if stage_of[l.name] == s:
        k = choice[l.name]
        total += tables.memory_by_stage(l.name)[s][k]
        transient = max(transient, l.temp_bytes[k])
    out.append(int(total + transient))
  return tuple(out)


def runtime_memory_bytes(tables: _tables.CostTables, choice: Mapping[str, int],
                         stage_of: Mapping[str, int] | None = None,
                         executor: str = "gpipe") -> tuple[int, ...]:
  """Per stage, peak bytes per device of the step `plan.apply` runs with `executor`.

  With one stage and one micro-batch nothing is pipelined: the plain jitted step holds
  what the paper's memory charges (`linear_memory_bytes`; both of the tables' memory
  models agree there). Otherwise the lockstep
  program's buffers (see the module docstring), the same on every device, at the
  larger of two moments. While the pipeline's backward loop runs:

    stored state      sum over layers of state_bytes / S (the arguments, donated:
                      the new state is written over them), plus the batch (M
                      micro-batches of the batch leaves, per device);
    stacks            per kind, C slots of parameters (tied tables included), read
                      by every run of the table executors. Autodiff "gpipe" reads
                      its ticks' own slices instead, but XLA keeps the stacks at
                      least until its backward loop starts, and each backward tick
                      forms its parameter cotangents whole, stack sized, before
                      they are added up: the same bytes either way;
    stack gradients   the accumulated gradients of the stacks;
    residuals         "gpipe": M + S - 1 ticks x every position's residuals (its
                      activations and, when it reads another layer's output, the
                      parameter slices its backward reads); a table executor: the
                      activations of one stage run (its `jax.vjp` reads the
                      parameters from the stacks);
    stash             a table executor's K stashed stage inputs and one arrived
                      cotangent per buffer slot (`stash_slots`); "gpipe" keeps its
                      stage inputs among the residuals;
    outputs           the cotangents of the model's outputs (the last call's returned
                      values, what the loss reads) for the M micro-batches;
    working set       the largest `temp_bytes` of any position (one run at a time).

  After it, while the optimizer runs: the stored state, the stack gradients and
  their copy in the stored layout (sum of grad_bytes / S).

  Args:
    tables: the configuration's cost tables.
    choice: layer name -> index into its `LayerCosts.candidates`.
    stage_of: layer name -> stage; default everything on stage 0.
    executor: `uniap_jax.apply`'s executor ("gpipe", "gpipe-remat", "fused", "1f1b";
      the one a plan's schedule runs with is `plans.runtime_executor`'s).
  Returns:
    One figure per stage, in bytes per device: with a pipeline, the same for every
    stage (one SPMD program allocates alike on every device).
  Raises:
    ValueError: an unknown executor.
  """
  terms = runtime_memory_terms(tables, choice, stage_of, executor)
  if "linear" in terms:
    return linear_memory_bytes(tables, choice, stage_of)
  update = terms["stored state"] + terms["stack gradients"] + terms["stored gradients"]
  loop = sum(v for k, v in terms.items() if k != "stored gradients")
  return tuple(int(max(loop, update)) for _ in range(tables.num_stages))


def runtime_memory_terms(tables: _tables.CostTables, choice: Mapping[str, int],
                         stage_of: Mapping[str, int] | None = None,
                         executor: str = "gpipe") -> dict[str, float]:
  """`runtime_memory_bytes`'s parts by name (bytes per device), for reports and tests.

  Keys: "stored state", "stacks", "stack gradients", "residuals", "stash", "outputs",
  "working set" (held while the pipeline's backward loop runs) and "stored gradients"
  (while the optimizer runs). With one stage and one micro-batch, one part,
  "linear": the paper's memory of the busiest stage.
  """
  if executor not in _predict.EXECUTORS:
    raise ValueError(f"executor={executor!r}; allowed: {', '.join(_predict.EXECUTORS)}.")
  stage_of = stage_of or {l.name: 0 for l in tables.layers}
  s_count, m = tables.num_stages, tables.num_microbatches
  if s_count == 1 and m == 1:
    return {"linear": float(max(linear_memory_bytes(tables, choice, stage_of)))}
  sizes = tables.mesh.sizes
  program = _predict._program(tables, choice, stage_of)
  produced = {v for l in tables.layers for v in l.output_ids}
  state = grads = batch = outputs = 0.0
  seen: set[int] = set()
  for l in tables.layers:
    k = choice[l.name]
    cand = l.candidates[k]
    state += l.state_bytes[k]
    grads += l.grad_bytes[k]
    for v, nbytes, layout in zip(l.input_ids, l.input_nbytes, cand.input_layouts):
      if v not in produced and v not in seen:
        seen.add(v)
        batch += m * nbytes / strategies.shard_count(layout, sizes)
    outputs += sum(local for _, local in cand.model_outputs)
  stacks = sum(n * _slot_bytes(layer, choice) for layer, n in program.stacks)
  activations = slices = working = 0.0
  for layer in program.positions:
    k = choice[layer.name]
    cand = layer.candidates[k]
    activations += layer.activation_bytes[k]
    # The backward forms the input's cotangent from the parameters (a matmul's
    # kernel); a layer under jax.checkpoint keeps all of its inputs.
    if cand.recompute or any(v in produced for v in layer.input_ids):
      slices += _slot_bytes(layer, choice)
    working = max(working, layer.temp_bytes[k])
  slots = sum(local for local, _ in program.slot_bytes)
  if executor == "gpipe":
    residuals, stash = (m + s_count - 1) * (activations + slices), 0.0
  else:
    residuals = activations
    stash = (stash_slots(executor, s_count, m) + 1) * slots
  return {
      "stored state": state / s_count + batch,
      "stacks": stacks,
      "stack gradients": stacks,
      "residuals": residuals,
      "stash": stash,
      "outputs": m * outputs,
      "working set": working,
      "stored gradients": grads / s_count,
  }


def _slot_bytes(layer: _tables.LayerCosts, choice: Mapping[str, int]) -> float:
  """Bytes per device of one slot of a kind's parameter stacks: the call's parameters
  and the tied ones the model passes to it (`_predict._stack_bytes`)."""
  return _predict._stack_bytes(layer, layer.candidates[choice[layer.name]])[0]
