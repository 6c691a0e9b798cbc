"""timm MobileNetV3-Large / EfficientNet-B0 → tljax: golden parity, strictness, the model itself.

Golden fixtures (tests/fixtures/timm_cnn/<arch>.json, tools/fixtures_timm_cnn.py)
hold a weight manifest + seed and the logits real timm computed with those
weights; numpy rebuilds the state dict and tljax must reproduce the logits
within 1e-4 * max(1, max|logits|). The timm archs go through the public
`tljax.porting.timm.from_timm`; `efficientnet_tiny` (timm's own B0 builder
at tljax's tiny scaling, no timm name) through `timm_cnn.port_state_dict`.
"""

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_weights
from tljax import models, optim
from tljax.models import efficientnet
from tljax.porting import timm as timm_port
from tljax.porting import timm_cnn
from tljax.porting.merge import PortError

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = ('efficientnet_tiny', 'mobilenetv3_large_100', 'efficientnet_b0')


def golden(arch):
  fx = reference_weights.load_fixture(os.path.join(HERE, 'fixtures', 'timm_cnn', f'{arch}.json'))
  return fx, reference_weights.build(fx['manifest'], fx['seed'])


@functools.cache
def jitted_apply(arch, num_classes, dtype=jnp.float32):
  """One compiled apply per model, shared by the tests (compiles dominate this file's time)."""
  return jax.jit(models.create(arch, num_classes, dtype=dtype).apply)


def ported(state_dict, arch, num_classes):
  if arch in timm_cnn.TIMM_CONVERTERS:
    return timm_port.from_timm(state_dict, arch, num_classes=num_classes)
  return timm_cnn.port_state_dict(state_dict, arch)


def check_logits(arch, apply, variables, x, ref, label):
  y = np.asarray(apply(variables, x))
  err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
  print(f'{label} {arch} {x.shape[1]}x{x.shape[2]}: max|dlogits| = {err:.3g} '
        f'(max|logits| = {scale:.4g}, tol = {1e-4 * max(1.0, scale):.3g})')
  assert y.shape == ref.shape
  assert err <= 1e-4 * max(1.0, scale)


@pytest.fixture(scope='module')
def tiny():
  """(model, ported golden variables, input) of the 10-class efficientnet_tiny."""
  fx, state_dict = golden('efficientnet_tiny')
  x = reference_weights.random_inputs(fx['inputs'][0]['seed'], fx['inputs'][0]['shape'])
  return models.create('efficientnet_tiny', 10), timm_cnn.port_state_dict(state_dict,
                                                                          'efficientnet_tiny'), x


@pytest.mark.parametrize('arch', ARCHS)
def test_golden_parity_at_default_and_non_square_sizes(arch):
  fx, state_dict = golden(arch)
  num_classes = len(fx['logits'][0][0])
  variables = ported(state_dict, arch, num_classes)
  apply = jitted_apply(arch, num_classes)
  for case, ref in zip(fx['inputs'], fx['logits']):
    x = reference_weights.random_inputs(case['seed'], case['shape'])
    check_logits(arch, apply, variables, x, np.asarray(ref, np.float32), 'golden')


def test_timm_names_are_registered_converters_and_models():
  for arch in ('mobilenetv3_large_100', 'efficientnet_b0', 'resnet50'):
    assert arch in timm_cnn.TIMM_CONVERTERS and arch in models.NAMES
  with pytest.raises(ValueError, match='mobilenetv3_large_100'):
    timm_cnn.port_state_dict({}, 'mobilenetv3_small_100')


def test_every_problem_is_listed_in_one_error():
  _, sd = golden('efficientnet_tiny')
  del sd['blocks.3.1.se.conv_reduce.bias']
  sd['blocks.7.0.conv_pw.weight'] = np.zeros((8, 8, 1, 1), np.float32)
  sd['bn2.running_mean'] = np.zeros(7, np.float32)
  with pytest.raises(PortError) as e:
    timm_cnn.port_state_dict(sd, 'efficientnet_tiny')
  msg = str(e.value)
  assert 'missing (1):\n    blocks.3.1.se.conv_reduce.bias' in msg
  assert 'unexpected (1):\n    blocks.7.0.conv_pw.weight  (8, 8, 1, 1)' in msg
  assert ('shape mismatch (1):\n    batch_stats/backbone/bn2/mean: checkpoint (7,) vs model (320,)'
          in msg)


def test_shape_mismatch_alone_is_an_error():
  _, sd = golden('efficientnet_tiny')
  sd['blocks.1.0.conv_dw.weight'] = np.zeros((48, 1, 5, 5), np.float32)
  with pytest.raises(PortError, match=r'shape mismatch \(1\):\n    params/backbone/blocks1_0/'
                     r'conv_dw/kernel: checkpoint \(5, 5, 1, 48\) vs model \(3, 3, 1, 48\)'):
    timm_cnn.port_state_dict(sd, 'efficientnet_tiny')


def test_efficientnet_file_as_mobilenetv3_is_refused_naming_the_differences():
  _, sd = golden('efficientnet_b0')
  with pytest.raises(PortError) as e:
    timm_cnn.port_state_dict(sd, 'mobilenetv3_large_100')
  msg = str(e.value)
  assert 'blocks.6.0.conv.weight' in msg and 'conv_head.bias' in msg  # MobileNetV3 only
  assert 'blocks.5.3.conv_pwl.weight  (192, 1152, 1, 1)' in msg       # B0 only
  assert 'bn2.running_var  (1280,)' in msg


def test_mobilenetv3_conv_head_must_be_1x1():
  _, sd = golden('mobilenetv3_large_100')
  sd['conv_head.weight'] = np.zeros((1280, 960, 3, 3), np.float32)
  with pytest.raises(PortError, match=r'conv_head.weight: expected a 1x1 conv weight'):
    timm_cnn.port_state_dict(sd, 'mobilenetv3_large_100')


