"""The C++ CPU kernels (`tljax.cpu_backend.native`): built, used, exact, and optional.

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

from tljax import ops
from tljax.cpu_backend import native

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
  got, hlo = _run('cpu', x, k, stride, padding)
  assert 'tljax_depthwise_forward' in hlo and 'tljax_depthwise_backward' in hlo
  assert_close(ref, got)


@pytest.mark.parametrize('n, h, w, c, kernel, stride, padding', CASES[:3])
def test_pure_jax_depthwise_without_native(pure_jax, n, h, w, c, kernel, stride, padding):
  x, k = _inputs(n, h, w, c, kernel)
  ref, _ = _run('xla', x, k, stride, padding)
  got, hlo = _run('cpu', x, k, stride, padding)
  assert 'tljax_depthwise' not in hlo
  assert_close(ref, got)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_native_bf16_matches_xla():
  x, k = _inputs(2, 10, 19, 24, 3, jnp.bfloat16)
  ref, _ = _run('xla', x, k, 2, 'SAME')
  got, hlo = _run('cpu', x, k, 2, 'SAME')
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
    got, hlo = _run('cpu', x, k, 1, 'SAME')
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
      from tljax import ops
      assert jax.local_device_count() == 4
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.standard_normal((4, 3, 14, 18, 32)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((3, 3, 1, 32)), jnp.float32)
      def grads(impl):
        def loss(x, k):
          with ops.use_backend(impl):
            return jnp.sum(jnp.square(ops.conv2d(x, k, strides=2, padding='SAME', groups=32)))
        return jax.pmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(x, k)
      for a, b in zip(grads('xla'), grads('cpu')):
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
  got, hlo = _dense_run('cpu', x, k, stride, padding)
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
  got, hlo = _dense_run('cpu', x, k, stride, padding)
  assert 'tljax_conv_forward' in hlo and 'tljax_conv_kernel_grad' in hlo
  assert_close(ref, got)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
def test_shallow_stem_takes_the_cpp_conv_only_where_it_runs(monkeypatch):
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  lowered = lambda k: jax.jit(lambda x, k: ops.conv2d(x, k, strides=2, padding='SAME')).lower(
      x, k).as_text()
  with ops.use_backend('cpu'):
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
  got, hlo = _dense_run('cpu', x, k, 2, ((3, 3), (3, 3)))
  assert 'tljax_conv' not in hlo
  assert_close(ref, got)


@pytest.mark.skipif(not HAS_COMPILER, reason='no C++ compiler on this machine')
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('cin, strides, downsample', [(32, 1, False), (16, 2, True)])
def test_resnet_block_matches_xla(cin, strides, downsample, train):
  """A ResNet block (conv -> BatchNorm -> ReLU, residual) on the CPU backend: the C++ convs
  and, in training, the BatchNorm sums; same output, running statistics and gradients as
  plain XLA ops."""
  from tljax.models import resnet
  block = resnet.Block(32, bottleneck=False, strides=strides, downsample=downsample)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 14, 13, cin)), jnp.float32)
  variables = block.init(jax.random.key(0), x)
  noise = lambda a: a + 0.3 * jax.random.uniform(jax.random.key(1), a.shape)  # noqa: E731
  variables = jax.tree_util.tree_map(noise, variables)

  def run(impl):
    def loss(params):
      y, updates = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                               train=train, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y)), (y, updates)
    with ops.use_backend(impl):
      fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
      return fn(variables['params']), fn.lower(variables['params']).compile().as_text()

  (ref, _), (got, hlo) = run('xla'), run('cpu')
  assert 'tljax_conv_forward' in hlo and 'tljax_conv_kernel_grad' in hlo
  assert ('tljax_batchnorm_sums' in hlo) == train
  for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, np.max(np.abs(a))), (a, b)


_DETERMINISM_SCRIPT = textwrap.dedent('''
    import hashlib, os, sys
    os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')})
    import jax, jax.numpy as jnp, numpy as np
    from tljax import ops
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    for groups, cin, cout in ((48, 48, 48), (1, 32, 64), (1, 3, 64), (1, 200, 112)):
      x = jnp.asarray(rng.standard_normal((8, 20, 20, cin)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((3, 3, cin // groups, cout)), jnp.float32)
      with ops.use_backend('cpu'):
        loss = lambda x, k: jnp.sum(jnp.sin(ops.conv2d(x, k, strides=1, padding='SAME',
                                                       groups=groups)))
        for g in jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k):
          digest.update(np.asarray(g).tobytes())
        bn = lambda x: ops.batch_norm_train(x, jnp.ones(cin), jnp.zeros(cin), 1e-5)  # noqa: E731
        for stat in jax.jit(bn)(x)[1:]:
          digest.update(np.asarray(stat).tobytes())
        bn_loss = lambda x: jnp.sum(jnp.sin(bn(x)[0]))  # noqa: E731
        digest.update(np.asarray(jax.jit(jax.grad(bn_loss))(x)).tobytes())
    print(digest.hexdigest())
''')


@pytest.mark.skipif(not HAS_COMPILER or len(os.sched_getaffinity(0)) < 2,
                    reason='needs a C++ compiler and two CPUs')
def test_native_gradients_do_not_depend_on_threads():
  """Kernel gradients and BatchNorm statistics are sums over pixels: bit-identical with one
  thread or two, every run."""
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
      with ops.use_backend(impl):
        y = ops.conv2d(x, kd, strides=2, padding='SAME', groups=32)
        return jnp.sum(jnp.square(ops.conv2d(y, kc, strides=1, padding='SAME')))
    return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None)))(
        x, kd, kc)

  for a, b in zip(grads('xla'), grads('cpu')):
    assert a.shape == b.shape
    assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 1e-5
