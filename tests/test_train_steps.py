"""Pure steps: freezing is bit-exact, frozen trunks get no backward pass, losses, devices, caching."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import models, ops, optim, steps
from tljax.config import phase

SHAPE = (16, 32, 32, 3)


def fast_variables(model, shape=SHAPE, seed=0):
  """Random variables without compiling an init (threefry compiles slowly on busy CPUs)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + shape[1:]))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return (rng.standard_normal(s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, dict(shapes))
  variables.setdefault('batch_stats', {})
  return variables


def to_input(key, images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def make_batch(devices, n=16, seed=0, classes=3):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, (n,) + SHAPE[1:], dtype=np.uint8)
  labels = rng.integers(0, classes, n).astype(np.int32)
  return {'image': images.reshape((devices, n // devices) + SHAPE[1:]),
          'label': labels.reshape(devices, n // devices)}


@pytest.fixture(scope='module')
def setup():
  model = models.create('simple_cnn_tiny', 3, head=dict(hidden=(8,), dropout=0.0))
  variables = fast_variables(model)
  blocks = optim.backbone_blocks(model, variables['params'], SHAPE)
  return model, variables, blocks


def run_phase(setup, rule, bn, n_steps=3, devices=None, loss='softmax', model=None, variables=None,
              cached_batches=None, batches=None, optimizer='adam', cache=None):
  base_model, base_vars, blocks = setup
  model, variables = model or base_model, variables or base_vars
  devices = devices or jax.local_devices()
  p = phase('p', trainable=rule, bn=bn, lr=1e-2, optimizer=optimizer)
  labels = optim.param_labels(variables['params'], rule, blocks)
  tx = optim.make_optimizer(p, labels, steps_per_epoch=n_steps)
  state = steps.TrainState(variables['params'], variables['batch_stats'],
                           tx.init(variables['params']), np.zeros((), np.int32), steps.make_key(0))
  train_apply = (steps.on_features(model) if cached_batches is not None else
                 steps.on_images(model, to_input, bn_train=bn == 'train'))
  fns = steps.build_steps(train_apply=train_apply, tx=tx, param_labels=labels, loss_kind=loss,
                          devices=devices, donate=False)
  rstate = steps.replicate(state, devices)
  metrics = []
  for i in range(n_steps):
    if cached_batches is not None:
      batch = cached_batches[i]
    elif batches is not None:
      batch = batches[i]
    else:
      batch = make_batch(len(devices), seed=i)
    rstate, m = fns['train'](rstate, batch, cache)
    metrics.append(m)
  return steps.unreplicate(rstate), jax.device_get(metrics)


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _bit_equal(a, b):
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_head_only_phase_leaves_backbone_and_stats_bit_identical(setup):
  _, variables, _ = setup
  final, _ = run_phase(setup, 'head', 'frozen')
  before, after = _flat(variables['params']), _flat(final.params)
  for k in before:
    if k.startswith('backbone/'):
      assert _bit_equal(before[k], after[k]), k
    else:
      assert not np.array_equal(before[k], after[k]), k
  for k, v in _flat(variables['batch_stats']).items():
    assert _bit_equal(v, _flat(final.batch_stats)[k]), k
  stateful = [x for x in jax.tree.leaves(final.opt_state) if np.ndim(x) > 0]
  assert sum(x.size for x in stateful) == 2 * optim.count(variables['params'], optim.param_labels(
      variables['params'], 'head'))['trainable']


@pytest.fixture(scope='module')
def fine_tuned_on_8_devices(setup):
  return run_phase(setup, 'all', 'frozen', n_steps=2)[0]


def test_fine_tune_with_frozen_bn_keeps_statistics(setup, fine_tuned_on_8_devices):
  _, variables, _ = setup
  final = fine_tuned_on_8_devices
  for k, v in _flat(variables['batch_stats']).items():
    assert _bit_equal(v, _flat(final.batch_stats)[k]), k
  assert not np.array_equal(variables['params']['backbone']['conv0']['kernel'],
                            final.params['backbone']['conv0']['kernel'])


def test_multi_device_equals_single_device(setup, fine_tuned_on_8_devices):
  one, _ = run_phase(setup, 'all', 'frozen', n_steps=2, devices=jax.local_devices()[:1])
  for k, v in _flat(one.params).items():
    np.testing.assert_allclose(v, _flat(fine_tuned_on_8_devices.params)[k], rtol=2e-5, atol=2e-6,
                               err_msg=k)


def _flops(fn, *args):
  # XLA's own ops: its cost analysis does not see into the CPU backend's custom calls.
  with ops.use_backend('xla'):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops']


def test_head_only_step_costs_about_one_forward(setup):
  """No backward pass through a frozen trunk: the head-only step's FLOPs ≈ the forward's."""
  model, variables, blocks = setup
  params, stats = variables['params'], variables['batch_stats']
  x = np.zeros(SHAPE[1:], np.uint8)[None].repeat(SHAPE[0], 0)
  batch = {'image': x, 'label': np.zeros(SHAPE[0], np.int32)}
  forward = _flops(lambda v, im: model.apply(v, to_input(None, im)), variables, x)
  costs = {}
  for rule in ('head', 'top:1', 'all'):
    labels = optim.param_labels(params, rule, blocks)
    tx = optim.make_optimizer(phase('p', trainable=rule), labels, 1)
    state = steps.TrainState(params, stats, tx.init(params), jnp.zeros((), jnp.int32),
                             steps.make_key(0))
    step = functools.partial(steps.train_step, apply_fn=steps.on_images(model, to_input), tx=tx,
                             param_labels=labels, loss_kind='softmax', label_smoothing=0.0)
    vmapped = jax.vmap(step, axis_name=steps.AXIS)
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], (state, batch))
    costs[rule] = _flops(vmapped, *stacked) / forward
  assert costs["head"] < 1.3, costs
  assert costs['head'] < costs['top:1'] < costs['all'], costs
  assert costs['all'] > 2.0, costs


def test_gathering_images_on_device_is_bit_identical_to_shipping_them(setup):
  from tljax.data import batching
  from tljax.data.split import Split
  rng = np.random.default_rng(7)
  images = rng.integers(0, 255, (48,) + SHAPE[1:], dtype=np.uint8)
  split = Split(images, rng.integers(0, 3, 48), ['a', 'b', 'c'], [str(i) for i in range(48)])
  shipped = list(batching.train_batches(split, 16, seed=0, epoch=0))
  indexed = [{'index': b['index'], 'label': b['label']} for b in shipped]
  host, _ = run_phase(setup, 'all', 'train', batches=[{'image': b['image'], 'label': b['label']}
                                                     for b in shipped])
  device, _ = run_phase(setup, 'all', 'train', batches=indexed, cache=batching.device_cache(split))
  for k, v in _flat(host.params).items():
    assert _bit_equal(v, _flat(device.params)[k]), k


def test_softmax_loss_with_label_smoothing_matches_formula():
  logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], np.float32)
  labels = np.array([0, 2])
  eps = 0.1
  target = np.full((2, 3), eps / 3)
  target[np.arange(2), labels] += 1 - eps
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(target * logp).sum(-1)
  got = steps.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), 'softmax', eps)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_binary_sigmoid_head_loss_and_predictions():
  logits = np.array([[1.5], [-0.3], [0.2]], np.float32)
  labels = np.array([1, 1, 0])
  p = 1 / (1 + np.exp(-logits[:, 0]))
  expected = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  np.testing.assert_allclose(steps.per_example_loss(logits, labels, 'sigmoid'), expected, rtol=1e-6)
  assert steps.predict_classes(jnp.asarray(logits), 'sigmoid').tolist() == [1, 0, 1]
  assert steps.top_k_correct(jnp.asarray(logits), jnp.asarray(labels), 'sigmoid').tolist() == [
      True, False, False]


