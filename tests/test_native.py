"""The C++ CPU kernels (`tljax.ops.native`): built, used, exact, and optional.

References are XLA's own grouped convolution and its autodiff gradients,
never the code under test.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.ops import conv, native

from tests.conv_checks import assert_close, run_conv

HAS_COMPILER = native._compiler() is not None


@pytest.fixture
def pure_jax(monkeypatch):
  monkeypatch.setenv('TLJAX_NATIVE', '0')


def _run(impl, x, k, stride, padding, groups=None):
  """((y, dx, dk), compiled HLO text); `groups` defaults to depthwise."""
  groups = x.shape[-1] if groups is None else groups
  return run_conv(impl, x, k, stride, padding, groups, seed=3, hlo=True)


# Wide enough for the 8-pixel tiles and the edge columns; channel counts with and without a
# tail past the last 16-channel block.
CASES = [
    # (n, h, w, channels, kernel, stride, padding)
    (2, 13, 21, 35, 3, 1, 'SAME'),
    (2, 20, 19, 48, 3, 2, ((0, 1), (0, 1))),     # TF 'SAME' at stride 2
    (2, 17, 18, 40, 5, 2, ((2, 2), (2, 2))),
    (3, 12, 30, 32, 5, 1, ((2, 2), (2, 2))),
    (1, 9, 25, 17, 3, 3, ((2, 0), (0, 3))),      # stride 3, asymmetric
    (2, 11, 26, 16, 3, 1, 'VALID'),
    (2, 3, 4, 20, 5, 1, ((2, 2), (2, 2))),       # window wider than the image
]


def _inputs(n, h, w, c, kernel, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((n, h, w, c)), dtype),
          jnp.asarray(rng.standard_normal((kernel, kernel, 1, c)), dtype))


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_kernels_build_where_a_compiler_exists():
  assert native.available(), 'a compiler exists but the C++ kernels did not build'


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('n, h, w, c, kernel, stride, padding', CASES)
def test_native_depthwise_matches_xla(n, h, w, c, kernel, stride, padding):
  x, k = _inputs(n, h, w, c, kernel)
  ref, _ = _run('xla', x, k, stride, padding)
  got, hlo = _run('fast', x, k, stride, padding)
  assert 'tljax_depthwise_forward' in hlo and 'tljax_depthwise_backward' in hlo
  assert_close(ref, got)


@pytest.mark.parametrize('n, h, w, c, kernel, stride, padding', CASES[:3])
def test_pure_jax_depthwise_without_native(pure_jax, n, h, w, c, kernel, stride, padding):
  x, k = _inputs(n, h, w, c, kernel)
  ref, _ = _run('xla', x, k, stride, padding)
  got, hlo = _run('fast', x, k, stride, padding)
  assert 'tljax_depthwise' not in hlo
  assert_close(ref, got)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_native_bf16_matches_xla():
  x, k = _inputs(2, 10, 19, 24, 3, jnp.bfloat16)
  ref, _ = _run('xla', x, k, 2, 'SAME')
  got, hlo = _run('fast', x, k, 2, 'SAME')
  assert 'tljax_depthwise_forward' in hlo
  assert_close(ref, got, rtol=1e-2)


def test_bad_switch_is_explained(monkeypatch):
  monkeypatch.setenv('TLJAX_NATIVE', 'maybe')
  with pytest.raises(ValueError, match='TLJAX_NATIVE=.maybe.*use 1.*or 0'):
    native.library()


def test_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
  broken = tmp_path / 'broken-c++'
  broken.write_text('#!/bin/sh\necho "broken-c++: internal error" >&2\nexit 1\n')
  broken.chmod(0o755)
  monkeypatch.setenv('CXX', str(broken))
  monkeypatch.setenv('TLJAX_CACHE_DIR', str(tmp_path / 'cache'))
  native._load.cache_clear()
  try:
    with pytest.warns(UserWarning, match=r'(?s)could not build.*broken-c\+\+: internal error'):
      assert native.library() is None
    x, k = _inputs(1, 6, 9, 18, 3)
    ref, _ = _run('xla', x, k, 1, 'SAME')
    got, hlo = _run('fast', x, k, 1, 'SAME')
    assert 'tljax_depthwise' not in hlo
    assert_close(ref, got)
    assert not list((tmp_path / 'cache').rglob('*.so')), 'a failed build left a library behind'
  finally:
    native._load.cache_clear()


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_build_is_cached_by_source(tmp_path, monkeypatch):
  monkeypatch.setenv('TLJAX_CACHE_DIR', str(tmp_path))
  first = native._build(native._compiler())
  mtime = first.stat().st_mtime_ns
  assert native._build(native._compiler()) == first and first.stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.rglob('*') if p.is_file()] == [first.name]


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_unusable_cache_dir_falls_back_to_temp(tmp_path, monkeypatch):
  blocker = tmp_path / 'a-file'
  blocker.write_text('not a folder')
  monkeypatch.setenv('TLJAX_CACHE_DIR', str(blocker / 'cache'))
  monkeypatch.setattr(native.tempfile, 'gettempdir', lambda: str(tmp_path / 'tmp'))
  built = native._build(native._compiler())
  assert built.parent == tmp_path / 'tmp' / f'tljax-native-{os.getuid()}' and built.exists()


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_native_kernels_under_pmap_on_several_devices(tmp_path):
  """Several CPU devices call the kernels at once and share XLA's thread pool."""
  script = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      from tljax.ops import conv
      assert jax.local_device_count() == 4
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.standard_normal((4, 3, 14, 18, 32)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((3, 3, 1, 32)), jnp.float32)
      def grads(impl):
        def loss(x, k):
          with conv.conv_impl(impl):
            return jnp.sum(jnp.square(conv.conv2d(x, k, strides=2, padding='SAME', groups=32)))
        return jax.pmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(x, k)
      for a, b in zip(grads('xla'), grads('fast')):
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
        assert err < 1e-5, err
      print('ok')
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                        timeout=300, cwd=pathlib.Path(__file__).parent.parent)
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]


