"""Class-weighted loss: the global weighted mean on any device count, and what it buys.

A linear head on cached features stands in for a model: the weighting lives
in `steps.train_step`, which is the same code on features or images.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tljax import optim, steps, train
from tljax.config import base_config, validate

DIM, CLASSES = 2, 2


def linear_apply(params, batch_stats, batch, cache, keys, train):
  del batch_stats, cache, keys, train
  head = params['head']
  return batch['feature'] @ head['kernel'] + head['bias'], None


def init_params():
  return {'head': {'kernel': np.zeros((DIM, CLASSES), np.float32),
                   'bias': np.zeros((CLASSES,), np.float32)}}


def imbalanced(n, seed, minority=0.1):
  """Two overlapping Gaussians, class 1 rare: an unweighted fit mostly predicts class 0."""
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < minority).astype(np.int32)
  features = rng.standard_normal((n, DIM)).astype(np.float32) + labels[:, None] * 1.2
  return features, labels


def fit(features, labels, weights, steps_=300, devices=None):
  devices = devices or jax.local_devices()
  d = len(devices)
  params = init_params()
  labels_tree = optim.param_labels(params, 'head')
  tx = optax.sgd(0.5)
  fns = steps.build_steps(train_apply=linear_apply, tx=tx, param_labels=labels_tree,
                          class_weights=weights, devices=devices, donate=False)
  state = steps.TrainState(params=params, batch_stats={}, opt_state=tx.init(params),
                           step=np.zeros((), np.int32), rng=steps.make_key(0))
  rstate = steps.replicate(state, devices)
  batch = {'feature': features.reshape(d, -1, DIM), 'label': labels.reshape(d, -1)}
  for _ in range(steps_):
    # One step in flight at a time: hundreds of queued 8-device all-reduces on a 2-core host
    # can starve one device thread past XLA:CPU's 40 s rendezvous limit (it then aborts).
    rstate, metrics = jax.block_until_ready(fns['train'](rstate, batch, None))
  return steps.unreplicate(rstate).params, jax.device_get(metrics)


def recall(params, features, labels, cls):
  pred = np.argmax(features @ params['head']['kernel'] + params['head']['bias'], -1)
  return float(np.mean(pred[labels == cls] == cls))


def test_balanced_weights_follow_sklearns_rule_and_explicit_weights_are_checked():
  split = types.SimpleNamespace(class_names=['a', 'b', 'c'],
                                class_counts=lambda: np.array([80, 15, 5]))
  w = train.class_weights('balanced', split)
  np.testing.assert_allclose(w, [100 / (3 * 80), 100 / (3 * 15), 100 / (3 * 5)])
  assert train.class_weights('none', split) is None
  assert train.class_weights('1,2,3.5', split) == (1.0, 2.0, 3.5)
  with pytest.raises(ValueError, match='2 weights for 3 classes'):
    train.class_weights('1,2', split)


@pytest.mark.parametrize('bad', ['inverse', '1,-1', '0,0', 'nan,1', '', '1,,2'])
def test_invalid_class_weights_are_config_errors(bad):
  c = base_config()
  c.loss.class_weights = bad
  with pytest.raises(ValueError, match='loss.class_weights'):
    validate(c)


def test_weighted_step_is_the_global_weighted_mean_on_any_device_count():
  features, labels = imbalanced(64, seed=3, minority=0.3)
  weights = (0.4, 2.5)
  one, m1 = fit(features, labels, weights, steps_=1, devices=jax.local_devices()[:1])
  many, m8 = fit(features, labels, weights, steps_=1)
  assert len(jax.local_devices()) > 1

  def weighted_mean(params):
    logits = features @ params['head']['kernel'] + params['head']['bias']
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = jnp.asarray(weights)[labels]
    return jnp.sum(w * losses) / jnp.sum(w)

  grads = jax.grad(weighted_mean)(init_params())
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, init_params(), grads)
  for got in (one, many):
    for k in ('kernel', 'bias'):
      np.testing.assert_allclose(got['head'][k], expected['head'][k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1['loss'][0], weighted_mean(init_params()), rtol=1e-5)
  np.testing.assert_allclose(m8['loss'][0], weighted_mean(init_params()), rtol=1e-5)


def test_balanced_weights_raise_minority_recall_on_an_imbalanced_split():
  features, labels = imbalanced(512, seed=0)
  test_f, test_l = imbalanced(2000, seed=1)
  split = types.SimpleNamespace(class_names=['common', 'rare'],
                                class_counts=lambda: np.bincount(labels, minlength=2))
  plain, _ = fit(features, labels, None)
  balanced, _ = fit(features, labels, train.class_weights('balanced', split))
  rare_plain, rare_balanced = recall(plain, test_f, test_l, 1), recall(balanced, test_f, test_l, 1)
  assert rare_balanced > rare_plain + 0.3, (rare_plain, rare_balanced)
  assert recall(balanced, test_f, test_l, 0) < 1.0   # the trade: common-class recall pays


def test_imbalance_ratio_makes_a_long_tailed_train_split_and_is_validated():
  from tljax.data import split as S
  from tljax.data.config import default_data_config, validate_data_config
  labels = np.repeat(np.arange(5), 30).astype(np.int32)
  pool = S.Split(images=np.zeros((150, 4, 4, 3), np.uint8), labels=labels,
                 class_names=[f'c{i}' for i in range(5)], ids=[str(i) for i in range(150)],
                 name='train')
  counts = S.few_shot(pool, examples_per_class=16, train_fraction=1.0, seed=0,
                      imbalance_ratio=8.0).class_counts()
  np.testing.assert_array_equal(counts, [16, 10, 6, 3, 2])   # 16 · 8^(−c/4), rounded
  assert S.few_shot(pool, examples_per_class=0, train_fraction=1.0, seed=0,
                    imbalance_ratio=1.0) is pool
  cfg = default_data_config()
  cfg.imbalance_ratio = 0.5
  with pytest.raises(ValueError, match='imbalance_ratio'):
    validate_data_config(cfg)
