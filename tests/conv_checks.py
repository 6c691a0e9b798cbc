"""Runs a conv under one implementation and compares it with XLA's (shared by the conv tests)."""

import jax
import jax.numpy as jnp
import numpy as np

from tljax import ops


def run_conv(impl, x, k, strides, padding, groups, *, seed, hlo=False):
  """(y, dy/dx, dy/dk) of sum(conv(x, k) * cotangent) under ops backend `impl` ('xla' or
  'cpu'), and the compiled HLO text if `hlo`.

  The cotangent is drawn from `seed`, so the 'xla' and 'cpu' runs of one case share it.
  """
  def loss(x, k, ct):
    y = ops.conv2d(x, k, strides=strides, padding=padding, groups=groups)
    return jnp.sum(y.astype(jnp.float32) * ct), y

  with ops.use_backend(impl):
    shape = jax.eval_shape(lambda x, k: loss(x, k, 0.0)[1], x, k).shape
    ct = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y), (dx, dk) = fn(x, k, ct)
    if not hlo:
      return y, dx, dk
    return (y, dx, dk), fn.lower(x, k, ct).compile().as_text()


def assert_close(ref, got, rtol=1e-5):
  """Same shapes and dtypes; each of output and gradients within `rtol` of its largest value."""
  for name, a, b in zip(('output', 'input grad', 'kernel grad'), ref, got):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    err = np.max(np.abs(a - b)) / np.max(np.abs(a))
    assert err <= rtol, f'{name}: relative error {err:.2e}'
