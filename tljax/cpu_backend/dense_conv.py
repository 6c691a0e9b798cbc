"""A K x K convolution (groups=1) whose kernel gradient is one matmul, for XLA:CPU.

XLA:CPU runs the forward convolution and its input gradient at close to
matmul speed, but lowers the kernel gradient to a convolution over
transposed activations: it first copies the input and the cotangent into
[channels, h, w, batch] layout, a strided transpose that costs more than
the convolution itself.
Here the kernel gradient is `patches^T @ cotangent` instead: the K*K shifted
views of the padded input side by side as one [pixels, K*K*in] matrix
(written once, sequentially) times the [pixels, out] cotangent, one 2-D
matmul. Forward and input gradient stay XLA's.

With the C++ kernels built (`native`), the float32 forward, the stride-1
input gradient and the kernel gradient run as indirect GEMMs instead
(`csrc/conv.cc`; no patches matrix): XLA:CPU runs some of these convolutions
on one thread, and its input gradients well below matmul speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tljax.cpu_backend import native

Pads = tuple[tuple[int, int], tuple[int, int]]


def _conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _pad_hw(x, pads):
  (pt, pb), (pl, pr) = pads
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def patches(x, kernel_hw, strides, pads):
  """[n*ho*wo, kh*kw*cin]: the kh*kw shifted (strided) views of the padded input, side by side.

  Also `conv.im2col_conv2d`'s operand. Returns (patches, (n, ho, wo)).
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  xp = _pad_hw(x, pads)
  n, hp, wp, cin = xp.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  views = [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                     (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return jnp.concatenate(views, axis=-1).reshape(n * ho * wo, kh * kw * cin), (n, ho, wo)


def _patches_kernel_grad(x, ct, kernel_shape, strides, pads):
  cols, _ = patches(x, kernel_shape[:2], strides, pads)
  dk = lax.dot_general(cols, ct.reshape(-1, kernel_shape[-1]), (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return dk.reshape(kernel_shape)


def _out_hw(in_hw, kernel_hw, strides, pads):
  return tuple((size + lo + hi - k) // s + 1
               for size, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads))


def _native_conv(x, kernel, strides, top_left, out_hw):
  """The C++ conv: out-of-range reads are zeros, so only top/left padding and the size matter."""
  out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, kernel.shape[-1]), jnp.float32)
  (sh, sw), (pt, pl) = strides, top_left
  return native.call('tljax_conv_forward', out, x, kernel, sh=sh, sw=sw, pt=pt, pl=pl)


def _native_ok(x, kernel, pads, out_channels):
  """The C++ kernels take float32 and a multiple of 16 output channels."""
  return (x.dtype == kernel.dtype == jnp.float32 and out_channels % 16 == 0
          and min(p for pair in pads for p in pair) >= 0)


def takes_native(x, kernel, pads) -> bool:
  """Whether `dense_conv2d` runs the C++ conv for these operands (kernels built, CPU at run time)."""
  return native.available() and _native_ok(x, kernel, pads, kernel.shape[-1])


def _merged(x, kernel, pads):
  """Few input channels (an RGB stem): each tap would be too shallow for the GEMM tiles.

  Over the explicitly padded input, the kw taps of one kernel row read kw
  neighbouring pixels, i.e. one contiguous row of kw * cin floats; the C++
  kernels take that as a [kh, 1, kw * cin, cout] kernel with no padding.
  """
  if x.shape[-1] >= 16:
    return x, kernel, pads
  kh, kw, cin, cout = kernel.shape
  return _pad_hw(x, pads), kernel.reshape(kh, 1, kw * cin, cout), ((0, 0), (0, 0))


def _forward(x, kernel, strides, pads):
  if not _native_ok(x, kernel, pads, kernel.shape[-1]):
    return _conv(x, kernel, strides, pads)
  out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, pads)

  def fast(x, k):
    x, k, p = _merged(x, k, pads)
    return _native_conv(x, k, strides, (p[0][0], p[1][0]), out_hw)
  return native.dispatch(fast, lambda x, k: _conv(x, k, strides, pads), x, kernel)


def _kernel_grad(x, kernel, ct, strides, pads):
  def fallback(x, ct):
    return _patches_kernel_grad(x, ct, kernel.shape, strides, pads)

  if not _native_ok(x, kernel, pads, kernel.shape[-1]):
    return fallback(x, ct)

  def fast(x, ct):
    x, k, ((pt, _), (pl, _)) = _merged(x, kernel, pads)
    (sh, sw) = strides
    dk = native.call('tljax_conv_kernel_grad', jax.ShapeDtypeStruct(k.shape, jnp.float32),
                     x, ct, sh=sh, sw=sw, pt=pt, pl=pl)
    return dk.reshape(kernel.shape)
  return native.dispatch(fast, fallback, x, ct)


def _input_grad(x, kernel, ct, strides, pads):
  """A stride-1 input gradient is a convolution of the cotangent with the flipped kernel."""
  def xla(ct, kernel):
    return jax.vjp(lambda x_: _conv(x_, kernel, strides, pads), x)[1](ct)[0]

  kh, kw = kernel.shape[:2]
  flipped_pads = ((kh - 1 - pads[0][0], 0), (kw - 1 - pads[1][0], 0))
  if strides != (1, 1) or not _native_ok(x, kernel, flipped_pads, x.shape[-1]):
    return xla(ct, kernel)

  def fast(ct, kernel):
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    return _native_conv(ct, flipped, (1, 1), (flipped_pads[0][0], flipped_pads[1][0]),
                        x.shape[1:3])
  return native.dispatch(fast, xla, ct, kernel)


def _dense_bwd(strides, pads, res, ct):
  x, kernel = res
  dk = _kernel_grad(x, kernel, ct, strides, pads)
  return _input_grad(x, kernel, ct, strides, pads), dk.astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, kernel, strides, pads):
  return _forward(x, kernel, strides, pads)


_dense.defvjp(lambda x, kernel, strides, pads: (_forward(x, kernel, strides, pads), (x, kernel)),
              _dense_bwd)


def dense_conv2d(x, kernel, strides: tuple[int, int], pads: Pads):
  """`lax.conv_general_dilated` (NHWC, HWIO, groups=1) with the matmul kernel gradient."""
  return _dense(x, kernel, tuple(strides), tuple(tuple(p) for p in pads))
