"""The step's jaxpr with calls inlined: typed equations and their costs."""

from __future__ import annotations

from collections.abc import Sequence
import enum
import hashlib
import math
import os
import re
import traceback
from typing import Any

import jax
from jax.extend import core as jex_core
from jax.extend import source_info_util
import numpy as np

from uniap_jax.graph._types import Equation
from uniap_jax.graph._types import TensorInfo
from uniap_jax.graph._args import _Leaf
from uniap_jax.graph._args import _where
from uniap_jax.graph._modules import _Modules

_UNTRACEABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                jax.errors.TracerArrayConversionError)


def _make_jaxpr(step_fn, fn_name, leaves, treedefs, counts, modules: _Modules):
  """The step's closed jaxpr over all leaves.

  Its outputs are the step's array leaves, then the leaves it wrote back in place (NNX).
  Returns (closed jaxpr, number of step outputs, {leaf index: output position} of the
  new value of each leaf, written back or returned in the place of its argument).
  """
  layout: dict[str, Any] = {}
  starts = np.cumsum([0] + list(counts)).tolist()

  def traced(*leaves):  # the name "leaves" is parsed from JAX's error messages
    args = [jax.tree_util.tree_unflatten(td, leaves[s:s + n])
            for td, s, n in zip(treedefs, starts, counts)]
    modules.stamp(args)
    out = step_fn(*args)
    out_leaves = [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]
    position = {id(x): k for k, x in enumerate(out_leaves)}
    # A functional step returns each new state in the place of its argument: as the whole
    # output, or as one element of an output tuple, with the argument's structure.
    returned = [out] + (list(out) if isinstance(out, tuple | list) else [])
    updates, written = {}, []
    for td, arg, s, n in zip(treedefs, args, starts, counts):
      now = jax.tree_util.tree_leaves(arg)
      if len(now) == n and any(x is not leaves[s + k] for k, x in enumerate(now)):
        for k, x in enumerate(now):
          if isinstance(x, jax.Array) and x is not leaves[s + k]:
            updates[s + k] = len(out_leaves) + len(written)
            written.append(x)
        continue
      for candidate in returned:
        if jax.tree_util.tree_structure(candidate) == td:
          new = jax.tree_util.tree_leaves(candidate)
          updates.update((s + k, position[id(x)]) for k, x in enumerate(new)
                         if id(x) in position and x is not leaves[s + k])
          break
    layout["num_out"], layout["updates"] = len(out_leaves), updates
    return tuple(out_leaves) + tuple(written)

  with modules.scoped_calls():
    try:
      closed = jax.make_jaxpr(traced)(*[l.spec for l in leaves])
    except _UNTRACEABLE as e:
      raise TypeError(_untraceable_message(fn_name, e, leaves)) from e
  return closed, layout["num_out"], layout["updates"]


def _untraceable_message(fn_name: str, err: Exception, leaves: Sequence[_Leaf]) -> str:
  if isinstance(err, jax.errors.TracerBoolConversionError):
    what = "converts an array to a Python bool (an `if`, `while`, `and` or `assert` on it)"
  elif isinstance(err, jax.errors.TracerIntegerConversionError):
    what = "converts an array to a Python int (range(), list indexing)"
  elif isinstance(err, jax.errors.TracerArrayConversionError):
    what = "converts an array to a NumPy array (np.asarray)"
  else:
    what = "needs the concrete value of an array"
  at = ""
  here = os.path.abspath(__file__)
  for frame in reversed(traceback.extract_tb(err.__traceback__)):
    f = frame.filename
    if os.path.abspath(f) != here and not any(
        f"{os.sep}{lib}{os.sep}" in f for lib in ("jax", "jaxlib", "flax", "optax")):
      at = f" at {f}:{frame.lineno}"
      break
  source = ""
  m = re.search(r"argument leaves\[(\d+)\]", str(err))
  if m and int(m.group(1)) < len(leaves):
    leaf = leaves[int(m.group(1))]
    source = f" The value depends on {_where(leaf.arg_index, leaf.path).rstrip(',')}."
  first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return (f"trace: {fn_name}{at} {what}, but trace() runs the step on shapes only, so no "
          f"array has a value.{source} Use jax.lax.cond, jnp.where or jax.lax.fori_loop "
          "instead of Python control flow on arrays, or make the value a static Python "
          f"constant (close over it). JAX said: {first}")


# ---------------------------------------------------------------------------
# The inlined program

_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                     "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint", "remat",
                     "remat2"})
