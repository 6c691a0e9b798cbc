"""Depthwise 2-D convolution as shifted multiply-adds, for XLA:CPU.

XLA:CPU lowers a grouped convolution with one channel per group to a
generic loop that reaches well under 1 GFLOP/s; the same computation written
as K*K shifted slices of the padded input, each scaled by one kernel tap and
summed, fuses into one vectorised loop (see `experiments/bench_micro.py`).

Strided convolutions first split the padded input into its stride x stride
phases (`x[a::s, b::s]`, one pass): every tap then reads one phase at unit
stride, so forward and backward are the same contiguous multiply-adds as at
stride 1 instead of strided gathers that XLA:CPU copies out one tap at a time.

Both gradients are written by hand (`jax.custom_vjp`) because autodiff's
versions are slow on XLA:CPU in two ways:
- the incoming cotangent is usually an unmaterialised expression (the
  batch-norm backward); fused into K*K shifted reads it is recomputed K*K
  times, so it is materialised once (`optimization_barrier`);
- autodiff's input gradient sums K*K zero-padded copies of the cotangent,
  a bounds check per tap per element; here the cotangent is padded once
  and every tap reads a window of it.
Arithmetic runs in float32 for every input dtype, as XLA's convolution
does, and results are cast back to the input dtype.

On CPU, when the C++ kernels are available (`native`), both passes
run there instead: the forward tiles eight output pixels per 16-channel
block, and one backward sweep reads input and cotangent once for both
gradients. The kernel gradient above needs one full pass per tap, the
largest cost of a MobileNetV2 training step on XLA:CPU. Other platforms
(and CPUs without a compiler) keep the pure-JAX formulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from tljax.cpu_backend import native

Pads = tuple[tuple[int, int], tuple[int, int]]


def _pad(x, hw_pads, value=0.0):
  (pt, pb), (pl, pr) = hw_pads
  if not (pt or pb or pl or pr):
    return x
  return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


class Geometry:
  """Sizes of a K x K window sliding over a padded input (shared with `pool`)."""

  def __init__(self, in_hw, kernel_hw, strides, pads):
    (self.kh, self.kw), (self.sh, self.sw) = kernel_hw, strides
    (pt, pb), (pl, pr) = pads
    hp, wp = in_hw[0] + pt + pb, in_hw[1] + pl + pr
    self.ho, self.wo = (hp - self.kh) // self.sh + 1, (wp - self.kw) // self.sw + 1
    if self.ho < 1 or self.wo < 1:
      raise ValueError(f'input {tuple(in_hw)} with padding {pads} is smaller than the '
                       f'{self.kh}x{self.kw} window (depthwise conv or pool).')
    # Phase arrays are hq x wq; the padded input is extended (or cut) to sh*hq x sw*wq.
    self.hq = self.ho + (self.kh - 1) // self.sh
    self.wq = self.wo + (self.kw - 1) // self.sw
    self.pads = ((pt, self.sh * self.hq - hp + pb), (pl, self.sw * self.wq - wp + pr))
    self.taps = [(i, j) for i in range(self.kh) for j in range(self.kw)]

  def phase_of(self, i, j):
    return i % self.sh, j % self.sw

  def offset_of(self, i, j):
    return i // self.sh, j // self.sw

  def place(self, a, i, j):
    """An output-shaped [n, ho, wo, c] array zero-padded to a phase's shape at tap (i, j)."""
    oi, oj = self.offset_of(i, j)
    return _pad(a, ((oi, self.hq - self.ho - oi), (oj, self.wq - self.wo - oj)))


def phases(x, g: Geometry, pad_value=0.0):
  """{(a, b): padded input rows a::sh, columns b::sw}, each [n, hq, wq, c], materialised."""
  xp = _pad(x, g.pads, pad_value)
  if (g.sh, g.sw) == (1, 1):
    return {(0, 0): xp}
  n, _, _, c = xp.shape
  used = sorted({g.phase_of(i, j) for i, j in g.taps})
  out = {(a, b): lax.slice(xp, (0, a, b, 0), (n, xp.shape[1], xp.shape[2], c),
                  (1, g.sh, g.sw, 1)) for a, b in used}
  return dict(zip(out, lax.optimization_barrier(tuple(out.values()))))


def windows(planes, g: Geometry):
  """((i, j), the [n, ho, wo, c] unit-stride window of `phases` that tap (i, j) reads)."""
  for i, j in g.taps:
    (oi, oj), src = g.offset_of(i, j), planes[g.phase_of(i, j)]
    n, _, _, c = src.shape
    yield (i, j), lax.slice(src, (0, oi, oj, 0), (n, oi + g.ho, oj + g.wo, c))


