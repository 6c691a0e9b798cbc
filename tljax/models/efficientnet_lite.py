"""EfficientNet-Lite0..4, laid out like `efficientnet_lite_pytorch` (and its .pth files).

Lite is EfficientNet-B0's MBConv network made quantisation-friendly: ReLU6
instead of swish, no squeeze-excite, and the stem (32) and head (1280) kept
fixed while the blocks scale. The weights were trained in TensorFlow, so
every convolution uses TF 'SAME' padding, which is asymmetric on stride 2
(the extra row/column goes after). The PyTorch reference computes those pads
once, for the variant's default resolution (`Conv2dStaticSamePadding`); here
they are computed from the actual input shape, as TF does. Both agree at the
default resolution; `pad_for_size` reproduces the reference's static pads
at other input sizes.

Module names mirror the .pth keys without underscores (`conv_stem`, `bn0`,
`blocks_7/depthwise_conv`, `conv_head`, `bn1`) so the port is a rename.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import KERAS_BN, Conv, batch_norm, relu6

# (repeats, kernel, stride, expand_ratio, in_filters, out_filters) of EfficientNet-B0/Lite0.
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# width coefficient, depth coefficient, resolution, head dropout (efficientnet_lite_builder.py).
SCALING = {
    'efficientnet_lite0': (1.0, 1.0, 224, 0.2),
    'efficientnet_lite1': (1.0, 1.1, 240, 0.2),
    'efficientnet_lite2': (1.1, 1.2, 260, 0.3),
    'efficientnet_lite3': (1.2, 1.4, 280, 0.3),
    'efficientnet_lite4': (1.4, 1.8, 300, 0.3),
    # Same code path, a few thousand parameters: for tests only.
    'efficientnet_lite_tiny': (0.25, 0.5, 64, 0.2),
}

INPUT_SIZES = {'default': 224, **{name: s[2] for name, s in SCALING.items()}}

# The PyTorch reference (torch momentum 0.01) and TF (0.99) use eps 1e-3, momentum 0.99.
BN = KERAS_BN
DROP_CONNECT_RATE = 0.2


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  kernel: int
  stride: int
  expand_ratio: int
  in_filters: int
  out_filters: int

  @property
  def expanded(self) -> int:
    return self.in_filters * self.expand_ratio

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.in_filters == self.out_filters


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TF EfficientNet's channel rounding: nearest multiple of 8, never more than 10% down."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def block_specs(width: float, depth: float, stem: int = 32) -> tuple[BlockSpec, ...]:
  """The flat list of MBConv blocks; its index is the N of `_blocks.N` in the .pth.

  Lite keeps the first and last stage at their base repeat count and the
  first stage's input at the unscaled stem width.
  """
  specs = []
  last = len(BASE_STAGES) - 1
  for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(BASE_STAGES):
    cin = stem if i == 0 else round_filters(cin, width)
    cout = round_filters(cout, width)
    if 0 < i < last:
      repeats = int(math.ceil(depth * repeats))
    for r in range(repeats):
      first = r == 0
      specs.append(BlockSpec(kernel, stride if first else 1, expand, cin if first else cout, cout))
  return tuple(specs)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME': output ceil(size/stride); odd total padding puts the extra after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pads(hw: Sequence[int], kernel: int, stride: int) -> tuple[tuple[int, int], ...]:
  return tuple(tf_same_padding(s, kernel, stride) for s in hw)


def _out_size(hw: Sequence[int], stride: int) -> tuple[int, int]:
  return tuple(-(-s // stride) for s in hw)


class MBConv(nn.Module):
  """Inverted residual: 1×1 expand → k×k depthwise → 1×1 project, ReLU6, no SE.

  `pad_hw` is the spatial size the depthwise padding is computed for (None:
  the input's own). Drop-connect (stochastic depth) drops the whole residual
  branch per example; it is active when `stochastic` (default: `train`, the
  BatchNorm mode), so fine-tuning with frozen BatchNorm can still regularise.
  """

  spec: BlockSpec
  drop_connect: float = 0.0
  pad_hw: tuple[int, int] | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, stochastic: bool | None = None):
    s = self.spec
    bn = lambda name: batch_norm(train, dtype=self.dtype, name=name, **BN)
    y = x
    if s.expand_ratio != 1:
      y = Conv(s.expanded, 1, dtype=self.dtype, name='expand_conv')(y)
      y = relu6(bn('bn0')(y))
    pads = _pads(self.pad_hw or x.shape[1:3], s.kernel, s.stride)
    y = Conv(s.expanded, s.kernel, strides=s.stride, padding=pads, groups=s.expanded,
             dtype=self.dtype, name='depthwise_conv')(y)
    y = relu6(bn('bn1')(y))
    y = Conv(s.out_filters, 1, dtype=self.dtype, name='project_conv')(y)
    y = bn('bn2')(y)
    if not s.residual:
      return y
    active = train if stochastic is None else stochastic
    y = nn.Dropout(self.drop_connect, broadcast_dims=(1, 2, 3), deterministic=not active,
                   name='drop_connect')(y)
    return y + x


class EfficientNetLite(nn.Module):
  """Stem → MBConv blocks → 1×1 head conv + BN + ReLU6; returns the feature map.

  `pad_for_size`: compute every 'SAME' pad for this square input size, as
  the PyTorch reference does for its configured `image_size`, instead of
  from the actual input.
  """

  blocks: Sequence[BlockSpec]
  stem_features: int = 32
  head_features: int = 1280
  drop_connect_rate: float = DROP_CONNECT_RATE
  pad_for_size: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, stochastic: bool | None = None):
    hw = (self.pad_for_size,) * 2 if self.pad_for_size else None
    bn = lambda name: batch_norm(train, dtype=self.dtype, name=name, **BN)
    x = Conv(self.stem_features, 3, strides=2, padding=_pads(hw or x.shape[1:3], 3, 2),
             dtype=self.dtype, name='conv_stem')(x)
    x = relu6(bn('bn0')(x))
    hw = _out_size(hw, 2) if hw else None
    for i, spec in enumerate(self.blocks):
      rate = self.drop_connect_rate * i / len(self.blocks)
      x = MBConv(spec, drop_connect=rate, pad_hw=hw, dtype=self.dtype,
                 name=f'blocks_{i}')(x, train, stochastic)
      hw = _out_size(hw, spec.stride) if hw else None
    x = Conv(self.head_features, 1, dtype=self.dtype, name='conv_head')(x)
    return relu6(bn('bn1')(x))


def arch_facts(name: str) -> dict:
  """Width/depth/resolution/dropout and the block list of a registered variant."""
  if name not in SCALING:
    raise ValueError(f'unknown EfficientNet-Lite variant {name!r}; known: {", ".join(SCALING)}')
  width, depth, resolution, dropout = SCALING[name]
  stem, head = (16, 64) if name == 'efficientnet_lite_tiny' else (32, 1280)
  return dict(width=width, depth=depth, resolution=resolution, dropout=dropout, stem=stem,
              head=head, blocks=block_specs(width, depth, stem))


def build(name: str, dtype=jnp.float32, drop_connect_rate: float = DROP_CONNECT_RATE,
          pad_for_size: int | None = None):
  facts = arch_facts(name)
  backbone = EfficientNetLite(
      blocks=facts['blocks'], stem_features=facts['stem'], head_features=facts['head'],
      drop_connect_rate=drop_connect_rate, pad_for_size=pad_for_size, dtype=dtype)
  return backbone, dict(pool='avg', dropout=facts['dropout'])
