"""Vision Transformer (Dosovitskiy et al. 2021): patches, class token, pre-LN encoder.

Top level, in call order: `embed` (patch convolution, class token, position embedding),
`blocks[0..n-1]`, `norm`, `head` (linear classifier on the class token).
Batch: `images` float [batch, image_size, image_size, 3] (NHWC), `labels` int32 [batch].
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
  """A ViT configuration; images are square, image_size a multiple of patch_size."""

  num_layers: int
  dim: int
  num_heads: int
  mlp_dim: int
  image_size: int
  patch_size: int
  num_classes: int
  channels: int = 3
  norm_eps: float = 1e-6

  def __post_init__(self):
    _common.check_config(self)
    _common.check_divides("num_heads", self.num_heads, "dim", self.dim)
    _common.check_divides("patch_size", self.patch_size, "image_size", self.image_size)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


CONFIGS: dict[str, dict[str, Config]] = {
    "vit_huge": {
        # ViT-H/16 at 224x224 with a 1000-class head.
        "paper": Config(num_layers=32, dim=1280, num_heads=16, mlp_dim=5120, image_size=224,
                        patch_size=16, num_classes=1000),
        "tiny": Config(num_layers=2, dim=64, num_heads=4, mlp_dim=256, image_size=32,
                       patch_size=4, num_classes=10),
    },
}


class Embed(nnx.Module):
  """Patch embedding by a strided convolution, plus class token and position embedding."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.config = config
    p = config.patch_size
    self.patch = nnx.Conv(config.channels, config.dim, (p, p), strides=(p, p), padding="VALID",
                          dtype=dtype, param_dtype=dtype, kernel_init=_common.normal_init(),
                          rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, config.dim), dtype))
    self.position_embedding = nnx.Param(
        _common.normal_init()(rngs.params(), (1, config.num_patches + 1, config.dim), dtype))

  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    _common.check_images(images, c.image_size, c.channels)
    x = self.patch(images)  # [batch, h/p, w/p, dim]
    x = x.reshape(x.shape[0], -1, c.dim)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, c.dim))
    return jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]


class Attention(nnx.Module):
  """Bidirectional multi-head self-attention with biases."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=dtype,
                                     kernel_init=_common.normal_init(), rngs=rngs)
    self.num_heads = config.num_heads
    self.query = linear(config.dim, config.dim)
    self.key = linear(config.dim, config.dim)
    self.value = linear(config.dim, config.dim)
    self.out = linear(config.dim, config.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    split = lambda t: t.reshape(batch, length, self.num_heads, dim // self.num_heads)
    out = _common.attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
    return self.out(out.reshape(batch, length, dim))


class Block(nnx.Module):
  """One pre-LN encoder layer with a GELU MLP."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    norm = lambda: nnx.LayerNorm(config.dim, epsilon=config.norm_eps, dtype=dtype,
                                 param_dtype=dtype, rngs=rngs)
    linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=dtype,
                                     kernel_init=_common.normal_init(), rngs=rngs)
    self.attn_norm = norm()
    self.attn = Attention(config, dtype=dtype, rngs=rngs)
    self.mlp_norm = norm()
    self.fc1 = linear(config.dim, config.mlp_dim)
    self.fc2 = linear(config.mlp_dim, config.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.mlp_norm(x)), approximate=False))


class Head(nnx.Module):
  """Linear classifier on the class token."""

  def __init__(self, config: Config, *, dtype: Any, rngs: nnx.Rngs):
    self.linear = nnx.Linear(config.dim, config.num_classes, dtype=dtype, param_dtype=dtype,
                             kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x[:, 0])


class ViT(nnx.Module):
  """ViT classifier: images [batch, h, w, c] -> logits [batch, num_classes]."""

  def __init__(self, config: Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embed(config, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.norm = nnx.LayerNorm(config.dim, epsilon=config.norm_eps, dtype=dtype,
                              param_dtype=dtype, rngs=rngs)
    self.head = Head(config, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.embed(images)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))

  def layer_names(self) -> tuple[str, ...]:
    """The top-level module calls of one forward pass, in order."""
    return ("embed", *(f"blocks/{i}" for i in range(len(self.blocks))), "norm", "head")


Model = ViT


def image_batch(image_size: int, channels: int, num_classes: int, batch_size: int, *,
                shape_only: bool, rng: np.random.Generator) -> dict[str, Any]:
  """Random NHWC float32 images in [0, 1) with random class labels (also used by Swin)."""
  shape = (batch_size, image_size, image_size, channels)
  if shape_only:
    return {"images": jax.ShapeDtypeStruct(shape, jnp.float32),
            "labels": _common.int_spec(batch_size)}
  return {"images": jnp.asarray(rng.random(shape, dtype=np.float32)),
          "labels": _common.tokens(rng, (batch_size,), num_classes)}


def example_batch(config: Config, batch_size: int, seq_len: None, *, shape_only: bool,
                  rng: np.random.Generator) -> dict[str, Any]:
  del seq_len  # images have a fixed size; the registry rejects seq_len for vision models
  return image_batch(config.image_size, config.channels, config.num_classes, batch_size,
                     shape_only=shape_only, rng=rng)


def loss(model: ViT, batch: dict[str, jax.Array]) -> jax.Array:
  """Classification cross entropy."""
  _common.check_batch(batch, ("images", "labels"), "vit")
  return _common.cross_entropy(model(batch["images"]), batch["labels"])