DENSE = [
    # (n, h, w, cin, cout, kh, kw, stride, padding)
    (2, 13, 11, 35, 48, 3, 3, 1, 'SAME'),          # channel tails in the tiles
    (2, 14, 15, 16, 32, 3, 3, 2, ((0, 1), (0, 1))),  # TF 'SAME' at stride 2
    (3, 9, 10, 24, 16, 5, 5, 2, ((2, 2), (2, 2))),
    (1, 9, 17, 20, 64, 1, 7, 1, ((0, 0), (3, 3))),   # Inception's 1x7 and 7x1
    (2, 17, 9, 40, 80, 7, 1, 1, ((3, 3), (0, 0))),
    (2, 11, 12, 300, 32, 3, 3, 1, ((1, 1), (1, 1))),  # deeper than one 256-channel pass
    (2, 12, 12, 200, 112, 3, 3, 1, 'SAME'),  # kernel gradient in channel blocks (64 + 48) x 3 slots
    (1, 10, 9, 16, 16, 3, 3, 3, ((2, 0), (0, 3))),    # stride 3, asymmetric
    (2, 8, 8, 32, 32, 3, 3, 1, 'VALID'),
]


def _dense_run(impl, x, k, stride, padding):
  return _run(impl, x, k, stride, padding, groups=1)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('n, h, w, cin, cout, kh, kw, stride, padding', DENSE)
