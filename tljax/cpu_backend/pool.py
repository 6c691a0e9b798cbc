"""Max pooling that XLA:CPU runs at memory speed, with XLA's exact gradient.

`lax.reduce_window` max pooling is a scalar loop on XLA:CPU; its gradient,
select-and-scatter, is slower still. Here the pool reads the input's stride phases
(`depthwise.phases`) and takes the
maximum of K*K unit-stride windows, one fused loop. The hand-written
gradient routes each output's cotangent to the *first* window position
holding the maximum in row-major order, exactly as XLA's select-and-scatter
does; autodiff of `maximum` would split it between ties, which are common
after a ReLU (windows of zeros).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tljax.cpu_backend import depthwise

Pads = tuple[tuple[int, int], tuple[int, int]]


def _views(x, window, strides, pads):
  """(geometry, the K*K window views of x in row-major tap order; padding is -inf)."""
  g = depthwise.Geometry(x.shape[1:3], window, strides, pads)
  return g, [view for _, view in depthwise.windows(depthwise.phases(x, g, -jnp.inf), g)]


def _maximum(views):
  out = views[0]
  for view in views[1:]:
    out = jnp.maximum(out, view)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _maximum(_views(x, window, strides, pads)[1])


def _max_pool_fwd(x, window, strides, pads):
  _, views = _views(x, window, strides, pads)
  y = _maximum(views)
  # Which window position the gradient goes to: the first one holding the maximum. Kept as a
  # residual (int8, so it is materialised once) rather than recomputed per tap in the backward.
  first = jnp.full(y.shape, len(views), jnp.int8)
  for t in reversed(range(len(views))):
    first = jnp.where(views[t] == y, jnp.int8(t), first)
  return y, (x, first)   # x only for its shape and dtype: an input, alive anyway


def _max_pool_bwd(window, strides, pads, res, ct):
  x, first = res
  g = depthwise.Geometry(x.shape[1:3], window, strides, pads)
  ct = ct.astype(jnp.float32)
  terms = (((i, j), g.place(jnp.where(first == t, ct, 0.0), i, j))
           for t, (i, j) in enumerate(g.taps))
  return (depthwise.input_grad(terms, g, x.shape).astype(x.dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: int, strides: int, padding: int = 0):
  """`tljax.ops.max_pool` on the CPU backend."""
  pads = ((padding, padding), (padding, padding))
  return _max_pool(x, (window, window), (strides, strides), pads)
