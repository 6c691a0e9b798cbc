"""Drop-connect apart from BatchNorm: `phase.drop_connect='when_trained'` regularises a
backbone fine-tuned with frozen BatchNorm (as PyTorch's model.train() with BN in eval does),
while the default keeps Keras' `training=False` behaviour and a frozen trunk stays exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import config as config_lib
from tljax import models, optim, steps


@pytest.fixture(scope='module')
def model_and_vars():
  model = models.create('efficientnet_lite_tiny', 3, head={'dropout': 0.0})
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  return model, variables, x


def _out(model, variables, x, seed, **kw):
  """The backbone's feature map (the fresh head's logits are ~1e-9)."""
  return model.apply(variables, x, rngs={'dropout': jax.random.key(seed)}, method='features',
                     **kw)


def _differ(a, b):
  """Relative: a fresh tiny network's activations are ~1e-9."""
  return float(np.max(np.abs(a - b))) > 1e-3 * float(np.max(np.abs(a)))


def test_stochastic_turns_drop_connect_on_without_batch_statistics(model_and_vars):
  model, variables, x = model_and_vars
  frozen = _out(model, variables, x, 1, train=True, bn_train=False)
  assert np.array_equal(frozen, _out(model, variables, x, 2, train=True, bn_train=False))
  a = _out(model, variables, x, 1, train=True, bn_train=False, stochastic=True)
  b = _out(model, variables, x, 2, train=True, bn_train=False, stochastic=True)
  assert _differ(a, b)          # branches dropped per key
  assert _differ(a, frozen)
  evaluated = _out(model, variables, x, 1, train=False, bn_train=False, stochastic=False)
  assert np.array_equal(evaluated, frozen)   # running statistics either way


def test_backbones_without_stochastic_layers_ignore_it():
  model = models.create('simple_cnn_tiny', 3)
  x = jnp.zeros((2, 24, 24, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  out = model.apply(variables, x, train=False, bn_train=False, stochastic=True)
  assert out.shape == (2, 3)


def test_policy_needs_a_trained_backbone(model_and_vars):
  model, variables, _ = model_and_vars
  params = variables['params']
  when = config_lib.phase('p', trainable='all', drop_connect='when_trained')
  assert optim.stochastic_backbone(when, optim.param_labels(params, 'all'))
  assert not optim.stochastic_backbone(when, optim.param_labels(params, 'head'))
  follow = config_lib.phase('p', trainable='all')
  assert follow.drop_connect == 'follow_bn'
  assert not optim.stochastic_backbone(follow, optim.param_labels(params, 'all'))


def test_train_apply_draws_drop_connect_only_in_training_steps(model_and_vars):
  model, variables, x = model_and_vars
  images = (np.asarray(x) * 127 + 128).astype(np.uint8)
  apply = steps.on_images(model, lambda key, im: im.astype(jnp.float32) / 128 - 1,
                          bn_train=False, stochastic_backbone=True)
  run = lambda seed, train: apply(variables['params'], variables['batch_stats'],
                                  {'image': images}, None,
                                  (None, jax.random.key(seed)), train)[0]
  assert _differ(run(1, True), run(2, True))
  assert np.array_equal(run(1, False), run(2, False))


def test_bad_policy_is_a_config_error():
  c = config_lib.base_config()
  c.phases = (config_lib.phase('p', drop_connect='always'),)
  with pytest.raises(ValueError, match=r"phases\[0\].drop_connect='always' is invalid"):
    config_lib.validate(c)
