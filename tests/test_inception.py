"""InceptionV3 structure: end points, cut backbones, names and Keras' layer conventions.

Numerical parity with `keras.applications.InceptionV3` (full and cut at
mixed7) is in `test_keras_port.py`; these checks are shape-only
(`jax.eval_shape`), so they cost no compilation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tljax import models
from tljax.models import inception

# Keras' channel counts at each end point.
END_POINT_CHANNELS = {'mixed0': 256, 'mixed1': 288, 'mixed2': 288, 'mixed3': 768, 'mixed4': 768,
                      'mixed5': 768, 'mixed6': 768, 'mixed7': 768, 'mixed8': 1280, 'mixed9': 2048,
                      'mixed10': 2048}


def abstract_variables(model, size=(299, 299)):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *size, 3)))


def features_shape(model, size=(299, 299)):
  variables = abstract_variables(model, size)
  x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
  return jax.eval_shape(lambda v, x: model.apply(v, x, method=model.features), variables, x).shape


def test_mixed7_cut_is_17x17x768_at_299_and_gets_a_new_head():
  model = models.create('inception_v3', 5, cut='mixed7')
  assert features_shape(model) == (2, 17, 17, 768)
  params = abstract_variables(model)['params']
  assert params['head']['logits']['kernel'].shape == (768, 5)
  assert sorted(k for k in params['backbone'] if k.startswith('mixed')) == [
      f'mixed{i}' for i in range(8)]


def test_full_network_and_default_head():
  model = models.create('inception_v3', 1000)
  assert models.input_size('inception_v3') == 299
  assert features_shape(model) == (2, 8, 8, 2048)
  assert features_shape(model, (139, 181)) == (2, 3, 4, 2048)
  assert model.head.pool == 'avg' and model.head.hidden == () and model.head.dropout == 0.0


def test_every_end_point_via_capture_intermediates():
  model = models.create('inception_v3', 10)
  variables = abstract_variables(model)
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=lambda m, _: (m.name or '').startswith('mixed'),
                               mutable=['intermediates']), variables, x)
  captured = state['intermediates']['backbone']
  assert {k: v['__call__'][0].shape[-1] for k, v in captured.items()} == END_POINT_CHANNELS
  assert captured['mixed2']['__call__'][0].shape[1:3] == (35, 35)
  assert captured['mixed8']['__call__'][0].shape[1:3] == (8, 8)


def test_keras_layer_conventions_in_the_parameter_tree():
  params = abstract_variables(models.create('inception_v3', 1000))['params']['backbone']
  assert list(params)[:5] == ['conv2d_1a_3x3', 'conv2d_2a_3x3', 'conv2d_2b_3x3', 'conv2d_3b_1x1',
                              'conv2d_4a_3x3']
  unit = params['mixed9']['branch3x3_2a']
  assert unit['conv']['kernel'].shape == (1, 3, 384, 384)
  assert set(unit['conv']) == {'kernel'} and set(unit['bn']) == {'bias'}  # no conv bias, no BN scale
  assert params['mixed4']['branch7x7dbl_2']['conv']['kernel'].shape == (7, 1, 128, 128)


def test_same_padding_is_symmetric_for_odd_kernels():
  spec = inception.ConvSpec('x', 8, (1, 7))
  assert inception.keras_pads(spec) == ((0, 0), (3, 3))
  assert inception.keras_pads(inception.ConvSpec('x', 8, (3, 3), 2, 'valid')) == ((0, 0), (0, 0))


def test_bad_cut_and_too_small_inputs_are_rejected():
  with pytest.raises(ValueError, match='unknown InceptionV3 end point .mixed11.*mixed0'):
    models.create('inception_v3', 2, cut='mixed11')
  with pytest.raises(ValueError, match='at least 75x75'):
    features_shape(models.create('inception_v3', 2), (64, 64))
