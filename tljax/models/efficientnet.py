"""EfficientNet-B0 as timm builds it (`timm.create_model('efficientnet_b0')`).

timm's B0 differs from the TF original and from EfficientNet-Lite in what a
port must match exactly: PyTorch's symmetric padding (k//2 on every side,
also at stride 2, unlike TF 'SAME'), BatchNorm eps 1e-5, SiLU everywhere,
and a squeeze-excite in every block whose width is a quarter of the block's
*input* channels (`round(in * 0.25)`), not of its expanded width. Channel
rounding is timm's `round_channels` (nearest multiple of 8, never more than
10% down) and depth scaling rounds each stage's repeats up.

Module names (under `backbone`) mirror timm's keys, so the port is a rename:

  conv_stem, bn1                        conv_stem, bn1
  blocks<s>_<j>/<leaf>                  blocks.<s>.<j>.<leaf>
      stage 0 (depthwise-separable):    conv_dw, bn1, se/{conv_reduce,conv_expand}, conv_pw, bn2
      other stages (inverted residual): conv_pw, bn1, conv_dw, bn2, se/..., conv_pwl, bn3
  conv_head, bn2                        conv_head, bn2

`classifier` is `head/logits`. The `<s>` in the block names makes each stage
a name-prefix group, so `trainable='stages:N'` unfreezes whole stages.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.efficientnet_lite import DROP_CONNECT_RATE
from tljax.models.layers import TORCH_BN, Conv, batch_norm, torch_padding
from tljax.models.mobilenet import make_divisible

# timm's arch_def for EfficientNet-B0: (depthwise-separable?, repeats, kernel, stride, expand,
# out channels); every block has squeeze-excite with ratio 0.25.
BASE_STAGES = (
    (True, 1, 3, 1, 1, 16),
    (False, 2, 3, 2, 6, 24),
    (False, 2, 5, 2, 6, 40),
    (False, 3, 3, 2, 6, 80),
    (False, 3, 5, 1, 6, 112),
    (False, 4, 5, 2, 6, 192),
    (False, 1, 3, 1, 6, 320),
)
SE_RATIO = 0.25

# channel multiplier, depth multiplier, resolution, head dropout.
SCALING = {
    'efficientnet_b0': (1.0, 1.0, 224, 0.2),
    # timm's builder at a quarter width and half depth: every block kind, residuals included.
    'efficientnet_tiny': (0.25, 0.5, 64, 0.2),
}
INPUT_SIZES = {'default': 224, **{name: s[2] for name, s in SCALING.items()}}

# PyTorch's BatchNorm2d defaults (eps 1e-5, torch momentum 0.1 → Flax 0.9), as timm uses them.
BN = TORCH_BN


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block; `separable` is timm's DepthwiseSeparableConv (no expansion conv)."""

  separable: bool
  inp: int
  out: int
  kernel: int
  stride: int
  expanded: int
  squeeze: int

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.inp == self.out


def round_channels(channels: int, multiplier: float) -> int:
  """timm's `round_channels`: scaled, then to a multiple of 8 no more than 10% below."""
  return make_divisible(channels * multiplier, 8)


def stage_specs(width: float, depth: float, stem: int) -> tuple[tuple[BlockSpec, ...], ...]:
  """Blocks per stage, as timm's `EfficientNetBuilder` decodes B0's arch_def at this scaling."""
  stages, inp = [], stem
  for separable, repeats, kernel, stride, expand, out in BASE_STAGES:
    out = round_channels(out, width)
    blocks = []
    for r in range(int(math.ceil(repeats * depth))):
      expanded = inp if separable else make_divisible(inp * float(expand), 8)
      # timm divides the SE ratio by the expansion and applies it to the expanded width.
      squeeze = round(expanded * (SE_RATIO / float(expand)))
      blocks.append(BlockSpec(separable, inp, out, kernel, stride if r == 0 else 1, expanded,
                              squeeze))
      inp = out
    stages.append(tuple(blocks))
  return tuple(stages)


def arch_facts(name: str) -> dict:
  """Scaling, stem/head widths and per-stage blocks of a registered variant."""
  if name not in SCALING:
    raise ValueError(f'unknown EfficientNet {name!r}; known: {", ".join(SCALING)}')
  width, depth, resolution, dropout = SCALING[name]
  stem = round_channels(32, width)
  return dict(width=width, depth=depth, resolution=resolution, dropout=dropout, stem=stem,
              head=round_channels(1280, width), stages=stage_specs(width, depth, stem))


