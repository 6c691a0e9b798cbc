"""Parameter labelling rules, freezing without optimizer state, decay masks, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models, optim
from tljax.config import phase

SHAPE = (1, 32, 32, 3)


@pytest.fixture(scope='module')
def cnn():
  model = models.create('simple_cnn_tiny', 3, head=dict(hidden=(8,)))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(SHAPE))['params']
  return model, params, optim.backbone_blocks(model, params, SHAPE)


def _trainable(labels):
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  return sorted('/'.join(k.key for k in path) for path, v in flat if v == optim.TRAINABLE)


def test_blocks_follow_execution_order_and_attach_bn_to_conv(cnn):
  _, _, blocks = cnn
  assert blocks == [['conv0', 'bn0'], ['conv1', 'bn1']]


def test_resnet_blocks_and_stages_in_execution_order():
  model = models.create('resnet_tiny', 4)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(SHAPE))['params']
  blocks = optim.backbone_blocks(model, params, SHAPE)
  assert blocks[0] == ['conv1', 'bn1']
  names = [b[0] for b in blocks[1:]]
  assert names == sorted(names, key=lambda n: (int(n[5:].split('_')[0]), int(n.split('_')[1])))
  labels = optim.param_labels(params, 'stages:1', blocks)
  last_stage = names[-1].split('_')[0]
  assert {p.split('/')[1].split('_')[0] for p in _trainable(labels)} == {last_stage}


@pytest.mark.parametrize('rule, expected', [
    ('head', ['head/hidden0/bias', 'head/hidden0/kernel', 'head/logits/bias', 'head/logits/kernel']),
    ('top:1', ['backbone/bn1/bias', 'backbone/bn1/scale', 'backbone/conv1/kernel']),
    ('re:conv0', ['backbone/conv0/kernel']),
    ('re:^head/logits+re:bn0/scale', ['backbone/bn0/scale', 'head/logits/bias', 'head/logits/kernel']),
])
def test_rules_select_exactly(cnn, rule, expected):
  _, params, blocks = cnn
  assert _trainable(optim.param_labels(params, rule, blocks)) == expected


def test_every_leaf_is_labelled(cnn):
  _, params, blocks = cnn
  for rule in ('head', 'all', 'head+top:2', 'stages:1'):
    labels = optim.param_labels(params, rule, blocks)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert set(jax.tree.leaves(labels)) <= {optim.TRAINABLE, optim.FROZEN}
  assert len(_trainable(optim.param_labels(params, 'all', blocks))) == len(jax.tree.leaves(params))


@pytest.mark.parametrize('rule, message', [
    ('re:nothing_here', 'matches no parameter'),
    ('top:3', 'has 2 blocks'),
    ('backbone', 'unknown trainable term'),
])
def test_bad_rules_are_rejected_with_the_reason(cnn, rule, message):
  _, params, blocks = cnn
  with pytest.raises(ValueError, match=message):
    optim.param_labels(params, rule, blocks)


def test_the_trainable_grammar_parses_into_terms():
  T = optim.Term
  assert optim.parse_trainable('head') == (T('head'),)
  assert optim.parse_trainable('head+top:2+stages:1+all') == (
      T('head'), T('top', 2), T('stages', 1), T('all'))
  assert optim.parse_trainable(r're:layer4_\d+/+head') == (T('re', r'layer4_\d+/'), T('head'))
  assert optim.parse_trainable('re:a+b+re:c') == (T('re', 'a+b'), T('re', 'c'))
  assert str(T('top', 3)) == 'top:3'


@pytest.mark.parametrize('rule, message', [
    ('backbone', "unknown trainable term 'backbone'; use '\\+'-joined terms: head \\| all"),
    ('head+', "unknown trainable term ''"),
    ('head+backbone', "unknown trainable term 'backbone'"),
    ('head:1', "'head:1' takes no argument"),
    ('top:0', "'top:0' needs a count N >= 1"),
    ('stages:x', "'stages:x' needs a count N >= 1"),
    ('re:', "'re:' needs a regex"),
    ('re:[a', "'re:\\[a' has a bad regex"),
])
def test_the_parser_names_the_bad_term_and_the_grammar(rule, message):
  with pytest.raises(ValueError, match=message):
    optim.parse_trainable(rule)


def test_labels_accept_parsed_terms_and_regex_quantifiers(cnn):
  _, params, blocks = cnn
  parsed = optim.parse_trainable('re:conv\\d+/kernel+head')
  assert (_trainable(optim.param_labels(params, parsed, blocks))
          == _trainable(optim.param_labels(params, 're:conv\\d+/kernel+head', blocks))
          == sorted(['backbone/conv0/kernel', 'backbone/conv1/kernel', 'head/hidden0/bias',
                     'head/hidden0/kernel', 'head/logits/bias', 'head/logits/kernel']))


@pytest.mark.parametrize('name', sorted(optim.OPTIMIZERS))
def test_frozen_leaves_hold_no_state_and_get_no_update(cnn, name):
  _, params, blocks = cnn
  p = phase('x', trainable='head', optimizer=name, weight_decay=0.1)
  labels = optim.param_labels(params, p.trainable, blocks)
  tx = optim.make_optimizer(p, labels, steps_per_epoch=4)
  state = tx.init(params)
  n_head = len(jax.tree.leaves(params['head']))
  slots = {'adam': 2, 'adamw': 2, 'sgd': 1, 'rmsprop': 2}[name]
  arrays = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert len(arrays) == slots * n_head
  assert sum(x.size for x in arrays) == slots * sum(x.size for x in jax.tree.leaves(params['head']))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert all(not np.any(u) for u in jax.tree.leaves(updates['backbone']))
  assert all(np.all(u != 0) for u in jax.tree.leaves(updates['head']))


def test_weight_decay_touches_trainable_kernels_only(cnn):
  _, params, blocks = cnn
  p = phase('x', trainable='head+top:1', optimizer='sgd', momentum=0.0, lr=1.0, weight_decay=0.5)
  labels = optim.param_labels(params, p.trainable, blocks)
  tx = optim.make_optimizer(p, labels, steps_per_epoch=1)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  flat = {'/'.join(k.key for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
  decayed = sorted(k for k, v in flat.items() if np.any(v))
  assert decayed == ['backbone/conv1/kernel', 'head/hidden0/kernel', 'head/logits/kernel']
  np.testing.assert_allclose(flat['head/logits/kernel'], -0.5 * params['head']['logits']['kernel'],
                             rtol=1e-6)


def test_warmup_cosine_and_constant_schedules():
  p = phase('x', lr=0.1, epochs=10, schedule='cosine', warmup_epochs=1, end_lr_factor=0.1)
  s = optim.schedule(p, steps_per_epoch=10)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.05)
  assert float(s(10)) == pytest.approx(0.1)
  assert float(s(55)) == pytest.approx(0.01 + 0.09 * 0.5, rel=1e-4)
  assert float(s(100)) == pytest.approx(0.01)
  c = optim.schedule(phase('y', lr=0.3, epochs=2, warmup_epochs=0.5), steps_per_epoch=4)
  assert [round(float(c(i)), 6) for i in (0, 1, 2, 7)] == [0.0, 0.15, 0.3, 0.3]
