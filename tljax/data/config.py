"""Data and augmentation config defaults, and their validation.

The training configs embed these dicts so that every recipe names the same
fields; validation runs before any file is touched so that a typo in a
launch flag fails in a second, not after decoding a dataset.
"""

from __future__ import annotations

import math
import os

import ml_collections

SOURCES = ('synthetic', 'digits', 'lfw', 'folder', 'tfds')
SAMPLERS = ('uniform', 'balanced')
POLICIES = ('none', 'randaugment', 'trivialaugment')      # augment op policies


def default_data_config() -> ml_collections.ConfigDict:
  """Every field `load_splits` reads, with defaults that work offline."""
  return ml_collections.ConfigDict(dict(
      source='synthetic',        # one of SOURCES
      name='',                   # tfds dataset name, e.g. 'tf_flowers'
      data_dir='',               # tfds data_dir ('' = tfds default)
      root='',                   # image folder root
      # tfds: split strings ('train[:80%]'); folder: split directory names
      # ('training'). An empty val/test split is carved from train by
      # val_fraction/test_fraction (stratified, seeded by split_seed).
      train_split='train',
      val_split='',
      test_split='',
      val_fraction=0.2,
      test_fraction=0.0,
      split_seed=0,              # fixes the carve, independent of the run seed
      label_file='',             # e.g. 'monkey_labels.txt' (relative to root or absolute)
      classes=(),                # subset of class dir names / class names, in label order
      max_per_class=0,           # 0 = all; first N valid files per class in sorted order
      examples_per_class=0,      # few-shot: N train examples per class, drawn by seed
      train_fraction=1.0,        # few-shot: stratified fraction of train, drawn by seed
      few_shot_seed=-1,          # -1: the draw follows the run seed; >= 0 fixes it across seeds
      imbalance_ratio=1.0,       # >1: train counts long-tailed by class index, first/last = ratio
      cache_budget_mb=4096.0,    # decoded uint8 cache limit; above it, stream (decode per epoch)
      num_classes=4,             # synthetic
      num_train=256,             # synthetic
      num_val=64,                # synthetic
      num_test=0,                # synthetic
      decode_threads=0,          # 0 = os.cpu_count()
      # folder: symlinks resolving outside root are skipped with a reason
      # unless True (then followed; a link cycle is entered once)
      follow_symlinks=False,
      # 'uniform': each epoch a permutation; 'balanced': n draws with replacement, each
      # class equally likely (in-memory splits only)
      sampler='uniform',
  ))


def default_augment_config() -> ml_collections.ConfigDict:
  """On-device train augmentation; all off except crop+flip (torchvision recipe)."""
  return ml_collections.ConfigDict(dict(
      random_resized_crop=True,
      scale=(0.08, 1.0),         # area fraction of the cached image
      ratio=(3 / 4, 4 / 3),      # aspect ratio range
      flip=True,                 # horizontal, p=0.5
      rotation=0.0,              # degrees, uniform in [-r, r], reflect fill (Keras RandomRotation)
      zoom=0.0,                  # uniform in [-z, z]; positive = zoom out (Keras RandomZoom)
      brightness=0.0,            # factor in [1-b, 1+b] (torchvision ColorJitter)
      contrast=0.0,
      saturation=0.0,
      # Op policy after crop/flip/colour, per image on device: 'none', 'randaugment'
      # (policy_ops ops at bin policy_magnitude of 0..30, torchvision's scale) or
      # 'trivialaugment' (one op at a uniform bin, torchvision's wide ranges).
      policy='none',
      policy_ops=2,              # RandAugment's N
      policy_magnitude=9,        # RandAugment's M, 0..30
      # Batch mixing (the train step calls augment.mix_batch): 0 = off. With both alphas
      # > 0 a batch uses CutMix with probability mix_switch_prob, else Mixup (as timm).
      mixup_alpha=0.0,
      cutmix_alpha=0.0,
      mix_switch_prob=0.5,
      mix_prob=1.0,              # probability that a batch is mixed at all
  ))


def _fail(field: str, value, expected: str):
  raise ValueError(f'data config: {field}={value!r} is invalid; {expected}.')


