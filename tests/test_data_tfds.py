"""tfds source through `tfds.testing.mock_data` (no network, no prepared data)."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tljax.data import StreamingSplit, default_data_config, load_splits
from tljax.data.batching import eval_batches, train_batches
from tljax.data.tfds_source import TfdsSource

FLOWERS = ['dandelion', 'daisy', 'tulips', 'sunflowers', 'roses']


def _cfg(tmp_path, **kw):
  cfg = default_data_config()
  cfg.update(dict(source='tfds', name='tf_flowers', data_dir=str(tmp_path), decode_threads=2,
                  train_split='train[:80%]', val_split='train[80%:]'))
  cfg.update(kw)
  return cfg


def test_tfds_split_strings_decode_to_cache(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    splits = load_splits(_cfg(tmp_path), load_size=16, seed=0)
  assert list(splits) == ['train', 'val']
  train = splits['train']
  assert train.class_names == FLOWERS
  assert train.images.shape == (40, 16, 16, 3) and train.images.dtype == np.uint8
  assert train.labels.min() >= 0 and train.labels.max() < 5
  assert all(i.startswith('tf_flowers-train') for i in train.ids)
  assert train.skipped == [] and train.images.std() > 10


def test_tfds_val_carved_from_train_when_no_val_split(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    splits = load_splits(_cfg(tmp_path, train_split='train', val_split='', val_fraction=0.25),
                         load_size=8, seed=0)
  assert len(splits['train']) + len(splits['val']) == 40
  assert not set(splits['train'].ids) & set(splits['val'].ids)


def test_tfds_streaming_over_budget(tmp_path, monkeypatch):
  monkeypatch.setattr(TfdsSource, 'num_examples', lambda self, split: 40)
  with tfds.testing.mock_data(num_examples=40):
    cached = load_splits(_cfg(tmp_path), load_size=8, seed=0)
    splits = load_splits(_cfg(tmp_path, cache_budget_mb=0.001), load_size=8, seed=0)
    assert isinstance(splits['train'], StreamingSplit) and len(splits['train']) == 40
    batches = list(eval_batches(splits['val'], 16, num_devices=4, process_index=0,
                                process_count=1))
    mask = np.concatenate([b['mask'].ravel() for b in batches])
    labels = np.concatenate([b['label'].ravel() for b in batches])[mask]
    assert mask.sum() == 40 and np.array_equal(labels, cached['val'].labels)
    kw = dict(seed=0, epoch=0, num_devices=4, process_index=0, process_count=1)
    first = [b['label'] for b in train_batches(splits['train'], 8, **kw)]
    again = [b['label'] for b in train_batches(splits['train'], 8, **kw)]
    assert len(first) == 5 and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert sorted(np.concatenate([f.ravel() for f in first])) == sorted(cached['train'].labels)


def test_unprepared_dataset_error_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError) as err:
    load_splits(_cfg(tmp_path), load_size=8, seed=0)
  message = str(err.value)
  assert 'not prepared' in message and 'download_and_prepare' in message
  assert 'manual_dir' in message and str(tmp_path) in message


def test_unknown_tfds_name(tmp_path):
  with pytest.raises(ValueError, match='tfds has no dataset'):
    load_splits(_cfg(tmp_path, name='no_such_dataset_xyz'), load_size=8, seed=0)


def test_without_the_tfds_extra_one_line_names_it(tmp_path, monkeypatch, capsys):
  from tljax import inspect_data
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)   # as in a base install
  with pytest.raises(ImportError) as err:
    load_splits(_cfg(tmp_path), load_size=8, seed=0)
  message = str(err.value)
  assert "pip install 'tljax[tfds]'" in message and '\n' not in message
  assert isinstance(err.value, ValueError)                   # so the CLIs print it as one line
  assert inspect_data.main(['--tfds=tf_flowers', f'--data_dir={tmp_path}']) == 2
  assert capsys.readouterr().err.strip().endswith("pip install 'tljax[tfds]'")
