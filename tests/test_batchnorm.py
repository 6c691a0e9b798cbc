"""tljax's BatchNorm equals flax.linen.BatchNorm: variables, outputs, running stats and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import ops
from tljax.cpu_backend import native
from tljax.models.layers import BatchNorm


def _run(module, variables, x, ct):
  def loss(params, x):
    y, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) * ct), (y, updates)
  (dparams, dx), (y, updates) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      variables['params'], x)
  return y, updates, dparams, dx


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('use_scale', [True, False])
@pytest.mark.parametrize('dtype, grad_rtol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_matches_flax_batchnorm(train, use_scale, dtype, grad_rtol):
  """XLA's reductions (the 'xla' backend): outputs bit-identical to Flax's."""
  with ops.use_backend('xla'):
    _check_against_flax(train, use_scale, dtype, grad_rtol, exact=True)


@pytest.mark.skipif(not native.available(), reason='no C++ kernels on this machine')
@pytest.mark.parametrize('use_scale', [True, False])
@pytest.mark.parametrize('shape', [(4, 5, 6, 7), (3, 9, 8, 24), (2, 30, 31, 144)])
def test_one_read_sums_match_flax_batchnorm(use_scale, shape):
  """The C++ one-read sums (the 'cpu' backend): Flax's values within float32 rounding;
  channel counts whose rows tile 16-float vectors (24) or not (7, 144)."""
  with ops.use_backend('cpu'):
    _check_against_flax(True, use_scale, jnp.float32, 1e-5, exact=False, shape=shape,
                        want_hlo='tljax_batchnorm_sums')


@pytest.mark.parametrize('train', [True, False])
def test_cpu_backend_without_native_matches_flax_batchnorm(monkeypatch, train):
  """TLJAX_NATIVE=0: the 'cpu' backend's closed-form gradient with XLA's reductions."""
  monkeypatch.setenv('TLJAX_NATIVE', '0')
  with ops.use_backend('cpu'):
    _check_against_flax(train, True, jnp.float32, 1e-5, exact=False, shape=(3, 9, 8, 24),
                        refuse_hlo='tljax_')


def _check_against_flax(train, use_scale, dtype, grad_rtol, *, exact, shape=(4, 5, 6, 7),
                        want_hlo=None, refuse_hlo=None):
  kw = dict(use_running_average=not train, epsilon=1e-3, momentum=0.9, dtype=dtype,
            use_scale=use_scale)
  x = (jax.random.normal(jax.random.key(0), shape) * 3 + 1).astype(dtype)
  ct = jax.random.normal(jax.random.key(3), x.shape)
  ref_vars = nn.BatchNorm(**kw).init(jax.random.key(1), x)
  assert (jax.tree_util.tree_structure(BatchNorm(**kw).init(jax.random.key(1), x))
          == jax.tree_util.tree_structure(ref_vars))
  noise = lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape)  # noqa: E731
  variables = jax.tree_util.tree_map(noise, ref_vars)
  ref = _run(nn.BatchNorm(**kw), variables, x, ct)
  got = _run(BatchNorm(**kw), variables, x, ct)
  assert got[0].dtype == ref[0].dtype and got[3].dtype == ref[3].dtype
  if exact:
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(ref[0], np.float32))
  else:
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
  if want_hlo or refuse_hlo:
    hlo = jax.jit(lambda v, x: _run(BatchNorm(**kw), v, x, ct)).lower(variables, x).compile()
    assert want_hlo is None or want_hlo in hlo.as_text()
    assert refuse_hlo is None or refuse_hlo not in hlo.as_text()
  rtol, atol = (1e-6, 1e-7) if exact else (1e-5, 1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(ref[1]), jax.tree_util.tree_leaves(got[1])):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
  for a, b in zip(jax.tree_util.tree_leaves((ref[2], ref[3])),
                  jax.tree_util.tree_leaves((got[2], got[3]))):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= grad_rtol * np.max(np.abs(a))
