"""Embedded real datasets, the synthetic set, stratified carving and few-shot controls."""

import numpy as np
import pytest

from tljax.data import Split, default_data_config, load_splits
from tljax.data.preprocess import KERAS_TF
from tljax.data.split import few_shot, stratified_carve


def _cfg(**kw):
  cfg = default_data_config()
  cfg.update(kw)
  return cfg


def test_synthetic_is_deterministic_balanced_and_class_dependent():
  cfg = _cfg(source='synthetic', num_classes=5, num_train=50, num_val=20, num_test=10)
  a = load_splits(cfg, load_size=24, seed=0)
  b = load_splits(cfg, load_size=24, seed=123)          # the run seed does not change the data
  assert list(a) == ['train', 'val', 'test']
  for name in a:
    assert np.array_equal(a[name].images, b[name].images)
    assert np.array_equal(a[name].labels, b[name].labels)
  train = a['train']
  assert train.images.shape == (50, 24, 24, 3) and train.images.dtype == np.uint8
  assert list(train.class_counts()) == [10] * 5
  assert not np.array_equal(a['train'].images[:10], a['val'].images[:10])
  cfg.split_seed = 1
  assert not np.array_equal(load_splits(cfg, load_size=24, seed=0)['train'].images, train.images)
  # learnable: a nearest-class-mean classifier on raw pixels beats chance by far
  flat = lambda s: s.images.reshape(len(s), -1).astype(np.float32)  # noqa: E731
  means = np.stack([flat(train)[train.labels == c].mean(0) for c in range(5)])
  val = a['val']
  pred = np.argmin(((flat(val)[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == val.labels).mean() > 0.6


@pytest.mark.parametrize('source,n,classes', [('digits', 1797, 10), ('lfw', 200, 2)])
def test_embedded_real_datasets_upsampled_and_split_deterministically(source, n, classes):
  cfg = _cfg(source=source, val_fraction=0.2, test_fraction=0.1)
  splits = load_splits(cfg, load_size=32, seed=0)
  assert list(splits) == ['train', 'val', 'test']
  assert sum(len(s) for s in splits.values()) == n
  ids = [set(s.ids) for s in splits.values()]
  assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
  for split in splits.values():
    assert split.images.shape[1:] == (32, 32, 3) and split.num_classes == classes
    assert np.all(split.class_counts() > 0)
    assert np.array_equal(split.images[..., 0], split.images[..., 2])  # gray → RGB
  assert 0.17 < len(splits['val']) / n < 0.23
  again = load_splits(cfg, load_size=32, seed=5)
  assert again['val'].ids == splits['val'].ids
  assert splits['train'].images.std() > 20                             # not blank


def test_embedded_class_subset_relabels_in_given_order():
  splits = load_splits(_cfg(source='digits', classes=('7', '1')), load_size=8, seed=0)
  assert splits['train'].class_names == ['7', '1']
  ids = splits['train'].ids + splits['val'].ids
  assert len(ids) == 179 + 182


def test_stratified_carve_keeps_every_class_in_val_when_possible():
  labels = np.array([0] * 10 + [1] * 2 + [2] * 1)
  parts = stratified_carve(labels, {'val': 0.1, 'test': 0.1}, seed=0, num_classes=3)
  assert sorted(np.concatenate(list(parts.values()))) == list(range(13))
  assert np.bincount(labels[parts['val']], minlength=3).tolist() == [1, 1, 0]
  assert np.bincount(labels[parts['train']], minlength=3).tolist() == [8, 1, 1]


def _pool(n_per_class=(10, 6, 8)):
  labels = np.concatenate([[c] * n for c, n in enumerate(n_per_class)])
  images = np.zeros((len(labels), 2, 2, 3), np.uint8)
  return Split(images, labels, ['a', 'b', 'c'], [str(i) for i in range(len(labels))])


def test_few_shot_examples_per_class_and_fraction_are_seeded():
  pool = _pool()
  k3 = few_shot(pool, examples_per_class=3, train_fraction=1.0, seed=0)
  assert k3.class_counts().tolist() == [3, 3, 3]
  assert few_shot(pool, examples_per_class=3, train_fraction=1.0, seed=0).ids == k3.ids
  assert few_shot(pool, examples_per_class=3, train_fraction=1.0, seed=1).ids != k3.ids
  half = few_shot(pool, examples_per_class=0, train_fraction=0.5, seed=0)
  assert half.class_counts().tolist() == [5, 3, 4]
  assert few_shot(pool, examples_per_class=0, train_fraction=1.0, seed=0) is pool


def test_few_shot_through_load_splits_only_touches_train():
  cfg = _cfg(source='lfw', examples_per_class=4)
  a = load_splits(cfg, load_size=8, seed=0)
  b = load_splits(cfg, load_size=8, seed=1)
  assert a['train'].class_counts().tolist() == [4, 4]
  assert a['train'].ids != b['train'].ids and a['val'].ids == b['val'].ids


def test_config_validation_messages():
  with pytest.raises(ValueError, match="source='nope'.*synthetic"):
    load_splits(_cfg(source='nope'), load_size=8, seed=0)
  with pytest.raises(ValueError, match='tfds dataset name'):
    load_splits(_cfg(source='tfds'), load_size=8, seed=0)
  with pytest.raises(ValueError, match='--config.data.root'):
    load_splits(_cfg(source='folder'), load_size=8, seed=0)
  with pytest.raises(ValueError, match='not both'):
    load_splits(_cfg(examples_per_class=2, train_fraction=0.5), load_size=8, seed=0)
  with pytest.raises(ValueError, match='val_fraction'):
    load_splits(_cfg(val_fraction=1.5), load_size=8, seed=0)
  with pytest.raises(ValueError, match='geometry'):
    load_splits(_cfg(), load_size=8, seed=0, geometry='fill')
  splits = load_splits(_cfg(), load_size=8, seed=0, preprocessing=KERAS_TF)
  assert len(splits['train']) == 256


def test_few_shot_seed_fixes_the_draw_across_run_seeds():
  cfg = _cfg(source='lfw', examples_per_class=4, few_shot_seed=3)
  a = load_splits(cfg, load_size=8, seed=0)
  b = load_splits(cfg, load_size=8, seed=1)
  drawn_by_3 = load_splits(_cfg(source='lfw', examples_per_class=4), load_size=8, seed=3)
  assert a['train'].ids == b['train'].ids == drawn_by_3['train'].ids
