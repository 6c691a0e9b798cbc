"""Sharded batching: exact-once evaluation under pmap, multi-host slices, resumable order."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax.data import Split
from tljax.data.batching import (eval_batches, eval_steps, prefetch, steps_per_epoch,
                                 train_batches)


def _split(n: int, size: int = 2, num_classes: int = 3) -> Split:
  """Example i has all pixels equal to i % 251 and label i % num_classes, so sums identify it."""
  images = np.broadcast_to((np.arange(n) % 251).astype(np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()
  return Split(images, np.arange(n) % num_classes, [str(c) for c in range(num_classes)],
               [str(i) for i in range(n)])


@functools.lru_cache(maxsize=None)
def _pmapped_stats(d: int):
  """Masked count, label sum and pixel-value sum, psum'ed over the devices."""
  def stats(batch):
    mask = batch['mask'].astype(jnp.float32)
    pixel = batch['image'][:, 0, 0, 0].astype(jnp.float32)
    out = jnp.stack([mask.sum(), (batch['label'] * mask).sum(), (pixel * mask).sum()])
    return jax.lax.psum(out, 'batch')
  return jax.pmap(stats, axis_name='batch', devices=jax.local_devices()[:d])


@pytest.mark.parametrize('n,d,batch', [(13, 4, 4), (13, 4, 8), (1, 8, 8), (17, 3, 6),
                                       (64, 8, 16), (5, 1, 2), (9, 2, 12), (23, 5, 10),
                                       (10, 6, 12), (31, 7, 7)])
def test_eval_counts_every_example_once_under_pmap(n, d, batch):
  split = _split(n)
  totals = np.zeros(3)
  steps = 0
  for b in eval_batches(split, batch, num_devices=d, process_index=0, process_count=1):
    assert b['image'].shape == (d, batch // d, 2, 2, 3) and b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
    totals += np.asarray(_pmapped_stats(d)(b))[0]
    steps += 1
  assert steps == eval_steps(n, batch)
  labels = np.arange(n) % 3
  np.testing.assert_allclose(totals, [n, labels.sum(), (np.arange(n) % 251).sum()])


@pytest.mark.parametrize('n,hosts,d,batch', [(13, 2, 2, 4), (50, 4, 2, 8), (7, 3, 1, 3)])
def test_multi_host_eval_and_train_slices_partition_the_data(n, hosts, d, batch):
  split = _split(n)
  per_host = [list(eval_batches(split, batch, num_devices=d, process_index=p, process_count=hosts))
              for p in range(hosts)]
  assert len({len(h) for h in per_host}) == 1                # every host runs the same steps
  seen = np.concatenate([b['index'][b['mask']] for h in per_host for b in h])
  assert sorted(seen) == list(range(n))
  train = [list(train_batches(split, batch, seed=3, epoch=1, num_devices=d, process_index=p,
                              process_count=hosts)) for p in range(hosts)]
  steps = steps_per_epoch(n, batch)
  assert all(len(h) == steps for h in train)
  for s in range(steps):                                     # hosts take disjoint slices
    idx = np.concatenate([train[p][s]['index'].ravel() for p in range(hosts)])
    assert len(set(idx)) == batch


def test_train_order_is_a_function_of_seed_epoch_and_resumes_bit_identically():
  split = _split(40)
  kw = dict(num_devices=4, process_index=0, process_count=1)
  full = list(train_batches(split, 8, seed=7, epoch=2, **kw))
  assert len(full) == 5
  assert sorted(np.concatenate([b['index'].ravel() for b in full])) == list(range(40))
  again = list(train_batches(split, 8, seed=7, epoch=2, **kw))
  resumed = list(train_batches(split, 8, seed=7, epoch=2, start_step=3, **kw))
  for a, b in zip(full, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  for a, b in zip(full[3:], resumed):
    assert np.array_equal(a['image'], b['image']) and np.array_equal(a['label'], b['label'])
  other_epoch = list(train_batches(split, 8, seed=7, epoch=3, **kw))
  other_seed = list(train_batches(split, 8, seed=8, epoch=2, **kw))
  assert not np.array_equal(full[0]['index'], other_epoch[0]['index'])
  assert not np.array_equal(full[0]['index'], other_seed[0]['index'])
  assert np.array_equal(full[0]['label'], split.labels[full[0]['index']])


def test_layout_errors_are_clear():
  split = _split(10)
  with pytest.raises(ValueError, match='not divisible by process_count\\*local_devices = 1\\*4'):
    next(train_batches(split, 6, seed=0, epoch=0, num_devices=4, process_index=0, process_count=1))
  with pytest.raises(ValueError, match='fewer than one global batch'):
    next(train_batches(split, 16, seed=0, epoch=0, num_devices=4, process_index=0,
                       process_count=1))
  with pytest.raises(ValueError, match='not divisible'):
    next(eval_batches(split, 6, num_devices=4, process_index=0, process_count=1))


def test_defaults_use_all_local_devices():
  batch = next(eval_batches(_split(20), 16))
  assert batch['image'].shape[0] == jax.local_device_count()


def test_prefetch_preserves_order_propagates_errors_and_stops():
  def slow(n):
    for i in range(n):
      time.sleep(0.01)
      yield {'x': np.full((2, 1), i)}
  assert [int(b['x'][0, 0]) for b in prefetch(slow(6), buffer_size=2)] == list(range(6))

  def failing():
    yield {'x': np.zeros((1, 1))}
    raise RuntimeError('decode failed')
  it = prefetch(failing())
  next(it)
  with pytest.raises(RuntimeError, match='decode failed'):
    next(it)
  devices = jax.local_devices()[:2]
  with prefetch(slow(100), buffer_size=1, devices=devices) as it:
    first = next(it)
    assert first['x'].sharding.device_set == set(devices)
    summed = jax.pmap(lambda x: x + 1, devices=devices)(first['x'])
    assert np.array_equal(np.asarray(summed), np.ones((2, 1)))
  assert not it._thread.is_alive()


def test_threaded_gather_equals_fancy_indexing():
  from tljax.data.batching import _gather
  images = np.random.default_rng(0).integers(0, 256, (80, 128, 128, 3), dtype=np.uint8)
  idx = np.random.default_rng(1).permutation(80)[:70]
  big = np.concatenate([idx, idx, idx])                     # 10 MB: the threaded path
  assert np.array_equal(_gather(images, big), images[big])
  assert np.array_equal(_gather(images, idx[:3]), images[idx[:3]])


def test_device_cache_gather_matches_host_batches():
  from tljax.data.batching import device_cache
  d = 4
  split = _split(21, size=3)
  devices = jax.local_devices()[:d]
  cache = device_cache(split, devices)
  assert cache.shape == (d, 21, 3, 3, 3)
  gather = jax.pmap(lambda c, i: jnp.take(c, i, axis=0), devices=devices)
  kw = dict(num_devices=d, process_index=0, process_count=1)
  for host, light in zip(train_batches(split, 8, seed=0, epoch=0, **kw),
                         train_batches(split, 8, seed=0, epoch=0, with_images=False, **kw)):
    assert 'image' not in light and np.array_equal(host['label'], light['label'])
    assert np.array_equal(np.asarray(gather(cache, light['index'])), host['image'])
