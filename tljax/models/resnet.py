"""ResNet18/34/50 laid out exactly as torchvision builds them (ResNet v1.5).

Exactness matters because the weights are ported from torchvision: the
stride of a bottleneck sits in its 3x3 conv (v1.5, not the 1x1 of the
paper), every pad is torch's symmetric one (never 'SAME', which pads (0, 1)
on even inputs), and BatchNorm uses torch's epsilon.

Module names mirror torchvision's state-dict keys so ports and freezing rules
read naturally:

  backbone/conv1, backbone/bn1                      <- conv1, bn1
  backbone/layer{s}_{b}/conv{i}, .../bn{i}           <- layer{s}.{b}.conv{i}, .bn{i}
  backbone/layer{s}_{b}/downsample_conv, ..._bn      <- layer{s}.{b}.downsample.0 / .1
  head/logits                                        <- fc

e.g. `backbone/layer4_.*` selects the last stage. `resnet_tiny` is the same
code with two one-block stages of widths 8 and 16, for fast tests.
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import TORCH_BN, Conv, batch_norm, max_pool_torch, torch_padding


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """One torchvision ResNet: block type, blocks per stage, stage widths."""

  block: str  # 'basic' (expansion 1) or 'bottleneck' (expansion 4)
  stage_sizes: tuple[int, ...]
  widths: tuple[int, ...]
  stem_width: int = 64

  @property
  def expansion(self) -> int:
    return 4 if self.block == 'bottleneck' else 1

  def stride(self, stage: int, block: int) -> int:
    return 2 if stage > 0 and block == 0 else 1

  def has_downsample(self, stage: int, block: int) -> bool:
    """torchvision adds a 1x1 projection where stride or channel count changes."""
    if block:
      return False
    in_ch = self.stem_width if stage == 0 else self.widths[stage - 1] * self.expansion
    return self.stride(stage, block) != 1 or in_ch != self.widths[stage] * self.expansion


SPECS = {
    'resnet18': ResNetSpec('basic', (2, 2, 2, 2), (64, 128, 256, 512)),
    'resnet34': ResNetSpec('basic', (3, 4, 6, 3), (64, 128, 256, 512)),
    'resnet50': ResNetSpec('bottleneck', (3, 4, 6, 3), (64, 128, 256, 512)),
    'resnet_tiny': ResNetSpec('basic', (1, 1), (8, 16), stem_width=8),
}

INPUT_SIZES = {'default': 224, 'resnet_tiny': 32}


class Block(nn.Module):
  """torchvision `BasicBlock` (two 3x3) or `Bottleneck` (1x1, strided 3x3, 1x1)."""

  width: int
  bottleneck: bool
  strides: int
  downsample: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv_bn(x, features, k, s, conv_name, bn_name):
      x = Conv(features, k, strides=s, padding=torch_padding(k), dtype=self.dtype,
               name=conv_name)(x)
      return batch_norm(train, dtype=self.dtype, name=bn_name, **TORCH_BN)(x)

    out_ch = self.width * 4 if self.bottleneck else self.width
    identity = x
    if self.downsample:
      identity = conv_bn(x, out_ch, 1, self.strides, 'downsample_conv', 'downsample_bn')
    if self.bottleneck:
      y = nn.relu(conv_bn(x, self.width, 1, 1, 'conv1', 'bn1'))
      y = nn.relu(conv_bn(y, self.width, 3, self.strides, 'conv2', 'bn2'))
      y = conv_bn(y, out_ch, 1, 1, 'conv3', 'bn3')
    else:
      y = nn.relu(conv_bn(x, self.width, 3, self.strides, 'conv1', 'bn1'))
      y = conv_bn(y, self.width, 3, 1, 'conv2', 'bn2')
    return nn.relu(y + identity)


class ResNetBackbone(nn.Module):
  """Stem + stages; returns the last feature map (pooling belongs to the head)."""

  spec: ResNetSpec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = self.spec
    x = Conv(spec.stem_width, 7, strides=2, padding=torch_padding(7), dtype=self.dtype,
             name='conv1')(x)
    x = nn.relu(batch_norm(train, dtype=self.dtype, name='bn1', **TORCH_BN)(x))
    x = max_pool_torch(x, 3, 2, padding=1)
    for s, (size, width) in enumerate(zip(spec.stage_sizes, spec.widths)):
      for b in range(size):
        x = Block(width, spec.block == 'bottleneck', spec.stride(s, b), spec.has_downsample(s, b),
                  dtype=self.dtype, name=f'layer{s + 1}_{b}')(x, train=train)
    return x


def build(name: str, dtype=jnp.float32, **arch_kw):
  """Returns (backbone, head defaults): avg pool straight into `logits`, like torchvision's fc."""
  if name not in SPECS:
    raise ValueError(f'unknown ResNet {name!r}; known: {", ".join(SPECS)}')
  if arch_kw:
    raise ValueError(f'{name} takes no architecture options, got {sorted(arch_kw)}')
  return ResNetBackbone(SPECS[name], dtype=dtype), dict(pool='avg', hidden=(), dropout=0.0)

