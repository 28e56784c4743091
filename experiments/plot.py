"""Pictures of a plan: the pipeline schedule as a Gantt chart, and per-layer strategies.

`timeline(plan)` draws the schedule in text (one cell per tick: a forward pass takes one
tick, a backward pass two, as the cost model charges backward at twice forward), so the
fill and drain bubble shows as idle cells. `save_png(plan, path)` draws the same schedule
to scale in seconds (each stage's forward and backward take a third and two thirds of its
per-micro-batch time, the sum of its layers' `time_s`) above a bar chart of every layer's
time coloured by its strategy.

GPipe runs all forwards, then all backwards in reverse micro-batch order (as autodiff
through the micro-batch loop runs them); 1F1B (PipeDream-flush) runs `num_stages - s - 1`
warm-up forwards on stage s, then alternates one forward and one backward, then drains.

Sends between stages are not drawn; the predicted step time in the picture's title
includes them (and charges every micro-batch the slowest stage, as the objective does),
so the chart can be a little shorter than the prediction.

matplotlib is optional (`pip install -e '.[experiments]'`) and imported only by
`save_png`, so that planning from the command line never needs it.

References: Huang et al., GPipe, NeurIPS 2019 (Fig. 2); Narayanan et al., PipeDream-2BW /
Megatron-LM SC 2021 (1F1B schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

from uniap_jax import plans

SCHEDULES = ("gpipe", "1f1b")
FORWARD_TICKS = 1  # a forward pass, the unit of the text timeline
BACKWARD_TICKS = 2  # backward = 2 x forward, as the UniAP cost model assumes
BACKWARD_SHARE = BACKWARD_TICKS / (FORWARD_TICKS + BACKWARD_TICKS)  # of a stage's time
_INSTALL_HINT = "pip install -e '.[experiments]'"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
  """One pass of one micro-batch on one stage.

  `start` and `duration` share the unit of the durations the schedule was built with
  (ticks, or seconds).
  """

  stage: int
  microbatch: int
  phase: str  # "forward" | "backward"
  start: float
  duration: float

  @property
  def end(self) -> float:
    return self.start + self.duration


def _order(stage: int, num_stages: int, num_microbatches: int,
           schedule: str) -> list[tuple[str, int]]:
  """The passes one stage runs, in order."""
  c = num_microbatches
  if schedule == "gpipe":
    return [("forward", m) for m in range(c)] + [("backward", m) for m in reversed(range(c))]
  warmup = min(num_stages - stage - 1, c)
  order = [("forward", m) for m in range(warmup)]
  for i in range(c - warmup):
    order += [("forward", warmup + i), ("backward", i)]
  return order + [("backward", m) for m in range(c - warmup, c)]


def schedule_events(num_stages: int, num_microbatches: int, schedule: str, *,
                    forward: Sequence[float] | None = None,
                    backward: Sequence[float] | None = None) -> tuple[Event, ...]:
  """Every pass of a pipeline step, each started as soon as its stage and input allow.

  A forward pass needs the previous stage's forward of the same micro-batch; a
  backward pass needs the next stage's backward (the last stage: its own forward).

  Args:
    num_stages: pipeline stages.
    num_microbatches: micro-batches per step.
    schedule: "gpipe" or "1f1b".
    forward, backward: per stage, the duration of one pass; default 1 and 2 ticks.
  Returns:
    The events sorted by (stage, start).
  Raises:
    ValueError: a count below 1, an unknown schedule, or durations of the wrong length.
  """
  for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}; allowed: {', '.join(SCHEDULES)}.")
  durations = {}
  for phase, given, default in (("forward", forward, FORWARD_TICKS),
                                ("backward", backward, BACKWARD_TICKS)):
    values = [default] * num_stages if given is None else [float(x) for x in given]
    if len(values) != num_stages or any(not x > 0 for x in values):
      raise ValueError(f"{phase} must give one positive duration per stage "
                       f"({num_stages}), got {given!r}.")
    durations[phase] = values
  orders = [_order(s, num_stages, num_microbatches, schedule) for s in range(num_stages)]
  nxt = [0] * num_stages
  free = [0.0] * num_stages
  end: dict[tuple[str, int, int], float] = {}
  events = []
  while any(n < len(o) for n, o in zip(nxt, orders)):
    progressed = False
    for s in range(num_stages):
      if nxt[s] == len(orders[s]):
        continue
      phase, m = orders[s][nxt[s]]
      if phase == "forward":
        dep = ("forward", s - 1, m) if s > 0 else None
      else:
        dep = ("backward", s + 1, m) if s < num_stages - 1 else ("forward", s, m)
      if dep is not None and dep not in end:
        continue
      start = max(free[s], end[dep] if dep else 0.0)
      events.append(Event(stage=s, microbatch=m, phase=phase, start=start,
                          duration=durations[phase][s]))
      end[(phase, s, m)] = free[s] = start + durations[phase][s]
      nxt[s] += 1
      progressed = True
    if not progressed:  # the orders above never deadlock; guard against edits
      raise RuntimeError(f"{schedule} schedule deadlocked at {nxt}")
  return tuple(sorted(events, key=lambda e: (e.stage, e.start)))


def stage_times_s(plan: plans.Plan) -> tuple[float, ...]:
  """Per stage, seconds of one micro-batch's forward and backward (its layers' time_s)."""
  times = [0.0] * len(plan.stages)
  for layer in plan.layers:
    if 0 <= layer.stage < len(times):
      times[layer.stage] += layer.time_s
  return tuple(times)


def plan_events(plan: plans.Plan, *, in_seconds: bool = True) -> tuple[Event, ...]:
  """The plan's schedule, to scale in seconds (or in ticks, or when times are missing)."""
  times = stage_times_s(plan)
  kwargs = {}
  if in_seconds and all(t > 0 for t in times):
    kwargs = dict(forward=[t * (1 - BACKWARD_SHARE) for t in times],
                  backward=[t * BACKWARD_SHARE for t in times])
  return schedule_events(len(plan.stages), plan.num_microbatches, plan.schedule, **kwargs)


