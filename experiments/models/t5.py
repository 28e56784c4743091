"""T5 v1.0 (Raffel et al. 2020): encoder-decoder with relative position buckets.

Top level, in call order: `shared` (token embedding, encoder side),
`encoder_position_bias`, `encoder_blocks[0..n-1]`, `encoder_norm`, `shared` again (decoder
side), `decoder_position_bias` (causal mask folded in), `decoder_blocks[0..n-1]` (each
cross-attends to the encoder output), `decoder_norm`, `lm_head` (no parameters: multiplies
by the shared embedding it is given, after scaling by d_model**-0.5, as T5 v1.0 ties it).
Each stack's relative position bias table is its own small module, called once and fed
to every block of that stack (the reference keeps it in the first block and passes the
result on). No dropout. Batch: `input_ids` [batch, enc_len], `decoder_input_ids` and
`labels` [batch, dec_len], int32; `decoder_input_ids` is `labels` shifted right by one
with token 0 (T5's decoder start) in front: teacher forcing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.models import _common

# The decoder starts from the pad token, id 0 (Raffel et al. 2020).
DECODER_START_ID = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
  """A T5 configuration; `seq_len` is the example length of encoder and decoder alike."""

  num_layers: int  # per stack: encoder and decoder each have this many blocks
  dim: int
  num_heads: int
  head_dim: int
  ffn_dim: int
  vocab_size: int
  seq_len: int
  num_buckets: int = 32
  max_distance: int = 128
  norm_eps: float = 1e-6

  def __post_init__(self):
    _common.check_config(self)
    if self.num_buckets < 4:
      raise ValueError(f"num_buckets must be at least 4, got {self.num_buckets}.")


CONFIGS: dict[str, dict[str, Config]] = {
    "t5_large": {
        # T5-Large (v1.0). Sequence length 512 for inputs and targets alike.
        "paper": Config(num_layers=24, dim=1024, num_heads=16, head_dim=64, ffn_dim=4096,
                        vocab_size=32128, seq_len=512),
        "tiny": Config(num_layers=2, dim=64, num_heads=4, head_dim=16, ffn_dim=256,
                       vocab_size=256, seq_len=16),
    },
}


@functools.lru_cache(maxsize=None)
def relative_buckets(q_len: int, k_len: int, *, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> np.ndarray:
  """[q_len, k_len] bucket of key position minus query position: exact for small
  distances, logarithmic up to max_distance, sign split into halves when bidirectional."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0) * num_buckets
    distance = np.abs(rel)
  else:
    distance = np.maximum(-rel, 0)
  exact = num_buckets // 2
  log_ratio = np.log(np.maximum(distance, 1) / exact) / math.log(max_distance / exact)
  large = np.minimum(exact + (log_ratio * (num_buckets - exact)).astype(np.int64),
                     num_buckets - 1)
  return (buckets + np.where(distance < exact, distance, large)).astype(np.int32)


class PositionBias(nnx.Module):
  """Learned bias per (relative position bucket, head); [1, heads, q_len, k_len] out."""

  def __init__(self, config: Config, *, causal: bool, dtype: Any, rngs: nnx.Rngs):
    self.config = config
    self.causal = causal
    self.embedding = nnx.Param(
        _common.normal_init(config.dim**-0.5)(rngs.params(),
                                               (config.num_buckets, config.num_heads), dtype))

  def __call__(self, q_len: int, k_len: int) -> jax.Array:
    c = self.config
    buckets = relative_buckets(q_len, k_len, bidirectional=not self.causal,
                               num_buckets=c.num_buckets, max_distance=c.max_distance)
    bias = self.embedding[...][buckets].astype(jnp.float32).transpose(2, 0, 1)[None]
    if self.causal:
      bias = jnp.where(jnp.tril(jnp.ones((q_len, k_len), bool)), bias, _common.MASK_VALUE)
    return bias