_REMAT_SCOPE = "rematted_computation"  # the scope jax.checkpoint adds to recomputation

_ARITH = frozenset({
    "add", "add_any", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "floor",
    "ceil", "round", "select_n", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not",
    "xor", "shift_left", "shift_right_logical", "shift_right_arithmetic", "population_count",
    "clz", "square", "integer_pow", "is_finite", "nextafter", "real", "imag", "conj", "complex"})
_FREE_ELEMENTWISE = frozenset({"copy", "copy_p", "stop_gradient", "optimization_barrier"})
_TRANSCENDENTAL = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin",
    "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "atan2", "sqrt", "rsqrt", "cbrt",
    "pow", "erf", "erfc", "erf_inv", "lgamma", "digamma", "igamma", "igammac", "polygamma",
    "zeta", "bessel_i0e", "bessel_i1e", "random_gamma_grad", "regularized_incomplete_beta"})
_CONVERT = frozenset({"convert_element_type", "reduce_precision", "bitcast_convert_type"})
_REDUCTION = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                        "reduce_or", "reduce_xor", "argmax", "argmin"})
_SCATTER_ACC = frozenset({"scatter-add", "scatter_add", "scatter-mul", "scatter_mul",
                          "scatter-min", "scatter_min", "scatter-max", "scatter_max"})
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_KIND_OF = {
    "dot_general": "dot_general", "conv_general_dilated": "conv", "gather": "gather",
    "scatter": "scatter", "dynamic_update_slice": "scatter", "reshape": "reshape",
    "squeeze": "reshape", "expand_dims": "reshape", "transpose": "transpose",
    "broadcast_in_dim": "broadcast", "slice": "slice", "dynamic_slice": "slice",
    "split": "slice", "concatenate": "concatenate",
    **{p: "elementwise" for p in _ARITH | _FREE_ELEMENTWISE | _TRANSCENDENTAL},
    **{p: "convert" for p in _CONVERT}, **{p: "reduction" for p in _REDUCTION},
    **{p: "scatter" for p in _SCATTER_ACC}}
# XLA expands logistic into 1 / (1 + exp(-x)): three flops and one transcendental per element.
_LOGISTIC_FLOPS = 3


class _Eqn:
  __slots__ = ("prim", "kind", "in_ids", "out_ids", "in_types", "out_types", "lits", "params",
               "flops", "trans", "nbytes", "stack", "source")


def _plain(v: Any) -> Any:
  """Plain hashable Python data for a primitive parameter, or _SKIP."""
  if v is None or isinstance(v, bool | int | float | str):
    return v
  if isinstance(v, np.integer | np.floating | np.bool_):
    return v.item()
  if isinstance(v, enum.Enum):
    return v.name
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return np.dtype(v).name
  if hasattr(v, "dtype") and type(v).__name__.endswith("DType"):  # numpy DType classes
    try:
      return np.dtype(v).name
    except TypeError:
      return _SKIP
  if isinstance(v, tuple | list):
    items = tuple(_plain(x) for x in v)
    return _SKIP if any(x is _SKIP for x in items) else items
  return _SKIP


_SKIP = object()