def test_mobilenet_batchnorm_is_timms_only_through_the_alias():
  timm_bn = models.create('mobilenetv3_large_100', 5).backbone.arch.bn
  tv_bn = models.create('mobilenet_v3_large', 5).backbone.arch.bn
  assert timm_bn == {'eps': 1e-5, 'momentum': 0.9}
  assert tv_bn == {'eps': 1e-3, 'momentum': 0.99}
  with pytest.raises(ValueError, match='bn_eps must be > 0'):
    models.create('mobilenet_v3_large', 5, bn_eps=0.0)
  with pytest.raises(ValueError, match=r'bn_momentum must be in \[0, 1\)'):
    models.create('mobilenet_v3_large', 5, bn_momentum=1.0)
  with pytest.raises(ValueError, match='drop_connect_rate must be in'):
    models.create('efficientnet_b0', 5, drop_connect_rate=1.0)
  with pytest.raises(ValueError, match='unknown EfficientNet .*efficientnet_b0'):
    efficientnet.arch_facts('efficientnet_b1')


def test_tiny_forward_and_gradient_on_cpu(tiny):
  model, variables, x = tiny
  x = x[:, :32, :32]
  assert models.input_size('efficientnet_tiny') == 64

  def loss(params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
    return jnp.mean(logits ** 2), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  flat = jax.tree_util.tree_leaves_with_path(grads)
  for path, g in flat:
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
  dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(g)]
  assert not dead
  old = variables['batch_stats']['backbone']['bn2']['mean']
  assert not np.allclose(updates['batch_stats']['backbone']['bn2']['mean'], old)


def test_drop_connect_follows_stochastic_and_grows_with_depth(tiny):
  model, variables, x = tiny
  x = x[:, :32, :32]

  @jax.jit
  def features(key):
    f = lambda stochastic, k: model.apply(variables, x, train=True, bn_train=False,
                                          stochastic=stochastic, rngs={'dropout': k},
                                          method='features')
    return f(None, key), f(True, key), f(True, jax.random.fold_in(key, 1))

  off, on0, on1 = map(np.asarray, features(jax.random.key(0)))
  np.testing.assert_array_equal(off, np.asarray(features(jax.random.key(1))[0]))
  assert np.abs(on0 - on1).max() > 1e-3 * np.abs(on0).max()
  assert np.abs(on0 - off).max() > 1e-3 * np.abs(off).max()
  rates = [m.drop_connect for m in _mbconvs(model, variables, x)]
  assert len(rates) == 10 and rates[0] == 0.0 and rates == sorted(rates)
  assert rates[-1] == pytest.approx(0.2 * 9 / 10)


def _mbconvs(model, variables, x):
  """The MBConv modules in call order."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, efficientnet.MBConv) and context.method_name == '__call__':
      seen.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, x), variables)
  return seen


def test_bf16_compute_is_close_to_f32(tiny):
  model, variables, x = tiny
  f32 = np.asarray(jitted_apply('efficientnet_tiny', 10)(variables, x))
  bf16_model = models.create('efficientnet_tiny', 10, dtype=jnp.bfloat16)
  bf16 = jitted_apply('efficientnet_tiny', 10, jnp.bfloat16)(variables, x)
  feats = jax.eval_shape(lambda v: bf16_model.apply(v, x, method='features'), variables)
  assert feats.dtype == jnp.bfloat16
  assert bf16.dtype == jnp.float32
  err = np.abs(np.asarray(bf16) - f32).max()
  assert 0 < err <= 0.05 * np.abs(f32).max(), err


def test_top_n_and_stages_select_whole_blocks(tiny):
  model, variables, x = tiny
  blocks = optim.backbone_blocks(model, variables['params'], x.shape)
  assert blocks[0] == ['conv_stem', 'bn1'] and blocks[-1] == ['conv_head', 'bn2']
  assert [b[0] for b in blocks[1:-1]] == [
      'blocks0_0', 'blocks1_0', 'blocks2_0', 'blocks3_0', 'blocks3_1', 'blocks4_0', 'blocks4_1',
      'blocks5_0', 'blocks5_1', 'blocks6_0']

  def trainable(rule):
    labels = optim.param_labels(variables['params'], rule, blocks)
    flat = jax.tree_util.tree_leaves_with_path(labels)
    return {p[1].key for p, v in flat if v == optim.TRAINABLE and p[0].key == 'backbone'}

  assert trainable('top:1') == {'conv_head', 'bn2'}
  assert trainable('top:3') == {'conv_head', 'bn2', 'blocks6_0', 'blocks5_1'}
  # A stage is a name prefix: blocks5_* is one group.
  assert trainable('stages:3') == {'conv_head', 'bn2', 'blocks6_0', 'blocks5_0', 'blocks5_1'}


@pytest.mark.reference
@pytest.mark.parametrize('arch', ARCHS)
def test_live_parity_against_timm(arch):
  """Builds the timm model in-process with seed 1 (the golden files use 0) and ports it."""
  sys.path.insert(0, os.path.dirname(HERE))
  from tools import fixtures_timm_cnn as fixtures
  model, _ = fixtures.seeded_model(arch, seed=1)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  num_classes = state_dict['classifier.weight'].shape[0]
  variables = ported(state_dict, arch, num_classes)
  apply = jax.jit(models.create(arch, num_classes).apply)
  for i, (h, w) in enumerate(fixtures.sizes_of(arch)):
    x = reference_weights.random_inputs(100 + i, (2, h, w, 3))
    check_logits(arch, apply, variables, x, fixtures.reference_logits(model, x), 'live')
