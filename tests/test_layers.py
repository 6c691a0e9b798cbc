import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models
from tljax.models import layers


def test_create_unknown_model_lists_known_names():
  with pytest.raises(ValueError, match='resnet34'):
    models.create('resnet35', 10)


def test_create_rejects_unknown_head_option():
  with pytest.raises(ValueError, match='Unknown head options'):
    models.create('simple_cnn_tiny', 10, head=dict(pooling='avg'))


def test_backbone_and_head_names_and_logits_shape():
  model = models.create('simple_cnn_tiny', 5)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert set(variables['params']) == {'backbone', 'head'}
  assert set(variables['params']['head']) == {'hidden0', 'logits'}
  logits = model.apply(variables, jnp.ones((3, 32, 32, 3)))
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  feats = model.apply(variables, jnp.ones((3, 32, 32, 3)), method=model.pre_logits)
  assert feats.shape == (3, 16)


def test_bf16_compute_keeps_float32_params():
  model = models.create('simple_cnn_tiny', 4, dtype=jnp.bfloat16)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  assert model.apply(variables, jnp.ones((2, 32, 32, 3))).dtype == jnp.float32


def test_conv_torch_padding_keeps_center_aligned_on_even_inputs():
  # 'SAME' on an even input with stride 2 pads (0, 1); torch pads (1, 1).
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  conv = layers.Conv(1, 3, strides=2, padding=layers.torch_padding(3))
  v = {'params': {'kernel': jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)}}
  y = conv.apply(v, x)
  # top-left tap of the first window sits on the zero padding row/column.
  np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], [[0.0, 0.0], [0.0, 5.0]])


def test_avg_pool_count_include_pad():
  x = jnp.ones((1, 3, 3, 1))
  incl = layers.avg_pool_torch(x, 3, 1, 1, count_include_pad=True)
  excl = layers.avg_pool_torch(x, 3, 1, 1, count_include_pad=False)
  assert float(incl[0, 0, 0, 0]) == pytest.approx(4 / 9)
  assert float(excl[0, 0, 0, 0]) == pytest.approx(1.0)