def test_binary_head_trains(setup):
  _, _, blocks = setup
  model = models.create('simple_cnn_tiny', 1, head=dict(hidden=(8,)))
  variables = fast_variables(model, seed=1)
  batch = make_batch(8, classes=2)
  final, metrics = run_phase(setup, 'head', 'frozen', n_steps=12, loss='sigmoid', model=model,
                             variables=variables, batches=[batch] * 12)
  assert metrics[-1]['loss'][0] < 0.8 * metrics[0]['loss'][0]


def test_bn_training_in_bfloat16_updates_statistics_and_keeps_float32_params(setup):
  model = models.create('simple_cnn_tiny', 3, head=dict(hidden=(8,)), dtype=jnp.bfloat16)
  variables = fast_variables(model, seed=3)
  final, metrics = run_phase(setup, 'all', 'train', n_steps=2, model=model, variables=variables)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(final.params))
  assert np.isfinite(metrics[-1]['loss']).all()
  for k, v in _flat(variables['batch_stats']).items():
    assert not np.array_equal(v, _flat(final.batch_stats)[k]), k


def test_precise_bn_step_returns_the_batch_statistics(setup):
  model, variables, _ = setup
  devices = jax.local_devices()[:1]
  batch = make_batch(1, seed=5)
  state = steps.TrainState(variables['params'], variables['batch_stats'], None,
                           np.zeros((), np.int32), steps.make_key(0))
  fn = steps.build_backbone_steps(model, to_input, pool=False, devices=devices)['bn_stats']
  stats = steps.unreplicate(fn(steps.replicate(state, devices), batch))
  _, inter = model.apply(variables, to_input(None, batch['image'][0]), capture_intermediates=True)
  conv0 = np.asarray(inter['intermediates']['backbone']['conv0']['__call__'][0])
  np.testing.assert_allclose(stats['backbone']['bn0']['mean'], conv0.mean((0, 1, 2)),
                             rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(stats['backbone']['bn0']['var'], conv0.var((0, 1, 2)),
                             rtol=1e-3, atol=1e-5)