def _op_params(prim: str, params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
  out: dict[str, Any] = {}
  for k, v in params.items():
    if k == "dimension_numbers" and prim == "dot_general":
      (lc, rc), (lb, rb) = v
      out[k] = ((tuple(map(int, lc)), tuple(map(int, rc))), (tuple(map(int, lb)),
                                                              tuple(map(int, rb))))
    elif k == "dimension_numbers" and prim == "conv_general_dilated":
      out[k] = tuple(tuple(int(d) for d in spec) for spec in (v.lhs_spec, v.rhs_spec,
                                                              v.out_spec))
    elif k == "dimension_numbers" and hasattr(v, "_fields"):  # gather / scatter
      for field in v._fields:
        out[field] = _plain(getattr(v, field))
    else:
      p = _plain(v)
      if p is not _SKIP:
        out[k] = p
  return tuple(sorted(out.items()))


def _op_cost(prim: str, params: dict[str, Any], ins: Sequence[TensorInfo],
             outs: Sequence[TensorInfo]) -> tuple[float, float]:
  """(flops, transcendentals) of one primitive, counted as XLA's HloCostAnalysis does."""
  out_size = float(sum(o.size for o in outs))
  if prim == "dot_general":
    (lc, _), _ = params["dimension_numbers"]
    contract = math.prod(ins[0].shape[d] for d in lc)
    return 2.0 * out_size * float(contract), 0.0
  if prim == "conv_general_dilated":
    rhs = ins[1]
    out_features = rhs.shape[params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * out_size * rhs.size / max(out_features, 1), 0.0
  if prim in _ARITH:
    if prim == "integer_pow":  # repeated multiplication, plus a division when negative
      y = int(params.get("y", 2))
      return out_size * (max(abs(y) - 1, 0) + (y < 0)), 0.0
    return out_size, 0.0
  if prim in _TRANSCENDENTAL:
    return (_LOGISTIC_FLOPS * out_size if prim == "logistic" else 0.0), out_size
  if prim in _CONVERT:
    return (0.0 if prim == "bitcast_convert_type" else out_size), 0.0
  if prim in _REDUCTION:
    return float(max(ins[0].size - out_size, 0)), 0.0
  if prim in _SCATTER_ACC:
    return float(ins[2].size) if len(ins) > 2 else 0.0, 0.0
  if prim in _CUMULATIVE:
    return float(ins[0].size), 0.0
  if prim.startswith("reduce_window"):
    window = math.prod(params.get("window_dimensions", (1,)))
    return out_size * float(window), 0.0
  return 0.0, 0.0


def _sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]] | None:
  """(jaxpr, consts) of a call-like equation that is inlined, else None."""
  if eqn.primitive.name not in _INLINE:
    return None
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, jex_core.ClosedJaxpr):
      jaxpr, consts = j.jaxpr, j.consts
    elif isinstance(j, jex_core.Jaxpr):
      jaxpr, consts = j, ()
    else:
      continue
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr, consts
  return None


def _own_stack(name_stack) -> tuple[tuple[bool, str], ...]:
  """(is_transform, name) elements of an equation's name stack.

  A transposed `checkpoint` carries its scopes twice ("transpose(jvp(a))/jvp(a)"); the
  repeat is dropped so that it does not read as a nested scope.
  """
  elems = tuple((type(el).__name__ == "Transform", el.name) for el in name_stack.stack)
  scopes = [k for k, (t, _) in enumerate(elems) if not t]
  half = len(scopes) // 2
  if half and [elems[k] for k in scopes[:half]] == [elems[k] for k in scopes[half:]]:
    drop = set(scopes[half:])
    elems = tuple(e for k, e in enumerate(elems) if k not in drop)
  return elems


def _literal_key(val: Any) -> Any:
  """A cheap, exact stand-in for a literal's value in layer signatures."""
  arr = np.asarray(val)
  if arr.ndim == 0:
    return (arr.dtype.name, arr.item())
  return (arr.dtype.name, arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=8).hexdigest())


def _open(j) -> Any:
  return j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j


