"""Class names for model outputs.

Ported ImageNet weights carry `labels: 'imagenet1k'` in their metadata rather
than 1000 strings, so every 1000-class head reads the same shipped file;
fine-tuned checkpoints store their own list of names.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Sequence

IMAGENET1K = 'imagenet1k'


@functools.cache
def _imagenet1k() -> tuple[str, ...]:
  text = resources.files('tljax').joinpath('assets/imagenet1k_labels.txt').read_text('utf-8')
  names = tuple(line.strip() for line in text.splitlines() if line.strip())
  if len(names) != 1000:
    raise RuntimeError(f'tljax/assets/imagenet1k_labels.txt has {len(names)} names, expected 1000; '
                       'the installed package is damaged, reinstall tljax.')
  return names


def imagenet1k() -> list[str]:
  """The 1000 ImageNet-1k class names in the standard (synset-sorted) index order."""
  return list(_imagenet1k())


def resolve(labels: str | Sequence[str] | None, num_classes: int | None = None) -> list[str]:
  """Turns a metadata 'labels' field into a list of names, one per output.

  `None` (no names recorded) gives 'class_0', 'class_1', ... when
  `num_classes` is known, so predictions are still printable. A binary head
  (`num_classes == 1`, one sigmoid logit) has two names: negative, positive.
  """
  expected = None if num_classes is None else max(num_classes, 2)
  if labels is None:
    if expected is None:
      raise ValueError('no labels recorded and num_classes unknown; pass num_classes.')
    names = [f'class_{i}' for i in range(expected)]
  elif isinstance(labels, str):
    if labels != IMAGENET1K:
      raise ValueError(f'unknown label set {labels!r}; use {IMAGENET1K!r} or a list of names.')
    names = imagenet1k()
  else:
    names = [str(n) for n in labels]
  if expected is not None and len(names) != expected:
    raise ValueError(f'{len(names)} label names for a {num_classes}-class head '
                     f'(expected {expected}); '
                     'the metadata labels do not match the model.')
  return names
