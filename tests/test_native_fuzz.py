"""Shape fuzz of the C++ CPU kernels (`tljax.cpu_backend.native`) against XLA's own convolution.

The hand-written kernels special-case edges, 8-pixel tiles, 16-channel
vectors and padding; their bugs hide in the maps that models only reach at
the end of a tiny run (a 1x1 map under a 5x5 kernel wrote past its output
row and corrupted the heap). So every kernel runs here, forward and both
gradients, on tiny and odd maps: H, W in 1..9, kernels 1-7 wide, strides 1
and 2, SAME/VALID/symmetric/TF-style/arbitrary asymmetric padding (also
wider than the map), channel counts around the 16-float vector width. A
seeded sample of that cross product keeps the file fast and reproducible;
cases are compiled in groups (one jit each) because XLA compiles dominate.

References are `lax.conv_general_dilated` (`feature_group_count` for
depthwise), its autodiff gradients and float64 NumPy sums, never the code
under test. Each group also asserts that the compiled program calls the C++
targets it is meant to test, so the file cannot pass on XLA's paths alone.

Under `make asan` (TLJAX_SANITIZE set, the ASan runtime preloaded) the same
cases run on the sanitizer build, plus every tiny model's forward and
backward (`test_tiny_models_forward_backward`, skipped otherwise).
"""

from __future__ import annotations

import random
import zlib

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from tljax import ops
from tljax.cpu_backend import allocator, batchnorm, conv, native

HAS_COMPILER = native._compiler() is not None
SWITCHED_OFF = not native.enabled()
pytestmark = pytest.mark.skipif(not HAS_COMPILER or SWITCHED_OFF,
                                reason='no C++ compiler (or TLJAX_NATIVE=0): no C++ kernels to test')

SEED = 14
SIZES = range(1, 10)
KERNELS = (1, 3, 5, 7)
STRIDES = (1, 2)
CHANNELS = (1, 7, 15, 16, 17, 33)
DENSE_OUT = (16, 32, 48)
PAD_MODES = ('SAME', 'VALID', 'symmetric', 'tf', 'asymmetric')
RTOL = 2e-5
GROUP = 12


def test_kernels_are_built_where_a_compiler_exists():
  assert native.available(), 'a C++ compiler exists but the kernels did not build'


def test_sanitizer_mode_is_explicit(monkeypatch):
  """TLJAX_SANITIZE: known names only; the ASan build refuses to load into a process
  without the runtime (it would kill it); never the huge-block cache."""
  assert native.sanitizers({'TLJAX_SANITIZE': ' undefined,address '}) == ('address', 'undefined')
  with pytest.raises(ValueError, match='TLJAX_SANITIZE=.*subset of address,undefined'):
    native.sanitizers({'TLJAX_SANITIZE': 'thread'})
  flags = native.sanitizer_flags(('address', 'undefined'))
  assert '-fsanitize=address,undefined' in flags and '-fno-sanitize-recover=undefined' in flags
  assert '-O3' not in flags and native.sanitizer_flags(()) == list(native.FLAGS)
  monkeypatch.setenv('TLJAX_SANITIZE', 'address')
  with pytest.raises(RuntimeError, match='TLJAX_HOST_BLOCK_CACHE=0'):
    native.host_allocator()
  if not native._runtime_loaded('asan'):
    with pytest.raises(RuntimeError, match='LD_PRELOAD'):
      native._build(native._compiler())


