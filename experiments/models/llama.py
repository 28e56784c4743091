"""Llama (Touvron et al. 2023): RMSNorm, rotary positions, SwiGLU, grouped-query attention.

Top level, in call order: `embed`, `blocks[0..n-1]`, `norm`, `lm_head` (untied).
Batch: `input_ids` and `labels` (the next tokens), both int32 [batch, seq_len].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.models import _common


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
  """A Llama configuration; `max_seq_len` is the context length, `seq_len` the example one."""

  num_layers: int
  dim: int
  num_heads: int
  num_kv_heads: int
  ffn_dim: int
  vocab_size: int
  max_seq_len: int
  seq_len: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    _common.check_config(self)
    _common.check_divides("num_heads", self.num_heads, "dim", self.dim)
    _common.check_divides("num_kv_heads", self.num_kv_heads, "num_heads", self.num_heads)
    if self.seq_len > self.max_seq_len:
      raise ValueError(f"seq_len={self.seq_len} exceeds max_seq_len={self.max_seq_len}.")
    if (self.dim // self.num_heads) % 2:
      raise ValueError(f"head dim {self.dim // self.num_heads} must be even for rotary embeddings.")

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads


_TINY = Config(num_layers=2, dim=64, num_heads=4, num_kv_heads=4, ffn_dim=172, vocab_size=256,
               max_seq_len=64, seq_len=16)
CONFIGS: dict[str, dict[str, Config]] = {
    # Llama-7B (Touvron et al. 2023, Table 2): 2048-token context.
    "llama_7b": {
        "paper": Config(num_layers=32, dim=4096, num_heads=32, num_kv_heads=32, ffn_dim=11008,
                        vocab_size=32000, max_seq_len=2048, seq_len=2048),
        "tiny": _TINY,
    },
    # Llama-2-70B (Touvron et al. 2023b): 8 KV heads, 4096-token context.
    "llama_70b": {
        "paper": Config(num_layers=80, dim=8192, num_heads=64, num_kv_heads=8, ffn_dim=28672,
                        vocab_size=32000, max_seq_len=4096, seq_len=4096, norm_eps=1e-5),
        "tiny": dataclasses.replace(_TINY, num_kv_heads=2, norm_eps=1e-5),
    },
}


def rotary(x: jax.Array, theta: float) -> jax.Array:
  """Rotates [batch, len, heads, head_dim] by position; halves pair up (x1, x2)."""
  length, head_dim = x.shape[1], x.shape[3]
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Causal self-attention with rotary positions and grouped keys/values."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype,
                                     kernel_init=_common.normal_init(), rngs=rngs)
    self.config = config
    kv_dim = config.num_kv_heads * config.head_dim
    self.q_proj = linear(config.dim, config.dim)
    self.k_proj = linear(config.dim, kv_dim)
    self.v_proj = linear(config.dim, kv_dim)
    self.o_proj = linear(config.dim, config.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
    out = _common.attention(rotary(q, c.rope_theta), rotary(k, c.rope_theta), v, causal=True)
    return self.o_proj(out.reshape(batch, length, c.dim))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype,
                                     kernel_init=_common.normal_init(), rngs=rngs)
    self.gate_proj = linear(config.dim, config.ffn_dim)
    self.up_proj = linear(config.dim, config.ffn_dim)
    self.down_proj = linear(config.ffn_dim, config.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """One pre-norm decoder layer."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    norm = lambda: nnx.RMSNorm(config.dim, epsilon=config.norm_eps, dtype=dtype,
                               param_dtype=dtype, rngs=rngs)
    self.attn_norm = norm()
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """Llama decoder: token ids [batch, len] -> logits [batch, len, vocab]."""

  def __init__(self, config: Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.dim, dtype=dtype, param_dtype=dtype,
                           embedding_init=_common.normal_init(), rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm = nnx.RMSNorm(config.dim, epsilon=config.norm_eps, dtype=dtype, param_dtype=dtype,
                            rngs=rngs)
    self.lm_head = nnx.Linear(config.dim, config.vocab_size, use_bias=False, dtype=dtype,
                              param_dtype=dtype, kernel_init=_common.normal_init(), rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    _common.check_tokens("input_ids", input_ids, self.config.max_seq_len, "max_seq_len")
    x = self.embed(input_ids)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.norm(x))

  def layer_names(self) -> tuple[str, ...]:
    """The top-level module calls of one forward pass, in order."""
    return ("embed", *(f"blocks/{i}" for i in range(len(self.blocks))), "norm", "lm_head")


Model = Llama


def example_batch(config: Config, batch_size: int, seq_len: int, *, shape_only: bool,
                  rng: np.random.Generator) -> dict[str, Any]:
  _common.check_seq_len(seq_len, config.max_seq_len, "max_seq_len")
  if shape_only:
    return {"input_ids": _common.int_spec(batch_size, seq_len),
            "labels": _common.int_spec(batch_size, seq_len)}
  ids = _common.tokens(rng, (batch_size, seq_len + 1), config.vocab_size)
  return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def loss(model: Llama, batch: dict[str, jax.Array]) -> jax.Array:
  """Next-token cross entropy, averaged over all positions."""
  _common.check_batch(batch, ("input_ids", "labels"), "llama")
  return _common.cross_entropy(model(batch["input_ids"]), batch["labels"])
