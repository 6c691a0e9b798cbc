"""ConvNeXt: torchvision and timm ports (golden + live parity, strictness), trainable rules,
bf16, the CPU backend's gradients, stochastic depth and head-only features.

Golden fixtures (tests/fixtures/convnext/<source>_<arch>.json, written by
tools/fixtures_convnext.py) hold a weight manifest + seed and the logits the
real library computed; numpy rebuilds the state dict here and tljax must
reproduce the logits within 1e-4 * max(1, max|logits|).
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_weights
from tljax import models, ops, optim
from tljax.porting import catalog
from tljax.porting import convnext as port_convnext
from tljax.porting import timm as timm_port
from tljax.porting import torchvision as tv
from tljax.porting.merge import PortError, flatten

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [(s, a) for a in ('convnext_test', 'convnext_tiny') for s in ('torchvision', 'timm')]


def golden(source, arch):
  fx = reference_weights.load_fixture(
      os.path.join(HERE, 'fixtures', 'convnext', f'{source}_{arch}.json'))
  return fx, reference_weights.build(fx['manifest'], fx['seed'])


def ported(state_dict, source, arch):
  """Through the public entry points; timm has no `convnext_test`, so that one goes through the
  same converter by `port_state_dict`."""
  if source == 'torchvision':
    return tv.from_torchvision(state_dict, arch, num_classes=classes_of(state_dict, source))
  if arch in timm_port.ARCHS:
    return timm_port.from_timm(state_dict, arch, num_classes=classes_of(state_dict, source))
  return port_convnext.port_state_dict(state_dict, arch, source)


def classes_of(state_dict, source):
  return state_dict['classifier.2.weight' if source == 'torchvision' else 'head.fc.weight'].shape[0]


@functools.lru_cache(maxsize=None)
def jitted_apply(arch, num_classes, dtype=jnp.float32):
  return jax.jit(models.create(arch, num_classes, dtype=dtype).apply)


def check_logits(label, arch, y, ref, x):
  err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
  print(f'{label} {arch} {x.shape[1]}x{x.shape[2]}: max|dlogits| = {err:.3g} '
        f'(max|logits| = {scale:.4g}, tol = {1e-4 * max(1.0, scale):.3g})')
  assert y.shape == ref.shape
  assert err <= 1e-4 * max(1.0, scale)


@pytest.fixture(scope='module')
def test_model():
  """convnext_test with torchvision-golden weights, and its golden inputs."""
  fx, sd = golden('torchvision', 'convnext_test')
  x = reference_weights.random_inputs(fx['inputs'][0]['seed'], fx['inputs'][0]['shape'])
  return models.create('convnext_test', 10), tv.from_torchvision(sd, 'convnext_test', 10), x


@pytest.mark.parametrize('source, arch', CASES)
def test_golden_parity_at_two_sizes(source, arch):
  fx, state_dict = golden(source, arch)
  variables = ported(state_dict, source, arch)
  apply = jitted_apply(arch, classes_of(state_dict, source))
  for case, ref in zip(fx['inputs'], fx['logits']):
    x = reference_weights.random_inputs(case['seed'], case['shape'])
    check_logits(f'golden {source}', arch, np.asarray(apply(variables, x)),
                 np.asarray(ref, np.float32), x)


def test_torchvision_errors_name_every_tensor_at_once():
  _, sd = golden('torchvision', 'convnext_test')
  del sd['features.3.0.layer_scale']
  sd['features.9.0.block.0.weight'] = np.zeros((8, 1, 7, 7), np.float32)
  sd['features.5.1.block.3.weight'] = np.zeros((96, 25), np.float32)
  with pytest.raises(PortError) as e:
    tv.from_torchvision(sd, 'convnext_test', num_classes=10)
  msg = str(e.value)
  assert 'missing (1):\n    features.3.0.layer_scale' in msg
  assert 'unexpected (1):\n    features.9.0.block.0.weight  (8, 1, 7, 7)' in msg
  assert ('shape mismatch (1):\n    params/backbone/stage3_1/fc1/kernel: '
          'checkpoint (25, 96) vs model (24, 96)') in msg


def test_timm_errors_name_every_tensor_at_once():
  _, sd = golden('timm', 'convnext_test')
  del sd['stages.1.downsample.0.weight']
  sd['stages.2.blocks.0.gamma'] = np.ones((24, 2), np.float32)
  with pytest.raises(PortError) as e:
    port_convnext.port_state_dict(sd, 'convnext_test', 'timm')
  msg = str(e.value)
  assert 'missing (1):\n    stages.1.downsample.0.weight' in msg
  assert ('shape mismatch (1):\n    params/backbone/stage3_0/gamma: '
          'checkpoint (24, 2) vs model (24,)') in msg


def test_a_mis_shaped_layer_scale_alone_is_an_error():
  _, sd = golden('torchvision', 'convnext_test')
  sd['features.1.0.layer_scale'] = np.ones((8, 2, 1), np.float32)
  with pytest.raises(PortError, match=r'shape mismatch \(1\):\n    params/backbone/stage1_0/gamma: '
                     r'.* \(8, 2, 1\) vs model \(8,\)'):
    tv.from_torchvision(sd, 'convnext_test', num_classes=10)


def test_each_library_s_file_is_refused_by_the_other_converter():
  _, timm_sd = golden('timm', 'convnext_test')
  with pytest.raises(PortError, match=r'missing \(\d+\):\n    features\.0\.0\.weight'):
    tv.from_torchvision(timm_sd, 'convnext_test', num_classes=10)
  _, tv_sd = golden('torchvision', 'convnext_test')
  with pytest.raises(PortError, match=r'missing \(\d+\):\n    stem\.0\.weight'):
    port_convnext.port_state_dict(tv_sd, 'convnext_test', 'timm')
  with pytest.raises(ValueError, match='torchvision, timm'):
    port_convnext.port_state_dict(tv_sd, 'convnext_test', 'keras')


def test_registrations_and_catalog_entry():
  assert 'convnext_tiny' in tv.ARCHS and 'convnext_test' in tv.ARCHS
  assert set(port_convnext.TIMM_CONVERTERS) == {'convnext_tiny'}
  assert 'convnext_tiny' in timm_port.ARCHS
  spec = catalog.lookup('torchvision', 'convnext_tiny')  # torchvision's DEFAULT
  assert spec.filename == tv.CATALOG['convnext_tiny:IMAGENET1K_V1'].filename
  assert spec.url == 'https://download.pytorch.org/models/convnext_tiny-983f1562.pth'
  assert spec.sha256 == '983f1562536e84ff750a1576fb08e54de751dbf2e17c0d8a4a13704341fdcd3d'
  assert (spec.preprocessing.input_size, spec.preprocessing.resize) == (224, 236)
  assert spec.preprocessing.interpolation == 'bilinear'


def test_new_head_keeps_the_backbone_and_replaces_only_logits():
  _, sd = golden('torchvision', 'convnext_test')
  variables, replaced = tv.port(sd, 'convnext_test', num_classes=3, rng=jax.random.key(1))
  assert replaced == ['params/head/logits/bias', 'params/head/logits/kernel']
  pretrained = flatten(tv.from_torchvision(sd, 'convnext_test', num_classes=10))
  for path, value in flatten(variables).items():
    if path not in replaced:
      np.testing.assert_array_equal(value, pretrained[path], err_msg=path)
  assert variables['params']['head']['logits']['kernel'].shape == (32, 3)


def _trainable(labels):
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  return {'/'.join(k.key for k in path[:2]) for path, v in flat if v == optim.TRAINABLE}


def test_trainable_top_and_stages_follow_convnext_stages(test_model):
  model, variables, _ = test_model
  params = variables['params']
  blocks = optim.backbone_blocks(model, params, (1, 32, 32, 3))
  assert blocks == [['stem'], ['stage1_0'], ['stage2_down'], ['stage2_0'], ['stage3_down'],
                    ['stage3_0'], ['stage3_1'], ['stage4_down'], ['stage4_0', 'norm']]
  select = lambda rule: _trainable(optim.param_labels(params, rule, blocks))
  assert select('top:1') == {'backbone/stage4_0', 'backbone/norm'}
  assert select('top:2') == {'backbone/stage4_down', 'backbone/stage4_0', 'backbone/norm'}
  assert select('stages:1') == select('top:2')
  assert select('head+stages:2') == {'head/logits', 'backbone/stage3_down', 'backbone/stage3_0',
                                     'backbone/stage3_1', 'backbone/stage4_down',
                                     'backbone/stage4_0', 'backbone/norm'}
  assert len(optim._stages(blocks)) == 5  # stem + 4 stages


def test_bf16_forward_is_close_to_float32(test_model):
  model, variables, x = test_model
  ref = np.asarray(jitted_apply('convnext_test', 10)(variables, x))
  y = jitted_apply('convnext_test', 10, jnp.bfloat16)(variables, x)
  assert y.dtype == jnp.float32  # Head returns float32 logits
  err = float(np.abs(np.asarray(y) - ref).max())
  assert 0 < err <= 0.05 * float(np.abs(ref).max()), err


def test_features_are_pooled_normalised_and_feed_the_head_alone(test_model):
  model, variables, x = test_model
  features = jax.jit(functools.partial(model.apply, method='features'))(variables, x)
  assert features.shape == (2, 32)
  head_only = jax.jit(functools.partial(model.apply, method='apply_head'))(variables, features)
  np.testing.assert_allclose(head_only, jitted_apply('convnext_test', 10)(variables, x),
                             rtol=1e-5, atol=1e-5)
  scale = variables['params']['backbone']['norm']['scale']
  bias = variables['params']['backbone']['norm']['bias']
  np.testing.assert_allclose(np.mean((features - bias) / scale, axis=-1), 0, atol=1e-4)


def test_forward_and_grad_on_the_cpu_backend_match_xla(test_model):
  _, variables, x = test_model
  model = models.create('convnext_test', 10, drop_path=0.5)

  def loss(params):
    logits = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(3)})
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), logits

  grads = {}
  for backend in ('cpu', 'xla'):
    with ops.use_backend(backend):
      grads[backend] = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  (g_cpu, y_cpu), (g_xla, y_xla) = grads['cpu'], grads['xla']
  np.testing.assert_allclose(y_cpu, y_xla, rtol=1e-4, atol=1e-4)
  for path, g in flatten(g_xla).items():
    np.testing.assert_allclose(flatten(g_cpu)[path], g, rtol=1e-3, atol=1e-4, err_msg=path)
  assert float(np.abs(g_xla['backbone']['stage1_0']['conv_dw']['kernel']).max()) > 0


def test_drop_path_follows_stochastic_and_build_refuses_bad_options(test_model):
  _, variables, x = test_model
  model = models.create('convnext_test', 10)
  out = lambda seed, **kw: np.asarray(model.apply(variables, x, rngs={'dropout': jax.random.key(
      seed)}, method='features', **kw))
  assert np.array_equal(out(1, train=True, stochastic=False), out(2, train=False))
  a, b = out(1, train=False, stochastic=True), out(2, train=False, stochastic=True)
  assert np.abs(a - b).max() > 1e-3
  assert np.array_equal(a, out(1, train=True))
  with pytest.raises(ValueError, match=r"only the architecture option drop_path, got \['alpha'\]"):
    models.create('convnext_tiny', 10, alpha=0.5)
  with pytest.raises(ValueError, match=r'drop_path must be in \[0, 1\)'):
    models.create('convnext_tiny', 10, drop_path=1.0)


@pytest.mark.reference
@pytest.mark.parametrize('source, arch', CASES)
def test_live_parity_against_the_reference_library(source, arch, tmp_path):
  """The reference model built in-process with seed 1 (the golden files use 0); torchvision's
  is also ported from a `torch.save`d file through the pickle reader."""
  import torch
  sys.path.insert(0, os.path.dirname(HERE))
  from tools import fixtures_convnext as fixtures
  model, _ = fixtures.seeded_model(source, arch, seed=1)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  variables = ported(state_dict, source, arch)
  if source == 'torchvision':
    path = tmp_path / f'{arch}.pth'
    torch.save(model.state_dict(), path)
    from_file = tv.from_torchvision(path, arch, num_classes=classes_of(state_dict, source))
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_file, variables)
  apply = jitted_apply(arch, classes_of(state_dict, source))
  for i, (h, w) in enumerate(fixtures.SIZES[arch]):
    x = reference_weights.random_inputs(100 + i, (2, h, w, 3))
    check_logits(f'live {source}', arch, np.asarray(apply(variables, x)),
                 fixtures.reference_logits(model, x), x)
