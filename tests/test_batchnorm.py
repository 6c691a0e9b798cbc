"""tljax's BatchNorm equals flax.linen.BatchNorm: variables, outputs, running stats and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  kw = dict(use_running_average=not train, epsilon=1e-3, momentum=0.9, dtype=dtype,
            use_scale=use_scale)
  x = (jax.random.normal(jax.random.key(0), (4, 5, 6, 7)) * 3 + 1).astype(dtype)
  ct = jax.random.normal(jax.random.key(3), x.shape)
  ref_vars = nn.BatchNorm(**kw).init(jax.random.key(1), x)
  assert (jax.tree_util.tree_structure(BatchNorm(**kw).init(jax.random.key(1), x))
          == jax.tree_util.tree_structure(ref_vars))
  noise = lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape)  # noqa: E731
  variables = jax.tree_util.tree_map(noise, ref_vars)
  ref = _run(nn.BatchNorm(**kw), variables, x, ct)
  got = _run(BatchNorm(**kw), variables, x, ct)
  assert got[0].dtype == ref[0].dtype and got[3].dtype == ref[3].dtype
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(ref[0], np.float32))
  for a, b in zip(jax.tree_util.tree_leaves(ref[1]), jax.tree_util.tree_leaves(got[1])):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves((ref[2], ref[3])),
                  jax.tree_util.tree_leaves((got[2], got[3]))):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= grad_rtol * np.max(np.abs(a))
