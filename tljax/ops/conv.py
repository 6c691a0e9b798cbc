"""2-D convolution entry point used by every model.

All models call `conv2d`, so a faster formulation for a platform can be
swapped in here without touching model code or checkpoints. On XLA:CPU the
native convolution is slow for the shapes mobile networks are made of:
grouped (depthwise) convolutions run at well under 1 GFLOP/s and 1x1
convolutions at a fraction of the matmul rate. The 'fast' implementation
rewrites exactly those cases as operations XLA:CPU compiles well:

- depthwise: C++ kernels through XLA's FFI where a compiler is available
  (`tljax.ops.native`), else K*K shifted multiply-adds over a padded input
  with hand-written gradients (see `tljax.ops.depthwise`);
- 1x1 (any stride, groups=1): a 2-D matmul on the flattened pixels;
- few input channels (the 3x3 RGB stem): one matmul on gathered patches;
- any other K x K conv with groups=1 (ResNet, Inception): XLA's forward and
  input gradient, kernel gradient as one patches matmul (see
  `tljax.ops.dense_conv`; XLA's own transposes the activations first).

Other grouped convs (and every conv on GPU/TPU) stay `lax.conv_general_dilated`.
The choice is made at trace time: by `TLJAX_CONV_IMPL` (`xla`, `fast`,
`auto`), overridden by the `conv_impl(...)` context manager, and for `auto`
by `jax.default_backend()`. A function already jitted keeps the choice it was
traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from tljax.ops import batchnorm as batchnorm_ops
from tljax.ops import dense_conv, depthwise

IMPLS = ('auto', 'xla', 'fast')
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar('tljax_conv_impl',
                                                                    default=None)

Padding = str | Sequence[tuple[int, int]]


def _check_impl(impl: str, source: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f'{source}={impl!r} is not a conv implementation; use one of {IMPLS}.')
  return impl


@contextlib.contextmanager
def conv_impl(impl: str) -> Iterator[None]:
  """Forces 'xla' or 'fast' (or 'auto') for convs traced inside the block."""
  token = _override.set(_check_impl(impl, 'conv_impl'))
  try:
    yield
  finally:
    _override.reset(token)


def resolved_impl() -> str:
  """'xla' or 'fast': what a conv traced right now would use."""
  impl = _override.get()
  if impl is None:
    impl = _check_impl(os.environ.get('TLJAX_CONV_IMPL', 'auto').lower(), 'TLJAX_CONV_IMPL')
  if impl == 'auto':
    impl = 'fast' if jax.default_backend() == 'cpu' else 'xla'
  return impl


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
  vectorise over (27 GFLOP/s for a 3x3/2 stem); gathering the kh*kw shifted
  views into one [pixels, kh*kw*cin] matrix costs a few MB and turns the conv
  into one matmul (2x faster forward and backward). Worth it only while
  kh*kw*cin is small: the patch matrix grows with it.
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
  kernel rows of the padded input in place (MobileNetV2's stem, batch 32, tuned allocator:
  forward 14 → 7 ms, kernel gradient 19 → 14 ms) instead of writing nine shifted copies."""
  kh, kw, cin, _ = kernel.shape
  return kh * kw * cin <= IM2COL_MAX_DEPTH and not dense_conv.takes_native(x, kernel, pads)


