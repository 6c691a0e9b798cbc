"""The CPU backend's max pool equals XLA's reduce_window pool: values and select-and-scatter
gradients (`ops.max_pool` under the 'cpu' and 'xla' backends)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import ops


def _value_and_grad(impl, x, ct, window, strides, padding):
  def f(x):
    return jnp.sum(ops.max_pool(x, window, strides, padding) * ct)
  with ops.use_backend(impl):
    y = jax.jit(lambda x: ops.max_pool(x, window, strides, padding))(x)
    return y, jax.jit(jax.grad(f))(x)


@pytest.mark.parametrize('h, w, window, strides, padding', [
    (12, 12, 3, 2, 1),     # ResNet's stem pool
    (11, 9, 3, 2, 1),      # odd sizes
    (13, 13, 3, 2, 0),     # Inception's 'valid' pools
    (10, 7, 2, 2, 0),
    (9, 9, 3, 1, 1),
    (8, 8, 3, 3, 0),
])
def test_cpu_max_pool_matches_xla_with_ties(h, w, window, strides, padding):
  rng = np.random.default_rng(h * 100 + w)
  # Few distinct values, many zeros (a ReLU's output): ties in most windows.
  x = jnp.asarray(np.maximum(rng.integers(-3, 3, (2, h, w, 5)), 0).astype(np.float32))
  probe = ops.max_pool(x, window, strides, padding)
  ct = jnp.asarray(rng.standard_normal(probe.shape).astype(np.float32))
  y_ref, g_ref = _value_and_grad('xla', x, ct, window, strides, padding)
  y, g = _value_and_grad('cpu', x, ct, window, strides, padding)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0, atol=1e-6)
  assert float(jnp.sum(g != 0)) > 0


def test_cpu_max_pool_bf16_and_negative_inputs():
  x = -jnp.abs(jax.random.normal(jax.random.key(0), (2, 9, 9, 4))).astype(jnp.bfloat16)
  ct = jnp.ones((2, 5, 5, 4), jnp.bfloat16)
  y_ref, g_ref = _value_and_grad('xla', x, ct, 3, 2, 1)
  y, g = _value_and_grad('cpu', x, ct, 3, 2, 1)
  assert y.dtype == jnp.bfloat16 and g.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))


@pytest.mark.parametrize('backend, reduce_window', [('xla', True), ('cpu', False)])
def test_backend_decides_the_formulation(backend, reduce_window):
  x = jnp.zeros((1, 8, 8, 2))
  with ops.use_backend(backend):
    jaxpr = str(jax.make_jaxpr(lambda x: ops.max_pool(x, 3, 2, 1))(x))
  assert ('reduce_window' in jaxpr) == reduce_window
