"""Small models for tests: NNX, Linen and plain JAX, a few layers each.

Each builder has an abstract variant (`nnx.eval_shape` / `jax.eval_shape`) so that
tests trace on shapes, as the planner does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4


# ---------------------------------------------------------------------------
# NNX


class Mlp(nnx.Module):
  """x -> fc2(relu(fc1(x)))."""

  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(din, dhidden, rngs=rngs)
    self.fc2 = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.relu(self.fc1(x)))


class Attention(nnx.Module):
  """Multi-head attention; causal for self-attention, over `memory` when given."""

  def __init__(self, dim: int, heads: int, *, causal: bool, rngs: nnx.Rngs):
    self.heads, self.causal = heads, causal
    self.q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.k = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.v = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.o = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array, memory: jax.Array | None = None) -> jax.Array:
    kv = x if memory is None else memory
    b, lq, d = x.shape
    lk, h = kv.shape[1], self.heads
    q = self.q(x).reshape(b, lq, h, d // h)
    k = self.k(kv).reshape(b, lk, h, d // h)
    v = self.v(kv).reshape(b, lk, h, d // h)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // h).astype(x.dtype)
    if self.causal:
      mask = jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :]
      scores = jnp.where(mask, scores, -1e9)
    probs = jax.nn.softmax(scores, axis=-1)
    return self.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, d))


class FeedForward(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(dim, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(nnx.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-norm transformer block; with `cross`, it also attends to an encoder output."""

  def __init__(self, dim: int, heads: int, hidden: int, *, causal: bool = True,
               cross: bool = False, rngs: nnx.Rngs):
    self.attn_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = Attention(dim, heads, causal=causal, rngs=rngs)
    self.cross_norm = nnx.LayerNorm(dim, rngs=rngs) if cross else None
    self.cross = Attention(dim, heads, causal=False, rngs=rngs) if cross else None
    self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp = FeedForward(dim, hidden, rngs=rngs)

  def __call__(self, x: jax.Array, memory: jax.Array | None = None) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    if self.cross is not None:
      x = x + self.cross(self.cross_norm(x), memory)
    return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nnx.Module):
  """Decoder-only LM: embed, a learned position table on the root, blocks, norm, head.

  `hidden` gives each block's MLP width, so blocks can be made to differ in shape.
  """

  def __init__(self, *, vocab: int = 64, dim: int = 32, heads: int = 4,
               hidden: Sequence[int] = (64, 64, 64), seq_len: int = 8, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq_len, dim)) * 0.02)
    self.blocks = nnx.List([Block(dim, heads, h, rngs=rngs) for h in hidden])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


class MlpBlock(nnx.Module):
  """Pre-norm residual MLP block: x + down(gelu(up(norm(x)))), `hidden` wide."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class MlpGpt(nnx.Module):
  """A GPT without attention, small enough to pipeline in tests: embed, one MlpBlock
  per entry of `hidden` (its MLP width, so blocks can be made to differ in shape),
  final norm, head. Layers "embed", "blocks/i", "norm", "head"; the forward's own code
  only passes layer outputs on, as a pipelined forward must."""

  def __init__(self, *, vocab: int = 32, dim: int = 16,
               hidden: Sequence[int] = (64, 64, 64, 64), seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([MlpBlock(dim, h, rngs=rngs) for h in hidden])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


class Stack(nnx.Module):
  """A stack of blocks and a final norm: a container module (its blocks are the layers)."""

  def __init__(self, dim: int, heads: int, hidden: int, depth: int, *, cross: bool,
               rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(dim, heads, hidden, causal=cross, cross=cross, rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, x: jax.Array, memory: jax.Array | None = None) -> jax.Array:
    for block in self.blocks:
      x = block(x, memory)
    return self.norm(x)


class Seq2Seq(nnx.Module):
  """A T5-like encoder-decoder: the encoder output feeds every decoder block."""

  def __init__(self, *, vocab: int = 64, dim: int = 32, heads: int = 4, hidden: int = 64,
               depth: int = 3, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.encoder = Stack(dim, heads, hidden, depth, cross=False, rngs=rngs)
    self.decoder = Stack(dim, heads, hidden, depth, cross=True, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, source: jax.Array, target: jax.Array) -> jax.Array:
    memory = self.encoder(self.embed(source))
    return self.head(self.decoder(self.embed(target), memory))


def lm_loss(model: TinyTransformer, batch: dict[str, jax.Array]) -> jax.Array:
  logits = model(batch["tokens"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def seq2seq_loss(model: Seq2Seq, batch: dict[str, jax.Array]) -> jax.Array:
  logits = model(batch["source"], batch["target"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def nnx_train_step(loss_fn):
  """The ordinary NNX train step over `loss_fn(model, batch)`, updating in place."""

  def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Any) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  return train_step


def abstract_model(cls, **kwargs) -> nnx.Module:
  return nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), **kwargs))


def abstract_optimizer(model: nnx.Module) -> nnx.Optimizer:
  return nnx.eval_shape(
      lambda m: nnx.Optimizer(m, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                              wrt=nnx.Param), model)


def lm_batch(batch_size: int = 2, seq_len: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
  spec = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  return {"tokens": spec, "labels": spec}


def seq2seq_batch(batch_size: int = 2, seq_len: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
  spec = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  return {"source": spec, "target": spec, "labels": spec}


# ---------------------------------------------------------------------------
# Linen


class LinenBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(self.width)(x)))


class LinenModel(nn.Module):
  """Dense in, two residual MLP blocks, Dense out."""

  width: int = 32
  out: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.width, name="inp")(x)
    for i in range(2):
      x = LinenBlock(2 * self.width, name=f"block_{i}")(x)
    return nn.Dense(self.out, name="out")(x)


def linen_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """A functional step: (params, opt_state, batch) -> (params, opt_state, loss)."""

  def train_step(params, opt_state, batch):
    def loss_fn(p):
      return jnp.mean((model.apply(p, batch["x"]) - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


# ---------------------------------------------------------------------------
# Plain JAX


def plain_params(din: int = 8, dh: int = 16, dout: int = 4) -> dict[str, jax.ShapeDtypeStruct]:
  f32 = jnp.float32
  return {"w1": jax.ShapeDtypeStruct((din, dh), f32), "w2": jax.ShapeDtypeStruct((dh, dh), f32),
          "w3": jax.ShapeDtypeStruct((dh, dout), f32)}


def plain_scoped(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """Three named_scope regions: three layers."""
  with jax.named_scope("first"):
    x = jnp.tanh(x @ params["w1"])
  with jax.named_scope("second"):
    x = jnp.tanh(x @ params["w2"])
  with jax.named_scope("third"):
    return (x @ params["w3"]).sum()


def plain_unscoped(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  x = jnp.tanh(x @ params["w1"])
  x = jnp.tanh(x @ params["w2"])
  return (x @ params["w3"]).sum()
