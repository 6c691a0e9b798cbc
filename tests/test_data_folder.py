"""Image-folder source: both Kaggle layouts, label files, subsets, the bad-file zoo, streaming."""

import logging
import os

import numpy as np
import pytest

from tests import data_fixtures as fx
from tljax.data import StreamingSplit, load_splits
from tljax.data.batching import eval_batches, train_batches
from tljax.data.decode import decode
from tljax.data.folder import read_label_file


_cfg = fx.folder_config


def _assert_colours_match_labels(split):
  """Each decoded image's dominant colour must be its class colour (labels follow pixels)."""
  for image, label in zip(split.images, split.labels):
    colour = np.median(image.reshape(-1, 3), axis=0)
    assert np.abs(colour - fx.COLOURS[label]).max() < 40, (label, colour)


def test_monkeys_split_layout_nested_with_label_file(tmp_path):
  root = fx.monkeys(str(tmp_path), per_class=(6, 3), num_classes=3, nested=True)
  splits = load_splits(_cfg(root, train_split='training', val_split='validation',
                            label_file='monkey_labels.txt'), load_size=16, seed=0)
  assert set(splits) == {'train', 'val'}
  train, val = splits['train'], splits['val']
  assert train.class_names == ['mantled_howler', 'patas_monkey', 'bald_uakari']
  assert train.images.shape == (18, 16, 16, 3) and train.images.dtype == np.uint8
  assert list(train.class_counts()) == [6, 6, 6] and list(val.class_counts()) == [3, 3, 3]
  assert all('/training/training/n' in i for i in train.ids)
  _assert_colours_match_labels(train)
  _assert_colours_match_labels(val)
  assert train.skipped == [] and val.skipped == []


def test_label_file_parsing_without_common_name_header(tmp_path):
  path = tmp_path / 'labels.tsv'
  path.write_text('n0\tdog\nn1\thorse\n')
  assert read_label_file(str(path)) == {'n0': 'dog', 'n1': 'horse'}


def test_animals10_flat_subset_with_limit_and_carve(tmp_path):
  root = fx.animals10(str(tmp_path), {'cane': 12, 'cavallo': 9, 'gatto': 4})
  cfg = _cfg(root, classes=('cavallo', 'cane'), max_per_class=8, val_fraction=0.25, split_seed=3)
  splits = load_splits(cfg, load_size=12, seed=0)
  train, val = splits['train'], splits['val']
  assert train.class_names == ['cavallo', 'cane']          # order of data.classes
  total = train.class_counts() + val.class_counts()
  assert list(total) == [8, 8] and list(val.class_counts()) == [2, 2]
  # max_per_class takes the first N files in sorted order
  assert sorted(os.path.basename(i) for i, l in zip(train.ids + val.ids,
                np.concatenate([train.labels, val.labels])) if l == 1) == \
      [f'img_{i:03d}.jpg' for i in range(8)]
  assert not set(train.ids) & set(val.ids)
  # the carve depends only on split_seed, not on the run seed
  again = load_splits(cfg, load_size=12, seed=99)
  assert again['val'].ids == val.ids
  cfg.split_seed = 4
  assert load_splits(cfg, load_size=12, seed=0)['val'].ids != val.ids
  for split in splits.values():
    fx_colours = [fx.COLOURS[1], fx.COLOURS[0]]  # cavallo was written with colour 1, cane 0
    for image, label in zip(split.images, split.labels):
      assert np.abs(np.median(image.reshape(-1, 3), 0) - fx_colours[label]).max() < 40


def test_bad_file_zoo_is_converted_or_skipped_never_raised(tmp_path, caplog):
  root = tmp_path / 'ds'
  fx.write_class_dir(str(root / 'a'), 0, 4)
  fx.write_class_dir(str(root / 'b'), 1, 4)
  fx.write_zoo(str(root / 'a'), 0)
  with caplog.at_level(logging.WARNING):
    splits = load_splits(_cfg(root, val_fraction=0.25), load_size=16, seed=0)
  train = splits['train']
  skipped = {os.path.basename(p): r for p, r in train.skipped}
  converted = {}
  for p, note in train.converted:
    converted.setdefault(os.path.basename(p), []).append(note)
  expected_skip = {k for k, (kind, _) in fx.ZOO.items() if kind == 'skip'}
  assert set(skipped) == expected_skip
  for name in expected_skip:
    assert fx.ZOO[name][1] in skipped[name]
    assert name in caplog.text                              # warned, not silent
  for name, (kind, note) in fx.ZOO.items():
    if kind == 'convert':
      assert any(note in n for n in converted[name]), (name, converted.get(name))
  ids = {os.path.basename(i) for s in splits.values() for i in s.ids}
  assert ids >= {k for k, (kind, _) in fx.ZOO.items() if kind != 'skip'}
  assert '.DS_Store' not in ids and not expected_skip & ids
  total = sum(len(s) for s in splits.values())
  assert total == 8 + len(fx.ZOO) - len(expected_skip)
  for split in splits.values():
    for image, label, ident in zip(split.images, split.labels, split.ids):
      if label == 0 and 'gray' not in ident:                 # colour survives conversion
        assert np.abs(np.median(image.reshape(-1, 3), 0) - fx.COLOURS[0]).max() < 40, ident


