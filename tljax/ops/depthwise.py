"""Depthwise 2-D convolution as shifted multiply-adds, for XLA:CPU.

XLA:CPU lowers a grouped convolution with one channel per group to a
generic loop that reaches well under 1 GFLOP/s; the same computation written
as K*K strided slices of the padded input, each scaled by one kernel tap and
summed, fuses into one vectorised loop (13-28x faster than XLA's grouped
convolution forward and backward at batch 32, see `experiments/bench_micro.py`).

Backward: the input gradient is JAX's own transpose of pad + slice +
multiply-add, one fused loop (a hand-written one, the shifted multiply-add
on the dilated cotangent with the flipped kernel, measured no faster). The
kernel gradient is hand-written: autodiff's version makes XLA:CPU copy a
padded, shifted input per tap before reducing it; summing row products
first halves that at stride 1. Arithmetic runs in float32 for float32 and
lower-precision inputs alike, as XLA's convolution does, and the result is
cast back to the input dtype (bf16 outputs are bit-identical to XLA's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int]]


def _pad_hw(x, pads: Pads):
  (pt, pb), (pl, pr) = pads
  if not (pt or pb or pl or pr):
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def _shifted_mac(x, kernel, strides: tuple[int, int], pads: Pads):
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  xp = _pad_hw(x, pads)
  n, hp, wp, c = xp.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f'depthwise conv: input {x.shape[1:3]} with padding {pads} is smaller '
                     f'than the {kh}x{kw} kernel.')
  k = kernel[:, :, 0, :].astype(jnp.float32)
  acc = None
  for i in range(kh):
    for j in range(kw):
      view = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                       (1, sh, sw, 1))
      term = view.astype(jnp.float32) * k[i, j]
      acc = term if acc is None else acc + term
  return acc.astype(x.dtype)


def _kernel_grad(x, ct, kernel_shape, strides: tuple[int, int], pads: Pads):
  """d loss / d kernel: one multiply-reduce of a shifted input view and the cotangent per tap.

  At stride 1 the sum over output rows is unrolled into adds of row slices
  before the final reduction: XLA:CPU then streams each tap once instead of
  materialising a shifted copy of the input for a reduction (2x faster).
  """
  kh, kw = kernel_shape[:2]
  sh, sw = strides
  xp = _pad_hw(x, pads).astype(jnp.float32)
  ct = ct.astype(jnp.float32)
  n, ho, wo, c = ct.shape
  rows = []
  for i in range(kh):
    for j in range(kw):
      view = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                       (1, sh, sw, 1))
      if strides == (1, 1):
        acc = view[:, 0] * ct[:, 0]
        for o in range(1, ho):
          acc = acc + view[:, o] * ct[:, o]
        rows.append(jnp.sum(acc, axis=(0, 1)))
      else:
        rows.append(jnp.sum(view * ct, axis=(0, 1, 2)))
  return jnp.stack(rows).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, pads):
  return _shifted_mac(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
  return _shifted_mac(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, res, ct):
  x, kernel = res
  _, input_vjp = jax.vjp(lambda x_: _shifted_mac(x_, kernel, strides, pads), x)
  dk = _kernel_grad(x, ct, kernel.shape, strides, pads)
  return input_vjp(ct)[0], dk.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(x, kernel, strides: tuple[int, int], pads: Pads):
  """`feature_group_count == in_channels` convolution; kernel [kh, kw, 1, C * multiplier].

  A depth multiplier m > 1 (output channel c*m + r reads input channel c, as
  in XLA's and torch's grouped convolution) repeats each input channel m
  times first.
  """
  cin, cout = x.shape[-1], kernel.shape[-1]
  if kernel.shape[2] != 1 or cout % cin:
    raise ValueError(f'depthwise kernel must be [kh, kw, 1, C*m] for C={cin}, got {kernel.shape}')
  if cout != cin:
    x = jnp.repeat(x, cout // cin, axis=-1)
  return _depthwise(x, kernel, tuple(strides), tuple(tuple(p) for p in pads))