def test_native_dense_conv_matches_xla(n, h, w, cin, cout, kh, kw, stride, padding):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)), jnp.float32)
  ref, _ = _dense_run('xla', x, k, stride, padding)
  got, hlo = _dense_run('fast', x, k, stride, padding)
  assert 'tljax_conv_forward' in hlo and 'tljax_conv_kernel_grad' in hlo
  assert_close(ref, got)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('cin, kernel, stride, padding', [
    (3, 7, 2, ((3, 3), (3, 3))),     # ResNet's RGB stem: taps merged along the width
    (2, 5, 1, 'SAME'),
    (3, 5, 1, ((0, 2), (1, 0))),
    (3, 3, 2, ((1, 1), (1, 1))),     # MobileNet's stem: C++ conv, not im2col's nine copies
])
def test_native_few_channel_conv_matches_xla(cin, kernel, stride, padding):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 23, 21, cin)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kernel, kernel, cin, 64)), jnp.float32)
  ref, _ = _dense_run('xla', x, k, stride, padding)
  got, hlo = _dense_run('fast', x, k, stride, padding)
  assert 'tljax_conv_forward' in hlo and 'tljax_conv_kernel_grad' in hlo
  assert_close(ref, got)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_shallow_stem_takes_the_cpp_conv_only_where_it_runs(monkeypatch):
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  lowered = lambda k: jax.jit(lambda x, k: conv.conv2d(x, k, strides=2, padding='SAME')).lower(
      x, k).as_text()
  with conv.conv_impl('fast'):
    assert 'tljax_conv_forward' in lowered(jnp.zeros((3, 3, 3, 32), jnp.float32))
    im2col = lowered(jnp.zeros((3, 3, 3, 24), jnp.float32))      # 24 outputs: not for C++
    assert 'tljax_conv' not in im2col and 'concatenate' in im2col
    monkeypatch.setenv('TLJAX_NATIVE', '0')
    assert 'tljax_conv' not in lowered(jnp.zeros((3, 3, 3, 32), jnp.float32))


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_dense_conv_outside_native_limits_keeps_other_paths():
  """Output channels that are not a multiple of 16: no C++ conv, same results."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 15, 15, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((7, 7, 32, 24)), jnp.float32)
  ref, _ = _dense_run('xla', x, k, 2, ((3, 3), (3, 3)))
  got, hlo = _dense_run('fast', x, k, 2, ((3, 3), (3, 3)))
  assert 'tljax_conv' not in hlo
  assert_close(ref, got)


STATS_CASES = [
    # (n, h, w, cin, cout, kernel, stride, padding)
    (2, 13, 11, 35, 48, 3, 1, 'SAME'),               # a 16-channel tail, a partial last tile
    (2, 11, 12, 300, 32, 3, 1, ((1, 1), (1, 1))),     # summed in the last of several passes
    (2, 23, 21, 3, 64, 7, 2, ((3, 3), (3, 3))),       # the merged RGB stem
]


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('n, h, w, cin, cout, kernel, stride, padding', STATS_CASES)
def test_native_conv_statistics_are_its_outputs_sums(n, h, w, cin, cout, kernel, stride, padding):
  """`conv2d_with_stats`: sums equal float64 sums of XLA's output; gradients are conv2d's."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)), jnp.float32)
  xla_conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  with conv.conv_impl('fast'):
    fn = jax.jit(lambda x, k: conv.conv2d_with_stats(x, k, strides=stride, padding=padding))
    y, stats = fn(x, k)
    hlo = fn.lower(x, k).compile().as_text()
    ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    loss = lambda x, k: jnp.sum(ct * conv.conv2d_with_stats(  # noqa: E731
        x, k, strides=stride, padding=padding)[0])
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k)
  assert 'tljax_conv_forward_stats' in hlo
  ref_y = xla_conv(x, k)
  assert_close((ref_y,), (y,))
  y64 = np.asarray(ref_y, np.float64)
  np.testing.assert_allclose(stats[0], y64.sum((0, 1, 2)), rtol=0,
                             atol=1e-5 * np.abs(y64).sum((0, 1, 2)).max())
  np.testing.assert_allclose(stats[1], (y64 * y64).sum((0, 1, 2)), rtol=1e-5)
  xla_grads = jax.grad(lambda x, k: jnp.sum(ct * xla_conv(x, k)), argnums=(0, 1))(x, k)
  assert_close(xla_grads, grads)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('cin, strides, downsample', [(32, 1, False), (16, 2, True)])
def test_resnet_block_trains_the_same_with_conv_statistics(cin, strides, downsample):
  """BatchNorm fed by the C++ conv's sums: same loss, running statistics and gradients
  as XLA's convs with BatchNorm's own reductions."""
  from tljax.models import resnet
  block = resnet.Block(32, bottleneck=False, strides=strides, downsample=downsample)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 14, 13, cin)), jnp.float32)
  variables = block.init(jax.random.key(0), x)

  def run(impl):
    def loss(params):
      y, updates = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                               train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y)), updates
    with conv.conv_impl(impl):
      fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
      return fn(variables['params']), fn.lower(variables['params']).compile().as_text()

  (ref, _), (got, hlo) = run('xla'), run('fast')
  assert hlo.count('custom_call_target="tljax_conv_forward_stats"') == 2
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, np.max(np.abs(a))), (a, b)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('cin, strides, downsample', [(32, 1, False), (16, 2, True)])
def test_resnet_block_inference_is_one_conv_pass_per_unit(cin, strides, downsample):
  """Inference: each 3x3 conv applies BatchNorm, residual and ReLU itself; outputs and the
  gradients of a frozen-statistics fine-tune equal XLA's unfused path."""
  from tljax.models import resnet
  block = resnet.Block(32, bottleneck=False, strides=strides, downsample=downsample)
  x = jnp.asarray(np.random.default_rng(8).standard_normal((4, 14, 13, cin)), jnp.float32)
  variables = block.init(jax.random.key(0), x)
  noise = lambda a: a + 0.3 * jax.random.uniform(jax.random.key(1), a.shape)  # noqa: E731
  variables = jax.tree_util.tree_map(noise, variables)

  def run(impl):
    apply = lambda params, x: block.apply(  # noqa: E731
        {'params': params, 'batch_stats': variables['batch_stats']}, x, train=False)
    loss = lambda params: jnp.sum(jnp.sin(apply(params, x)))  # noqa: E731
    with conv.conv_impl(impl):
      y = jax.jit(apply)(variables['params'], x)
      grads = jax.jit(jax.grad(loss))(variables['params'])
      return (y, grads), jax.jit(apply).lower(variables['params'], x).compile().as_text()

  (ref, _), (got, hlo) = run('xla'), run('fast')
  assert hlo.count('custom_call_target="tljax_conv_forward_affine"') == 2
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, np.max(np.abs(a))), (a, b)


