"""`load_splits`: the one entry point from a data config to decoded (or streamed) splits.

Every source ends in the same shape: a dict with 'train', 'val' and maybe
'test', each a `Split` (uint8 cache at `load_size`) or, when the cache would
exceed `cache_budget_mb`, a `StreamingSplit`. Carving, few-shot subsampling,
class coverage checks and the summary are shared, so a folder, a tfds name
and the synthetic set behave the same downstream.
"""

from __future__ import annotations

import logging

import numpy as np

from tljax.data import embedded, folder
from tljax.data.config import validate_data_config
from tljax.data.decode import GEOMETRIES
from tljax.data.duplicates import warn_cross_split
from tljax.data.split import Split, check_coverage, few_shot, stratified_carve, summarize
from tljax.data.streaming import StreamingSplit, folder_stream
from tljax.data.tfds_source import TfdsSource, default_threads

log = logging.getLogger(__name__)


def _carve(pool: Split, cfg) -> dict[str, Split]:
  fractions = {'val': cfg.val_fraction}
  if cfg.test_fraction > 0:
    fractions['test'] = cfg.test_fraction
  parts = stratified_carve(pool.labels, fractions, cfg.split_seed, pool.num_classes)
  out = {name: pool.take(idx, name) for name, idx in parts.items()}
  for name, split in out.items():
    if name != 'train':  # the pool's skip/convert records are reported once, on train
      split.skipped, split.converted = [], []
  return out


def _cache_mb(n: int, load_size: int) -> float:
  return n * load_size * load_size * 3 / 2 ** 20


def _folder(cfg, load_size: int, geometry: str, resample: str) -> dict:
  scan = folder.scan(cfg)
  limit = cfg.max_per_class
  n = sum(min(len(f), limit) if limit else len(f)
          for per_class in scan.files.values() for f in per_class.values())
  threads = default_threads(cfg)
  if _cache_mb(n, load_size) <= cfg.cache_budget_mb:
    decoded = {name: folder.decode_split(scan, name, cfg, load_size=load_size, geometry=geometry,
                                         resample=resample) for name in scan.files}
    if 'val' not in decoded:
      train = decoded.pop('train')
      decoded = {**_carve(train, cfg), **decoded}
    return decoded
  log.warning('folder %s: %d images at %dpx need %.0f MB > cache_budget_mb=%d; streaming '
              '(decoding every epoch)', cfg.root, n, load_size, _cache_mb(n, load_size),
              cfg.cache_budget_mb)
  out = {}
  for name in scan.files:
    paths, labels = folder.file_list(scan, name, cfg)
    out[name] = (paths, labels)
  if 'val' not in out:
    paths, labels = out.pop('train')
    fractions = {'val': cfg.val_fraction}
    if cfg.test_fraction:
      fractions['test'] = cfg.test_fraction
    parts = stratified_carve(labels, fractions, cfg.split_seed, len(scan.class_dirs))
    out.update({k: ([paths[i] for i in idx], labels[idx]) for k, idx in parts.items()})
  streams = {name: folder_stream(p, l, scan.class_names, load_size=load_size, geometry=geometry,
                                 name=name, threads=threads, resample=resample)
             for name, (p, l) in out.items()}
  for name, skipped in scan.skipped.items():
    streams[name].skipped.extend(skipped)
  return streams


def _tfds(cfg, load_size: int, geometry: str, resample: str) -> dict:
  src = TfdsSource(cfg.name, cfg.data_dir)
  wanted = {'train': cfg.train_split, 'val': cfg.val_split, 'test': cfg.test_split}
  wanted = {k: v for k, v in wanted.items() if v}
  sizes = {k: src.num_examples(v) for k, v in wanted.items()}
  known = [n for n in sizes.values() if n is not None]
  threads = default_threads(cfg)
  if known and len(known) == len(sizes) and _cache_mb(sum(known), load_size) > cfg.cache_budget_mb:
    if not cfg.val_split:
      raise ValueError(f'tfds {cfg.name!r} is streamed (over cache_budget_mb='
                       f'{cfg.cache_budget_mb}) '
                       "so val cannot be carved from train; set data.val_split, e.g. "
                       "train_split='train[:90%]', val_split='train[90%:]'.")
    log.warning('tfds %s: %d examples at %dpx exceed cache_budget_mb=%d; streaming', cfg.name,
                sum(known), load_size, cfg.cache_budget_mb)
    return {k: src.streaming(v, load_size=load_size, geometry=geometry, threads=threads, name=k,
                             num_examples=sizes[k], resample=resample) for k, v in wanted.items()}
  decoded = {k: src.decoded(v, load_size=load_size, geometry=geometry, threads=threads, name=k,
                            resample=resample) for k, v in wanted.items()}
  if 'val' not in decoded:
    train = decoded.pop('train')
    decoded = {**_carve(train, cfg), **decoded}
  return decoded


