"""MobileNetV2 and MobileNetV3-Small/Large, laid out exactly as torchvision builds them.

Both families are a stem conv, a stack of inverted-residual blocks and a
final 1x1 conv, so one backbone class covers them; the differences
(activation per block, squeeze-excite, BatchNorm epsilon, channel widths)
live in the block table. Ports are exact only if every one of those
matches, hence the facts below are torchvision's, not the papers'.

Module names (under `backbone`) and the torchvision keys they hold:

  features_0/{conv,bn}                  features.0.{0,1}
  features_<i>/expand/{conv,bn}         V2: features.<i>.conv.0.{0,1}   V3: features.<i>.block.0.{0,1}
  features_<i>/depthwise/{conv,bn}      next index of `conv` / `block` (.0 conv, .1 bn)
  features_<i>/se/{fc1,fc2}             V3 only: features.<i>.block.<j>.{fc1,fc2}
  features_<i>/project/{conv,bn}        V2: features.<i>.conv.<j> and .<j+1> (bare conv, bn)
                                        V3: features.<i>.block.<j>.{0,1}
  features_<last>/{conv,bn}             features.<last>.{0,1}

The head (`tljax.models.layers.Head`) holds the classifier: V2
`classifier.1` → `head/logits`; V3 `classifier.0` → `head/hidden0`,
`classifier.3` → `head/logits`. The top-level indices mirror torchvision's
`features` so "unfreeze the last k blocks" rules read the same in both.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import (ACTIVATIONS, TORCH_BN, Conv, batch_norm, hard_sigmoid,
                                 torch_padding)

INPUT_SIZES = {'default': 224, 'mobilenet_tiny': 64}

# torchvision's MobileNetV3 BatchNorm: eps=0.001, torch momentum 0.01 (→ Flax 0.99).
V3_BN = dict(eps=1e-3, momentum=0.99)


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's `_make_divisible`: nearest multiple of `divisor`, never 10% below `v`."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One inverted-residual block: expand 1x1 (if widened) → depthwise → SE? → project 1x1."""

  inp: int
  kernel: int
  expanded: int
  out: int
  se: bool
  act: str
  stride: int

  @property
  def squeeze(self) -> int:
    return make_divisible(self.expanded // 4, 8)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """Everything that distinguishes one MobileNet from another; shared by model and port."""

  family: str                 # 'v2' or 'v3': decides the torchvision key layout.
  stem: int
  stem_act: str
  blocks: tuple[BlockSpec, ...]
  last: int                   # channels of the final 1x1 conv inside `features`.
  last_act: str
  bn: dict
  head: dict


# V2 table (t, c, n, s) and V3 tables (in, k, expanded, out, se, act, stride) from torchvision.
_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))
_V3_LARGE = ((16, 3, 16, 16, False, 'relu', 1), (16, 3, 64, 24, False, 'relu', 2),
             (24, 3, 72, 24, False, 'relu', 1), (24, 5, 72, 40, True, 'relu', 2),
             (40, 5, 120, 40, True, 'relu', 1), (40, 5, 120, 40, True, 'relu', 1),
             (40, 3, 240, 80, False, 'hard_swish', 2), (80, 3, 200, 80, False, 'hard_swish', 1),
             (80, 3, 184, 80, False, 'hard_swish', 1), (80, 3, 184, 80, False, 'hard_swish', 1),
             (80, 3, 480, 112, True, 'hard_swish', 1), (112, 3, 672, 112, True, 'hard_swish', 1),
             (112, 5, 672, 160, True, 'hard_swish', 2), (160, 5, 960, 160, True, 'hard_swish', 1),
             (160, 5, 960, 160, True, 'hard_swish', 1))
_V3_SMALL = ((16, 3, 16, 16, True, 'relu', 2), (16, 3, 72, 24, False, 'relu', 2),
             (24, 3, 88, 24, False, 'relu', 1), (24, 5, 96, 40, True, 'hard_swish', 2),
             (40, 5, 240, 40, True, 'hard_swish', 1), (40, 5, 240, 40, True, 'hard_swish', 1),
             (40, 5, 120, 48, True, 'hard_swish', 1), (48, 5, 144, 48, True, 'hard_swish', 1),
             (48, 5, 288, 96, True, 'hard_swish', 2), (96, 5, 576, 96, True, 'hard_swish', 1),
             (96, 5, 576, 96, True, 'hard_swish', 1))
# A few blocks that still exercise every code path: no-expand + SE + stride 2,
# expand + ReLU, residual + SE + hard-swish with a 5x5 depthwise.
_TINY = ((8, 3, 8, 8, True, 'relu', 2), (8, 3, 24, 16, False, 'relu', 2),
         (16, 5, 48, 16, True, 'hard_swish', 1))
_LAST_CHANNEL = {'mobilenet_v3_large': 1280, 'mobilenet_v3_small': 1024, 'mobilenet_tiny': 32}


def _v2_spec(width_mult: float) -> ArchSpec:
  stem = make_divisible(32 * width_mult)
  blocks, inp = [], stem
  for t, c, n, s in _V2_SETTING:
    out = make_divisible(c * width_mult)
    for i in range(n):
      blocks.append(BlockSpec(inp, 3, int(round(inp * t)), out, False, 'relu6', s if i == 0 else 1))
      inp = out
  return ArchSpec('v2', stem, 'relu6', tuple(blocks), make_divisible(1280 * max(1.0, width_mult)),
                  'relu6', TORCH_BN, dict(pool='avg', hidden=(), dropout=0.2))