BN_ACT_CASES = [
    # (cin, cout, kernel, stride, padding, residual, relu)
    (35, 48, 3, 1, 'SAME', True, True),
    (300, 32, 3, 2, ((1, 1), (1, 1)), False, True),     # epilogue after several passes
    (3, 64, 7, 2, ((3, 3), (3, 3)), False, False),      # the merged RGB stem
]


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('cin, cout, kernel, stride, padding, residual, relu', BN_ACT_CASES)
def test_native_conv_bn_act_matches_unfused(cin, cout, kernel, stride, padding, residual, relu):
  """Inference BatchNorm, residual and ReLU in the C++ conv's output pass: the unfused
  XLA result; under autodiff the unfused form runs, with XLA's gradients."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 15, 14, cin)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)), jnp.float32)
  c = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, cout), jnp.float32)  # noqa: E731
  bn = dict(mean=c(-2, 2), var=c(0.5, 3), scale=c(-1.5, 1.5), bias=c(-1, 1), eps=1e-5)
  out_shape = jax.eval_shape(lambda x, k: conv.conv2d(x, k, strides=stride, padding=padding),
                             x, k).shape
  res = jnp.asarray(rng.standard_normal(out_shape), jnp.float32) if residual else None
  ct = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

  def run(impl):
    fn = lambda x, k, res, scale: conv.conv2d_bn_act(  # noqa: E731
        x, k, **{**bn, 'scale': scale}, residual=res, relu=relu, strides=stride, padding=padding)
    loss = lambda *a: jnp.sum(ct * fn(*a))  # noqa: E731
    with conv.conv_impl(impl):
      y = jax.jit(fn)(x, k, res, bn['scale'])
      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 3)))(x, k, res, bn['scale'])
      return (y, grads, jax.jit(fn).lower(x, k, res, bn['scale']).compile().as_text(),
              jax.jit(jax.grad(loss)).lower(x, k, res, bn['scale']).compile().as_text())

  ref, got = run('xla'), run('fast')
  assert 'tljax_conv_forward_affine' in got[2] and 'tljax_conv_forward_affine' not in got[3]
  assert_close((ref[0],), (got[0],))
  assert_close(ref[1], got[1])


DEPTHWISE_BN_ACT_CASES = [
    # (channels, kernel, stride, padding, relu, clip)
    (24, 3, 1, ((1, 1), (1, 1)), False, (0.0, 6.0)),   # ReLU6; a 16-block and an 8-lane tail
    (32, 3, 2, ((0, 1), (0, 1)), True, None),          # TF 'SAME' at stride 2, ReLU
    (16, 5, 1, 'SAME', False, None),                   # BatchNorm only (no activation)
]


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('c, kernel, stride, padding, relu, clip', DEPTHWISE_BN_ACT_CASES)
def test_native_depthwise_bn_act_matches_unfused(c, kernel, stride, padding, relu, clip):
  """MobileNet's depthwise unit at inference: BatchNorm and ReLU/ReLU6 in the C++ depthwise
  kernel's output pass give the unfused XLA result; under autodiff the unfused form runs."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, 13, 12, c)) * 3, jnp.float32)
  k = jnp.asarray(rng.standard_normal((kernel, kernel, 1, c)), jnp.float32)
  v = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, c), jnp.float32)  # noqa: E731
  bn = dict(mean=v(-2, 2), var=v(0.5, 3), scale=v(-3, 3), bias=v(-1, 4), eps=1e-3)
  out_shape = jax.eval_shape(
      lambda x, k: conv.conv2d(x, k, strides=stride, padding=padding, groups=c), x, k).shape
  ct = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

  def run(impl):
    fn = lambda x, k, scale: conv.conv2d_bn_act(  # noqa: E731
        x, k, **{**bn, 'scale': scale}, relu=relu, clip=clip, strides=stride, padding=padding,
        groups=c)
    loss = lambda *a: jnp.sum(ct * fn(*a))  # noqa: E731
    with conv.conv_impl(impl):
      y = jax.jit(fn)(x, k, bn['scale'])
      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, k, bn['scale'])
      return (y, grads, jax.jit(fn).lower(x, k, bn['scale']).compile().as_text(),
              jax.jit(jax.grad(loss)).lower(x, k, bn['scale']).compile().as_text())

  ref, got = run('xla'), run('fast')
  assert 'tljax_depthwise_forward_affine' in got[2]
  assert 'tljax_depthwise_forward_affine' not in got[3]
  if clip is not None:   # the clip is exercised at both ends
    assert float(jnp.min(ref[0])) == clip[0] and float(jnp.max(ref[0])) == clip[1]
  assert_close((ref[0],), (got[0],))
  assert_close(ref[1], got[1])


