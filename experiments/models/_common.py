"""Pieces every model family shares: attention, losses, initialisers, checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# BERT, ViT, GPT-2 and Llama all initialise weights from N(0, 0.02^2)
# (Devlin et al. 2019; Dosovitskiy et al. 2021; Radford et al. 2019; Touvron et al. 2023).
INIT_STDDEV = 0.02
# Added to attention scores that must not be attended; finite so that fully
# masked rows (never produced here) would give a uniform softmax, not NaN.
MASK_VALUE = -1e9


def normal_init(stddev: float = INIT_STDDEV) -> nnx.Initializer:
  return nnx.initializers.normal(stddev=stddev)


def check_config(config: Any) -> None:
  """Rejects non-positive integer fields of a config dataclass, naming the field."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
      if isinstance(v, bool) or not isinstance(v, int | float):
        continue
      if v <= 0:
        raise ValueError(
            f"{type(config).__module__.rsplit('.', 1)[-1]} config: {field.name} must be "
            f"positive, got {value!r}.")


def check_divides(what: str, divisor: int, name: str, value: int) -> None:
  if value % divisor:
    raise ValueError(
        f"{name}={value} is not divisible by {what}={divisor} "
        f"({value} % {divisor} = {value % divisor}); choose a multiple of {divisor}.")


def check_tokens(name: str, ids: jax.Array, max_len: int | None, max_name: str) -> None:
  """Checks a [batch, length] integer id array against the config, at the model call."""
  if ids.ndim != 2:
    raise ValueError(f"{name} must be [batch, length], got shape {tuple(ids.shape)}.")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}.")
  if max_len is not None and ids.shape[1] > max_len:
    raise ValueError(
        f"{name} has sequence length {ids.shape[1]}, longer than the model's "
        f"{max_name}={max_len}; use seq_len <= {max_len}.")


def check_images(images: jax.Array, image_size: int, channels: int) -> None:
  """Checks a [batch, height, width, channels] image array against the config."""
  if images.ndim != 4:
    raise ValueError(
        f"images must be NHWC [batch, height, width, channels], got shape {tuple(images.shape)}.")
  _, height, width, got_channels = images.shape
  for dim, size, want in (("height", height, image_size), ("width", width, image_size),
                          ("channels", got_channels, channels)):
    if size != want:
      raise ValueError(
          f"images have {dim} {size}, the model expects {want} "
          f"(images of shape [batch, {image_size}, {image_size}, {channels}]).")


def check_batch(batch: Mapping[str, Any], keys: Sequence[str], family: str) -> None:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(
        f"The {family} batch lacks {missing}; it needs keys {list(keys)}, got {sorted(batch)}. "
        "Build one with experiments.models.example_batch.")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              causal: bool = False, scale: float | None = None) -> jax.Array:
  """Multi-head attention with grouped keys/values.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads (grouped-query
      attention when smaller).
    bias: added to the scores, broadcastable to [batch, heads, q_len, kv_len].
    causal: masks keys after the query position.
    scale: multiplies the scores; 1/sqrt(head_dim) when None (T5 passes 1.0).
  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  scale = head_dim**-0.5 if scale is None else scale
  q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * scale
  scores = scores.reshape(batch, heads, q_len, kv_len)
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  if causal:
    mask = jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]
    scores = jnp.where(mask, scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  probs = probs.reshape(batch, kv_heads, groups, q_len, kv_len)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(batch, q_len, heads, head_dim)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross entropy in float32; with weights, their weighted mean."""
  losses = -jnp.take_along_axis(
      jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), labels[..., None], axis=-1)[..., 0]
  if weights is None:
    return jnp.mean(losses)
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def tokens(rng: np.random.Generator, shape: tuple[int, ...], vocab_size: int) -> jax.Array:
  return jnp.asarray(rng.integers(0, vocab_size, size=shape, dtype=np.int32))


def check_seq_len(seq_len: int, max_len: int | None, max_name: str) -> None:
  """Checks a requested example sequence length, before any array is built."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
  if max_len is not None and seq_len > max_len:
    raise ValueError(
        f"seq_len={seq_len} is longer than the model's {max_name}={max_len}; "
        f"use seq_len <= {max_len}.")


def int_spec(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.int32)
