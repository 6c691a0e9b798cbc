"""The CPU backend's conv paths must be the same function as XLA's convolution.

Every case runs `ops.conv2d` (tljax/ops.py) under the 'xla' and 'cpu' backends and
compares outputs and both gradients (input and kernel); the reference is
always `lax.conv_general_dilated`, never the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import ops

from tests.conv_checks import assert_close, run_conv


def _run(impl, x, k, strides, padding, groups):
  return run_conv(impl, x, k, strides, padding, groups, seed=7)


def _inputs(n, h, w, cin, kh, kw, cout, groups, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, cin)), dtype)
  k = jnp.asarray(rng.standard_normal((kh, kw, cin // groups, cout)), dtype)
  return x, k


def _assert_same(x, k, strides, padding, groups, rtol=1e-5):
  assert_close(_run('xla', x, k, strides, padding, groups),
               _run('cpu', x, k, strides, padding, groups), rtol)


DEPTHWISE = [
    # (h, w, channels, kernel, stride, padding)
    (8, 8, 4, 3, 1, ((1, 1), (1, 1))),
    (9, 7, 3, 3, 2, ((1, 1), (1, 1))),      # odd, non-square, stride 2
    (10, 12, 5, 3, 2, ((0, 1), (0, 1))),    # TF 'SAME' on even input: asymmetric
    (11, 9, 6, 5, 2, ((1, 2), (2, 1))),     # kernel 5, explicit asymmetric
    (9, 10, 4, 5, 1, ((2, 2), (2, 2))),
    (8, 9, 3, 3, 2, 'VALID'),
    (7, 6, 2, 5, 1, 'SAME'),
    (12, 11, 3, 3, 3, ((2, 0), (0, 3))),    # stride 3, window past the last row
]


@pytest.mark.parametrize('h, w, c, kernel, stride, padding', DEPTHWISE)
def test_depthwise_matches_xla(h, w, c, kernel, stride, padding):
  x, k = _inputs(2, h, w, c, kernel, kernel, c, c)
  _assert_same(x, k, stride, padding, c)


def test_depthwise_multiplier_matches_xla():
  x, k = _inputs(2, 7, 8, 3, 3, 3, 6, 3)
  _assert_same(x, k, 2, ((1, 1), (1, 1)), 3)


@pytest.mark.parametrize('stride, padding', [(1, 'VALID'), (2, 'VALID'), (2, ((1, 0), (0, 1))),
                                             (1, 'SAME')])
def test_pointwise_matches_xla(stride, padding):
  x, k = _inputs(2, 9, 6, 16, 1, 1, 12, 1)
  _assert_same(x, k, stride, padding, 1)


@pytest.mark.parametrize('h, w, stride, padding', [(11, 10, 2, ((1, 1), (1, 1))),
                                                   (9, 9, 2, 'VALID'), (8, 7, 1, ((0, 1), (1, 0)))])
def test_rgb_stem_matches_xla(h, w, stride, padding):
  x, k = _inputs(2, h, w, 3, 3, 3, 8, 1)
  _assert_same(x, k, stride, padding, 1)


DENSE = [
    # (h, w, cin, cout, kernel, stride, padding): groups=1, kernel gradient as one matmul
    (8, 8, 8, 6, 3, 1, ((1, 1), (1, 1))),
    (9, 7, 6, 8, 3, 2, ((1, 1), (1, 1))),     # ResNet's strided 3x3, odd sizes
    (10, 12, 5, 4, 3, 2, ((0, 1), (0, 1))),   # TF 'SAME' on even input: asymmetric
    (15, 13, 3, 8, 7, 2, ((3, 3), (3, 3))),   # ResNet's 7x7 RGB stem (too deep for im2col)
    (9, 9, 8, 8, (1, 3), 1, ((0, 0), (1, 1))),  # Inception's 1x3
    (12, 11, 4, 5, 3, 3, ((2, 0), (0, 3))),   # stride 3, window past the last row
]


@pytest.mark.parametrize('h, w, cin, cout, kernel, stride, padding', DENSE)
def test_dense_conv_matches_xla(h, w, cin, cout, kernel, stride, padding):
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  x, k = _inputs(2, h, w, cin, kh, kw, cout, 1)
  _assert_same(x, k, stride, padding, 1)


@pytest.mark.parametrize('cin, cout, kernel, groups',
                         [(8, 8, 3, 1), (8, 6, 3, 2), (16, 8, (1, 3), 1)])
def test_other_convs_keep_xla_forward_and_match(cin, cout, kernel, groups):
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  x, k = _inputs(2, 7, 7, cin, kh, kw, cout, groups)
  _assert_same(x, k, 1, 'SAME', groups)
  with ops.use_backend('cpu'):
    jaxpr = str(jax.make_jaxpr(lambda x, k: ops.conv2d(x, k, padding='SAME', groups=groups))(x, k))
  assert 'conv_general_dilated' in jaxpr


@pytest.mark.parametrize('cin, cout, kernel, groups', [(6, 6, 3, 6), (8, 4, 1, 1), (3, 4, 3, 1)])
def test_cpu_backend_replaces_xla_conv(cin, cout, kernel, groups):
  x, k = _inputs(1, 6, 6, cin, kernel, kernel, cout, groups)
  with ops.use_backend('cpu'):
    jaxpr = str(jax.make_jaxpr(lambda x, k: ops.conv2d(x, k, padding='SAME', groups=groups))(x, k))
  assert 'conv_general_dilated' not in jaxpr


@pytest.mark.parametrize('c_in, c_out, kernel, stride, groups',
                         [(6, 6, 3, 1, 6), (6, 6, 5, 2, 6), (8, 12, 1, 1, 1), (3, 8, 3, 2, 1)])
def test_bf16_outputs_identical_and_grads_close(c_in, c_out, kernel, stride, groups):
  x, k = _inputs(2, 9, 8, c_in, kernel, kernel, c_out, groups, jnp.bfloat16)
  p = (kernel - 1) // 2
  ref = _run('xla', x, k, stride, ((p, p), (p, p)), groups)
  got = _run('cpu', x, k, stride, ((p, p), (p, p)), groups)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  np.testing.assert_array_equal(np.asarray(ref[0], np.float32), np.asarray(got[0], np.float32))
  for a, b in zip(ref[1:], got[1:]):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 2e-2  # a few bf16 ulps


def test_backend_selection(monkeypatch):
  monkeypatch.delenv('TLJAX_OPS', raising=False)
  assert ops.requested() == 'auto'
  assert ops.active_backend() == ('cpu' if jax.default_backend() == 'cpu' else 'xla')
  monkeypatch.setenv('TLJAX_OPS', 'xla')
  assert ops.active_backend() == 'xla'
  with ops.use_backend('cpu'):
    assert ops.active_backend() == 'cpu'
    with ops.use_backend('xla'):
      assert ops.active_backend() == 'xla'
    assert ops.active_backend() == 'cpu'
  assert ops.active_backend() == 'xla'
  monkeypatch.setenv('TLJAX_OPS', ' CPU ')
  assert ops.requested() == 'cpu' and ops.active_backend() == 'cpu'
  assert ops.requested({'TLJAX_OPS': ''}) == 'auto'
  monkeypatch.setenv('TLJAX_OPS', 'cudnn')
  with pytest.raises(ValueError, match='TLJAX_OPS'):
    ops.active_backend()
  with pytest.raises(ValueError, match='TLJAX_OPS'):
    ops.conv2d(*_inputs(1, 5, 5, 2, 3, 3, 2, 1))
  with pytest.raises(ValueError, match='use_backend'):
    with ops.use_backend('fast'):   # the old name is no backend
      pass


def test_xla_backend_is_plain_lax_conv():
  x, k = _inputs(1, 6, 6, 6, 3, 3, 6, 6)
  with ops.use_backend('xla'):
    jaxpr = str(jax.make_jaxpr(lambda x, k: ops.conv2d(x, k, padding='SAME', groups=6))(x, k))
  assert 'conv_general_dilated' in jaxpr


def test_kernel_shape_mismatch_is_explained():
  x, k = _inputs(1, 5, 5, 6, 3, 3, 6, 1)
  with pytest.raises(ValueError, match='groups=3'):
    ops.conv2d(x, k, groups=3)

