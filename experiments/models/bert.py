"""BERT (Devlin et al. 2019): post-LN encoder pre-trained with masked LM and next sentence.

Top level, in call order: `embed` (word + position + token type embeddings, LayerNorm),
`blocks[0..n-1]`, `mlm_head` (transform, LayerNorm, decoder tied to the word embedding
it is given, own bias), `pooler` (tanh dense on the [CLS] position), `nsp_head`.
Batch: `input_ids`, `token_type_ids`, `labels` (original tokens), int32 [batch, seq_len];
`label_weights` float32 [batch, seq_len], 1 where a token was masked; `next_sentence_labels`
int32 [batch]. The loss is masked-LM cross entropy over masked positions plus next-sentence
cross entropy, as in BERT pre-training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.models import _common

# BERT masks 15% of the tokens for the MLM objective (Devlin et al. 2019, Sec. 3.1).
MASK_FRACTION = 0.15


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
  """A BERT configuration; `seq_len` is the example batch length (<= max_positions)."""

  num_layers: int
  dim: int
  num_heads: int
  ffn_dim: int
  vocab_size: int
  max_positions: int
  seq_len: int
  type_vocab_size: int = 2
  norm_eps: float = 1e-12

  def __post_init__(self):
    _common.check_config(self)
    _common.check_divides("num_heads", self.num_heads, "dim", self.dim)
    if self.seq_len > self.max_positions:
      raise ValueError(f"seq_len={self.seq_len} exceeds max_positions={self.max_positions}.")

  @property
  def mask_token_id(self) -> int:
    # Any fixed id stands for [MASK]: BERT's WordPiece vocabulary puts it at 103.
    return min(103, self.vocab_size - 1)


CONFIGS: dict[str, dict[str, Config]] = {
    "bert_huge": {
        # BERT-Huge as in UniAP / Galvatron: 32 layers, 1280 wide, 16 heads; 512 tokens.
        "paper": Config(num_layers=32, dim=1280, num_heads=16, ffn_dim=5120, vocab_size=30522,
                        max_positions=512, seq_len=512),
        "tiny": Config(num_layers=2, dim=64, num_heads=4, ffn_dim=256, vocab_size=256,
                       max_positions=64, seq_len=16),
    },
}


def _dense(i: int, o: int, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(i, o, dtype=dtype, param_dtype=dtype, kernel_init=_common.normal_init(),
                    rngs=rngs)


def _norm(config: Config, dtype: Any, rngs: nnx.Rngs, dim: int | None = None) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim or config.dim, epsilon=config.norm_eps, dtype=dtype,
                       param_dtype=dtype, rngs=rngs)


class Embed(nnx.Module):
  """Sum of word, position and token-type embeddings, then LayerNorm."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    embed = lambda n: nnx.Embed(n, config.dim, dtype=dtype, param_dtype=dtype,
                                embedding_init=_common.normal_init(), rngs=rngs)
    self.max_positions = config.max_positions
    self.word_embeddings = embed(config.vocab_size)
    self.position_embeddings = embed(config.max_positions)
    self.token_type_embeddings = embed(config.type_vocab_size)
    self.norm = _norm(config, dtype, rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    _common.check_tokens("input_ids", input_ids, self.max_positions, "max_positions")
    if token_type_ids.shape != input_ids.shape:
      raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, input_ids "
                       f"{tuple(input_ids.shape)}; they must match.")
    x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
         + self.position_embeddings(jnp.arange(input_ids.shape[1]))[None])
    return self.norm(x)