def validate_data_config(cfg) -> None:
  """Raises ValueError naming the field and the fix; touches only the root's existence."""
  missing = set(default_data_config().keys()) - set(cfg.keys())
  if missing:
    raise ValueError(f'data config lacks {sorted(missing)}; start from '
                     'tljax.data.config.default_data_config().')
  if cfg.source not in SOURCES:
    _fail('source', cfg.source, f'use one of {", ".join(SOURCES)}')
  if cfg.source == 'tfds' and not cfg.name:
    _fail('name', cfg.name, "set the tfds dataset name, e.g. --config.data.name=tf_flowers")
  if cfg.source == 'folder':
    if not cfg.root:
      _fail('root', cfg.root,
            'set --config.data.root=DIR (root/<class>/* or root/<split>/<class>/*)')
    if not os.path.isdir(cfg.root):
      _fail('root', cfg.root, 'the directory does not exist')
  for field in ('val_fraction', 'test_fraction'):
    if not 0.0 <= cfg[field] < 1.0:
      _fail(field, cfg[field], 'expected 0 <= fraction < 1')
  if cfg.val_fraction + cfg.test_fraction >= 1.0:
    _fail('val_fraction+test_fraction', cfg.val_fraction + cfg.test_fraction,
          'must leave train data')
  if not 0.0 < cfg.train_fraction <= 1.0:
    _fail('train_fraction', cfg.train_fraction, 'expected 0 < fraction <= 1')
  for field in ('max_per_class', 'examples_per_class', 'num_test', 'decode_threads'):
    if cfg[field] < 0:
      _fail(field, cfg[field], 'expected >= 0 (0 = off/all/default)')
  if not (math.isfinite(cfg.imbalance_ratio) and cfg.imbalance_ratio >= 1.0):
    _fail('imbalance_ratio', cfg.imbalance_ratio, 'expected a finite ratio >= 1 (1 = as drawn)')
  if cfg.few_shot_seed < -1:
    _fail('few_shot_seed', cfg.few_shot_seed, 'expected -1 (follow the run seed) or a seed >= 0')
  if cfg.examples_per_class and cfg.train_fraction < 1.0:
    _fail('examples_per_class', cfg.examples_per_class, 'use it or train_fraction, not both')
  if not isinstance(cfg.follow_symlinks, bool):
    _fail('follow_symlinks', cfg.follow_symlinks, 'expected True or False')
  if cfg.sampler not in SAMPLERS:
    _fail('sampler', cfg.sampler, f'use one of {", ".join(SAMPLERS)}')
  if cfg.cache_budget_mb <= 0:
    _fail('cache_budget_mb', cfg.cache_budget_mb, 'expected > 0')
  if cfg.source == 'synthetic':
    if cfg.num_classes < 2:
      _fail('num_classes', cfg.num_classes, 'synthetic data needs >= 2 classes')
    if cfg.num_train < cfg.num_classes or cfg.num_val < 1:
      _fail('num_train/num_val', (cfg.num_train, cfg.num_val),
            'need num_train >= num_classes and num_val >= 1')


def validate_augment_config(cfg) -> None:
  missing = set(default_augment_config().keys()) - set(cfg.keys())
  if missing:
    raise ValueError(f'augment config lacks {sorted(missing)}; start from '
                     'tljax.data.config.default_augment_config().')
  lo, hi = cfg.scale
  if not 0.0 < lo <= hi <= 1.0:
    _fail('augment.scale', cfg.scale, 'expected 0 < min <= max <= 1')
  lo, hi = cfg.ratio
  if not 0.0 < lo <= hi:
    _fail('augment.ratio', cfg.ratio, 'expected 0 < min <= max')
  if not 0.0 <= cfg.rotation <= 180.0:
    _fail('augment.rotation', cfg.rotation, 'degrees in [0, 180]')
  if not 0.0 <= cfg.zoom < 1.0:
    _fail('augment.zoom', cfg.zoom, 'expected 0 <= zoom < 1')
  for field in ('brightness', 'contrast', 'saturation'):
    if not 0.0 <= cfg[field] < 1.0:
      _fail(f'augment.{field}', cfg[field], 'expected 0 <= factor < 1')
  if cfg.policy not in POLICIES:
    _fail('augment.policy', cfg.policy, f'use one of {", ".join(POLICIES)}')
  if not _is_int(cfg.policy_ops) or cfg.policy_ops < 1:
    _fail('augment.policy_ops', cfg.policy_ops, 'expected an integer >= 1 (RandAugment uses 2)')
  if not _is_int(cfg.policy_magnitude) or not 0 <= cfg.policy_magnitude <= 30:
    _fail('augment.policy_magnitude', cfg.policy_magnitude,
          'expected an integer bin in [0, 30] (torchvision scale; RandAugment uses 9)')
  for field in ('mixup_alpha', 'cutmix_alpha'):
    if not 0.0 <= cfg[field] < float('inf'):
      _fail(f'augment.{field}', cfg[field], 'expected a Beta alpha >= 0 (0 = off; 0.2 and 1.0 '
            'are usual for mixup and cutmix)')
  for field in ('mix_switch_prob', 'mix_prob'):
    if not 0.0 <= cfg[field] <= 1.0:
      _fail(f'augment.{field}', cfg[field], 'expected a probability in [0, 1]')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)
