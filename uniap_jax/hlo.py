"""Collectives read from compiled HLO text: what XLA actually emitted, per device.

`compiled.as_text()` is the ground truth the cost model is checked against and the
way a plan is verified after it is applied. This module parses it: every collective
instruction (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute),
its bytes on one device, the device groups it runs over (and so the mesh axes), and
how many times it executes, following while loops through their known trip counts.

Conventions (shared with `cost.predicted_collectives` and DESIGN.md):
  - kinds are "all-reduce", "all-gather", "reduce-scatter", "all-to-all" and "send"
    (collective-permute);
  - bytes of one collective are the larger of its operand and its result on one device;
  - an asynchronous pair (`all-gather-start` / `all-gather-done`) counts once, at the start;
  - a tuple all-reduce / all-gather / reduce-scatter (XLA's combiner merges several into
    one instruction) counts one collective per array, so counts do not depend on whether
    the combiner ran; a tuple all-to-all (CPU splits one into a piece per peer) counts once.
  - CPU has no reduce-scatter creator pass: it emits all-reduce followed by a dynamic-slice
    of this device's shard. With `fold_reduce_scatter=True` (the default) that pattern is
    counted as the reduce-scatter GPU and TPU compile it into (same bytes, same kind).

References: XLA HLO text format (xla/hlo/ir/hlo_instruction.cc, replica_group.cc).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import dataclasses
import math
import re
import warnings

import numpy as np

CollectiveKind = str  # "all-reduce" | "all-gather" | "reduce-scatter" | "all-to-all" | "send"
KINDS: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send")

_OPCODE_KIND = {
    "all-reduce": "all-reduce",
    "all-gather": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all",
    "collective-permute": "send",
    "collective-broadcast": "all-gather",
}

# Bits per element of each HLO primitive type (xla/xla_data.proto).
_TYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e3m4": 8,
    "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4,
    "token": 0, "opaque": 0,
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Collective:
  """One logical collective of a compiled program.

  Attributes:
    kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or "send".
    name: the HLO instruction name (with "#i" for the i-th array of a tuple collective).
    computation: the HLO computation that holds it.
    executions: how often it runs per call of the program (while trip counts
      multiplied); 0 inside a loop whose trip count XLA does not know (with a warning).
      Inside a conditional's branch (`conditional`) it counts as if that branch ran
      every time: an upper bound, since which branch runs is data dependent (a
      pipeline tick that skips an idle device's stage work runs it only on busy ticks).
    conditional: whether it sits in a branch of a conditional (lax.cond / lax.switch),
      at any depth.
    operand_bytes / result_bytes: sizes on one device, for one execution.
    replica_groups: the device groups (partition ids), empty when the text gives none.
    source_target_pairs: for "send", the (source, target) partition pairs.
    axes: mesh axes the groups vary over, when `parse` was given the mesh.
  """

  kind: str
  name: str
  computation: str
  executions: int
  operand_bytes: int
  result_bytes: int
  replica_groups: tuple[tuple[int, ...], ...] = ()
  source_target_pairs: tuple[tuple[int, int], ...] = ()
  axes: tuple[str, ...] = ()
  conditional: bool = False

  @property
  def bytes(self) -> int:
    """Bytes one device moves in one execution: the larger of operand and result."""
    return max(self.operand_bytes, self.result_bytes)

  @property
  def group_size(self) -> int:
    if self.replica_groups:
      return len(self.replica_groups[0])
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Instr:
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attrs: str
  literal: str = ""  # the text inside parameter(N) / constant(...)


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, e.g. "f32[8,32]{1,0}" or "(f32[], bf16[4])"."""
  total_bits = 0
  for dtype, dims in re.findall(r"([a-z][a-z0-9]*)\[([^\]]*)\]", shape):
    if dtype not in _TYPE_BITS:
      raise ValueError(
          f"Unknown HLO element type {dtype!r} in shape {shape!r}; known types are "
          f"{sorted(_TYPE_BITS)}. Add it to hlo._TYPE_BITS.")
    elements = 1
    for d in dims.split(","):
      d = d.strip().lstrip("<=")
      if d:
        elements *= int(d)
    total_bits += elements * _TYPE_BITS[dtype]
  return (total_bits + 7) // 8


def _tuple_elements(shape: str) -> list[str]:
  """Top-level elements of a tuple shape "(a, b, ...)"; [shape] for an array shape."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  inner = shape[1:-1]
  inner = re.sub(r"/\*[^*]*\*/", "", inner)
  return [s.strip() for s in _split_top_level(inner) if s.strip()]


def _split_top_level(text: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def _match_close(text: str, start: int) -> int:
  """Index just past the bracket that closes text[start] (one of "([{")."""
  depth = 0
  for i in range(start, len(text)):
    ch = text[i]
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"Unbalanced brackets in HLO text near {text[start:start + 80]!r}")


_INSTR_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_COMP_HEAD = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")


def _parse_instruction(line: str) -> _Instr | None:
  m = _INSTR_HEAD.match(line)
  if not m:
    return None
  rest = line[m.end():]
  rest = re.sub(r"/\*index=\d+\*/", "", rest)
  if rest.startswith("("):
    end = _match_close(rest, 0)
    shape, rest = rest[:end], rest[end:].lstrip()
  else:
    sm = re.match(r"[a-z][a-z0-9]*\[[^\]]*\](\{[^}]*\})?", rest)
    if not sm:
      return None
    shape, rest = sm.group(0), rest[sm.end():].lstrip()
  om = re.match(r"([\w\-]+)\(", rest)
  if not om:
    return None
  opcode = om.group(1)
  open_at = om.end() - 1
  close = _match_close(rest, open_at)
  operand_text = rest[open_at + 1:close - 1]
  if opcode in ("parameter", "constant", "iota"):
    return _Instr(name=m.group(1), shape=shape, opcode=opcode, operands=(),
                  attrs=rest[close:], literal=operand_text.strip())
  operands = tuple(re.findall(r"%([\w.\-]+)", operand_text))
  if not operands and operand_text.strip():
    # Older text without '%' sigils: "f32[4] x, f32[4] y" or "x, y".
    operands = tuple(p.split()[-1] for p in _split_top_level(operand_text) if p.split())
  return _Instr(name=m.group(1), shape=shape, opcode=opcode, operands=operands,
                attrs=rest[close:])


def _split_computations(text: str) -> tuple[dict[str, list[_Instr]], str]:
  comps: dict[str, list[_Instr]] = {}
  entry = ""
  current = None
  for line in text.splitlines():
    if current is None:
      m = _COMP_HEAD.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    instr = _parse_instruction(line)
    if instr is not None:
      comps[current].append(instr)
  if not entry:
    raise ValueError(
        "No ENTRY computation found in the HLO text; pass compiled.as_text() of a "
        "jax.jit(...).lower(...).compile() result.")
  return comps, entry


def _callees(instr: _Instr) -> list[tuple[str, float, bool]]:
  """(computation, executions per execution of instr, whether it is a conditional's
  branch) for each computation instr calls."""
  out: list[tuple[str, float, bool]] = []
  attrs = instr.attrs
  if instr.opcode == "while":
    trip = _trip_count(attrs)
    trip = _UNKNOWN_TRIPS if trip is None else trip
    for key, factor in (("body", trip), ("condition", trip + 1)):
      m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
      if m:
        out.append((m.group(1), factor, False))
    return out
  for key in ("calls", "to_apply", "true_computation", "false_computation"):
    for m in re.finditer(rf"\b{key}=%?([\w.\-]+)", attrs):
      out.append((m.group(1), 1.0, key.endswith("_computation")))
  m = re.search(r"\bbranch_computations=\{([^}]*)\}", attrs)
  if m:
    # Only one branch runs per execution; which one is data dependent, so each branch is
    # counted as if it ran (an upper bound for stage-dependent switches).
    for name in re.findall(r"%?([\w.\-]+)", m.group(1)):
      out.append((name, 1.0, True))
  return out


# Stands for a data-dependent trip count while multiplying executions; any result that
# reaches it is reported as unknown (0 executions) with a warning.
_UNKNOWN_TRIPS = float("nan")


def _trip_count(attrs: str) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
  return int(m.group(1)) if m else None


def _executions(comps: Mapping[str, list[_Instr]], entry: str
                ) -> tuple[dict[str, int], set[str]]:
  """Executions per program call of every computation reachable from ENTRY, and the
  computations reached through a conditional's branch."""
  edges: dict[str, list[tuple[str, float, bool]]] = {}
  for name, instrs in comps.items():
    edges[name] = [c for ins in instrs for c in _callees(ins) if c[0] in comps]
  # Topological order of the (acyclic) call graph from ENTRY.
  order: list[str] = []
  seen: set[str] = set()

  def visit(node: str) -> None:
    stack = [(node, iter(edges[node]))]
    seen.add(node)
    while stack:
      cur, it = stack[-1]
      for child, _, _ in it:
        if child not in seen:
          seen.add(child)
          stack.append((child, iter(edges[child])))
          break
      else:
        stack.pop()
        order.append(cur)

  visit(entry)
  counts = {name: 0.0 for name in seen}
  counts[entry] = 1.0
  branched: set[str] = set()
  for node in reversed(order):
    for child, factor, branch in edges[node]:
      counts[child] += counts[node] * factor
      if branch or node in branched:
        branched.add(child)
  return {k: (-1 if math.isnan(v) else int(round(v))) for k, v in counts.items()}, branched


def expand_replica_groups(attrs: str, num_devices: int | None = None) -> tuple[tuple[int, ...], ...]:
  """Device groups of a collective from its attribute text, in every format XLA prints.

  Formats: explicit `{{0,1},{2,3}}`; iota `[2,4]<=[8]` or `[4,2]<=[2,2,2]T(0,2,1)`;
  mesh axes `mesh['a'=2,'b'=4] {'b'}` (optionally with `, device_ids=(...)` and
  sub-axes `'b':(1)2`). Returns () when the text has no replica_groups (or `{}`, which
  means all devices: then one group of `num_devices` when that is given).
  """
  m = re.search(r"replica_groups=", attrs)
  if not m:
    return ()
  rest = attrs[m.end():]
  if rest.startswith("{"):
    end = _match_close(rest, 0)
    body = rest[1:end - 1].strip()
    if not body:
      return (tuple(range(num_devices)),) if num_devices else ()
    return tuple(tuple(int(x) for x in re.findall(r"\d+", g))
                 for g in re.findall(r"\{([^{}]*)\}", body))
  im = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
  if im:
    group_shape = [int(x) for x in im.group(1).split(",")]
    array = _iota(im.group(2), im.group(3))
    return tuple(tuple(int(x) for x in row) for row in array.reshape(group_shape))
  mm = re.match(r"mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", rest)
  if mm:
    return _mesh_groups(mm.group(1), mm.group(2), mm.group(3))
  raise ValueError(f"Unrecognised replica_groups format: {rest[:120]!r}")


def _iota(reshape: str, perm: str | None) -> np.ndarray:
  dims = [int(x) for x in reshape.split(",")]
  array = np.arange(math.prod(dims)).reshape(dims)
  if perm:
    array = array.transpose([int(x) for x in perm.split(",")])
  return array.reshape(-1)


def _mesh_groups(axes_text: str, device_ids: str | None, group_text: str) -> tuple[tuple[int, ...], ...]:
  names, sizes = [], []
  for name, size in re.findall(r"'?([\w.\-]+)'?\s*=\s*(\d+)", axes_text):
    names.append(name)
    sizes.append(int(size))
  if device_ids:
    im = re.match(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*$", device_ids)
    if im:
      devices = _iota(im.group(1), im.group(2))
    else:
      devices = np.array([int(x) for x in re.findall(r"\d+", device_ids)])
  else:
    devices = np.arange(math.prod(sizes))
  refs = []  # (mesh axis index, pre_size, size), in the listed order
  for name, pre, size in re.findall(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?", group_text):
    i = names.index(name)
    refs.append((i, int(pre) if pre else 1, int(size) if size else sizes[i]))
  # Split each mesh axis into (major ... minor) pieces around its referenced sub-axes;
  # a sub-axis "a:(pre)size" is the piece of `size` after the major `pre` (Shardy).
  new_sizes: list[int] = []
  position: dict[tuple[int, int, int], int] = {}
  for i, full in enumerate(sizes):
    prefix = 1
    for pre, size in sorted({(p, s) for j, p, s in refs if j == i}):
      if pre != prefix:
        new_sizes.append(pre // prefix)
        prefix = pre
      position[(i, pre, size)] = len(new_sizes)
      new_sizes.append(size)
      prefix *= size
    if prefix != full:
      new_sizes.append(full // prefix)
  group_dims = [position[r] for r in refs]
  rest = [d for d in range(len(new_sizes)) if d not in group_dims]
  group_size = math.prod(new_sizes[d] for d in group_dims)
  array = devices.reshape(new_sizes).transpose(rest + group_dims).reshape(-1, group_size)
  return tuple(tuple(int(x) for x in row) for row in array)


def groups_to_axes(groups: Sequence[Sequence[int]],
                   mesh_axes: Mapping[str, int]) -> tuple[str, ...]:
  """Mesh axes whose coordinate varies inside the device groups.

  Partition ids are row-major coordinates of the mesh (the last axis varies fastest),
  which is how jax numbers the devices of `Mesh.devices.flat`.
  """
  names = list(mesh_axes)
  sizes = [mesh_axes[n] for n in names]
  total = math.prod(sizes)
  varying: set[int] = set()
  for group in groups:
    ids = [d for d in group if d < total]
    if len(ids) < 2:
      continue
    coords = np.array(np.unravel_index(np.array(ids), sizes)).T
    for a in range(len(names)):
      if len(set(coords[:, a].tolist())) > 1:
        varying.add(a)
  return tuple(names[a] for a in sorted(varying))


def _pairs(attrs: str) -> tuple[tuple[int, int], ...]:
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
  if not m:
    return ()
  return tuple((int(a), int(b)) for a, b in re.findall(r"\{?(\d+),(\d+)\}?", m.group(1) + "}"))


def parse(hlo_text: str, mesh_axes: Mapping[str, int] | None = None, *,
          fold_reduce_scatter: bool = True) -> tuple[Collective, ...]:
  """Every collective of a compiled program, with bytes, groups and executions.

  Args:
    hlo_text: `compiled.as_text()` of a jitted, compiled function.
    mesh_axes: the mesh the program was compiled for, axis name -> size in mesh order;
      when given, each collective's `axes` names the axes its groups vary over.
    fold_reduce_scatter: count CPU's all-reduce + dynamic-slice as a reduce-scatter.
  Returns:
    One `Collective` per logical collective, in program text order.
  Raises:
    ValueError: the text is not HLO.
  """
  comps, entry = _split_computations(hlo_text)
  executions, branched = _executions(comps, entry)
  num_devices = None
  m = re.search(r"num_partitions=(\d+)", hlo_text)
  if m:
    num_devices = int(m.group(1))
  if mesh_axes is not None:
    num_devices = math.prod(mesh_axes.values())
  out: list[Collective] = []
  unknown: list[str] = []
  for comp_name, instrs in comps.items():
    runs = executions.get(comp_name, 0)
    if runs == 0:
      continue
    table = {ins.name: ins for ins in instrs}
    users: dict[str, list[_Instr]] = collections.defaultdict(list)
    for ins in instrs:
      for op in ins.operands:
        users[op].append(ins)
    for ins in instrs:
      base = ins.opcode.removesuffix("-start")
      if base not in _OPCODE_KIND or ins.opcode.endswith("-done"):
        continue
      kind = _OPCODE_KIND[base]
      result_shape = ins.shape
      if ins.opcode.endswith("-start"):
        done = [u for u in users[ins.name] if u.opcode.endswith("-done")]
        if done:
          result_shape = done[0].shape
      operand_shapes = [table[o].shape if o in table else "" for o in ins.operands]
      groups = expand_replica_groups(ins.attrs, num_devices)
      pairs = _pairs(ins.attrs) if kind == "send" else ()
      axes: tuple[str, ...] = ()
      if mesh_axes is not None:
        if groups:
          axes = groups_to_axes(groups, mesh_axes)
        elif pairs:
          axes = groups_to_axes([list(p) for p in pairs], mesh_axes)
        elif num_devices:
          axes = tuple(mesh_axes)
      results = _tuple_elements(result_shape)
      is_piecewise_all_to_all = kind == "all-to-all" and len(results) > 1
      if is_piecewise_all_to_all or len(results) == 1:
        pieces = [(ins.name, sum(shape_bytes(s) for s in operand_shapes),
                   shape_bytes(result_shape), kind)]
      else:
        pieces = []
        for i, res in enumerate(results):
          op_bytes = shape_bytes(operand_shapes[i]) if i < len(operand_shapes) else 0
          pieces.append((f"{ins.name}#{i}", op_bytes, shape_bytes(res), kind))
      for index, (name, op_bytes, res_bytes, k) in enumerate(pieces):
        if (fold_reduce_scatter and k == "all-reduce" and groups and len(groups[0]) > 1):
          shard = _sliced_shard_bytes(ins, index if len(pieces) > 1 else None, users, comps)
          if shard is not None and shard * len(groups[0]) == res_bytes:
            k, res_bytes = "reduce-scatter", shard
        if runs < 0:
          unknown.append(name)
        out.append(Collective(kind=k, name=name, computation=comp_name,
                              executions=max(runs, 0), operand_bytes=op_bytes,
                              result_bytes=res_bytes, replica_groups=groups,
                              source_target_pairs=pairs, axes=axes,
                              conditional=comp_name in branched))
  if unknown:
    warnings.warn(
        f"Collectives {unknown[:5]} run inside a while loop without a known trip count; "
        "they are reported with executions=0. Use loops with static bounds (lax.fori_loop "
        "/ lax.scan with a static length) to count them.", stacklevel=2)
  return tuple(out)


def _sliced_shard_bytes(ins: _Instr, index: int | None, users: Mapping[str, list[_Instr]],
                        comps: Mapping[str, list[_Instr]]) -> int | None:
  """Bytes of the per-device slice when every use of an all-reduce result is a dynamic-slice.

  Follows get-tuple-element (for tuple all-reduces), bitcasts and copies, and looks into
  fusions at the parameter the value enters as. Returns None for any other use.
  """
  frontier = [(ins.name, None)]
  if index is not None:
    frontier = [(u.name, None) for u in users[ins.name]
                if u.opcode == "get-tuple-element" and re.search(rf"index={index}\b", u.attrs)]
    if not frontier:
      return None
  shard: int | None = None
  seen = set()
  while frontier:
    name, _ = frontier.pop()
    if name in seen:
      continue
    seen.add(name)
    for user in users.get(name, []):
      if user.opcode in ("bitcast", "copy", "reshape"):
        frontier.append((user.name, None))
      elif user.opcode == "dynamic-slice" and user.operands and user.operands[0] == name:
        size = shape_bytes(user.shape)
        if shard is not None and shard != size:
          return None
        shard = size
      elif user.opcode == "fusion":
        size = _fusion_slice_bytes(user, user.operands.index(name), comps)
        if size is None or (shard is not None and shard != size):
          return None
        shard = size
      else:
        return None
  return shard


def _fusion_slice_bytes(fusion: _Instr, param_index: int,
                        comps: Mapping[str, list[_Instr]]) -> int | None:
  m = re.search(r"\bcalls=%?([\w.\-]+)", fusion.attrs)
  if not m or m.group(1) not in comps:
    return None
  body = comps[m.group(1)]
  param = next((i for i in body if i.opcode == "parameter" and i.literal == str(param_index)),
               None)
  if param is None:
    return None
  sizes = set()
  frontier = [param.name]
  while frontier:
    name = frontier.pop()
    for user in (i for i in body if name in i.operands):
      if user.opcode in ("bitcast", "copy", "reshape"):
        frontier.append(user.name)
      elif user.opcode == "dynamic-slice" and user.operands[0] == name:
        sizes.add(shape_bytes(user.shape))
      else:
        return None
  return sizes.pop() if len(sizes) == 1 else None


def summarize(collectives: Sequence[Collective]) -> dict[str, dict[str, int]]:
  """kind -> {"count": executions summed, "bytes": bytes moved per device per call}."""
  out: dict[str, dict[str, int]] = {}
  for c in collectives:
    entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
    entry["count"] += c.executions
    entry["bytes"] += c.executions * c.bytes
  return out


def bytes_by_kind(collectives: Sequence[Collective]) -> dict[str, int]:
  """kind -> bytes one device moves per program call (DESIGN.md's `predicted.collectives`)."""
  return {k: v["bytes"] for k, v in summarize(collectives).items()}


def by_axes(collectives: Sequence[Collective]) -> dict[tuple[str, tuple[str, ...]], dict[str, int]]:
  """(kind, axes) -> {"count", "bytes"}: the per-axis view tests compare against."""
  out: dict[tuple[str, tuple[str, ...]], dict[str, int]] = {}
  for c in collectives:
    entry = out.setdefault((c.kind, c.axes), {"count": 0, "bytes": 0})
    entry["count"] += c.executions
    entry["bytes"] += c.executions * c.bytes
  return out
