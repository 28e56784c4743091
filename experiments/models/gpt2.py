"""GPT-2 (Radford et al. 2019): pre-LN decoder, learned positions, head tied to `wte`.

Top level, in call order: `embed` (token + position embeddings), `blocks[0..n-1]`,
`norm` (ln_f), `lm_head` (no parameters of its own: it multiplies by the token
embedding it is given). Batch: `input_ids` and `labels` (next tokens), int32 [batch, seq_len].
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
  """A GPT-2 configuration; `max_positions` bounds the sequence length."""

  num_layers: int
  dim: int
  num_heads: int
  vocab_size: int
  max_positions: int
  seq_len: int
  norm_eps: float = 1e-5

  def __post_init__(self):
    _common.check_config(self)
    _common.check_divides("num_heads", self.num_heads, "dim", self.dim)
    if self.seq_len > self.max_positions:
      raise ValueError(f"seq_len={self.seq_len} exceeds max_positions={self.max_positions}.")


CONFIGS: dict[str, dict[str, Config]] = {
    "gpt2": {
        # GPT-2 small (124M): 12 layers, 768 wide, 12 heads, 50257 tokens, 1024 positions.
        "paper": Config(num_layers=12, dim=768, num_heads=12, vocab_size=50257,
                        max_positions=1024, seq_len=1024),
        "tiny": Config(num_layers=2, dim=64, num_heads=4, vocab_size=256, max_positions=64,
                       seq_len=16),
    },
}


class Embed(nnx.Module):
  """Token embedding `wte` plus learned position embedding `wpe`."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.max_positions = config.max_positions
    self.wte = nnx.Embed(config.vocab_size, config.dim, dtype=dtype, param_dtype=dtype,
                         embedding_init=_common.normal_init(), rngs=rngs)
    self.wpe = nnx.Embed(config.max_positions, config.dim, dtype=dtype, param_dtype=dtype,
                         embedding_init=_common.normal_init(0.01), rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    _common.check_tokens("input_ids", input_ids, self.max_positions, "max_positions")
    return self.wte(input_ids) + self.wpe(jnp.arange(input_ids.shape[1]))[None]


class Block(nnx.Module):
  """One pre-LN layer: fused qkv projection `c_attn`, GELU (tanh) MLP."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    d = config.dim
    # GPT-2 scales residual output projections by 1/sqrt(2 * layers) at init.
    out_init = _common.normal_init(_common.INIT_STDDEV / (2 * config.num_layers) ** 0.5)
    linear = lambda i, o, init=_common.normal_init(): nnx.Linear(
        i, o, dtype=dtype, param_dtype=dtype, kernel_init=init, rngs=rngs)
    norm = lambda: nnx.LayerNorm(d, epsilon=config.norm_eps, dtype=dtype, param_dtype=dtype,
                                 rngs=rngs)
    self.num_heads = config.num_heads
    self.ln_1 = norm()
    self.c_attn = linear(d, 3 * d)
    self.attn_proj = linear(d, d, out_init)
    self.ln_2 = norm()
    self.c_fc = linear(d, 4 * d)
    self.mlp_proj = linear(4 * d, d, out_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    heads = self.num_heads
    q, k, v = jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1)
    split = lambda t: t.reshape(batch, length, heads, dim // heads)
    out = _common.attention(split(q), split(k), split(v), causal=True)
    x = x + self.attn_proj(out.reshape(batch, length, dim))
    return x + self.mlp_proj(nnx.gelu(self.c_fc(self.ln_2(x)), approximate=True))


class LMHead(nnx.Module):
  """Logits from the tied token embedding [vocab, dim]: x @ wte.T."""

  def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
    return jnp.einsum("bld,vd->blv", x, embedding.astype(x.dtype))


class GPT2(nnx.Module):
  """GPT-2: token ids [batch, len] -> logits [batch, len, vocab]."""

  def __init__(self, config: Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm = nnx.LayerNorm(config.dim, epsilon=config.norm_eps, dtype=dtype,
                              param_dtype=dtype, rngs=rngs)
    self.lm_head = LMHead()

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    x = self.embed(input_ids)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.norm(x), self.embed.wte.embedding[...])

  def layer_names(self) -> tuple[str, ...]:
    """The top-level module calls of one forward pass, in order."""
    return ("embed", *(f"blocks/{i}" for i in range(len(self.blocks))), "norm", "lm_head")


Model = GPT2


def example_batch(config: Config, batch_size: int, seq_len: int, *, shape_only: bool,
                  rng: np.random.Generator) -> dict[str, Any]:
  _common.check_seq_len(seq_len, config.max_positions, "max_positions")
  if shape_only:
    return {"input_ids": _common.int_spec(batch_size, seq_len),
            "labels": _common.int_spec(batch_size, seq_len)}
  ids = _common.tokens(rng, (batch_size, seq_len + 1), config.vocab_size)
  return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def loss(model: GPT2, batch: dict[str, jax.Array]) -> jax.Array:
  """Next-token cross entropy, averaged over all positions."""
  _common.check_batch(batch, ("input_ids", "labels"), "gpt2")
  return _common.cross_entropy(model(batch["input_ids"]), batch["labels"])