def test_decode_sixteen_bit_scaling_matches_eight_bit(tmp_path):
  arr = fx.class_image(2, 5)
  (tmp_path / 'a.png').write_bytes(fx.png16_rgb(arr.astype(np.uint16) * 257))
  out = decode(str(tmp_path / 'a.png'), 14, 'exact')
  ref = decode(fx.png16_rgb(arr.astype(np.uint16) * 257), 14, 'exact', name='x.png')
  assert out.error is None and np.array_equal(out.image, ref.image)
  assert np.abs(out.image.astype(int).mean((0, 1)) - arr.mean((0, 1))).max() < 3


def test_empty_class_and_single_split_class_rejected(tmp_path):
  flat = tmp_path / 'flat'
  fx.write_class_dir(str(flat / 'a'), 0, 4)
  os.makedirs(flat / 'empty')
  with pytest.raises(ValueError, match="class 'empty'.*empty in every split"):
    load_splits(_cfg(flat), load_size=8, seed=0)
  unreadable = tmp_path / 'unreadable'
  fx.write_class_dir(str(unreadable / 'a'), 0, 4)
  os.makedirs(unreadable / 'b')
  (unreadable / 'b' / 'x.jpg').write_bytes(b'')
  with pytest.raises(ValueError, match="class 'b'"):
    load_splits(_cfg(unreadable), load_size=8, seed=0)
  split = tmp_path / 'split'
  fx.write_class_dir(str(split / 'train' / 'a'), 0, 3)
  fx.write_class_dir(str(split / 'train' / 'b'), 1, 3)
  fx.write_class_dir(str(split / 'val' / 'a'), 0, 2)
  with pytest.raises(ValueError, match="class 'b'.*present only in \\['train'\\]"):
    load_splits(_cfg(split, val_split='val'), load_size=8, seed=0)


def test_config_errors_are_actionable(tmp_path):
  with pytest.raises(ValueError, match='source'):
    load_splits(_cfg(tmp_path, source='kaggle'), load_size=8, seed=0)
  with pytest.raises(ValueError, match='does not exist'):
    load_splits(_cfg(tmp_path / 'missing'), load_size=8, seed=0)
  fx.write_class_dir(str(tmp_path / 'a'), 0, 2)
  with pytest.raises(ValueError, match="no 'training' folder"):
    load_splits(_cfg(tmp_path, train_split='training', val_split='validation'), load_size=8,
                seed=0)
  with pytest.raises(ValueError, match='not found; available'):
    load_splits(_cfg(tmp_path, classes=('zebra',)), load_size=8, seed=0)


def test_streaming_when_over_budget_matches_cache(tmp_path):
  root = tmp_path / 'ds'
  for split, n in (('train', 5), ('val', 2)):
    fx.write_class_dir(str(root / split / 'a'), 0, n)
    fx.write_class_dir(str(root / split / 'b'), 1, n)
  (root / 'train' / 'b' / 'broken.jpg').write_bytes(b'\xff\xd8garbage')
  cfg = _cfg(root, val_split='val')
  cached = load_splits(cfg, load_size=8, seed=0)
  cfg.cache_budget_mb = 1e-4
  streamed = load_splits(cfg, load_size=8, seed=0)
  assert isinstance(streamed['train'], StreamingSplit)
  assert [len(s) for s in streamed.values()] == [11, 4]       # counts files before decoding
  got = list(eval_batches(streamed['train'], 4, num_devices=2, process_index=0, process_count=1))
  images = np.concatenate([b['image'].reshape(-1, 8, 8, 3)[b['mask'].reshape(-1)] for b in got])
  assert len(images) == len(cached['train']) == 10
  assert np.array_equal(images, cached['train'].images)
  assert [os.path.basename(p) for p, _ in streamed['train'].skipped] == ['broken.jpg']
  kw = dict(seed=1, epoch=0, num_devices=2, process_index=0, process_count=1)
  a = [b['label'] for b in train_batches(streamed['train'], 4, **kw)]
  b = [b['label'] for b in train_batches(streamed['train'], 4, start_step=1, **kw)]
  assert len(a) == 2 and np.array_equal(a[1], b[0])


def test_cache_follows_the_backbone_preprocessing(tmp_path):
  from PIL import Image
  from tljax.data.preprocess import EFFICIENTNET_LITE, KERAS_TF
  os.makedirs(tmp_path / 'a')
  os.makedirs(tmp_path / 'b')
  rng = np.random.default_rng(0)
  for c in 'ab':
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(
          tmp_path / c / f'{i}.png')
  path = str(tmp_path / 'a' / '0.png')
  cfg = _cfg(tmp_path, val_fraction=0.5)
  by_spec = {}
  for name, spec in (('torchvision', None), ('lite', EFFICIENTNET_LITE), ('keras', KERAS_TF)):
    split = load_splits(cfg, load_size=20, seed=0, preprocessing=spec)
    images = dict(zip(split['train'].ids + split['val'].ids,
                      np.concatenate([split['train'].images, split['val'].images])))
    by_spec[name] = images[path]
  assert np.array_equal(by_spec['torchvision'], decode(path, 20, 'shorter').image)
  assert np.array_equal(by_spec['lite'], decode(path, 20, 'shorter', resample='bicubic').image)
  assert np.array_equal(by_spec['keras'], decode(path, 20, 'exact').image)
  assert not np.array_equal(by_spec['torchvision'], by_spec['lite'])