def conv2d(x, kernel, *, strides: int | Sequence[int] = 1, padding: Padding = 'VALID',
           groups: int = 1):
  """NHWC input, HWIO kernel (I = in_channels // groups) → NHWC output.

  Same semantics as `lax.conv_general_dilated` with those dimension numbers
  and `feature_group_count=groups`, whichever implementation runs.
  """
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  kh, kw, kin, kout = kernel.shape
  cin = x.shape[-1]
  if kin * groups != cin or kout % groups:
    raise ValueError(f'kernel {kernel.shape} does not fit {cin} input channels with '
                     f'groups={groups}: need kernel[2] * groups == in_channels and '
                     'out_channels divisible by groups.')
  if resolved_impl() == 'fast':
    pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
    if groups == 1 and kh == kw == 1:
      return pointwise_conv2d(x, kernel, strides, pads)
    if groups == 1 and _im2col_wins(x, kernel, pads):
      return im2col_conv2d(x, kernel, strides, pads)
    if groups == cin and groups > 1:
      return depthwise.depthwise_conv2d(x, kernel, strides, pads)
    if groups == 1:
      return dense_conv.dense_conv2d(x, kernel, strides, pads)
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
  return xla_conv2d(x, kernel, strides, padding, groups)


def _dense_geometry(x, kernel, strides, padding, groups):
  """(strides, explicit pads) when `conv2d` would take the `dense_conv` path, else None."""
  strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
  kh, kw, kin, _ = kernel.shape
  if resolved_impl() != 'fast' or groups != 1 or kin != x.shape[-1] or (kh, kw) == (1, 1):
    return None
  pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
  return None if _im2col_wins(x, kernel, pads) else (strides, pads)


def conv2d_with_stats(x, kernel, *, strides: int | Sequence[int] = 1, padding: Padding = 'VALID',
                      groups: int = 1):
  """(`conv2d(...)`, statistics or None) for a conv that feeds training-mode BatchNorm.

  Where the C++ dense conv runs, the statistics are its output's per-channel sum and sum
  of squares ([2, out], float32, no gradient), summed as tiles leave registers: the two
  reductions BatchNorm would otherwise run over the output (~30 ms of a 2.1 s ResNet34
  step on 2 CPU cores, more when memory bandwidth is contended). Elsewhere None, and
  BatchNorm reduces as usual.
  """
  dense = _dense_geometry(x, kernel, strides, padding, groups)
  if dense is not None:
    return dense_conv.dense_conv2d_with_stats(x, kernel, *dense)
  return conv2d(x, kernel, strides=strides, padding=padding, groups=groups), None


def conv2d_bn_act(x, kernel, *, mean, var, scale, bias, eps: float, residual=None,
                  relu: bool = False, clip: tuple[float, float] | None = None,
                  strides: int | Sequence[int] = 1, padding: Padding = 'VALID', groups: int = 1):
  """clip(relu?(inference BatchNorm(conv2d(x)) + residual?)), float32: a ResNet unit, or a
  MobileNet depthwise unit (`clip=(0, 6)`: ReLU6), at inference.

  Where the C++ dense conv (ReLU, no clip) or depthwise conv (clip, no residual) runs,
  BatchNorm (folded into a per-channel scale and bias), the residual and the activation
  are applied as it stores its output, instead of in more passes over it; under autodiff
  and everywhere else the same formula runs unfused.
  """
  bn = dict(mean=mean, var=var, scale=scale, bias=bias, eps=eps)
  kh, kw = kernel.shape[:2]
  strides_hw = (strides, strides) if isinstance(strides, int) else tuple(strides)
  if (resolved_impl() == 'fast' and groups > 1 and groups == x.shape[-1] and residual is None
      and not (relu and clip is not None)):
    pads = explicit_padding(padding, x.shape[1:3], (kh, kw), strides_hw)
    return depthwise.depthwise_conv2d_bn_act(
        x, kernel, strides_hw, pads, clip=(0.0, np.inf) if relu else clip, **bn)
  dense = _dense_geometry(x, kernel, strides, padding, groups) if clip is None else None
  if dense is not None:
    return dense_conv.dense_conv2d_bn_act(x, kernel, *dense, residual=residual, relu=relu, **bn)
  y = batchnorm_ops.normalize_eval(
      conv2d(x, kernel, strides=strides, padding=padding, groups=groups), **bn)
  if residual is not None:
    y = y + residual
  y = jnp.maximum(y, 0.0) if relu else y
  return y if clip is None else jnp.clip(y, *clip)
