"""Dataset report to run before training: classes, counts, imbalance, bad files, duplicates.

  python -m tljax.inspect_data --root=DIR [--label_file=F] [--follow_symlinks] [--json]
  python -m tljax.inspect_data --tfds=NAME [--data_dir=D] [--splits=train,test] [--json]

Every file is fully decoded (the only way to find truncated images), with the
same decoder the training loader uses, so what is reported skipped here is
exactly what training will skip. Exact duplicates are found by the sha1 of
the decoded RGB pixels at native resolution (so a byte-identical copy and a
re-saved PNG both match; a re-encoded JPEG does not), within and across
splits; a cross-split duplicate is train/test leakage. Symlinks leading out
of the root are skipped and listed, as training skips them (unless
--follow_symlinks). Exits 1 when a class is empty in some split (or a split
lacks a class) or when duplicates span splits (unless --allow_duplicates),
2 on bad arguments or an unreadable dataset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import sys

from tljax.data import folder
from tljax.data.decode import decode
from tljax.data.duplicates import duplicate_groups
from tljax.data.split import imbalance

HASH_METHOD = 'sha1 of decoded RGB pixels at native resolution (after mode conversion)'


def _detect_splits(root: str) -> list[str]:
  """Top-level folders holding only folders are splits (Kaggle); else the root is one split."""
  dirs = folder._listdirs(root)
  if not dirs:
    return []
  for d in dirs:
    path = os.path.join(root, d)
    has_files = any(not f.startswith('.') and os.path.isfile(os.path.join(path, f))
                    for f in os.listdir(path))
    if has_files or not folder._listdirs(path):
      return []
  return dirs


def _detect_label_file(root: str) -> str:
  found = sorted(glob.glob(os.path.join(root, '*label*.txt')) +
                 glob.glob(os.path.join(root, '*label*.csv')))
  return found[0] if len(found) == 1 else ''


def _folder_items(root: str, splits: list[str] | None, label_file: str, follow_symlinks: bool):
  """→ (class dirs, display names, [(split, class_dir, path)], layout, splits, skipped links)."""
  guard = folder.LinkGuard(root, follow_symlinks, '--follow_symlinks')
  splits = splits if splits is not None else _detect_splits(root)
  layout = 'split' if splits else 'flat'
  for s in splits:
    if not os.path.isdir(os.path.join(root, s)):
      raise ValueError(f'--splits names {s!r}, which is not a folder of {root}; existing: '
                       f'{folder._listdirs(root)}')
  roots = {s: folder._split_dir(root, s, guard) for s in splits} if splits else {'all': root}
  per_root = {r: folder._listdirs(r, guard) for r in roots.values()}
  class_dirs = sorted(set().union(*per_root.values()))
  names = {d: d for d in class_dirs}
  if label_file:
    mapping = folder.read_label_file(label_file)
    names = {d: mapping.get(d, d) for d in class_dirs}
  items = []
  links = []
  for split, path in roots.items():
    split_guard = folder.LinkGuard(root, follow_symlinks, '--follow_symlinks')
    for d in class_dirs:
      files = folder._files_under(os.path.join(path, d), split_guard) if d in per_root[path] else []
      items += [(split, d, f) for f in files]
    links += [(split, p, reason) for p, reason in split_guard.skipped]
  links += [(_split_of(p, roots), p, reason) for p, reason in guard.skipped]
  return class_dirs, names, items, layout, list(roots), links


def _split_of(path: str, roots: dict[str, str]) -> str:
  """The split whose folder holds `path` (a skipped class link), else the first split."""
  for split, root in roots.items():
    if os.path.dirname(path) == root:
      return split
  return next(iter(roots))


def _decode_all(jobs, threads: int):
  """jobs: [(split, class, ident, source)] → [(split, class, ident, Decoded)]."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    results = pool.map(lambda j: decode(j[3], 8, name=j[2], want_hash=True), jobs)
    return [(j[0], j[1], j[2], r) for j, r in zip(jobs, results)]


def _tfds_jobs(name: str, data_dir: str, splits: list[str] | None):
  from tljax.data.tfds_source import TfdsSource, import_tfds
  tfds = import_tfds()
  src = TfdsSource(name, data_dir)
  splits = splits or list(src.builder.info.splits) or ['train']
  jobs = []
  for split in splits:
    for ex in tfds.as_numpy(src._dataset(split)):
      label = src.class_names[int(ex[src.label_key])]
      jobs.append((split, label, ex['tfds_id'].decode(), ex[src.image_key]))
  return src.class_names, {c: c for c in src.class_names}, jobs, 'tfds', splits