def _padding(mode, rng, hw, khw, strides):
  """One of the padding forms the ops accept, as `conv2d` takes it."""
  if mode in ('SAME', 'VALID'):
    return mode
  if mode == 'symmetric':       # PyTorch's k // 2 on both sides
    return tuple((k // 2, k // 2) for k in khw)
  if mode == 'tf':              # Keras ports: ZeroPadding2D(correct_pad) before a VALID conv
    return tuple((max(0, k // 2 - (1 - size % 2)), k // 2) for size, k in zip(hw, khw))
  return tuple((rng.randint(0, k + 1), rng.randint(0, k + 1)) for k in khw)


def _out_hw(hw, khw, strides, padding):
  pads = conv.explicit_padding(padding, hw, khw, strides)
  return tuple((size + lo + hi - k) // s + 1
               for size, k, s, (lo, hi) in zip(hw, khw, strides, pads))


def _geometry(rng, *, kernels_1x1=True):
  """(n, (h, w), (kh, kw), (sh, sw), padding) with a non-empty output."""
  while True:
    hw = (rng.choice(SIZES), rng.choice(SIZES))
    kh = rng.choice(KERNELS)
    kw = kh if rng.random() < 0.7 else rng.choice(KERNELS)
    if (kh, kw) == (1, 1) and not kernels_1x1:
      continue
    s = rng.choice(STRIDES)
    strides = (s, s) if rng.random() < 0.8 else (s, 3 - s)
    padding = _padding(rng.choice(PAD_MODES), rng, hw, (kh, kw), strides)
    if min(_out_hw(hw, (kh, kw), strides, padding)) >= 1:
      return rng.choice((1, 2, 3)), hw, (kh, kw), strides, padding


def _depthwise_cases(count, rng):
  return [(*_geometry(rng), rng.choice(CHANNELS)) for _ in range(count)]


def _dense_cases(count, rng):
  return [(*_geometry(rng, kernels_1x1=False), rng.choice(CHANNELS), rng.choice(DENSE_OUT))
          for _ in range(count)]


def _array(rng, shape, scale=1.0):
  return np.asarray(rng.standard_normal(shape) * scale, np.float32)


def _xla_conv(x, k, strides, padding, groups):
  padding = padding if isinstance(padding, str) else tuple(padding)
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)


def _with_grads(fn, args, ct):
  """(fn(*args), d/dx, d/dk) of sum(fn(*args) * ct)."""
  y, vjp = jax.vjp(lambda x, k: fn(x, k, *args[2:]), *args[:2])
  return (y, *vjp(ct))


def _seed(case) -> int:
  return zlib.crc32(repr(case).encode())


def _run_group(label, cases, build, targets):
  """Compiles `build(case) -> (fast, reference, inputs)` for all cases into one program
  (`fast` on the CPU backend), checks that it calls `targets`, and compares each case's
  outputs with the reference's."""
  built = [build(case) for case in cases]

  def program(all_inputs):
    out = []
    for (fast, reference, _), inputs in zip(built, all_inputs):
      with ops.use_backend('cpu'):
        got = fast(*inputs)
      out.append((got, reference(*inputs)))
    return out

  inputs = [b[2] for b in built]
  fn = jax.jit(program)
  hlo = fn.lower(inputs).compile().as_text()
  for target in targets:
    assert f'custom_call_target="{target}"' in hlo, f'{label}: {target} not called'
  for case, (got, ref) in zip(cases, fn(inputs)):
    assert len(got) == len(ref)
    for name, a, b in zip(('output', 'input grad', 'kernel grad'), ref, got):
      _assert_close(f'{label} {case} {name}', a, b)


def _assert_close(what, ref, got):
  """Within RTOL of the reference's largest magnitude."""
  ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
  assert ref.shape == got.shape, f'{what}: shape {got.shape} != {ref.shape}'
  scale = np.max(np.abs(ref), initial=0.0)
  err = np.max(np.abs(ref - got), initial=0.0) / (scale or 1.0)
  assert err <= RTOL, f'{what}: relative error {err:.2e}'


def _groups(cases):
  return [cases[i:i + GROUP] for i in range(0, len(cases), GROUP)]


def _ids(groups):
  return [f'group{i}' for i in range(len(groups))]


DEPTHWISE = _groups(_depthwise_cases(48, random.Random(SEED)))
DENSE = _groups(_dense_cases(40, random.Random(SEED + 2)))
# VALID kernels larger than the map: XLA gives an empty output and a zero kernel gradient.
EMPTY = [(2, (4, 4), (5, 5), (1, 1), 'VALID', 16, 32), (1, (4, 6), (5, 3), (1, 2), 'VALID', 7, 16),
         (1, (6, 2), (3, 3), (1, 1), 'VALID', 33, 48)]


def _depthwise_inputs(case, seed):
  n, (h, w), (kh, kw), strides, padding, c = case
  rng = np.random.default_rng(seed)
  x, k = _array(rng, (n, h, w, c)), _array(rng, (kh, kw, 1, c))
  ct = _array(rng, (n, *_out_hw((h, w), (kh, kw), strides, padding), c))
  return rng, x, k, ct


@pytest.mark.parametrize('cases', DEPTHWISE, ids=_ids(DEPTHWISE))
def test_depthwise_forward_and_gradients(cases):
  def build(case):
    _, _, _, strides, padding, c = case
    _, x, k, ct = _depthwise_inputs(case, _seed(case))
    fast = lambda x, k, ct: _with_grads(  # noqa: E731
        lambda x, k: ops.conv2d(x, k, strides=strides, padding=padding, groups=c), (x, k), ct)
    reference = lambda x, k, ct: _with_grads(  # noqa: E731
        lambda x, k: _xla_conv(x, k, strides, padding, c), (x, k), ct)
    return fast, reference, (x, k, ct)
  _run_group('depthwise', cases, build, ('tljax_depthwise_forward', 'tljax_depthwise_backward'))


def _dense_inputs(case, seed):
  n, (h, w), (kh, kw), strides, padding, cin, cout = case
  rng = np.random.default_rng(seed)
  x, k = _array(rng, (n, h, w, cin)), _array(rng, (kh, kw, cin, cout))
  ct = _array(rng, (n, *_out_hw((h, w), (kh, kw), strides, padding), cout))
  return rng, x, k, ct


@pytest.mark.parametrize('cases', DENSE + [EMPTY], ids=_ids(DENSE) + ['empty'])
def test_dense_forward_and_gradients(cases):
  """Forward and kernel gradient always C++; the input gradient where it applies
  (stride 1, 16k input channels, top/left padding below the kernel)."""
  def build(case):
    *_, strides, padding, _, _ = case
    _, x, k, ct = _dense_inputs(case, _seed(case))
    fast = lambda x, k, ct: _with_grads(  # noqa: E731
        lambda x, k: ops.conv2d(x, k, strides=strides, padding=padding), (x, k), ct)
    reference = lambda x, k, ct: _with_grads(  # noqa: E731
        lambda x, k: _xla_conv(x, k, strides, padding, 1), (x, k), ct)
    return fast, reference, (x, k, ct)
  _run_group('dense', cases, build, ('tljax_conv_forward', 'tljax_conv_kernel_grad'))


SUM_SHAPES = [
    (1, 1), (3, 7), (16, 15), (17, 16), (255, 17), (256, 33), (257, 1), (600, 7),
    (1000, 16), (513, 24), (300, 48), (40, 128), (33, 129), (2, 3, 5, 33), (4, 9, 9, 15),
    (1, 1, 1, 17),
]


def test_batchnorm_sums():
  """Both sums over every row count around the 256-row chunks and the flat-stream period
  (lcm(C, 16) floats), against float64 NumPy sums."""
  rng = np.random.default_rng(SEED)
  operands = [(_array(rng, s), _array(rng, s)) for s in SUM_SHAPES]

  def program(operands):
    with ops.use_backend('cpu'):
      return [batchnorm._native_sums(a, b) for a, b in operands]

  fn = jax.jit(program)
  assert 'custom_call_target="tljax_batchnorm_sums"' in fn.lower(operands).compile().as_text()
  for shape, (a, b), got in zip(SUM_SHAPES, operands, fn(operands)):
    a64, b64 = a.astype(np.float64).reshape(-1, shape[-1]), b.astype(np.float64).reshape(-1, shape[-1])
    for name, ref, bound, value in (('sum', a64.sum(0), np.abs(a64).sum(0), got[0]),
                                    ('sum of products', (a64 * b64).sum(0),
                                     np.abs(a64 * b64).sum(0), got[1])):
      err = np.max(np.abs(np.asarray(value, np.float64) - ref) / np.maximum(bound, 1e-30))
      assert err <= 1e-6, f'batchnorm sums {shape} {name}: error {err:.2e} of the absolute sum'


TINY_MODELS = ('simple_cnn_tiny', 'resnet_tiny', 'mobilenet_tiny', 'efficientnet_lite_tiny')


@pytest.mark.skipif(not native.sanitizers(), reason='runs under `make asan` (TLJAX_SANITIZE)')
@pytest.mark.parametrize('name', TINY_MODELS)
def test_tiny_models_forward_backward(name):
  """Each tiny model at 32 px (its last maps are 1-2 px wide), on the sanitizer build: a
  training step's gradients (BatchNorm sums, both conv gradients) and inference, one
  program. Values need only be finite: the kernels' results are checked against XLA above."""
  from tljax import models
  model = models.create(name, 3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  with ops.use_backend('cpu'):
    variables = jax.jit(model.init)(jax.random.key(0), x)

    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
      return jnp.sum(jnp.sin(logits))

    grads, logits = jax.jit(lambda v: (jax.grad(loss)(v['params']), model.apply(v, x)))(variables)
  for leaf in jax.tree_util.tree_leaves((grads, logits)):
    assert np.all(np.isfinite(leaf))
  assert not allocator.block_cache_active(), 'the huge-block cache hides memory from ASan'
