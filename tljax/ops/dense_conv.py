"""A K x K convolution (groups=1) whose kernel gradient is one matmul, for XLA:CPU.

XLA:CPU runs the forward convolution and its input gradient at close to
matmul speed, but lowers the kernel gradient to a convolution over
transposed activations: it first copies the input and the cotangent into
[channels, h, w, batch] layout, a strided transpose that costs more than
the convolution itself (ResNet34 at batch 32: 0.1-0.2 s per layer-1 conv).
Here the kernel gradient is `patches^T @ cotangent` instead: the K*K shifted
views of the padded input side by side as one [pixels, K*K*in] matrix
(written once, sequentially) times the [pixels, out] cotangent, one 2-D
matmul. Forward and input gradient stay XLA's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]


def _conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def patches(x, kernel_hw, strides, pads):
  """[n*ho*wo, kh*kw*cin]: the kh*kw shifted (strided) views of the padded input, side by side.

  Also `tljax.ops.conv.im2col_conv2d`'s operand. Returns (patches, (n, ho, wo)).
  """
  (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_hw, strides, pads
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  n, hp, wp, cin = xp.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  views = [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                     (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  return jnp.concatenate(views, axis=-1).reshape(n * ho * wo, kh * kw * cin), (n, ho, wo)


def _kernel_grad(x, ct, kernel_shape, strides, pads):
  cols, _ = patches(x, kernel_shape[:2], strides, pads)
  dk = lax.dot_general(cols, ct.reshape(-1, kernel_shape[-1]), (((0,), (0,)), ((), ())),
                       preferred_element_type=jnp.float32)
  return dk.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads)


def _dense_fwd(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _dense_bwd(strides, pads, res, ct):
  x, kernel = res
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, kernel, strides, pads), x)
  dk = _kernel_grad(x, ct, kernel.shape, strides, pads)
  return input_vjp(ct)[0], dk.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_conv2d(x, kernel, strides: tuple[int, int], pads: Pads):
  """`lax.conv_general_dilated` (NHWC, HWIO, groups=1) with the matmul kernel gradient."""
  return _dense(x, kernel, tuple(strides), tuple(tuple(p) for p in pads))
