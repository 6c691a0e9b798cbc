"""Image folders: `root/<class>/*` (flat) or `root/<split>/<class>/*` (Kaggle style).

Also reads a class-name file such as 10 Monkey Species' `monkey_labels.txt`
(`Label, Latin Name, Common Name, ...`) so reports and confusion matrices say
"mantled_howler" instead of "n0", and takes class subsets with a per-class
limit (Animals-10's `cane`/`cavallo`, 500 each). Decoding goes through
`decode.decode`, so bad files are skipped with a reason, never raised.

Symlinks that resolve inside the root are followed; one that leads out of
it (a class directory or file linked from elsewhere on the machine) is
skipped with a reason, like an unreadable file, unless
`data.follow_symlinks=True`: a dataset is what lies under its root, and a
stray link must not add a class or images silently.
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
  skipped: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)

  @property
  def class_names(self) -> list[str]:
    return [self.names[d] for d in self.class_dirs]


class LinkGuard:
  """Admits paths that stay inside `root` (after resolving symlinks) and records the rest.

  Only symlinks are resolved (a walk that starts inside the root and
  enters only admitted directories stays inside it), so a plain folder
  costs no extra system calls. `skipped` collects `(path, reason)`, once
  per path however often it is listed; `switch` is how the caller's user
  turns following on.
  """

  def __init__(self, root: str, follow: bool = False, switch: str = 'data.follow_symlinks=True'):
    self.root, self.follow, self.switch = root, follow, switch
    self._real_root = os.path.realpath(root)
    self.skipped: list[tuple[str, str]] = []
    self._recorded: set[str] = set()

  def admits(self, path: str, is_link: bool | None = None) -> bool:
    if self.follow or not (os.path.islink(path) if is_link is None else is_link):
      return True
    target = os.path.realpath(path)
    if os.path.commonpath([target, self._real_root]) == self._real_root:
      return True
    if path not in self._recorded:
      self._recorded.add(path)
      self.skipped.append((path, f'symlink to {target}, outside the data root {self.root}; set '
                                 f'{self.switch} to follow it'))
    return False


def _listdirs(path: str, guard: LinkGuard | None = None) -> list[str]:
  out = []
  for entry in os.scandir(path):
    if entry.name.startswith('.') or not entry.is_dir():
      continue
    if guard is None or guard.admits(entry.path, entry.is_symlink()):
      out.append(entry.name)
  return sorted(out)


def _files_under(path: str, guard: LinkGuard | None = None) -> list[str]:
  """Every non-hidden file below `path` (recursively, sorted); dotfiles are OS litter.

  A directory's files come before its subdirectories'. Linked directories
  are entered once each (by resolved path), so a link cycle ends.
  """
  out, seen = [], set()

  def walk(directory: str):
    real = os.path.realpath(directory)
    if real in seen:
      return
    seen.add(real)
    files, dirs = [], []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
      if entry.name.startswith('.'):
        continue
      if guard is not None and not guard.admits(entry.path, entry.is_symlink()):
        continue
      (dirs if entry.is_dir() else files).append(entry.path)
    out.extend(files)
    for d in dirs:
      walk(d)

  walk(path)
  return out


def _split_dir(root: str, dirname: str, guard: LinkGuard | None = None) -> str:
  """Kaggle archives nest `training/training/n0`: descend through a same-named lone folder."""
  path = os.path.join(root, dirname)
  if guard is not None and not guard.admits(path):
    raise ValueError(f'split folder {path} is a symlink to {os.path.realpath(path)}, outside the '
                     f'data root; set {guard.switch} to read it, or move it into the root.')
  inner = _listdirs(path, guard)
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
  guards: dict[str, LinkGuard] = {}
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
    guards = {name: LinkGuard(root, cfg.follow_symlinks) for name in split_dirs}
    class_roots = {name: _split_dir(root, d, guards[name]) for name, d in split_dirs.items()}
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
    guards = {'train': LinkGuard(root, cfg.follow_symlinks)}
  per_split_dirs = {name: _listdirs(path, guards[name]) for name, path in class_roots.items()}
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
    files[name] = {d: _files_under(os.path.join(path, d), guards[name])
                   if d in per_split_dirs[name] else [] for d in class_dirs}
  skipped = {name: guard.skipped for name, guard in guards.items()}
  for name, items in skipped.items():
    for path, reason in items:
      log.warning('skipping %s: %s', path, reason)
  return FolderScan(root, layout, class_dirs, names, files, split_dirs, skipped)


def _pool(cfg):
  threads = cfg.decode_threads or os.cpu_count() or 1
  return concurrent.futures.ThreadPoolExecutor(max_workers=threads)


def decode_split(scan_: FolderScan, split: str, cfg, *, load_size: int, geometry: str,
                 resample: str = 'bilinear') -> Split:
  """Decodes one split into the cache, honouring `max_per_class` (first N usable files)."""
  per_class = scan_.files[split]
  limit = cfg.max_per_class
  chosen: dict[int, list] = {}
  skipped, converted = list(scan_.skipped.get(split, [])), []
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
    log.warning('%s/%s: %d of %d files skipped (unreadable, or linked from outside the root); '
                'the run summary lists them', scan_.root, split, len(skipped), len(skipped) + n)
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
