"""MobileNet (V1) and MobileNetV2 laid out exactly as `keras.applications` builds them.

These are not torchvision's networks with other weights: Keras pads
differently (TF 'same' on the stride-2 stem, which depends on the input
size; explicit zero padding before every stride-2 depthwise conv, then
'valid'), uses BatchNorm eps 1e-3, and rounds channel widths its own way.
Any of these differences shifts every activation, so each is reproduced.

Module names (under `backbone`) are the Keras layer names, so a rule or a
layer found in a Keras recipe reads the same here:

  mobilenet_v1:        conv1, conv1_bn, conv_dw_<i>[_bn], conv_pw_<i>[_bn] (i = 1..13)
  mobilenet_v2_keras:  Conv1, bn_Conv1, expanded_conv_{depthwise,project}[_BN],
                       block_<i>_{expand,depthwise,project}[_BN] (i = 1..16), Conv_1, Conv_1_bn

The Keras tops map to the shared `Head`: V1's GAP → Dropout(1e-3) →
1x1 conv `conv_preds` (with bias) is `head/logits` after GAP and dropout;
V2's GAP → Dense `predictions` is `head/logits`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import KERAS_BN, Conv, batch_norm, relu6

INPUT_SIZES = {'default': 224}
V1_ALPHAS = (0.25, 0.5, 0.75, 1.0)
V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
V2_BN = dict(eps=1e-3, momentum=0.999)
V1_DROPOUT = 1e-3

# (pointwise filters, stride) of V1's 13 depthwise-separable blocks.
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
             (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# (expansion, filters, stride) of V2's 17 inverted-residual blocks (block_id 0..16).
V2_BLOCKS = ((1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 32, 1), (6, 64, 2),
             (6, 64, 1), (6, 64, 1), (6, 64, 1), (6, 96, 1), (6, 96, 1), (6, 96, 1), (6, 160, 2),
             (6, 160, 1), (6, 160, 1), (6, 320, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
  """Keras' `_make_divisible`: nearest multiple of `divisor`, never 10% below `v`."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'same': output ceil(size/stride); an odd total puts the extra row/column after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def correct_pad(size: int, kernel: int = 3) -> tuple[int, int]:
  """Keras' `imagenet_utils.correct_pad`, one dim: (0, 1) on even sizes, (1, 1) on odd ones."""
  return kernel // 2 - (1 - size % 2), kernel // 2


@dataclasses.dataclass(frozen=True)
class V2Block:
  block_id: int
  inp: int
  expanded: int
  out: int
  stride: int

  @property
  def prefix(self) -> str:
    return f'block_{self.block_id}_' if self.block_id else 'expanded_conv_'

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.inp == self.out


def v2_blocks(alpha: float) -> tuple[tuple[V2Block, ...], int, int]:
  """(blocks, stem filters, last conv filters) with Keras' channel rounding."""
  stem = make_divisible(32 * alpha, 8)
  blocks, inp = [], stem
  for i, (t, c, s) in enumerate(V2_BLOCKS):
    out = make_divisible(int(c * alpha), 8)
    blocks.append(V2Block(i, inp, t * inp, out, s))
    inp = out
  last = make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280
  return tuple(blocks), stem, last


class MobileNetV1Backbone(nn.Module):
  """Keras `MobileNet` up to `conv_pw_13_relu` (7x7x(1024·alpha) at 224)."""

  alpha: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: batch_norm(train, dtype=self.dtype, name=name, **KERAS_BN)
    pads = tuple(tf_same_padding(s, 3, 2) for s in x.shape[1:3])
    x = Conv(int(32 * self.alpha), 3, strides=2, padding=pads, dtype=self.dtype, name='conv1')(x)
    x = relu6(bn('conv1_bn')(x))
    for i, (filters, stride) in enumerate(V1_BLOCKS, start=1):
      # Keras: ZeroPadding2D(((0, 1), (0, 1))) + 'valid' before a stride-2 depthwise, else 'same'.
      pad = ((0, 1), (0, 1)) if stride == 2 else ((1, 1), (1, 1))
      x = Conv(x.shape[-1], 3, strides=stride, padding=pad, groups=x.shape[-1], dtype=self.dtype,
               name=f'conv_dw_{i}')(x)
      x = relu6(bn(f'conv_dw_{i}_bn')(x))
      x = Conv(int(filters * self.alpha), 1, dtype=self.dtype, name=f'conv_pw_{i}')(x)
      x = relu6(bn(f'conv_pw_{i}_bn')(x))
    return x


class MobileNetV2KerasBackbone(nn.Module):
  """Keras `MobileNetV2` up to `out_relu` (7x7x1280 at 224 for alpha <= 1)."""

  alpha: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: batch_norm(train, dtype=self.dtype, name=name, **V2_BN)
    blocks, stem, last = v2_blocks(self.alpha)
    pads = tuple(tf_same_padding(s, 3, 2) for s in x.shape[1:3])
    x = Conv(stem, 3, strides=2, padding=pads, dtype=self.dtype, name='Conv1')(x)
    x = relu6(bn('bn_Conv1')(x))
    for b in blocks:
      p, y = b.prefix, x
      if b.block_id:
        y = Conv(b.expanded, 1, dtype=self.dtype, name=f'{p}expand')(y)
        y = relu6(bn(f'{p}expand_BN')(y))
      pad = tuple(correct_pad(s) for s in y.shape[1:3]) if b.stride == 2 else ((1, 1), (1, 1))
      y = Conv(b.expanded, 3, strides=b.stride, padding=pad, groups=b.expanded, dtype=self.dtype,
               name=f'{p}depthwise')(y)
      y = relu6(bn(f'{p}depthwise_BN')(y))
      y = Conv(b.out, 1, dtype=self.dtype, name=f'{p}project')(y)
      y = bn(f'{p}project_BN')(y)
      x = x + y if b.residual else y
    x = Conv(last, 1, dtype=self.dtype, name='Conv_1')(x)
    return relu6(bn('Conv_1_bn')(x))


def build(name: str, dtype=jnp.float32, alpha: float = 1.0):
  """`alpha` is Keras' width multiplier; the listed values are those with ImageNet weights.

  Other positive alphas build too (Keras allows them with `weights=None`).
  """
  if alpha <= 0:
    raise ValueError(f'alpha must be positive, got {alpha}')
  if name == 'mobilenet_v1':
    return (MobileNetV1Backbone(alpha=alpha, dtype=dtype),
            dict(pool='avg', hidden=(), dropout=V1_DROPOUT))
  if name == 'mobilenet_v2_keras':
    return (MobileNetV2KerasBackbone(alpha=alpha, dtype=dtype),
            dict(pool='avg', hidden=(), dropout=0.0))
  raise ValueError(f'unknown Keras MobileNet {name!r}; choose mobilenet_v1 or mobilenet_v2_keras')
