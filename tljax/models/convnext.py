"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"), laid out so torchvision and timm port.

Both references compute the same network: a 4×4/4 patchify stem with
LayerNorm, four stages of blocks (7×7 depthwise conv → LayerNorm → Linear 4×
→ exact GELU → Linear → per-channel layer scale → stochastic depth +
residual), a LayerNorm + 2×2/2 conv between stages, then global average
pooling and a final LayerNorm before the classifier. Every LayerNorm uses
eps 1e-6 and normalises over channels only, which in NHWC is the last axis.

The backbone's direct children are the units `trainable` rules count
(`tljax.optim.backbone_blocks`):

  stem                                   <- torchvision features.0 / timm stem
  stage{s}_down  (s = 2..4)              <- features.{2,4,6} / stages.{s-1}.downsample
  stage{s}_{j}   (conv_dw, norm, fc1, fc2, gamma)
                                         <- features.{1,3,5,7}.j / stages.{s-1}.blocks.j
  norm                                   <- classifier.0 / head.norm

so `stages:1` is the last ConvNeXt stage with its downsample layer, and the
final norm (no kernel) joins the last block. The backbone returns pooled,
normalised features [N, C]; the head is only the classifier.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import Conv, torch_padding

LN_EPS = 1e-6
# torchvision's convnext_tiny default (and the paper's ImageNet-1k fine-tuning rate for T).
DROP_PATH = 0.1


@dataclasses.dataclass(frozen=True)
class ConvNeXtSpec:
  depths: tuple[int, ...]
  dims: tuple[int, ...]


SPECS = {
    'convnext_tiny': ConvNeXtSpec((3, 3, 9, 3), (96, 192, 384, 768)),
    # Same code path with a few thousand parameters: for tests only.
    'convnext_test': ConvNeXtSpec((1, 1, 2, 1), (8, 16, 24, 32)),
}

INPUT_SIZES = {'default': 224, 'convnext_test': 32}


def layer_norm(name: str, dtype) -> nn.LayerNorm:
  """LayerNorm over channels with two-pass float32 statistics, as torch computes them."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


class Stem(nn.Module):
  """4×4 stride-4 patchify conv (with bias) → LayerNorm."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv(self.features, 4, strides=4, use_bias=True, dtype=self.dtype, name='conv')(x)
    return layer_norm('norm', self.dtype)(x)


class Downsample(nn.Module):
  """LayerNorm → 2×2 stride-2 conv (with bias) into the next stage's width."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layer_norm('norm', self.dtype)(x)
    return Conv(self.features, 2, strides=2, use_bias=True, dtype=self.dtype, name='conv')(x)


class Block(nn.Module):
  """One ConvNeXt block; stochastic depth drops its whole residual branch per example.

  Drop path is active when `stochastic` (default: `train`), the same switch
  as EfficientNet-Lite's drop-connect, so `phase.drop_connect` governs both.
  """

  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, stochastic: bool | None = None):
    n, h, w, c = x.shape
    y = Conv(c, 7, padding=torch_padding(7), groups=c, use_bias=True, dtype=self.dtype,
             name='conv_dw')(x)
    # The MLP runs on flattened pixels: a 2-D matmul is XLA:CPU's fast path.
    y = layer_norm('norm', self.dtype)(y.reshape(n * h * w, c))
    y = nn.Dense(4 * c, dtype=self.dtype, name='fc1')(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(c, dtype=self.dtype, name='fc2')(y)
    gamma = self.param('gamma', nn.initializers.constant(1e-6), (c,), jnp.float32)
    y = (y * gamma.astype(self.dtype)).reshape(n, h, w, c)
    active = train if stochastic is None else stochastic
    y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not active,
                   name='drop_path')(y)
    return (x + y).astype(self.dtype)


class ConvNeXt(nn.Module):
  """Stem → stages → global average pool → LayerNorm; returns features [N, C].

  `drop_path` is the last block's stochastic-depth rate; earlier blocks get
  linearly less, from 0 at the first (as torchvision and timm schedule it).
  """

  spec: ConvNeXtSpec
  drop_path: float = DROP_PATH
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, stochastic: bool | None = None):
    spec = self.spec
    x = Stem(spec.dims[0], dtype=self.dtype, name='stem')(x)
    total, index = sum(spec.depths), 0
    for s, (depth, dim) in enumerate(zip(spec.depths, spec.dims), start=1):
      if s > 1:
        x = Downsample(dim, dtype=self.dtype, name=f'stage{s}_down')(x)
      for j in range(depth):
        rate = self.drop_path * index / max(total - 1, 1)
        x = Block(rate, dtype=self.dtype, name=f'stage{s}_{j}')(x, train, stochastic)
        index += 1
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    return layer_norm('norm', self.dtype)(x)


def build(name: str, dtype=jnp.float32, drop_path: float = DROP_PATH, **arch_kw):
  """Returns (backbone, head defaults): the head is just the classifier on normalised features."""
  if name not in SPECS:
    raise ValueError(f'unknown ConvNeXt {name!r}; known: {", ".join(SPECS)}')
  if arch_kw:
    raise ValueError(f'{name} takes only the architecture option drop_path, got {sorted(arch_kw)}')
  if not 0.0 <= drop_path < 1.0:
    raise ValueError(f'drop_path must be in [0, 1), got {drop_path}')
  return ConvNeXt(SPECS[name], drop_path=drop_path, dtype=dtype), dict(pool='avg', hidden=(),
                                                                         dropout=0.0)
