"""The model zoo: the UniAP paper's five models, GPT-2 and Llama-70B, in Flax NNX.

Every model keeps its embedding, its blocks (one module each, held in an `nnx.List` and
called in a plain Python loop), its final norm and its head as the outermost module
calls below the root, so a tracer that groups a step's equations by outermost module
call sees one layer per block. `model.layer_names()` lists those calls in order.

Example:
  model = models.create("llama_7b", shape_only=True)        # nothing allocated
  optimizer = models.create_optimizer(model)
  batch = models.example_batch("llama_7b", "paper", 8, shape_only=True)
  jax.make_jaxpr(models.train_step("llama_7b"))(model, optimizer, batch)

No model uses dropout or padding masks: every position is a real token and steps are
deterministic. Sequence lengths of the paper sizes (example batches): BERT 512, T5 512
encoder and 512 decoder tokens, GPT-2 1024, Llama-7B 2048, Llama-70B 4096 (its context);
ViT and Swin take 224x224x3 NHWC images. Tiny sizes use 16 tokens or 32x32 images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import difflib
import types
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.models import bert
from experiments.models import gpt2
from experiments.models import llama
from experiments.models import swin
from experiments.models import t5
from experiments.models import vit

Size = Literal["paper", "tiny"]
TrainStep = Callable[[nnx.Module, nnx.Optimizer, dict[str, jax.Array]], jax.Array]
SIZES: tuple[str, ...] = ("paper", "tiny")

# Published parameter counts of the paper sizes. The paper's five models: their
# configurations in UniAP (Lin et al. 2025) counted as in the Hugging Face definitions
# (reference/models.md); gpt2: GPT-2 small (124.4M); llama_70b: Llama-2-70B (68.98B).
PUBLISHED_PARAMS: dict[str, float] = {
    "bert_huge": 672.7e6,
    "t5_large": 737.7e6,
    "vit_huge": 632.2e6,
    "swin_huge": 1016.2e6,
    "llama_7b": 6738e6,
    "gpt2": 124.4e6,
    "llama_70b": 68.98e9,
}
# A paper-size model is right when its count is within this fraction of the published one.
PARAM_TOLERANCE = 0.005

_FAMILY_MODULES: tuple[types.ModuleType, ...] = (bert, t5, vit, swin, llama, gpt2)
_FAMILIES: dict[str, types.ModuleType] = {
    name: family for family in _FAMILY_MODULES for name in family.CONFIGS
}
NAMES: tuple[str, ...] = tuple(PUBLISHED_PARAMS)
# Models whose batches are images of the configured size rather than sequences.
_VISION = frozenset({"vit_huge", "swin_huge"})
# The seed of example batches when none is given.
DEFAULT_SEED = 0


def _family(name: str) -> types.ModuleType:
  if name not in _FAMILIES:
    close = difflib.get_close_matches(str(name), NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(NAMES)}.")
  return _FAMILIES[name]


def config(name: str, size: Size = "paper") -> Any:
  """The frozen configuration dataclass of one model at one size."""
  family = _family(name)
  if size not in SIZES:
    raise ValueError(f"Unknown size {size!r} for {name!r}; sizes are {', '.join(SIZES)}.")
  return family.CONFIGS[name][size]


def create(name: str, size: Size = "paper", shape_only: bool = False,
           dtype: Any = jnp.float32, *, seed: int = 0) -> nnx.Module:
  """Builds a model; with `shape_only`, an abstract one whose parameters are ShapeDtypeStructs.

  Args:
    name: one of NAMES, e.g. "llama_7b".
    size: "paper" (the published configuration) or "tiny" (same structure, 2 layers,
      width 64, for tests).
    shape_only: builds under `nnx.eval_shape`: nothing is allocated, so any size is cheap.
    dtype: parameter and computation dtype.
    seed: seeds `nnx.Rngs` for the initialisers.
  Returns:
    The NNX model; `model.layer_names()` lists its top-level module calls in order.
  Raises:
    ValueError: unknown name or size.
  """
  family, cfg = _family(name), config(name, size)
  build = lambda: family.Model(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
  return nnx.eval_shape(build) if shape_only else build()


def is_abstract(model: nnx.Module) -> bool:
  """True when the model's parameters are shapes only (from `create(..., shape_only=True)`)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  abstract = [isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves]
  if any(abstract) and not all(abstract):
    raise ValueError("The model mixes abstract (ShapeDtypeStruct) and concrete parameters; "
                     "build it either with shape_only=True or without.")
  return all(abstract) and bool(abstract)