class SqueezeExcite(nn.Module):
  """Global average → 1×1 conv (bias) → SiLU → 1×1 conv (bias) → sigmoid gate."""

  squeeze: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.promote_types(x.dtype, jnp.float32))
    s = nn.silu(Conv(self.squeeze, 1, use_bias=True, dtype=self.dtype,
                     name='conv_reduce')(s.astype(x.dtype)))
    s = Conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name='conv_expand')(s)
    return x * nn.sigmoid(s)


class MBConv(nn.Module):
  """timm's InvertedResidual (or, `spec.separable`, DepthwiseSeparableConv) with SE and SiLU.

  Drop-connect (stochastic depth) drops a residual block's whole branch per
  example, scaled by 1/keep as timm's DropPath; it is active when
  `stochastic` (default: `train`, the BatchNorm mode), as in EfficientNet-Lite.
  """

  spec: BlockSpec
  drop_connect: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, stochastic: bool | None = None):
    s = self.spec
    conv = lambda feats, k, name, **kw: Conv(feats, k, padding=torch_padding(k), dtype=self.dtype,
                                             name=name, **kw)
    bn = lambda name: batch_norm(train, dtype=self.dtype, name=name, **BN)
    depthwise = dict(strides=s.stride, groups=s.expanded)
    if s.separable:
      y = nn.silu(bn('bn1')(conv(s.expanded, s.kernel, 'conv_dw', **depthwise)(x)))
      y = SqueezeExcite(s.squeeze, dtype=self.dtype, name='se')(y)
      y = bn('bn2')(conv(s.out, 1, 'conv_pw')(y))
    else:
      y = nn.silu(bn('bn1')(conv(s.expanded, 1, 'conv_pw')(x)))
      y = nn.silu(bn('bn2')(conv(s.expanded, s.kernel, 'conv_dw', **depthwise)(y)))
      y = SqueezeExcite(s.squeeze, dtype=self.dtype, name='se')(y)
      y = bn('bn3')(conv(s.out, 1, 'conv_pwl')(y))
    if not s.residual:
      return y
    active = train if stochastic is None else stochastic
    y = nn.Dropout(self.drop_connect, broadcast_dims=(1, 2, 3), deterministic=not active,
                   name='drop_connect')(y)
    return y + x


class EfficientNet(nn.Module):
  """Stem → MBConv stages → 1×1 head conv + BN + SiLU; returns the feature map.

  Block i of n (counted over all stages) drops its branch with probability
  `drop_connect_rate * i / n`, timm's `drop_path_rate` schedule.
  """

  stages: tuple[tuple[BlockSpec, ...], ...]
  stem_features: int = 32
  head_features: int = 1280
  drop_connect_rate: float = DROP_CONNECT_RATE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, stochastic: bool | None = None):
    bn = lambda name: batch_norm(train, dtype=self.dtype, name=name, **BN)
    x = Conv(self.stem_features, 3, strides=2, padding=torch_padding(3), dtype=self.dtype,
             name='conv_stem')(x)
    x = nn.silu(bn('bn1')(x))
    total, i = sum(len(stage) for stage in self.stages), 0
    for s, stage in enumerate(self.stages):
      for j, spec in enumerate(stage):
        x = MBConv(spec, drop_connect=self.drop_connect_rate * i / total, dtype=self.dtype,
                   name=f'blocks{s}_{j}')(x, train, stochastic)
        i += 1
    x = Conv(self.head_features, 1, dtype=self.dtype, name='conv_head')(x)
    return nn.silu(bn('bn2')(x))


def build(name: str, dtype=jnp.float32, drop_connect_rate: float = DROP_CONNECT_RATE):
  """`drop_connect_rate` is timm's `drop_path_rate` (timm trains B0 with 0.2)."""
  if not 0.0 <= drop_connect_rate < 1.0:
    raise ValueError(f'drop_connect_rate must be in [0, 1), got {drop_connect_rate!r}')
  facts = arch_facts(name)
  backbone = EfficientNet(stages=facts['stages'], stem_features=facts['stem'],
                          head_features=facts['head'], drop_connect_rate=drop_connect_rate,
                          dtype=dtype)
  return backbone, dict(pool='avg', dropout=facts['dropout'])