class Attention(nnx.Module):
  """Bidirectional multi-head self-attention with biases."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.query = _dense(config.dim, config.dim, dtype, rngs)
    self.key = _dense(config.dim, config.dim, dtype, rngs)
    self.value = _dense(config.dim, config.dim, dtype, rngs)
    self.output = _dense(config.dim, config.dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    split = lambda t: t.reshape(batch, length, self.num_heads, dim // self.num_heads)
    out = _common.attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
    return self.output(out.reshape(batch, length, dim))


class Block(nnx.Module):
  """One post-LN encoder layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.attn_norm = _norm(config, dtype, rngs)
    self.intermediate = _dense(config.dim, config.ffn_dim, dtype, rngs)
    self.output = _dense(config.ffn_dim, config.dim, dtype, rngs)
    self.output_norm = _norm(config, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.attn_norm(x + self.attn(x))
    return self.output_norm(x + self.output(nnx.gelu(self.intermediate(x), approximate=False)))


class MLMHead(nnx.Module):
  """Masked-LM head: dense, GELU, LayerNorm, then the tied word embedding plus a bias."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.transform = _dense(config.dim, config.dim, dtype, rngs)
    self.norm = _norm(config, dtype, rngs)
    self.bias = nnx.Param(jnp.zeros((config.vocab_size,), dtype))

  def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
    x = self.norm(nnx.gelu(self.transform(x), approximate=False))
    return jnp.einsum("bld,vd->blv", x, embedding.astype(x.dtype)) + self.bias[...]


class Pooler(nnx.Module):
  """tanh(dense(hidden state of the first, [CLS], position))."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.dense = _dense(config.dim, config.dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(x[:, 0]))


class Bert(nnx.Module):
  """BERT for pre-training: returns (MLM logits [b, l, vocab], next-sentence logits [b, 2])."""

  def __init__(self, config: Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.mlm_head = MLMHead(config, dtype=dtype, rngs=rngs)
    self.pooler = Pooler(config, dtype=dtype, rngs=rngs)
    self.nsp_head = _dense(config.dim, 2, dtype, rngs)

  def __call__(self, input_ids: jax.Array,
               token_type_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = self.embed(input_ids, token_type_ids)
    for block in self.blocks:
      x = block(x)
    mlm_logits = self.mlm_head(x, self.embed.word_embeddings.embedding[...])
    return mlm_logits, self.nsp_head(self.pooler(x))

  def layer_names(self) -> tuple[str, ...]:
    """The top-level module calls of one forward pass, in order."""
    return ("embed", *(f"blocks/{i}" for i in range(len(self.blocks))),
            "mlm_head", "pooler", "nsp_head")


Model = Bert


def example_batch(config: Config, batch_size: int, seq_len: int, *, shape_only: bool,
                  rng: np.random.Generator) -> dict[str, Any]:
  _common.check_seq_len(seq_len, config.max_positions, "max_positions")
  tokens_spec = _common.int_spec(batch_size, seq_len)
  if shape_only:
    return {"input_ids": tokens_spec, "token_type_ids": tokens_spec, "labels": tokens_spec,
            "label_weights": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32),
            "next_sentence_labels": _common.int_spec(batch_size)}
  labels = np.asarray(_common.tokens(rng, (batch_size, seq_len), config.vocab_size))
  masked = rng.random((batch_size, seq_len)) < MASK_FRACTION
  masked[:, 0] |= ~masked.any(axis=1)  # at least one masked token per example
  first_segment = rng.integers(1, seq_len + 1, size=(batch_size, 1))
  return {
      "input_ids": jnp.asarray(np.where(masked, config.mask_token_id, labels), jnp.int32),
      "token_type_ids": jnp.asarray(np.arange(seq_len)[None] >= first_segment, jnp.int32),
      "labels": jnp.asarray(labels),
      "label_weights": jnp.asarray(masked, jnp.float32),
      "next_sentence_labels": _common.tokens(rng, (batch_size,), 2),
  }


def loss(model: Bert, batch: dict[str, jax.Array]) -> jax.Array:
  """Masked-LM cross entropy over masked positions plus next-sentence cross entropy."""
  _common.check_batch(batch, ("input_ids", "token_type_ids", "labels", "label_weights",
                              "next_sentence_labels"), "bert")
  mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"])
  return (_common.cross_entropy(mlm_logits, batch["labels"], batch["label_weights"])
          + _common.cross_entropy(nsp_logits, batch["next_sentence_labels"]))