class Attention(nnx.Module):
  """T5 attention: no biases, no 1/sqrt(d) scaling (folded into the query init)."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    inner = config.num_heads * config.head_dim
    linear = lambda i, o, std: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype,
                                          kernel_init=_common.normal_init(std), rngs=rngs)
    self.num_heads, self.head_dim = config.num_heads, config.head_dim
    self.q = linear(config.dim, inner, (config.dim * config.head_dim) ** -0.5)
    self.k = linear(config.dim, inner, config.dim**-0.5)
    self.v = linear(config.dim, inner, config.dim**-0.5)
    self.o = linear(inner, config.dim, inner**-0.5)

  def __call__(self, x: jax.Array, memory: jax.Array, bias: jax.Array | None) -> jax.Array:
    split = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)
    out = _common.attention(split(self.q(x)), split(self.k(memory)), split(self.v(memory)),
                            bias=bias, scale=1.0)
    return self.o(out.reshape(*x.shape[:2], -1))


class FeedForward(nnx.Module):
  """wo(relu(wi(x))), no biases."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=dtype,
                                     kernel_init=_common.normal_init(i**-0.5), rngs=rngs)
    self.wi = linear(config.dim, config.ffn_dim)
    self.wo = linear(config.ffn_dim, config.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(nnx.relu(self.wi(x)))


def _norm(config: Config, dtype: Any, rngs: nnx.Rngs) -> nnx.RMSNorm:
  # T5's LayerNorm rescales by the root mean square only: no mean, no bias.
  return nnx.RMSNorm(config.dim, epsilon=config.norm_eps, dtype=dtype, param_dtype=dtype,
                     rngs=rngs)


class EncoderBlock(nnx.Module):
  """Pre-norm self-attention (with the stack's position bias) and feed-forward."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.attn_norm = _norm(config, dtype, rngs)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = _norm(config, dtype, rngs)
    self.mlp = FeedForward(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
    y = self.attn_norm(x)
    x = x + self.attn(y, y, position_bias)
    return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nnx.Module):
  """Causal self-attention, cross-attention to the encoder output, feed-forward."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.attn_norm = _norm(config, dtype, rngs)
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.cross_attn_norm = _norm(config, dtype, rngs)
    self.cross_attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = _norm(config, dtype, rngs)
    self.mlp = FeedForward(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, encoded: jax.Array, position_bias: jax.Array) -> jax.Array:
    y = self.attn_norm(x)
    x = x + self.attn(y, y, position_bias)
    x = x + self.cross_attn(self.cross_attn_norm(x), encoded, None)
    return x + self.mlp(self.mlp_norm(x))


class LMHead(nnx.Module):
  """Logits from the shared embedding [vocab, dim], scaled by dim**-0.5 (T5 v1.0 tying)."""

  def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
    x = x * x.shape[-1] ** -0.5
    return jnp.einsum("bld,vd->blv", x, embedding.astype(x.dtype))


class T5(nnx.Module):
  """T5: (input ids [b, enc_len], decoder input ids [b, dec_len]) -> logits [b, dec_len, vocab]."""

  def __init__(self, config: Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.shared = nnx.Embed(config.vocab_size, config.dim, dtype=dtype, param_dtype=dtype,
                            embedding_init=_common.normal_init(1.0), rngs=rngs)
    self.encoder_position_bias = PositionBias(config, causal=False, dtype=dtype, rngs=rngs)
    self.encoder_blocks = nnx.List([EncoderBlock(config, dtype=dtype, rngs=rngs)
                                    for _ in range(config.num_layers)])
    self.encoder_norm = _norm(config, dtype, rngs)
    self.decoder_position_bias = PositionBias(config, causal=True, dtype=dtype, rngs=rngs)
    self.decoder_blocks = nnx.List([DecoderBlock(config, dtype=dtype, rngs=rngs)
                                    for _ in range(config.num_layers)])
    self.decoder_norm = _norm(config, dtype, rngs)
    self.lm_head = LMHead()

  def __call__(self, input_ids: jax.Array, decoder_input_ids: jax.Array) -> jax.Array:
    _common.check_tokens("input_ids", input_ids, None, "")
    _common.check_tokens("decoder_input_ids", decoder_input_ids, None, "")
    if input_ids.shape[0] != decoder_input_ids.shape[0]:
      raise ValueError(f"input_ids has batch size {input_ids.shape[0]}, decoder_input_ids "
                       f"{decoder_input_ids.shape[0]}; they must match.")
    x = self.shared(input_ids)
    bias = self.encoder_position_bias(input_ids.shape[1], input_ids.shape[1])
    for block in self.encoder_blocks:
      x = block(x, bias)
    encoded = self.encoder_norm(x)
    y = self.shared(decoder_input_ids)
    bias = self.decoder_position_bias(decoder_input_ids.shape[1], decoder_input_ids.shape[1])
    for block in self.decoder_blocks:
      y = block(y, encoded, bias)
    return self.lm_head(self.decoder_norm(y), self.shared.embedding[...])

  def layer_names(self) -> tuple[str, ...]:
    """The top-level module calls of one forward pass, in order (`shared` twice)."""
    return ("shared", "encoder_position_bias",
            *(f"encoder_blocks/{i}" for i in range(len(self.encoder_blocks))),
            "encoder_norm", "shared", "decoder_position_bias",
            *(f"decoder_blocks/{i}" for i in range(len(self.decoder_blocks))),
            "decoder_norm", "lm_head")


Model = T5


def example_batch(config: Config, batch_size: int, seq_len: int, *, shape_only: bool,
                  rng: np.random.Generator) -> dict[str, Any]:
  _common.check_seq_len(seq_len, None, "")
  spec = _common.int_spec(batch_size, seq_len)
  if shape_only:
    return {"input_ids": spec, "decoder_input_ids": spec, "labels": spec}
  labels = _common.tokens(rng, (batch_size, seq_len), config.vocab_size)
  start = jnp.full((batch_size, 1), DECODER_START_ID, jnp.int32)
  return {"input_ids": _common.tokens(rng, (batch_size, seq_len), config.vocab_size),
          "decoder_input_ids": jnp.concatenate([start, labels[:, :-1]], axis=1),
          "labels": labels}


def loss(model: T5, batch: dict[str, jax.Array]) -> jax.Array:
  """Teacher-forced cross entropy of the labels, averaged over decoder positions."""
  _common.check_batch(batch, ("input_ids", "decoder_input_ids", "labels"), "t5")
  return _common.cross_entropy(model(batch["input_ids"], batch["decoder_input_ids"]),
                               batch["labels"])
