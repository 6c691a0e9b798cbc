"""ResNet structure: torchvision's parameter counts, names and v1.5 stride placement.

Shapes come from `jax.eval_shape`, so nothing here compiles a big model.
Numerical parity with torchvision lives in test_torchvision_port.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models
from tljax.models import resnet

# `num_params` of torchvision 0.29.1's ResNet*_Weights metadata (1000-class fc included).
TORCHVISION_NUM_PARAMS = {'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032}


def _shapes(model, size=(224, 224)):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('arch', sorted(TORCHVISION_NUM_PARAMS))
def test_param_count_equals_torchvision(arch):
  assert _count(_shapes(models.create(arch, 1000))['params']) == TORCHVISION_NUM_PARAMS[arch]


def test_names_mirror_torchvision():
  v = _shapes(models.create('resnet18', 1000))
  backbone = v['params']['backbone']
  assert sorted(backbone) == ['bn1', 'conv1'] + [f'layer{s}_{b}' for s in range(1, 5)
                                                 for b in range(2)]
  assert sorted(backbone['layer1_0']) == ['bn1', 'bn2', 'conv1', 'conv2']
  assert sorted(backbone['layer2_0']) == ['bn1', 'bn2', 'conv1', 'conv2', 'downsample_bn',
                                          'downsample_conv']
  assert list(v['params']['head']) == ['logits']
  assert v['params']['head']['logits']['kernel'].shape == (512, 1000)
  assert set(v['batch_stats']['backbone']['bn1']) == {'mean', 'var'}


def test_resnet50_bottleneck_widths_and_projection():
  backbone = _shapes(models.create('resnet50', 1000))['params']['backbone']
  block = backbone['layer1_0']  # 64 -> 256 channels at stride 1 still needs a projection
  assert block['conv1']['kernel'].shape == (1, 1, 64, 64)
  assert block['conv2']['kernel'].shape == (3, 3, 64, 64)
  assert block['conv3']['kernel'].shape == (1, 1, 64, 256)
  assert block['downsample_conv']['kernel'].shape == (1, 1, 64, 256)
  assert 'downsample_conv' not in backbone['layer1_1']
  assert backbone['layer4_2']['conv3']['kernel'].shape == (1, 1, 512, 2048)


def test_bottleneck_strides_in_the_3x3_v1_5():
  spec = resnet.ResNetSpec('bottleneck', (1, 1), (4, 8), stem_width=8)
  backbone = resnet.ResNetBackbone(spec)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(backbone.init, jax.random.PRNGKey(0), x)
  _, state = jax.eval_shape(lambda v: backbone.apply(v, x, capture_intermediates=True), variables)
  block = state['intermediates']['layer2_0']
  assert block['conv1']['__call__'][0].shape == (1, 8, 8, 8)  # 1x1: no stride
  assert block['conv2']['__call__'][0].shape == (1, 4, 4, 8)  # 3x3: stride 2
  assert block['downsample_conv']['__call__'][0].shape == (1, 4, 4, 32)


@pytest.mark.parametrize('arch,size,out', [('resnet18', (224, 224), (7, 7, 512)),
                                           ('resnet50', (193, 257), (7, 9, 2048)),
                                           ('resnet_tiny', (29, 37), (4, 5, 16))])
def test_feature_map_shapes(arch, size, out):
  model = models.create(arch, 10)
  v = _shapes(model, size)
  x = jnp.zeros((2, *size, 3))
  assert jax.eval_shape(lambda v: model.apply(v, x, method=model.features), v).shape == (2, *out)
  assert jax.eval_shape(lambda v: model.apply(v, x), v).shape == (2, 10)


def test_tiny_runs_in_bf16_with_float32_params_and_train_mode_updates_stats():
  model = models.create('resnet_tiny', 3, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  shapes = _shapes(model, (32, 32))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
  rng = np.random.default_rng(0)  # random values instead of `init`, which costs a compile
  v = jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updates = train(v, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 3)
  before = v['batch_stats']['backbone']['bn1']['mean']
  assert not np.allclose(updates['batch_stats']['backbone']['bn1']['mean'], before)


def test_input_sizes_and_unknown_options():
  assert models.input_size('resnet34') == 224 and models.input_size('resnet_tiny') == 32
  with pytest.raises(ValueError, match='no architecture options'):
    models.create('resnet18', 10, width=2)
