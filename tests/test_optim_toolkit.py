"""Gradient accumulation, update-counting schedules, the weight EMA and the LR override.

Accumulation is checked where it matters: k small batches through the real
train step must move the weights as one batch k times larger would, and a
run interrupted mid-accumulation must resume bit-identically.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tljax import models, optim, steps
from tljax.checkpoint import Checkpointer
from tljax.config import phase
from tests.test_train_steps import fast_variables

SHAPE = (1, 16, 16, 3)


@pytest.fixture(scope='module')
def cnn():
  model = models.create('simple_cnn_tiny', 3, head=dict(hidden=(8,), dropout=0.0))
  variables = fast_variables(model, SHAPE)
  return model, variables, optim.backbone_blocks(model, variables['params'], SHAPE)


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_input(key, images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def _train(cnn, rule, optimizer, k, batch, images, labels):
  """Params after every batch step of one phase, on one device."""
  model, variables, blocks = cnn
  p = phase('p', trainable=rule, optimizer=optimizer, lr=0.05 if optimizer == 'sgd' else 3e-3,
            momentum=0.9, accumulate_steps=k)
  param_labels = optim.param_labels(variables['params'], rule, blocks)
  n_steps = len(images) // batch
  tx = optim.make_optimizer(p, param_labels, steps_per_epoch=n_steps)
  devices = jax.local_devices()[:1]
  fns = steps.build_steps(train_apply=steps.on_images(model, _to_input), tx=tx,
                          param_labels=param_labels, devices=devices, donate=False)
  state = steps.replicate(steps.TrainState(
      variables['params'], variables['batch_stats'], tx.init(variables['params']),
      np.zeros((), np.int32), steps.make_key(0)), devices)
  history = []
  for i in range(n_steps):
    part = slice(i * batch, (i + 1) * batch)
    state, _ = fns['train'](state, {'image': images[None, part], 'label': labels[None, part]})
    history.append(_flat(steps.unreplicate(state.params)))
  return history


@pytest.mark.parametrize('optimizer, rule', [('sgd', 'all'), ('adam', 'all'),
                                             ('adam', 'head+top:1')])
def test_four_accumulated_batches_of_8_equal_one_batch_of_32(cnn, optimizer, rule):
  _, variables, blocks = cnn
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (64,) + SHAPE[1:], dtype=np.uint8)
  labels = rng.integers(0, 3, 64).astype(np.int32)
  small = _train(cnn, rule, optimizer, 4, 8, images, labels)
  large = _train(cnn, rule, optimizer, 1, 32, images, labels)
  start = _flat(variables['params'])
  for i in (0, 1, 2):   # batches inside an accumulation move nothing
    assert all(small[i][key].tobytes() == start[key].tobytes() for key in start), i
  for s, l in ((small[3], large[0]), (small[7], large[1])):
    moved = [key for key in start if not np.array_equal(s[key], start[key])]
    assert moved, 'the update did not happen'
    for key in start:
      np.testing.assert_allclose(s[key], l[key], rtol=2e-5, atol=2e-6, err_msg=key)
  assert all(small[4][key].tobytes() == small[3][key].tobytes() for key in start)
  if rule != 'all':
    frozen = [key for key, v in _flat(optim.param_labels(variables['params'], rule, blocks)).items()
              if v == optim.FROZEN]
    assert frozen and all(small[7][key].tobytes() == start[key].tobytes() for key in frozen)


def _toy():
  rng = np.random.default_rng(0)
  params = {'backbone': {'w': rng.standard_normal((3, 4)).astype(np.float32)},
            'head': {'w': rng.standard_normal((4, 2)).astype(np.float32),
                     'b': rng.standard_normal(2).astype(np.float32)}}
  labels = {'backbone': {'w': optim.FROZEN}, 'head': {'w': optim.TRAINABLE, 'b': optim.TRAINABLE}}
  return params, labels


def _emitted_lrs(tx, params, n_batches):
  """-update of a unit gradient at every batch (plain SGD: the learning rate, or 0 between updates)."""
  state = tx.init(params)
  grads = jax.tree.map(np.ones_like, params)
  update = jax.jit(tx.update)
  lrs = []
  for _ in range(n_batches):
    updates, state = update(grads, state, params)
    lrs.append(-float(updates['head']['b'][0]))
  return np.asarray(lrs)


def test_the_schedule_counts_updates_and_lr_at_reads_it_per_batch():
  params, labels = _toy()
  spe, k = 12, 4     # 3 epochs = 36 batches = 9 updates, warm-up 1 epoch = 3 updates
  p = phase('p', optimizer='sgd', momentum=0.0, lr=0.1, epochs=3, schedule='cosine',
            warmup_epochs=1, end_lr_factor=0.1, accumulate_steps=k)
  lrs = _emitted_lrs(optim.make_optimizer(p, labels, spe), params, 36)
  assert not np.any(np.delete(lrs, np.arange(k - 1, 36, k)))
  applied = lrs[k - 1::k]
  np.testing.assert_allclose(applied[:4], [0.0, 0.1 / 3, 0.2 / 3, 0.1], rtol=1e-5, atol=1e-8)
  assert np.all(np.diff(applied[3:]) < 0) and applied[-1] > 0.01
  np.testing.assert_allclose([optim.lr_at(p, spe, b) for b in range(k - 1, 36, k)], applied,
                             rtol=1e-6, atol=1e-9)
  assert [optim.lr_at(p, spe, b) for b in range(4)] == [0.0] * 4   # one update's batches agree
  assert optim.lr_at(p, spe, 36) == pytest.approx(0.01)   # the phase ends at end_lr
  assert optim.lr_at(p, spe, 12) == pytest.approx(0.1)    # warm-up ends after 3 updates
  one = phase('q', lr=0.1, epochs=3, schedule='cosine', warmup_epochs=1, end_lr_factor=0.1)
  s = optim.schedule(one, spe)
  assert [optim.lr_at(one, spe, b) for b in range(40)] == [float(s(b)) for b in range(40)]


def test_an_lr_override_replaces_the_schedule_and_counts_updates():
  params, labels = _toy()
  p = phase('p', optimizer='sgd', momentum=0.0, lr=0.1, schedule='cosine', accumulate_steps=2)
  assert np.allclose(_emitted_lrs(optim.make_optimizer(p, labels, 5, lr=0.25), params, 4),
                     [0, 0.25, 0, 0.25])
  sweep = optax.exponential_decay(1e-3, transition_steps=1, decay_rate=10.0)
  np.testing.assert_allclose(_emitted_lrs(optim.make_optimizer(p, labels, 5, lr=sweep), params, 6),
                             [0, 1e-3, 0, 1e-2, 0, 1e-1], rtol=1e-5)


def test_ema_is_the_warmed_up_average_of_updated_weights():
  params, labels = _toy()
  d, k = 0.3, 2
  p = phase('p', optimizer='sgd', momentum=0.0, lr=0.1, ema_decay=d, accumulate_steps=k)
  tx = optim.make_optimizer(p, labels, 10)
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected = {key: v.astype(np.float64) for key, v in _flat(params).items()}
  rng = np.random.default_rng(3)
  n, deltas = 0, []
  for i in range(12):
    grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
    updates, state = update(grads, state, params)
    if i % k == k - 1:
      delta = min(d, (1 + n) / (10 + n))
      deltas.append(delta)
      for key, u in _flat(updates).items():
        target = _flat(params)[key].astype(np.float64) + u
        expected[key] = delta * expected[key] + (1 - delta) * target
      n += 1
    else:
      assert not any(np.any(u) for u in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
  assert deltas[0] == 0.1 and deltas[-1] == d   # both regimes of the warm-up were used
  ema = _flat(optim.ema_params(state))
  now = _flat(params)
  for key in expected:
    np.testing.assert_allclose(ema[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert ema['backbone/w'].tobytes() == now['backbone/w'].tobytes()   # frozen: EMA = weights
  assert not np.allclose(ema['head/w'], now['head/w'])


def test_without_ema_or_accumulation_the_state_is_what_it_was():
  params, labels = _toy()
  p = phase('p', optimizer='adam', lr=1e-3)
  before = optax.multi_transform(
      {optim.TRAINABLE: optax.chain(optax.adam(optax.constant_schedule(1e-3), b1=0.9, b2=0.999,
                                               eps=1e-7)),
       optim.FROZEN: optax.set_to_zero()}, labels)
  tx = optim.make_optimizer(p, labels, 10)
  state = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(before.init(params))
  assert optim.ema_params(state) is None
  grads = jax.tree.map(np.ones_like, params)
  for a, b in zip(jax.tree.leaves(tx.update(grads, state, params)),
                  jax.tree.leaves(before.update(grads, before.init(params), params))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # accumulation keeps frozen leaves stateless: Adam's two moments and one accumulator each
  acc = optim.make_optimizer(phase('p', accumulate_steps=3), labels, 10).init(params)
  trainable = sum(x.size for x in jax.tree.leaves(params['head']))
  assert sum(np.size(x) for x in jax.tree.leaves(acc) if np.ndim(x) > 0) == 3 * trainable


def _grads(i, params):
  rng = np.random.default_rng(100 + i)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)


def test_accumulation_and_ema_resume_bit_identically_mid_accumulation(tmp_path):
  params, labels = _toy()
  p = phase('p', optimizer='adam', lr=1e-2, epochs=2, schedule='cosine', accumulate_steps=3,
            ema_decay=0.5)
  tx = optim.make_optimizer(p, labels, 6)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def run(params, state, lo, hi):
    for i in range(lo, hi):
      params, state = step(params, state, _grads(i, params))
    return params, state

  straight = run(params, tx.init(params), 0, 10)
  params_4, state_4 = run(params, tx.init(params), 0, 4)   # one update and one batch into the next
  stats = {'bn': {'mean': np.zeros(2, np.float32)}}
  rng = steps.make_key(0)
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(4, {'model': {'params': params_4, 'batch_stats': stats}, 'opt_state': state_4,
                'step': np.asarray(4, np.int32), 'rng': rng}, {'step': 4, 'phase': 0})
  ckpt.wait()
  ckpt.close()

  def target(_meta):
    return {'model': {'params': params, 'batch_stats': stats},
            'train': {'opt_state': jax.tree.map(np.asarray, tx.init(params)),
                      'step': np.zeros((), np.int32), 'rng': rng}}

  ckpt = Checkpointer(str(tmp_path), keep=2)
  saved, meta = ckpt.restore_latest(target)
  ckpt.close()
  assert meta['step'] == 4
  ema_state = [s for s in jax.tree.leaves(saved['opt_state'],
                                          is_leaf=lambda x: isinstance(x, optim.EmaState))
               if isinstance(s, optim.EmaState)]
  assert len(ema_state) == 1 and int(ema_state[0].mini_step) == 1 and int(ema_state[0].count) == 1
  assert jax.tree.structure(saved['opt_state']) == jax.tree.structure(state_4)
  resumed = run(saved['model']['params'], saved['opt_state'], 4, 10)
  for a, b in ((straight[0], resumed[0]), (optim.ema_params(straight[1]),
                                           optim.ema_params(resumed[1]))):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    assert all(fa[key].tobytes() == fb[key].tobytes() for key in fa), 'resume changed the bits'
  for a, b in zip(jax.tree.leaves(straight[1]), jax.tree.leaves(resumed[1])):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