def build_report(*, root: str = '', tfds_name: str = '', data_dir: str = '',
                 splits: list[str] | None = None, label_file: str = '',
                 threads: int = 0, follow_symlinks: bool = False,
                 allow_duplicates: bool = False) -> dict:
  """The report as a JSON-ready dict (see the module docstring for what it contains).

  Cross-split duplicates are a problem (so `ok` is False) unless
  `allow_duplicates`.
  """
  threads = threads or os.cpu_count() or 1
  links = []
  if tfds_name:
    class_dirs, names, jobs, layout, split_names = _tfds_jobs(tfds_name, data_dir, splits)
  else:
    if not os.path.isdir(root):
      raise ValueError(f'--root {root!r} is not a directory; give the dataset folder '
                       '(root/<class>/* or root/<split>/<class>/*)')
    label_file = label_file or _detect_label_file(root)
    if label_file and not os.path.isabs(label_file) and not os.path.exists(label_file):
      label_file = os.path.join(root, label_file)
    class_dirs, names, items, layout, split_names, links = _folder_items(
        root, splits, label_file, follow_symlinks)
    jobs = [(s, c, p, p) for s, c, p in items]
  decoded = _decode_all(jobs, threads)
  counts = {s: {names[c]: 0 for c in class_dirs} for s in split_names}
  skipped = [{'path': p, 'reason': reason, 'split': s} for s, p, reason in links]
  converted, hashes = [], []
  for split, c, ident, result in decoded:
    if result.error:
      skipped.append({'path': ident, 'reason': result.error, 'split': split})
      continue
    counts[split][names[c]] += 1
    converted += [{'path': ident, 'note': note} for note in result.notes]
    hashes.append((split, ident, result.pixel_hash))
  duplicates = duplicate_groups(hashes)
  problems = []
  for split, per_class in counts.items():
    for cls, n in per_class.items():
      if n == 0:
        present = [s for s in counts if counts[s][cls] > 0]
        problems.append(f'class {cls!r} is empty in split {split!r}' +
                        (f' (present in {present})' if present else ' (empty everywhere)'))
  cross = sum(d['cross_split'] for d in duplicates)
  if cross and not allow_duplicates:
    problems.append(f'{cross} groups of identical images span splits (train/test leakage, listed '
                    'above as ACROSS SPLITS); delete the copies, or pass --allow_duplicates to '
                    'accept them')
  if not class_dirs:
    problems.append('no class folders found; expected root/<class>/* or root/<split>/<class>/*')
  ratios = {s: imbalance(list(c.values())) if c else None for s, c in counts.items()}
  return {
      'source': 'tfds' if tfds_name else 'folder',
      'root': root, 'tfds': tfds_name, 'layout': layout, 'label_file': label_file,
      'splits': split_names,
      'classes': [names[c] for c in class_dirs],
      'class_dirs': class_dirs,
      'counts': counts,
      'totals': {s: sum(c.values()) for s, c in counts.items()},
      'imbalance': {s: (None if r is None or r == float('inf') else round(r, 3))
                    for s, r in ratios.items()},
      'skipped': skipped,
      'converted': converted,
      'duplicates': duplicates,
      'duplicate_method': HASH_METHOD,
      'problems': problems,
      'ok': not problems,
  }


def format_report(report: dict) -> str:
  lines = [f"{report['source']} {report['root'] or report['tfds']} (layout: {report['layout']}"
           + (f", labels from {report['label_file']}" if report['label_file'] else '') + ')']
  splits = report['splits']
  width = max([len(c) for c in report['classes']] + [5])
  lines.append('class'.ljust(width) + ''.join(f'{s:>12}' for s in splits))
  for c in report['classes']:
    lines.append(c.ljust(width) + ''.join(f"{report['counts'][s][c]:>12}" for s in splits))
  lines.append('total'.ljust(width) + ''.join(f"{report['totals'][s]:>12}" for s in splits))
  lines.append('imbalance (max/min)'.ljust(width) + ''.join(
      f"{'inf' if report['imbalance'][s] is None else report['imbalance'][s]:>12}" for s in splits))
  lines.append(f"skipped: {len(report['skipped'])}")
  lines += [f"  {s['path']}: {s['reason']}" for s in report['skipped']]
  lines.append(f"converted: {len(report['converted'])}")
  lines += [f"  {c['path']}: {c['note']}" for c in report['converted']]
  cross = sum(d['cross_split'] for d in report['duplicates'])
  lines.append(f"exact duplicates ({report['duplicate_method']}): {len(report['duplicates'])} "
               f'groups, {cross} across splits')
  for d in report['duplicates']:
    tag = 'ACROSS SPLITS ' if d['cross_split'] else ''
    lines.append(f"  {tag}{', '.join(d['paths'])}")
  lines += [f'PROBLEM: {p}' for p in report['problems']]
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m tljax.inspect_data', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', default='', help='image folder (flat or split layout)')
  parser.add_argument('--tfds', default='', help='tfds dataset name (must be prepared)')
  parser.add_argument('--data_dir', default='', help='tfds data_dir')
  parser.add_argument('--splits', default='', help='comma-separated split folders / tfds splits')
  parser.add_argument('--label_file', default='', help='class-name file (auto: *label*.txt)')
  parser.add_argument('--threads', type=int, default=0, help='decode threads (0 = all cores)')
  parser.add_argument('--follow_symlinks', action='store_true',
                      help='follow symlinks that lead out of --root (training: '
                      'data.follow_symlinks=True)')
  parser.add_argument('--allow_duplicates', action='store_true',
                      help='exit 0 although identical images span splits')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  args = parser.parse_args(argv)
  if bool(args.root) == bool(args.tfds):
    parser.print_usage(sys.stderr)
    print('error: give exactly one of --root or --tfds', file=sys.stderr)
    return 2
  if args.threads < 0:
    parser.print_usage(sys.stderr)
    print(f'error: --threads={args.threads}; expected >= 0 (0 = all cores)', file=sys.stderr)
    return 2
  try:
    report = build_report(root=args.root, tfds_name=args.tfds, data_dir=args.data_dir,
                          splits=[s for s in args.splits.split(',') if s] or None,
                          label_file=args.label_file, threads=args.threads,
                          follow_symlinks=args.follow_symlinks,
                          allow_duplicates=args.allow_duplicates)
  except OSError as e:
    print(f'error: cannot read {e.filename or "the dataset"}: {e.strerror or e}; check the path '
          'and its permissions', file=sys.stderr)
    return 2
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(json.dumps(report, allow_nan=False) if args.json else format_report(report))
  return 0 if report['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