def _inspect_args(cfg) -> str:
  """How `python -m tljax.inspect_data` names this data, for the duplicates warning."""
  if cfg.source == 'folder':
    return f'--root={cfg.root}' + (' --follow_symlinks' if cfg.follow_symlinks else '')
  if cfg.source == 'tfds':
    return f'--tfds={cfg.name}' + (f' --data_dir={cfg.data_dir}' if cfg.data_dir else '')
  return ''


def load_splits(data_cfg, *, load_size: int, seed: int, preprocessing=None,
                geometry: str | None = None) -> dict[str, Split | StreamingSplit]:
  """Config → {'train', 'val'[, 'test']}, decoded once at `load_size` x `load_size`.

  The cache geometry follows the backbone's preprocessing: `'shorter'`
  (torchvision: shorter side to `load_size`, centre square) or `'exact'`
  (Keras: squash the whole image), resized with its interpolation; pass
  `preprocessing` (a `Preprocessing`) or `geometry` (then bilinear). `seed`
  only drives the few-shot subsampling of train (unless `data_cfg.few_shot_seed`
  fixes it, so a sweep can vary the run seed over one draw); the val/test carve uses
  `data_cfg.split_seed` so it stays fixed across seeds. Identical images in
  more than one split are reported in one warning line
  (`duplicates.warn_cross_split`); streamed splits are not checked.
  """
  cfg = data_cfg
  validate_data_config(cfg)
  if load_size < 1:
    raise ValueError(f'load_size must be >= 1, got {load_size}')
  if geometry is None:
    geometry = preprocessing.resize_mode if preprocessing is not None else 'shorter'
  resample = preprocessing.interpolation if preprocessing is not None else 'bilinear'
  if geometry not in GEOMETRIES:
    raise ValueError(f'geometry must be one of {GEOMETRIES}, got {geometry!r}')
  if cfg.source == 'synthetic':
    splits = {'train': embedded.synthetic(cfg.num_train, cfg.num_classes, load_size,
                                          cfg.split_seed, 'train'),
              'val': embedded.synthetic(cfg.num_val, cfg.num_classes, load_size,
                                        cfg.split_seed, 'val')}
    if cfg.num_test:
      splits['test'] = embedded.synthetic(cfg.num_test, cfg.num_classes, load_size,
                                          cfg.split_seed, 'test')
  elif cfg.source in ('digits', 'lfw'):
    pool = embedded.digits(load_size) if cfg.source == 'digits' else embedded.lfw(load_size)
    if cfg.classes:
      unknown = [c for c in cfg.classes if c not in pool.class_names]
      if unknown:
        raise ValueError(f'data.classes {unknown} not in {pool.class_names}')
      keep = [pool.class_names.index(c) for c in cfg.classes]
      idx = np.flatnonzero(np.isin(pool.labels, keep))
      pool = pool.take(idx)
      remap = np.full(len(pool.class_names), -1)
      remap[keep] = np.arange(len(keep))
      pool = Split(pool.images, remap[pool.labels], list(cfg.classes), pool.ids, name=pool.name)
    splits = _carve(pool, cfg)
  elif cfg.source == 'folder':
    splits = _folder(cfg, load_size, geometry, resample)
  else:
    splits = _tfds(cfg, load_size, geometry, resample)
  class_names = splits['train'].class_names
  check_coverage(splits, class_names)
  if cfg.examples_per_class or cfg.train_fraction < 1.0 or cfg.imbalance_ratio != 1.0:
    if isinstance(splits['train'], StreamingSplit):
      raise ValueError('examples_per_class/train_fraction/imbalance_ratio need the decoded cache; '
                       'the train split is streamed. Raise data.cache_budget_mb or lower the load '
                       'size.')
    splits['train'] = few_shot(splits['train'], examples_per_class=cfg.examples_per_class,
                               train_fraction=cfg.train_fraction,
                               seed=seed if cfg.few_shot_seed < 0 else cfg.few_shot_seed,
                               imbalance_ratio=cfg.imbalance_ratio)
  ordered = {k: splits[k] for k in ('train', 'val', 'test') if k in splits}
  warn_cross_split(ordered, _inspect_args(cfg), threads=default_threads(cfg))
  log.info('data (%s, %dpx, %s):\n%s', cfg.source, load_size, geometry, summarize(ordered))
  return ordered