_DETERMINISM_SCRIPT = textwrap.dedent('''
    import hashlib, os, sys
    os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')})
    import jax, jax.numpy as jnp, numpy as np
    from tljax.ops import batchnorm, conv
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    for groups, cin, cout in ((48, 48, 48), (1, 32, 64), (1, 3, 64), (1, 200, 112)):
      x = jnp.asarray(rng.standard_normal((8, 20, 20, cin)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((3, 3, cin // groups, cout)), jnp.float32)
      loss = lambda x, k: jnp.sum(jnp.sin(conv.conv2d(x, k, strides=1, padding='SAME',
                                                       groups=groups)))
      for g in jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k):
        digest.update(np.asarray(g).tobytes())
      if groups == 1 and cin > 3:
        with_stats = jax.jit(lambda x, k: conv.conv2d_with_stats(x, k, padding='SAME')[1])
        digest.update(np.asarray(with_stats(x, k)).tobytes())
      bn_loss = lambda x: jnp.sum(jnp.sin(batchnorm.normalize_train(  # noqa: E731
          x, jnp.ones(cin), jnp.zeros(cin), 1e-5)[0]))
      digest.update(np.asarray(jax.jit(jax.grad(bn_loss))(x)).tobytes())
    print(digest.hexdigest())
''')


@pytest.mark.skipif(not HAS_COMPILER or len(os.sched_getaffinity(0)) < 2,
                    reason='needs a C++ compiler and two CPUs')
def test_native_gradients_do_not_depend_on_threads():
  """Kernel gradients are sums over pixels: bit-identical with one thread or two, every run."""
  cpus = sorted(os.sched_getaffinity(0))[:2]
  digests = []
  for allowed in ([cpus[0]], cpus, cpus):
    proc = subprocess.run([sys.executable, '-c', _DETERMINISM_SCRIPT,
                           ','.join(map(str, allowed))], capture_output=True, text=True,
                          timeout=300, cwd=pathlib.Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests.append(proc.stdout.strip())
  assert len(set(digests)) == 1, digests


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_native_kernels_under_vmap():
  """vmap (per-example gradients, a pmap emulated with vmap) runs the kernels per element."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((3, 2, 9, 11, 32)), jnp.float32)
  kd = jnp.asarray(rng.standard_normal((3, 3, 1, 32)), jnp.float32)
  kc = jnp.asarray(rng.standard_normal((3, 3, 32, 16)), jnp.float32)

  def grads(impl):
    def loss(x, kd, kc):
      with conv.conv_impl(impl):
        y = conv.conv2d(x, kd, strides=2, padding='SAME', groups=32)
        return jnp.sum(jnp.square(conv.conv2d(y, kc, strides=1, padding='SAME')))
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None)))(
        x, kd, kc)

  for a, b in zip(grads('xla'), grads('fast')):
    assert a.shape == b.shape
    assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 1e-5
