"""Swin Transformer (Liu et al. 2021): shifted-window attention over four resolutions.

Top level, in call order: `patch_embed` (strided convolution and LayerNorm), then one flat
list `layers` holding every block and patch-merging layer in call order (stage 1 blocks,
merge, stage 2 blocks, merge, ..., last-stage blocks), `norm`, `head` (global average
pool and linear classifier). Activations between layers are NHWC [batch, h, w, channels].
Batch: `images` float [batch, image_size, image_size, 3] (NHWC), `labels` int32 [batch].

As in the reference implementation, a stage whose resolution is not larger than the
window uses one window covering it and does not shift.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.models import _common
from experiments.models import vit

# Swin initialises weights and bias tables from a normal with std 0.02 truncated to
# [-2, 2], that is, 100 standard deviations out: a plain normal.
_INIT = _common.normal_init()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
  """A Swin configuration: stage i has depths[i] blocks, num_heads[i] heads, width embed_dim*2^i."""

  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int
  image_size: int
  patch_size: int
  num_classes: int
  mlp_ratio: int = 4
  channels: int = 3
  norm_eps: float = 1e-5

  def __post_init__(self):
    if not (isinstance(self.depths, tuple) and isinstance(self.num_heads, tuple)):
      raise TypeError(f"depths and num_heads must be tuples, got {self.depths!r} and "
                      f"{self.num_heads!r}.")
    _common.check_config(self)
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must have one "
                       "entry per stage each.")
    _common.check_divides("patch_size", self.patch_size, "image_size", self.image_size)
    for stage in range(len(self.depths)):
      _common.check_divides(f"num_heads[{stage}]", self.num_heads[stage],
                            f"stage {stage} width", self.stage_dim(stage))
      res = self.resolution(stage)
      _common.check_divides(f"stage {stage} window", self.window(stage),
                            f"stage {stage} resolution", res)
      if stage + 1 < len(self.depths):
        _common.check_divides("patch merging factor", 2, f"stage {stage} resolution", res)

  def stage_dim(self, stage: int) -> int:
    return self.embed_dim * 2**stage

  def resolution(self, stage: int) -> int:
    return self.image_size // self.patch_size // 2**stage

  def window(self, stage: int) -> int:
    return min(self.window_size, self.resolution(stage))

  @property
  def final_dim(self) -> int:
    return self.stage_dim(len(self.depths) - 1)


CONFIGS: dict[str, dict[str, Config]] = {
    "swin_huge": {
        # Swin-H as in UniAP / Galvatron: embed 320, depths 2-2-42-2, window 7, 224x224.
        "paper": Config(embed_dim=320, depths=(2, 2, 42, 2), num_heads=(8, 16, 32, 64),
                        window_size=7, image_size=224, patch_size=4, num_classes=1000),
        # 32x32 images, 8x8 tokens: stage 1 has four 4x4 windows (shifted in its second
        # block), stage 2 (4x4 tokens) one unshifted window.
        "tiny": Config(embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                       image_size=32, patch_size=4, num_classes=10),
    },
}


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into the (2w-1)^2 bias table for each query/key pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  coords = coords.reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
  return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def _to_windows(x: np.ndarray | jax.Array, window: int):
  """[b, h, w, c] -> [b, num_windows, window*window, c]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window**2, c)


