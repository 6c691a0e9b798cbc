"""Convolutions as formulations XLA:CPU compiles well.

On XLA:CPU the native convolution is slow for the shapes mobile networks are
made of: grouped (depthwise) convolutions run at well under 1 GFLOP/s and 1x1
convolutions at a fraction of the matmul rate. `conv2d` rewrites exactly
those cases:

- depthwise: C++ kernels through XLA's FFI where a compiler is available
  (`native`), else K*K shifted multiply-adds over a padded input with
  hand-written gradients (`depthwise`);
- 1x1 (any stride, groups=1): a 2-D matmul on the flattened pixels;
- few input channels (the 3x3 RGB stem): one matmul on gathered patches;
- any other K x K conv with groups=1 (ResNet, Inception): the C++ dense conv,
  or XLA's forward and input gradient with the kernel gradient as one
  patches matmul (`dense_conv`; XLA's own transposes the activations first).

Other grouped convs stay `lax.conv_general_dilated`.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax import lax

from tljax.cpu_backend import dense_conv, depthwise

Padding = str | Sequence[tuple[int, int]]


def explicit_padding(padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                     strides: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """'SAME'/'VALID' or explicit pairs → explicit ((top, bottom), (left, right))."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides),
                                     padding.upper()))
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f'padding must be a string or ((top, bottom), (left, right)), got {padding!r}')
  return pads


def xla_conv2d(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def pointwise_conv2d(x, kernel, strides, pads):
  """1x1 convolution as one 2-D matmul over all output pixels.

  XLA:CPU runs `dot_general` on a 2-D operand at matmul speed, forward and
  backward; the 4-D convolution (or a 4-D `dot_general`) is several times
  slower. Stride and padding become a pad + strided slice of the input.
  """
  (pt, pb), (pl, pr) = pads
  if pt or pb or pl or pr:
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  sh, sw = strides
  if sh > 1 or sw > 1:
    x = x[:, ::sh, ::sw, :]
  n, h, w, c = x.shape
  y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, kernel.shape[-1]),
              preferred_element_type=jnp.float32)
  return y.astype(x.dtype).reshape(n, h, w, kernel.shape[-1])


def im2col_conv2d(x, kernel, strides, pads):
  """A conv with few input channels (an RGB stem) as patches @ kernel.

  With 3 input channels XLA:CPU's convolution has too little depth to
  vectorise over; gathering the kh*kw shifted views into one
  [pixels, kh*kw*cin] matrix costs a few MB and turns the conv into one
  matmul, forward and backward. Worth it only while kh*kw*cin is small: the
  patch matrix grows with it.
  """
  kh, kw, cin, cout = kernel.shape
  cols, (n, ho, wo) = dense_conv.patches(x, (kh, kw), strides, pads)
  y = jnp.dot(cols, kernel.reshape(kh * kw * cin, cout), preferred_element_type=jnp.float32)
  return y.astype(x.dtype).reshape(n, ho, wo, cout)


# Largest kh*kw*in_channels for which `im2col_conv2d` beats XLA:CPU's conv
# (3x3 RGB stem: 27; a 7x7 RGB stem, 147, is faster in XLA).
IM2COL_MAX_DEPTH = 32


def _im2col_wins(x, kernel, pads) -> bool:
  """Shallow convs (RGB stems) go to im2col unless the C++ conv takes them: it reads
  kernel rows of the padded input in place instead of writing nine shifted copies."""
  kh, kw, cin, _ = kernel.shape
  return kh * kw * cin <= IM2COL_MAX_DEPTH and not dense_conv.takes_native(x, kernel, pads)


def conv2d(x, kernel, strides: tuple[int, int], padding: Padding, groups: int):
  """`tljax.ops.conv2d` on the CPU backend (arguments already checked there)."""
  kh, kw, _, _ = kernel.shape
  cin = x.shape[-1]
  pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
  if groups == 1 and kh == kw == 1:
    return pointwise_conv2d(x, kernel, strides, pads)
  if groups == 1 and _im2col_wins(x, kernel, pads):
    return im2col_conv2d(x, kernel, strides, pads)
  if groups == cin and groups > 1:
    return depthwise.depthwise_conv2d(x, kernel, strides, pads)
  if groups == 1:
    return dense_conv.dense_conv2d(x, kernel, strides, pads)
  return xla_conv2d(x, kernel, strides, pads, groups)