def _forward(x, kernel, g: Geometry):
  k = kernel[:, :, 0, :].astype(jnp.float32)
  acc = None
  for (i, j), view in windows(phases(x.astype(jnp.float32), g), g):
    term = view * k[i, j]
    acc = term if acc is None else acc + term
  return acc.astype(x.dtype)


def _backward(x, kernel, ct, g: Geometry):
  # The cotangent, zero-padded so that every tap's shifted copy is a unit-stride window of it.
  mi, mj = (g.kh - 1) // g.sh, (g.kw - 1) // g.sw
  ct = lax.optimization_barrier(ct.astype(jnp.float32))
  ctp = lax.optimization_barrier(_pad(ct, ((mi, g.hq - g.ho), (mj, g.wq - g.wo))))
  n, c = ct.shape[0], ct.shape[-1]

  def window(i, j):
    oi, oj = g.offset_of(i, j)
    return lax.slice(ctp, (0, mi - oi, mj - oj, 0), (n, mi - oi + g.hq, mj - oj + g.wq, c))

  planes = phases(x.astype(jnp.float32), g)
  k = kernel[:, :, 0, :].astype(jnp.float32)
  dk = _kernel_grad(planes, ct, g)
  dx = input_grad((((i, j), window(i, j) * k[i, j]) for i, j in g.taps), g, x.shape)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


def _kernel_grad(planes, ct, g: Geometry):
  """[K*K, c]: per tap, sum(phase * cotangent placed at the tap's offset).

  Padding the small cotangent to the phase's shape (rather than slicing the
  input) keeps each product-sum one reduction XLA:CPU vectorises. (Walking
  the batch in cache-sized chunks helped this op alone but not a whole step.)
  """
  return jnp.stack([jnp.sum(planes[g.phase_of(i, j)] * g.place(ct, i, j), axis=(0, 1, 2))
                    for i, j in g.taps])


def input_grad(terms, g: Geometry, x_shape):
  """The input gradient from per-tap terms ((i, j), [n, hq, wq, c] in tap (i, j)'s phase).

  Terms of one phase are summed; the phases are then interleaved back into
  the padded input's layout and the padding is cut off.
  """
  dphase = {}
  for (i, j), term in terms:
    key = g.phase_of(i, j)
    dphase[key] = term if key not in dphase else dphase[key] + term
  n, h, w, c = x_shape
  zeros = jnp.zeros((n, g.hq, g.wq, c), jnp.float32)
  rows = [jnp.stack([dphase.get((a, b), zeros) for b in range(g.sw)], axis=3)
          for a in range(g.sh)]
  dxp = jnp.stack(rows, axis=2).reshape(n, g.sh * g.hq, g.sw * g.wq, c)
  (pt, _), (pl, _) = g.pads
  dxp = _pad(dxp, ((0, max(0, pt + h - dxp.shape[1])), (0, max(0, pl + w - dxp.shape[2]))))
  return lax.slice(dxp, (0, pt, pl, 0), (n, pt + h, pl + w, c))


def _geometry(x, kernel, strides, pads) -> Geometry:
  return Geometry(x.shape[1:3], kernel.shape[:2], strides, pads)


def _native_attrs(g: Geometry):
  (pt, _), (pl, _) = g.pads
  return dict(sh=g.sh, sw=g.sw, pt=pt, pl=pl)


def _native_forward(x, kernel, g: Geometry):
  n, _, _, c = x.shape
  y = native.call('tljax_depthwise_forward', jax.ShapeDtypeStruct((n, g.ho, g.wo, c), jnp.float32),
                  x.astype(jnp.float32), kernel[:, :, 0, :].astype(jnp.float32),
                  **_native_attrs(g))
  return y.astype(x.dtype)


def _native_backward(x, kernel, ct, g: Geometry):
  f32 = jnp.float32
  dx, dk = native.call('tljax_depthwise_backward',
                       (jax.ShapeDtypeStruct(x.shape, f32),
                        jax.ShapeDtypeStruct(kernel.shape[:2] + kernel.shape[3:], f32)),
                       x.astype(f32), kernel[:, :, 0, :].astype(f32), ct.astype(f32),
                       **_native_attrs(g))
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


def _on_platform(native_fn, jax_fn, g: Geometry, *args):
  (pt, _), (pl, _) = g.pads
  if pt < 0 or pl < 0:
    return jax_fn(*args, g)
  return native.dispatch(lambda *a: native_fn(*a, g), lambda *a: jax_fn(*a, g), *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, pads):
  return _on_platform(_native_forward, _forward, _geometry(x, kernel, strides, pads), x, kernel)


def _depthwise_fwd(x, kernel, strides, pads):
  return _depthwise(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, res, ct):
  x, kernel = res
  return _on_platform(_native_backward, _backward, _geometry(x, kernel, strides, pads),
                      x, kernel, ct)


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
