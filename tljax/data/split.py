"""The in-memory `Split` and the carving / few-shot / coverage logic shared by all sources.

A split is decoded once into a uint8 cache; everything after that (carving a
validation set, taking k examples per class) is index arithmetic on it, and
all of it is stratified and seeded so that runs and ablations are repeatable.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Split:
  """Decoded examples of one split.

  `skipped` holds `(id, reason)` for every file that could not be used and
  `converted` `(id, note)` for every file that needed a mode conversion, so a
  run summary can account for every input file.
  """

  images: np.ndarray                   # uint8 [N, S, S, 3]
  labels: np.ndarray                   # int32 [N]
  class_names: list[str]
  ids: list[str]
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  name: str = ''

  def __post_init__(self):
    self.labels = np.asarray(self.labels, np.int32)
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(f'Split images must be uint8 [N, S, S, 3], got {self.images.dtype} '
                       f'{self.images.shape}')
    if not len(self.images) == len(self.labels) == len(self.ids):
      raise ValueError(f'Split sizes differ: {len(self.images)} images, {len(self.labels)} labels, '
                       f'{len(self.ids)} ids')

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def load_size(self) -> int:
    return self.images.shape[1]

  def class_counts(self) -> np.ndarray:
    return np.bincount(self.labels, minlength=self.num_classes)

  def take(self, indices, name: str | None = None) -> 'Split':
    """A new Split of `indices` (kept in the given order); skip/convert records stay."""
    indices = np.asarray(indices, np.int64)
    return Split(self.images[indices], self.labels[indices], list(self.class_names),
                 [self.ids[i] for i in indices], list(self.skipped), list(self.converted),
                 self.name if name is None else name)


def stratified_carve(labels: np.ndarray, fractions: dict[str, float], seed: int,
                     num_classes: int) -> dict[str, np.ndarray]:
  """Splits indices per class by `fractions`; the rest go to 'train'.

  Each non-zero fraction gets at least one example of every class that has
  enough examples to leave one for train, so no class silently vanishes
  from a small validation set.
  """
  rng = np.random.default_rng([seed, 0x5EED])
  out: dict[str, list] = {name: [] for name in ['train', *fractions]}
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(len(idx))]
    start = 0
    for name, frac in fractions.items():
      k = int(round(frac * len(idx)))
      if frac > 0 and len(idx) >= 2:
        k = max(k, 1)
      k = max(0, min(k, len(idx) - start - 1))
      out[name].append(idx[start:start + k])
      start += k
    out['train'].append(idx[start:])
  return {name: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
          for name, parts in out.items()}


def few_shot(split: Split, *, examples_per_class: int, train_fraction: float, seed: int,
             imbalance_ratio: float = 1.0) -> Split:
  """Subsamples train per class, deterministic by `seed` (the ablation controls).

  `imbalance_ratio` ρ > 1 makes the kept counts long-tailed by class index:
  class c keeps its share × ρ^(−c/(k−1)) (at least one), so the first class
  has ρ times the examples of the last (the CIFAR-LT construction), a
  controlled imbalance for measuring what class weights or a balanced sampler
  buy.
  """
  if not examples_per_class and train_fraction >= 1.0 and imbalance_ratio == 1.0:
    return split
  rng = np.random.default_rng([seed, 0xF5])
  keep = []
  for c in range(split.num_classes):
    idx = np.flatnonzero(split.labels == c)
    idx = idx[rng.permutation(len(idx))]
    if examples_per_class:
      k = examples_per_class
      if len(idx) < k:
        log.warning('few-shot: class %r has only %d train examples (< examples_per_class=%d); '
                    'using all of them', split.class_names[c], len(idx), k)
    else:
      k = max(1, int(round(train_fraction * len(idx))))
    k = min(k, len(idx))
    if imbalance_ratio != 1.0 and split.num_classes > 1:
      k = max(1, int(round(k * imbalance_ratio ** (-c / (split.num_classes - 1)))))
    keep.append(idx[:k])
  return split.take(np.sort(np.concatenate(keep)))


def check_coverage(splits: dict, class_names: list[str]) -> None:
  """Rejects a class with no examples in a split: training or scoring it would be meaningless."""
  problems = []
  for name, split in splits.items():
    counts = split.class_counts() if isinstance(split, Split) else None
    if counts is None:
      continue
    for c in np.flatnonzero(counts == 0):
      present = [other for other, s in splits.items()
                 if isinstance(s, Split) and s.class_counts()[c] > 0]
      where = (f'present only in {present}' if present else 'empty in every split')
      problems.append(f'class {class_names[c]!r} has no usable examples in split {name!r} '
                      f'({where}; skipped files, if any, are listed above)')
  if problems:
    raise ValueError('Dataset rejected:\n  ' + '\n  '.join(problems) +
                     '\nFix: add images for these classes, drop them with data.classes=[...], '
                     'or lower val_fraction/test_fraction.')


def imbalance(counts: np.ndarray) -> float:
  """max/min class count (inf when a class is empty)."""
  counts = np.asarray(counts)
  return float('inf') if counts.min() == 0 else float(counts.max() / counts.min())


def summarize(splits: dict) -> str:
  """One human-readable block: counts per class and split, imbalance, skipped files."""
  lines = []
  for name, split in splits.items():
    if not isinstance(split, Split):
      lines.append(f'{name}: streaming, {split.num_examples} examples (counts not known upfront)')
      continue
    counts = split.class_counts()
    per_class = ', '.join(f'{n}={k}' for n, k in zip(split.class_names, counts))
    lines.append(f'{name}: {len(split)} examples, imbalance {imbalance(counts):.2f} ({per_class})')
    if split.skipped:
      lines.append(f'  {len(split.skipped)} files skipped in {name} (see warnings above)')
    if split.converted:
      lines.append(f'  {len(split.converted)} files converted in {name}')
  return '\n'.join(lines)
