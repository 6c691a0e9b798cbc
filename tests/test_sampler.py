"""Class-balanced sampling: pure in (seed, epoch), resumable, balanced, the same on every host."""

import numpy as np
import pytest

from tljax.data import Split, StreamingSplit, default_data_config
from tljax.data.batching import balanced_order, epoch_order, train_batches
from tljax.data.config import validate_data_config


def _split(counts=(90, 10), size=2) -> Split:
  labels = np.repeat(np.arange(len(counts)), counts)
  n = len(labels)
  images = np.broadcast_to((np.arange(n) % 251).astype(np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()
  return Split(images, labels, [str(c) for c in range(len(counts))], [str(i) for i in range(n)])


def _indices(split, batch=10, **kw):
  kw = dict(dict(seed=5, epoch=2, num_devices=2, process_index=0, process_count=1), **kw)
  return [b['index'].reshape(-1) for b in train_batches(split, batch, **kw)]


def test_balanced_order_is_a_pure_function_of_seed_and_epoch():
  labels = _split().labels
  a, b = balanced_order(labels, 3, 1), balanced_order(labels, 3, 1)
  np.testing.assert_array_equal(a, b)
  assert len(a) == len(labels) and a.min() >= 0 and a.max() < len(labels)
  assert not np.array_equal(a, balanced_order(labels, 3, 2))
  assert not np.array_equal(a, balanced_order(labels, 4, 1))


def test_balanced_epochs_draw_classes_about_equally():
  split = _split((90, 10))
  per_class = np.zeros(2)
  for epoch in range(60):
    idx = np.concatenate(_indices(split, epoch=epoch, sampler='balanced'))
    per_class += np.bincount(split.labels[idx], minlength=2)
  share = per_class / per_class.sum()
  assert abs(share[1] - 0.5) < 0.03                 # uniform sampling would give 0.10
  three = _split((70, 20, 10))
  idx = np.concatenate([balanced_order(three.labels, 0, e) for e in range(60)])
  np.testing.assert_allclose(np.bincount(three.labels[idx]) / len(idx), 1 / 3, atol=0.03)


@pytest.mark.parametrize('sampler', ['uniform', 'balanced'])
def test_resume_from_start_step_reads_the_same_batches(sampler):
  split = _split()
  full = _indices(split, sampler=sampler)
  resumed = _indices(split, sampler=sampler, start_step=4)
  assert len(full) == 10 and len(resumed) == 6
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(full, _indices(split, sampler=sampler)):
    np.testing.assert_array_equal(a, b)


def test_every_process_takes_its_slice_of_one_balanced_order():
  split = _split()
  hosts = [_indices(split, process_index=p, process_count=2, num_devices=1, sampler='balanced')
           for p in range(2)]
  whole = np.concatenate([np.concatenate([hosts[0][s], hosts[1][s]]) for s in range(10)])
  np.testing.assert_array_equal(whole, balanced_order(split.labels, 5, 2)[:100])


def test_uniform_is_the_unchanged_permutation():
  split = _split()
  default = np.concatenate(_indices(split))
  np.testing.assert_array_equal(default, np.concatenate(_indices(split, sampler='uniform')))
  np.testing.assert_array_equal(default, epoch_order(100, 5, 2))


def test_balanced_refuses_streamed_splits_and_unknown_samplers():
  streamed = StreamingSplit(make_source=lambda seed: None, num_examples=40, class_names=['a', 'b'],
                            load_size=8, geometry='shorter', from_path=True, name='train')
  with pytest.raises(ValueError, match=r"sampler='balanced'.*streamed.*cache_budget_mb.*'uniform'"):
    next(train_batches(streamed, 8, seed=0, epoch=0, num_devices=1, process_index=0,
                       process_count=1, sampler='balanced'))
  with pytest.raises(ValueError, match='sampler=.*weighted.*uniform, balanced'):
    next(train_batches(_split(), 10, seed=0, epoch=0, num_devices=1, process_index=0,
                       process_count=1, sampler='weighted'))


def test_data_config_validates_the_sampler():
  cfg = default_data_config()
  assert cfg.sampler == 'uniform'
  validate_data_config(cfg)
  cfg.sampler = 'balanced'
  validate_data_config(cfg)
  cfg.sampler = 'weighted'
  with pytest.raises(ValueError, match=r"sampler='weighted' is invalid; use one of uniform, bal"):
    validate_data_config(cfg)