class _Program:
  """The step's jaxpr with calls inlined: equations in program order, typed values."""

  def __init__(self, closed, keep_equations: bool = False):
    self.eqns: list[_Eqn] = []
    # With keep_equations, the JAX equation behind each _Eqn and where its operands
    # come from, so that any set of ops can be run again (`replay`).
    self.equations: list[Equation] | None = [] if keep_equations else None
    self.types: list[TensorInfo] = []
    self.notes: list[str] = []
    self._infos: dict[Any, TensorInfo] = {}
    self._costs: dict[int, tuple[float, float, float]] = {}
    jaxpr = closed.jaxpr
    in_ids = [self._new(v.aval) for v in jaxpr.invars]
    self.out_ids = self._walk(jaxpr, in_ids, (), "", closed.consts)

  def info(self, aval) -> TensorInfo:
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    key = (tuple(shape) if shape is not None else None, dtype)
    if key not in self._infos:
      if shape is None or dtype is None:  # tokens and other non-array values
        info = TensorInfo(shape=(), dtype="bool")
      elif jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # PRNG keys: their key data
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        info = TensorInfo(shape=tuple(int(d) for d in data.shape), dtype=np.dtype(data.dtype).name)
      else:
        info = TensorInfo(shape=tuple(int(d) for d in shape), dtype=np.dtype(dtype).name)
      self._infos[key] = info
    return self._infos[key]

  def _new(self, aval) -> int:
    self.types.append(self.info(aval))
    return len(self.types) - 1

  def _walk(self, jaxpr, in_ids: Sequence[int], stack: tuple, source: str,
            consts: Sequence[Any] = (), known: dict | None = None) -> list[int]:
    env: dict[Any, int] = {v: -1 for v in jaxpr.constvars}
    env.update(zip(jaxpr.invars, in_ids))
    const_of = {**dict(zip(jaxpr.constvars, consts)), **(known or {})}
    read = lambda a: -1 if isinstance(a, jex_core.Literal) else env[a]
    for eqn in jaxpr.eqns:
      ids = [read(a) for a in eqn.invars]
      estack = stack + _own_stack(eqn.source_info.name_stack)
      esource = source_info_util.summarize(eqn.source_info) or source
      sub = _sub_jaxpr(eqn)
      if sub is not None:
        # Constants and literals passed into an inlined call are constants inside it.
        passed = {v: a.val if isinstance(a, jex_core.Literal) else const_of.get(a)
                  for v, a in zip(sub[0].invars, eqn.invars) if read(a) == -1}
        outs = self._walk(sub[0], ids, estack, esource, sub[1], passed)
        env.update(zip(eqn.outvars, outs))
        continue
      e = _Eqn()
      e.prim = eqn.primitive.name
      e.kind = _KIND_OF.get(e.prim, "other")
      e.in_ids = tuple(ids)
      e.in_types = tuple(self.info(a.aval) for a in eqn.invars)
      e.out_ids = tuple(self._new(v.aval) for v in eqn.outvars)
      e.out_types = tuple(self.types[i] for i in e.out_ids)
      e.lits = tuple((k, _literal_key(a.val)) for k, a in enumerate(eqn.invars)
                     if isinstance(a, jex_core.Literal))
      bodies = list(jex_core.jaxprs_in_params(eqn.params))
      if bodies:  # loops and other higher-order ops: their bodies tell them apart
        e.lits += tuple(("body", hashlib.blake2b(str(j).encode(), digest_size=8).hexdigest())
                        for j in bodies)
      e.params = _op_params(e.prim, eqn.params)
      e.flops, e.trans, e.nbytes = self._eqn_cost(eqn, e.prim, e.in_types, e.out_types)
      e.stack, e.source = estack, esource
      env.update(zip(eqn.outvars, e.out_ids))
      self.eqns.append(e)
      if self.equations is not None:
        self.equations.append(Equation(eqn=eqn, operands=tuple(
            ("literal", a.val) if isinstance(a, jex_core.Literal) else
            ("value", i) if i != -1 else ("const", const_of.get(a))
            for a, i in zip(eqn.invars, ids)), out_ids=e.out_ids))
    return [read(v) for v in jaxpr.outvars]

  def _eqn_cost(self, eqn, prim, ins, outs) -> tuple[float, float, float]:
    """(flops, transcendentals, bytes); loops: body cost times the trip count."""
    if prim == "scan":
      f, t, b = self._jaxpr_cost(_open(eqn.params["jaxpr"]))
      n = float(eqn.params["length"])
      return f * n, t * n, b * n
    if prim == "while":
      self.notes.append(
          f"trace: a while loop at {source_info_util.summarize(eqn.source_info)} has a trip count "
          "unknown at trace time; its body is costed once. Use jax.lax.scan or fori_loop with "
          "static bounds for exact FLOPs.")
      body = self._jaxpr_cost(_open(eqn.params["body_jaxpr"]))
      cond = self._jaxpr_cost(_open(eqn.params["cond_jaxpr"]))
      return tuple(x + y for x, y in zip(body, cond))
    if prim == "cond":
      return max((self._jaxpr_cost(_open(b)) for b in eqn.params["branches"]),
                 key=lambda c: (c[0], c[2]))
    subs = list(jex_core.jaxprs_in_params(eqn.params))
    if subs and prim not in _KIND_OF:  # shard_map, custom calls...: their bodies, once
      costs = [self._jaxpr_cost(j) for j in subs]
      return tuple(sum(c[k] for c in costs) for k in range(3))
    flops, trans = _op_cost(prim, eqn.params, ins, outs)
    return flops, trans, float(sum(t.nbytes for t in ins) + sum(t.nbytes for t in outs))

  def _jaxpr_cost(self, jaxpr) -> tuple[float, float, float]:
    if id(jaxpr) not in self._costs:
      total = [0.0, 0.0, 0.0]
      for eqn in jaxpr.eqns:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
          c = self._jaxpr_cost(sub[0])
        else:
          ins = [self.info(a.aval) for a in eqn.invars]
          outs = [self.info(v.aval) for v in eqn.outvars]
          c = self._eqn_cost(eqn, eqn.primitive.name, ins, outs)
        total = [x + y for x, y in zip(total, c)]
      self._costs[id(jaxpr)] = tuple(total)
    return self._costs[id(jaxpr)]
