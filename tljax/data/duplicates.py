"""Exact duplicates within and across splits; across splits they are train/test leakage.

`duplicate_groups` is the one grouping rule, used by `tljax.inspect_data`
(keys: sha1 of the decoded full-resolution pixels) and by training through
`warn_cross_split` (keys: sha1 of each decoded cache image, which costs no
extra decoding). The training check therefore counts identical *training
inputs*: a byte copy and a re-saved PNG of a file match in both, and two
files that differ only below the cache resolution match only in training,
where the model cannot tell them apart either.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import os
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)


def duplicate_groups(entries: Iterable[tuple[str, str, str]], *,
                     with_members: bool = False) -> list[dict]:
  """`(split, ident, key)` triples → groups of two or more sharing a key.

  Each group is `{'hash', 'paths', 'splits', 'cross_split'}` (plus
  `'members'`, `[(split, ident)]`, if asked); cross-split groups come first,
  then by paths, so reports are stable.
  """
  by_key = collections.defaultdict(list)
  for split, ident, key in entries:
    by_key[key].append((split, ident))
  groups = []
  for key, members in by_key.items():
    if len(members) > 1:
      splits = sorted({s for s, _ in members})
      groups.append({'hash': key, 'paths': [i for _, i in members], 'splits': splits,
                     'cross_split': len(splits) > 1})
      if with_members:
        groups[-1]['members'] = members
  return sorted(groups, key=lambda g: (not g['cross_split'], g['paths']))


def cache_digests(images: np.ndarray, threads: int = 0) -> list[str]:
  """sha1 of each uint8 image; hashlib releases the GIL, so threads scale."""
  images = np.ascontiguousarray(images)
  with concurrent.futures.ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
    return list(pool.map(lambda image: hashlib.sha1(image).hexdigest(), images))


def cross_split_duplicates(splits: dict, threads: int = 0) -> list[dict]:
  """Groups of identical cached images that span splits; streamed splits are not checked."""
  entries = []
  for name, split in splits.items():
    if isinstance(getattr(split, 'images', None), np.ndarray) and len(split):
      entries += zip([name] * len(split), split.ids, cache_digests(split.images, threads))
  return [g for g in duplicate_groups(entries, with_members=True) if g['cross_split']]


def warn_cross_split(splits: dict, source: str = '', threads: int = 0) -> int:
  """Logs ONE warning line when identical images span splits; returns the group count.

  `source` is how to name the data to `python -m tljax.inspect_data` (e.g.
  `--root=DIR`), which lists every pair.
  """
  groups = cross_split_duplicates(splits, threads)
  if groups:
    example = ' = '.join(f'{s} {i}' for s, i in groups[0]['members'][:3])
    listing = f'`python -m tljax.inspect_data {source}`' if source else 'tljax.inspect_data'
    log.warning('data: %d cross-split duplicates (sets of identical images in more than one of '
                '%s; e.g. %s): val/test scores are inflated by this leakage; list them with %s '
                'and remove the copies', len(groups), '/'.join(splits), example, listing)
  return len(groups)