def count_params(model: nnx.Module) -> int:
  """Number of parameter elements (nnx.Param leaves); works on abstract models."""
  return sum(int(np.prod(leaf.shape, dtype=np.int64))
             for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create_optimizer(model: nnx.Module, learning_rate: float = 1e-3, *,
                     weight_decay: float = 1e-4) -> nnx.Optimizer:
  """AdamW over the model's nnx.Param leaves; abstract when the model is abstract.

  Tests and the planner build the optimizer here, so they trace the same state
  (a step count and two moments per parameter).
  """
  build = lambda m: nnx.Optimizer(
      m, optax.adamw(learning_rate, weight_decay=weight_decay), wrt=nnx.Param)
  return nnx.eval_shape(build, model) if is_abstract(model) else build(model)


def example_batch(name: str, size: Size, batch_size: int, shape_only: bool = False, *,
                  seq_len: int | None = None, seed: int = DEFAULT_SEED) -> dict[str, Any]:
  """A batch for `train_step(name)`: ShapeDtypeStructs, or small random data.

  Args:
    name: one of NAMES.
    size: "paper" or "tiny"; picks the vocabulary, image size and default length.
    batch_size: examples in the batch.
    shape_only: returns ShapeDtypeStructs (nothing allocated).
    seq_len: tokens per example (encoder and decoder for T5); the config's length when
      None. Vision models take no seq_len: their image size is the config's.
    seed: the numpy seed of the random data; the same seed gives the same batch.
  Returns:
    A dict of arrays; the keys are in each family module's docstring.
  Raises:
    ValueError: unknown name or size, batch_size < 1, or a seq_len the model cannot take.
  """
  family, cfg = _family(name), config(name, size)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if name in _VISION:
    if seq_len is not None:
      raise ValueError(f"{name} takes {cfg.image_size}x{cfg.image_size} images, not sequences: "
                       f"leave seq_len unset (got seq_len={seq_len}).")
  elif seq_len is None:
    seq_len = cfg.seq_len
  return family.example_batch(cfg, batch_size, seq_len, shape_only=shape_only,
                              rng=np.random.default_rng(seed))


def loss_fn(name: str) -> Callable[[nnx.Module, dict[str, jax.Array]], jax.Array]:
  """`loss(model, batch) -> scalar` of one model: its pre-training or classification loss."""
  return _family(name).loss


def _make_train_step(family: types.ModuleType) -> TrainStep:
  loss = family.loss

  def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> jax.Array:
    loss_value, grads = nnx.value_and_grad(loss)(model, batch)
    optimizer.update(model, grads)
    return loss_value

  short_name = family.__name__.rsplit(".", 1)[-1]
  step.__name__ = step.__qualname__ = f"{short_name}_train_step"
  step.__doc__ = (f"One AdamW step of {short_name}, in place on model and optimizer; "
                  "returns the loss.")
  return step


_TRAIN_STEPS: dict[types.ModuleType, TrainStep] = {
    family: _make_train_step(family) for family in _FAMILY_MODULES
}


def train_step(name: str) -> TrainStep:
  """The ordinary NNX train step of a model: `step(model, optimizer, batch) -> loss`.

  It differentiates the model's loss with `nnx.value_and_grad` and applies
  `optimizer.update(model, grads)` to an optimizer from `create_optimizer`. It is not
  jitted, so that callers (the planner, `nnx.jit`, `jax.make_jaxpr`) decide how to run it.
  Models of one family share one step; the same function object is returned every time.
  """
  return _TRAIN_STEPS[_family(name)]


def param_table(names: Sequence[str] = NAMES, size: Size = "paper") -> str:
  """Parameter counts against the published ones, as a text table.

  One row per model: parameters, published count, relative difference, and layers (the
  top-level module calls of one forward pass). Models are built shape-only.
  """
  rows = [("model", "parameters", "published", "difference", "layers")]
  for name in names:
    model = create(name, size, shape_only=True)
    count = count_params(model)
    published = PUBLISHED_PARAMS[name] if size == "paper" else None
    rows.append((
        name, f"{count:,}",
        "-" if published is None else f"{published:,.0f}",
        "-" if published is None else f"{(count - published) / published:+.3%}",
        str(len(model.layer_names())),
    ))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


__all__ = ["NAMES", "PUBLISHED_PARAMS", "PARAM_TOLERANCE", "SIZES", "config", "count_params",
           "create", "create_optimizer", "example_batch", "is_abstract", "loss_fn",
           "param_table", "train_step"]
