"""Image folders: `root/<class>/*` (flat) or `root/<split>/<class>/*` (Kaggle style).

Also reads a class-name file such as 10 Monkey Species' `monkey_labels.txt`
(`Label, Latin Name, Common Name, ...`) so reports and confusion matrices say
"mantled_howler" instead of "n0", and takes class subsets with a per-class
limit (Animals-10's `cane`/`cavallo`, 500 each). Decoding goes through
`decode.decode`, so bad files are skipped with a reason, never raised.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import logging
import os

import numpy as np

from tljax.data.decode import decode
from tljax.data.split import Split

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FolderScan:
  """What is on disk, before any decoding.

  `files[split][class_dir]` lists paths in sorted order; `class_dirs` fixes
  the label order; `names[class_dir]` is the display name.
  """

  root: str
  layout: str                                  # 'flat' | 'split'
  class_dirs: list[str]
  names: dict[str, str]
  files: dict[str, dict[str, list[str]]]
  split_dirs: dict[str, str]                   # our split name → directory name

  @property
  def class_names(self) -> list[str]:
    return [self.names[d] for d in self.class_dirs]


def _listdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path)
                if not d.startswith('.') and os.path.isdir(os.path.join(path, d)))


def _files_under(path: str) -> list[str]:
  """Every non-hidden file below `path` (recursively, sorted); dotfiles are OS litter."""
  out = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith('.'))
  return out


def _split_dir(root: str, dirname: str) -> str:
  """Kaggle archives nest `training/training/n0`: descend through a same-named lone folder."""
  path = os.path.join(root, dirname)
  inner = _listdirs(path)
  has_files = any(os.path.isfile(os.path.join(path, f)) for f in os.listdir(path))
  if inner == [dirname] and not has_files:
    return os.path.join(path, dirname)
  return path


def read_label_file(path: str) -> dict[str, str]:
  """`dir name → display name` from a CSV/TSV whose first column is the directory name.

  Uses the column titled "Common Name" when there is one (10 Monkey Species),
  else the second column. A header row is recognised by a first cell that
  is not a directory name, so files with or without headers both work.
  """
  if not os.path.isfile(path):
    raise ValueError(f'label_file {path!r} does not exist; give a path relative to root or '
                     'an absolute one, or leave label_file empty to use the folder names.')
  with open(path, newline='', encoding='utf-8-sig') as fh:
    text = fh.read()
  delimiter = '\t' if text.count('\t') > text.count(',') else ','
  reader = csv.reader(text.splitlines(), delimiter=delimiter)
  rows = [[cell.strip() for cell in row] for row in reader]
  rows = [row for row in rows if any(row)]
  if not rows:
    raise ValueError(f'label_file {path!r} is empty')
  header = [cell.lower() for cell in rows[0]]
  column = 1
  if 'common name' in header:
    column, rows = header.index('common name'), rows[1:]
  elif header[0] in ('label', 'class', 'dir', 'folder', 'id'):
    rows = rows[1:]
  mapping = {}
  for row in rows:
    if len(row) <= column or not row[column]:
      raise ValueError(f'label_file {path!r}: row {row} has no column {column}')
    mapping[row[0]] = row[column]
  return mapping


def scan(cfg) -> FolderScan:
  """Finds splits, classes and files per the config; raises on a layout it cannot read."""
  root = cfg.root
  split_names = {'train': cfg.train_split, 'val': cfg.val_split, 'test': cfg.test_split}
  if cfg.train_split and os.path.isdir(os.path.join(root, cfg.train_split)):
    layout = 'split'
    split_dirs = {}
    for name, dirname in split_names.items():
      if not dirname:
        continue
      if not os.path.isdir(os.path.join(root, dirname)):
        raise ValueError(f'{root!r} has a {cfg.train_split!r} folder but no {dirname!r} folder for '
                         f'the {name} split; existing folders: {_listdirs(root)}. Set '
                         f'data.{name}_split to one of them, or to "" to carve it from train.')
      split_dirs[name] = dirname
    class_roots = {name: _split_dir(root, d) for name, d in split_dirs.items()}
  else:
    if cfg.val_split or cfg.test_split:
      raise ValueError(f'{root!r} has no {cfg.train_split!r} folder, so it is read as a flat '
                       f'root/<class>/* folder, but val_split={cfg.val_split!r} / test_split='
                       f'{cfg.test_split!r} name split folders. Existing folders: '
                       f'{_listdirs(root)}. '
                       'Fix train_split, or set val_split="" to carve val_fraction from train.')
    layout = 'flat'
    split_dirs = {'train': ''}
    class_roots = {'train': root}
  per_split_dirs = {name: _listdirs(path) for name, path in class_roots.items()}
  class_dirs = sorted(set().union(*per_split_dirs.values()))
  if not class_dirs:
    raise ValueError(f'No class folders under {root!r}. Expected root/<class>/* or '
                     f'root/<split>/<class>/* (train_split={cfg.train_split!r}).')
  names = {d: d for d in class_dirs}
  if cfg.label_file:
    path = cfg.label_file if os.path.isabs(cfg.label_file) else os.path.join(root, cfg.label_file)
    mapping = read_label_file(path)
    unknown = [d for d in class_dirs if d not in mapping]
    if unknown:
      raise ValueError(f'label_file {path!r} has no entry for class folders {unknown}')
    names = {d: mapping[d] for d in class_dirs}
  if cfg.classes:
    wanted = list(cfg.classes)
    lookup = {**{names[d]: d for d in class_dirs}, **{d: d for d in class_dirs}}
    unknown = [c for c in wanted if c not in lookup]
    if unknown:
      raise ValueError(f'data.classes {unknown} not found; available: '
                       f'{[f"{d} ({names[d]})" if names[d] != d else d for d in class_dirs]}')
    class_dirs = [lookup[c] for c in wanted]
  files = {}
  for name, path in class_roots.items():
    files[name] = {d: _files_under(os.path.join(path, d)) if d in per_split_dirs[name] else []
                   for d in class_dirs}
  return FolderScan(root, layout, class_dirs, names, files, split_dirs)


def _pool(cfg):
  threads = cfg.decode_threads or os.cpu_count() or 1
  return concurrent.futures.ThreadPoolExecutor(max_workers=threads)


def decode_split(scan_: FolderScan, split: str, cfg, *, load_size: int, geometry: str,
                 resample: str = 'bilinear') -> Split:
  """Decodes one split into the cache, honouring `max_per_class` (first N usable files)."""
  per_class = scan_.files[split]
  limit = cfg.max_per_class
  chosen: dict[int, list] = {}
  skipped, converted = [], []
  with _pool(cfg) as pool:
    for label, d in enumerate(scan_.class_dirs):
      paths, good, pos = per_class[d], [], 0
      while pos < len(paths) and (not limit or len(good) < limit):
        chunk = paths[pos:pos + (limit - len(good) if limit else len(paths))]
        pos += len(chunk)
        for path, result in zip(chunk, pool.map(
            lambda p: decode(p, load_size, geometry, resample=resample), chunk)):
          if result.error:
            log.warning('skipping %s: %s', path, result.error)
            skipped.append((path, result.error))
          else:
            converted.extend((path, note) for note in result.notes)
            good.append((path, result.image))
      chosen[label] = good
  n = sum(len(v) for v in chosen.values())
  images = np.empty((n, load_size, load_size, 3), np.uint8)
  labels, ids, i = np.empty(n, np.int32), [], 0
  for label, items in chosen.items():
    for path, image in items:
      images[i], labels[i] = image, label
      ids.append(path)
      i += 1
  if skipped:
    log.warning('%s/%s: %d of %d files skipped (unreadable); the run summary lists them',
                scan_.root, split, len(skipped), len(skipped) + n)
  return Split(images, labels, scan_.class_names, ids, skipped, converted, split)


def file_list(scan_: FolderScan, split: str, cfg) -> tuple[list[str], np.ndarray]:
  """Paths and labels for streaming; `max_per_class` counts files, not usable files."""
  paths, labels = [], []
  for label, d in enumerate(scan_.class_dirs):
    files = scan_.files[split][d]
    files = files[:cfg.max_per_class] if cfg.max_per_class else files
    paths += files
    labels += [label] * len(files)
  return paths, np.asarray(labels, np.int32)