def _v3_spec(name: str, table, width_mult: float) -> ArchSpec:
  adjust = lambda c: make_divisible(c * width_mult)
  blocks = tuple(BlockSpec(adjust(i), k, adjust(e), adjust(o), se, act, s)
                 for i, k, e, o, se, act, s in table)
  head = dict(pool='avg', hidden=(adjust(_LAST_CHANNEL[name]),), activation='hard_swish', dropout=0.2)
  return ArchSpec('v3', blocks[0].inp, 'hard_swish', blocks, 6 * blocks[-1].out, 'hard_swish', V3_BN,
                  head)


def arch_spec(name: str, width_mult: float = 1.0) -> ArchSpec:
  """The block table of `name` at `width_mult` (torchvision's channel rounding)."""
  if name == 'mobilenet_v2':
    return _v2_spec(width_mult)
  tables = {'mobilenet_v3_large': _V3_LARGE, 'mobilenet_v3_small': _V3_SMALL, 'mobilenet_tiny': _TINY}
  if name not in tables:
    raise ValueError(f'unknown MobileNet {name!r}; expected one of mobilenet_v2, {", ".join(tables)}')
  return _v3_spec(name, tables[name], width_mult)


class ConvBN(nn.Module):
  """conv → BatchNorm → activation (torchvision's `Conv2dNormActivation`); `act=None` is linear."""

  features: int
  kernel: int
  bn: dict
  strides: int = 1
  groups: int = 1
  act: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.features, self.kernel, strides=self.strides, padding=torch_padding(self.kernel),
             groups=self.groups, dtype=self.dtype, name='conv')(x)
    x = batch_norm(train, dtype=self.dtype, name='bn', **self.bn)(x)
    return x if self.act is None else ACTIVATIONS[self.act](x)


class SqueezeExcite(nn.Module):
  """Global-average → 1x1 conv (bias) → ReLU → 1x1 conv (bias) → hard-sigmoid gate."""

  squeeze: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.promote_types(x.dtype, jnp.float32))
    s = s.astype(x.dtype)
    s = nn.relu(Conv(self.squeeze, 1, use_bias=True, dtype=self.dtype, name='fc1')(s))
    s = Conv(x.shape[-1], 1, use_bias=True, dtype=self.dtype, name='fc2')(s)
    return x * hard_sigmoid(s)


class InvertedResidual(nn.Module):
  spec: BlockSpec
  bn: dict
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    b = self.spec
    y = x
    if b.expanded != b.inp:
      y = ConvBN(b.expanded, 1, self.bn, act=b.act, dtype=self.dtype, name='expand')(y, train)
    y = ConvBN(b.expanded, b.kernel, self.bn, strides=b.stride, groups=b.expanded, act=b.act,
               dtype=self.dtype, name='depthwise')(y, train)
    if b.se:
      y = SqueezeExcite(b.squeeze, dtype=self.dtype, name='se')(y)
    y = ConvBN(b.out, 1, self.bn, dtype=self.dtype, name='project')(y, train)
    return x + y if b.stride == 1 and b.inp == b.out else y


class MobileNetBackbone(nn.Module):
  """Image → final feature map (after the last 1x1 conv + activation), as torchvision's `features`."""

  arch: ArchSpec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = self.arch
    x = ConvBN(a.stem, 3, a.bn, strides=2, act=a.stem_act, dtype=self.dtype, name='features_0')(x, train)
    for i, block in enumerate(a.blocks, start=1):
      x = InvertedResidual(block, a.bn, dtype=self.dtype, name=f'features_{i}')(x, train)
    return ConvBN(a.last, 1, a.bn, act=a.last_act, dtype=self.dtype,
                  name=f'features_{len(a.blocks) + 1}')(x, train)


def build(name: str, dtype=jnp.float32, width_mult: float = 1.0, bn_eps: float | None = None,
          bn_momentum: float | None = None):
  """`width_mult` scales channels with torchvision's rounding (official weights: 1.0).

  `bn_eps` and `bn_momentum` (Flax's: weight of the old running value)
  override the BatchNorm defaults: timm's `mobilenetv3_large_100` is
  torchvision's network in every shape and activation, but normalises with
  PyTorch's default eps 1e-5 (torchvision's V3: 1e-3), which its weights were
  trained with, and updates running statistics with torch momentum 0.1
  (torchvision's V3: 0.01).
  """
  spec = arch_spec(name, width_mult)
  if bn_eps is not None and not bn_eps > 0:
    raise ValueError(f'bn_eps must be > 0, got {bn_eps!r}')
  if bn_momentum is not None and not 0 <= bn_momentum < 1:
    raise ValueError(f'bn_momentum must be in [0, 1) (Flax convention), got {bn_momentum!r}')
  overrides = {k: float(v) for k, v in (('eps', bn_eps), ('momentum', bn_momentum))
               if v is not None}
  if overrides:
    spec = dataclasses.replace(spec, bn={**spec.bn, **overrides})
  return MobileNetBackbone(spec, dtype=dtype), dict(spec.head)