def _from_windows(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
  b, c = x.shape[0], x.shape[-1]
  x = x.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


@functools.lru_cache(maxsize=None)
def shift_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, w*w, w*w]: 0 where two tokens of a shifted window were neighbours
  before the cyclic shift, MASK_VALUE where the shift brought them together."""
  regions = np.zeros((1, resolution, resolution, 1), np.int32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, rows in enumerate(bounds):
    for j, cols in enumerate(bounds):
      regions[:, rows, cols, :] = 3 * i + j
  ids = _to_windows(regions, window)[0, :, :, 0]
  return np.where(ids[:, :, None] == ids[:, None, :], 0.0, _common.MASK_VALUE).astype(np.float32)


class WindowAttention(nnx.Module):
  """Multi-head attention inside each window, with a learned relative position bias."""

  def __init__(self, dim: int, num_heads: int, window: int, *, dtype: Any, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.window = window
    self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=dtype, kernel_init=_INIT,
                          rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=dtype, kernel_init=_INIT,
                           rngs=rngs)
    self.relative_position_bias_table = nnx.Param(
        _INIT(rngs.params(), ((2 * window - 1) ** 2, num_heads), dtype))

  def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """x: [batch, num_windows, w*w, dim]; mask: [num_windows, w*w, w*w] or None."""
    b, nw, n, dim = x.shape
    heads = self.num_heads
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    split = lambda t: t.reshape(b, nw, n, heads, dim // heads)
    scores = jnp.einsum("bwqhd,bwkhd->bwhqk", split(q), split(k)).astype(jnp.float32)
    bias = self.relative_position_bias_table[...][relative_position_index(self.window)]
    scores = scores * (dim // heads) ** -0.5 + bias.transpose(2, 0, 1).astype(jnp.float32)
    if mask is not None:
      scores = scores + jnp.asarray(mask)[:, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", probs, split(v))
    return self.proj(out.reshape(b, nw, n, dim))


class Block(nnx.Module):
  """One Swin block: (shifted) window attention and MLP, both pre-LN with residuals."""

  def __init__(self, config: Config, stage: int, index: int, *, dtype: Any, rngs: nnx.Rngs):
    dim = config.stage_dim(stage)
    self.resolution = config.resolution(stage)
    self.window = config.window(stage)
    self.shift = self.window // 2 if index % 2 and self.resolution > self.window else 0
    norm = lambda: nnx.LayerNorm(dim, epsilon=config.norm_eps, dtype=dtype, param_dtype=dtype,
                                 rngs=rngs)
    linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=dtype, kernel_init=_INIT,
                                     rngs=rngs)
    self.attn_norm = norm()
    self.attn = WindowAttention(dim, config.num_heads[stage], self.window, dtype=dtype,
                                rngs=rngs)
    self.mlp_norm = norm()
    self.fc1 = linear(dim, config.mlp_ratio * dim)
    self.fc2 = linear(config.mlp_ratio * dim, dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    if (h, w) != (self.resolution, self.resolution):
      raise ValueError(f"Swin block expects {self.resolution}x{self.resolution} tokens, got "
                       f"{h}x{w}; the images do not match the config's image_size.")
    y = self.attn_norm(x)
    mask = None
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = shift_mask(self.resolution, self.window, self.shift)
    y = _from_windows(self.attn(_to_windows(y, self.window), mask), self.window, h, w)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + y
    return x + self.fc2(nnx.gelu(self.fc1(self.mlp_norm(x)), approximate=False))


class PatchMerging(nnx.Module):
  """Halves the resolution: concatenates 2x2 neighbours (4C), LayerNorm, linear to 2C."""

  def __init__(self, dim: int, *, norm_eps: float, dtype: Any, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(4 * dim, epsilon=norm_eps, dtype=dtype, param_dtype=dtype,
                              rngs=rngs)
    self.reduction = nnx.Linear(4 * dim, 2 * dim, use_bias=False, dtype=dtype,
                                param_dtype=dtype, kernel_init=_INIT, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                         x[:, 1::2, 1::2]], axis=-1)
    return self.reduction(self.norm(x))


class PatchEmbed(nnx.Module):
  """Non-overlapping patches by a strided convolution, then LayerNorm; NHWC out."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.config = config
    p = config.patch_size
    self.proj = nnx.Conv(config.channels, config.embed_dim, (p, p), strides=(p, p),
                         padding="VALID", dtype=dtype, param_dtype=dtype, kernel_init=_INIT,
                         rngs=rngs)
    self.norm = nnx.LayerNorm(config.embed_dim, epsilon=config.norm_eps, dtype=dtype,
                              param_dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    _common.check_images(images, self.config.image_size, self.config.channels)
    return self.norm(self.proj(images))


class Head(nnx.Module):
  """Global average pool over positions, then a linear classifier."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.linear = nnx.Linear(config.final_dim, config.num_classes, dtype=dtype,
                             param_dtype=dtype, kernel_init=_INIT, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(jnp.mean(x, axis=(1, 2)))


class Swin(nnx.Module):
  """Swin classifier: images [batch, h, w, c] -> logits [batch, num_classes]."""

  def __init__(self, config: Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.patch_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
    layers = []
    for stage, depth in enumerate(config.depths):
      layers += [Block(config, stage, i, dtype=dtype, rngs=rngs) for i in range(depth)]
      if stage + 1 < len(config.depths):
        layers.append(PatchMerging(config.stage_dim(stage), norm_eps=config.norm_eps,
                                   dtype=dtype, rngs=rngs))
    self.layers = nnx.List(layers)
    self.norm = nnx.LayerNorm(config.final_dim, epsilon=config.norm_eps, dtype=dtype,
                              param_dtype=dtype, rngs=rngs)
    self.head = Head(config, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.patch_embed(images)
    for layer in self.layers:
      x = layer(x)
    return self.head(self.norm(x))

  def layer_names(self) -> tuple[str, ...]:
    """The top-level module calls of one forward pass, in order."""
    return ("patch_embed", *(f"layers/{i}" for i in range(len(self.layers))), "norm", "head")


Model = Swin


def example_batch(config: Config, batch_size: int, seq_len: None, *, shape_only: bool,
                  rng: np.random.Generator) -> dict[str, Any]:
  del seq_len  # images have a fixed size; the registry rejects seq_len for vision models
  return vit.image_batch(config.image_size, config.channels, config.num_classes, batch_size,
                         shape_only=shape_only, rng=rng)


def loss(model: Swin, batch: dict[str, jax.Array]) -> jax.Array:
  """Classification cross entropy."""
  _common.check_batch(batch, ("images", "labels"), "swin")
  return _common.cross_entropy(model(batch["images"]), batch["labels"])