def bubble_fraction(events: Sequence[Event], num_stages: int) -> float:
  """Idle share of all stages' time between the step's start and its end."""
  makespan = max(e.end for e in events)
  busy = sum(e.duration for e in events)
  return 1.0 - busy / (num_stages * makespan)


def timeline(plan: plans.Plan, *, max_width: int = 120) -> str:
  """The plan's pipeline schedule as text, one row per stage, in ticks.

  Each tick is a cell: `F3` the forward of micro-batch 3, `B3` (two cells) its
  backward, `..` idle. When that is wider than `max_width` characters, one character
  per tick (`>` forward, `<` backward, `.` idle), and past that several ticks per
  character (`.` when most of them are idle, else `>`, `<`, or `=` for both).
  """
  events = plan_events(plan, in_seconds=False)
  num_stages, c = len(plan.stages), plan.num_microbatches
  makespan = int(round(max(e.end for e in events)))
  label = [f"stage {s:<{len(str(num_stages - 1))}} |" for s in range(num_stages)]
  room = max(max_width - len(label[0]) - 1, 1)
  cell = 1 + len(str(c - 1))
  grid = [[None] * makespan for _ in range(num_stages)]
  for e in events:
    for t in range(int(round(e.start)), int(round(e.end))):
      grid[e.stage][t] = e
  rows = []
  if makespan * cell <= room:
    for s in range(num_stages):
      cells = [("F" if e.phase == "forward" else "B") + f"{e.microbatch:<{cell - 1}}"
               if e else "." * cell for e in grid[s]]
      rows.append(label[s] + "".join(cells) + "|")
    scale = f"one tick = {cell} characters"
  else:
    per = math.ceil(makespan / room)
    for s in range(num_stages):
      chars = []
      for t0 in range(0, makespan, per):
        ticks = grid[s][t0:t0 + per]
        busy = {e.phase for e in ticks if e is not None}
        if 2 * (len(ticks) - sum(e is not None for e in ticks)) > len(ticks):
          chars.append(".")
        else:
          chars.append("=" if len(busy) == 2 else ">" if "forward" in busy else "<")
      rows.append(label[s] + "".join(chars) + "|")
    scale = ("one character per tick" if per == 1 else f"one character = {per} ticks") + \
        "; > forward, < backward, = both"
  head = (f"{plan.schedule} schedule, {num_stages} stage(s) x {c} micro-batch(es), "
          f"{makespan} ticks (forward {FORWARD_TICKS}, backward {BACKWARD_TICKS}; {scale}); "
          f"idle '.' = bubble, {bubble_fraction(events, num_stages):.0%} of stage time")
  return "\n".join([head, *rows])


