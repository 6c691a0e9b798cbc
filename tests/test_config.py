"""Config as data: one argument grammar for recipes, one registry per choice.

Validation and construction must read the same registry, so these tests add a
choice to a registry and check that both sides see it, rather than comparing
two lists that could drift apart again.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tljax import components, config as config_lib, optim
from tljax.config import base_config, config_args, phase
from tljax.data import preprocess
from tljax.models import layers


def test_config_args_defaults_to_the_first_value_of_each_key():
  assert config_args('', model=('a', 'b'), cut=('x', 'y')) == {
      'model': 'a', 'cut': 'x', 'tiny': False}
  assert config_args(' cut=y , tiny,model=b', model=('a', 'b'), cut=('x', 'y')) == {
      'model': 'b', 'cut': 'y', 'tiny': True}
  assert config_args('tiny') == {'tiny': True}


@pytest.mark.parametrize('arg, message', [
    ('modle=a', "unknown config argument 'modle' in 'modle=a'; this recipe takes tiny, model=a\\|b"),
    ('model=c', "config argument model='c' is invalid; use one of a, b"),
    ('b', "unknown config argument 'b' \\(write model=b\\)"),
    ('small', "unknown config argument 'small'; this recipe takes tiny, model=a\\|b"),
    ('model=a,model=b', "config argument 'model' is given twice"),
    ('tiny=1', "unknown config argument 'tiny' in 'tiny=1'"),
])
def test_config_args_errors_name_the_item_and_what_the_recipe_takes(arg, message):
  with pytest.raises(ValueError, match=message):
    config_args(arg, model=('a', 'b'))


def test_a_recipe_cannot_redefine_the_tiny_switch():
  with pytest.raises(ValueError, match='test switch'):
    config_args('', tiny=('yes', 'no'))


def _validate_phase_field(field, value):
  c = base_config()
  c.phases = (phase('p', **{field: value}),)
  config_lib.validate(c)


def test_a_new_optimizer_is_one_registry_entry(monkeypatch):
  with pytest.raises(ValueError, match="optimizer='adagrad' is invalid"):
    _validate_phase_field('optimizer', 'adagrad')
  monkeypatch.setitem(optim.OPTIMIZERS, 'adagrad', lambda p, lr: optax.adagrad(lr))
  _validate_phase_field('optimizer', 'adagrad')
  params = {'head': {'logits': {'kernel': jnp.ones((2, 2))}}}
  labels = {'head': {'logits': {'kernel': optim.TRAINABLE}}}
  tx = optim.make_optimizer(phase('p', optimizer='adagrad'), labels, 1)
  updates, _ = tx.update(params, tx.init(params), params)
  assert np.all(np.asarray(updates['head']['logits']['kernel']) < 0)


def test_a_new_schedule_is_one_registry_entry(monkeypatch):
  with pytest.raises(ValueError, match="schedule='step' is invalid"):
    _validate_phase_field('schedule', 'step')
  monkeypatch.setitem(optim.SCHEDULES, 'step', lambda p, total, warmup: lambda s: p.lr / (1 + s))
  _validate_phase_field('schedule', 'step')
  assert float(optim.schedule(phase('p', lr=1.0, schedule='step'), 4)(3)) == 0.25


def test_a_new_pool_is_one_registry_entry(monkeypatch):
  c = base_config()
  c.model.head.pool = 'min'
  with pytest.raises(ValueError, match="pool='min' is invalid; use one of 'avg', 'max', 'flatten'"):
    config_lib.validate(c)
  monkeypatch.setitem(layers.POOLS, 'min', lambda x: jnp.min(x, axis=(1, 2)))
  config_lib.validate(c)
  head = layers.Head(num_classes=2, pool='min')
  x = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
  variables = head.init(jax.random.key(0), x)
  np.testing.assert_allclose(head.apply(variables, x, return_pre_logits=True)[1], x.min(axis=(1, 2)))


def test_a_new_preprocessing_preset_is_one_registry_entry(monkeypatch):
  c = base_config()
  c.preprocessing = 'caffe'
  with pytest.raises(ValueError, match="preprocessing='caffe' is invalid"):
    config_lib.validate(c)
  caffe = preprocess.Preprocessing(mean=(103.9, 116.8, 123.7), std=(1.0, 1.0, 1.0))
  monkeypatch.setitem(preprocess.PRESETS, 'caffe', caffe)
  config_lib.validate(c)
  assert components.preprocessing(c) == caffe


@pytest.mark.parametrize('field, registry, values', [
    ('model.dtype', components.DTYPES, ('float32', 'bfloat16')),
    ('loss.kind', components.LOSSES, ('softmax', 'sigmoid')),
    ('pretrained.source', components.PRETRAINED, ('none', 'dir', 'efficientnet_lite')),
    ('model.head.activation', layers.ACTIVATIONS, ('relu', 'swish')),
])
def test_validation_accepts_exactly_the_registry_keys(field, registry, values):
  assert set(values) <= set(registry)
  parent, _, leaf = field.rpartition('.')
  for value in list(registry) + ['no_such_' + leaf]:
    c = base_config()
    node = c
    for part in parent.split('.'):
      node = node[part]
    node[leaf] = value
    if field == 'pretrained.source' and value == 'dir':
      c.pretrained.path = 'weights/x'
    if value in registry:
      config_lib.validate(c)
    else:
      with pytest.raises(ValueError, match=f"{leaf}='no_such_{leaf}' is invalid; use one of "
                                           + ', '.join(repr(k) for k in registry)):
        config_lib.validate(c)


def test_bn_policies_say_whether_batchnorm_trains():
  assert {p: optim.bn_train(phase('p', bn=p)) for p in optim.BN_POLICIES} == {
      'frozen': False, 'train': True}
  with pytest.raises(ValueError, match="bn='off' is invalid; use one of 'frozen', 'train'"):
    _validate_phase_field('bn', 'off')


def test_loss_registry_sizes_the_head():
  c = base_config()
  assert components.num_outputs(c, 5) == 5
  c.loss.kind = 'sigmoid'
  assert components.num_outputs(c, 2) == 1
  with pytest.raises(ValueError, match='needs exactly 2 classes'):
    components.num_outputs(c, 3)


def test_validation_and_labels_share_the_trainable_parser():
  with pytest.raises(ValueError, match="phases\\[0\\].trainable='head\\+top:0' is invalid; "
                                       "trainable term 'top:0' needs a count N >= 1"):
    _validate_phase_field('trainable', 'head+top:0')
  _validate_phase_field('trainable', r're:stage4_\d+/+head')