def check_matplotlib() -> None:
  """Raises ImportError with the install command when matplotlib is missing."""
  try:
    import matplotlib  # noqa: F401  (lazy: an optional extra)
  except ImportError as e:
    raise ImportError(f"Drawing plots needs matplotlib, which is not installed. Install "
                      f"the experiments extra: {_INSTALL_HINT}") from e


def _time_unit(seconds: float) -> tuple[float, str]:
  if seconds >= 1:
    return 1.0, "s"
  if seconds >= 1e-3:
    return 1e3, "ms"
  return 1e6, "us"


def save_png(plan: plans.Plan, path: str, *, title: str | None = None) -> None:
  """Writes the plan's Gantt chart (top) and per-layer strategies (bottom) to a PNG.

  Raises:
    ImportError: matplotlib is missing; the message says how to install it.
  """
  check_matplotlib()
  from matplotlib.figure import Figure  # lazy: only --plot needs it
  from matplotlib.patches import Patch

  events = plan_events(plan)
  num_stages = len(plan.stages)
  in_ticks = not all(t > 0 for t in stage_times_s(plan))
  makespan = max(e.end for e in events)
  factor, unit = (1.0, "ticks") if in_ticks else _time_unit(makespan)
  fig = Figure(figsize=(13, 4.5 + 0.35 * num_stages), layout="constrained")
  gantt, bars = fig.subplots(2, 1, height_ratios=[max(num_stages, 2), 3])
  colours = {"forward": "#4C72B0", "backward": "#DD8452"}
  for s in range(num_stages):
    gantt.barh(s, makespan * factor, left=0, height=0.8, color="#EEEEEE")  # idle = bubble
  for e in events:
    gantt.barh(e.stage, e.duration * factor, left=e.start * factor, height=0.8,
               color=colours[e.phase], edgecolor="white", linewidth=0.5)
    if plan.num_microbatches <= 32 and e.duration / makespan > 0.012:
      gantt.text((e.start + e.duration / 2) * factor, e.stage, str(e.microbatch),
                 ha="center", va="center", fontsize=7, color="white")
  gantt.set_yticks(range(num_stages), [f"stage {s}" for s in range(num_stages)])
  gantt.invert_yaxis()
  gantt.set_xlim(0, makespan * factor)
  gantt.set_xlabel(f"time in one step ({unit})")
  gantt.legend(handles=[Patch(color=colours["forward"], label="forward"),
                        Patch(color=colours["backward"], label="backward"),
                        Patch(color="#EEEEEE", label="idle (bubble)")],
               loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
  mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh_axes.items()) or "1 device"
  p = plan.predicted
  gantt.set_title(title or (
      f"{plan.cluster}: mesh {mesh}, {plan.num_microbatches} micro-batches, "
      f"{plan.schedule}; predicted step {p.step_time_s * 1e3:.1f} ms, "
      f"{p.throughput:.2f} samples/s, bubble "
      f"{bubble_fraction(events, num_stages):.0%} of stage time"), fontsize=10)

  strategies = list(dict.fromkeys(l.strategy for l in plan.layers))
  palette = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
             "#8C8C8C", "#CCB974", "#64B5CD")
  colour_of = {s: palette[i % len(palette)] for i, s in enumerate(strategies)}
  layer_factor, layer_unit = _time_unit(max((l.time_s for l in plan.layers), default=0.0)
                                        or 1.0)
  xs = range(len(plan.layers))
  bars.bar(xs, [l.time_s * layer_factor for l in plan.layers],
           color=[colour_of[l.strategy] for l in plan.layers], width=0.85)
  for i in range(1, len(plan.layers)):
    if plan.layers[i].stage != plan.layers[i - 1].stage:
      bars.axvline(i - 0.5, color="black", linestyle="--", linewidth=0.8)
  step = max(1, math.ceil(len(plan.layers) / 60))
  bars.set_xticks(list(xs)[::step], [l.name for l in plan.layers][::step], rotation=90,
                  fontsize=6)
  bars.set_xlim(-0.5, len(plan.layers) - 0.5)
  bars.set_ylabel(f"time per micro-batch ({layer_unit})")
  bars.set_title("per-layer strategies (dashed: stage boundaries)", fontsize=10)
  shown = strategies[:12]
  bars.legend(handles=[Patch(color=colour_of[s], label=s if len(s) <= 48 else s[:45] + "...")
                       for s in shown]
              + ([Patch(color="white", label=f"+{len(strategies) - 12} more")]
                 if len(strategies) > 12 else []),
              fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.savefig(path, dpi=110)
