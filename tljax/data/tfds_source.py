"""TensorFlow Datasets by name and split string, decoded by our own decoder.

Images are read as encoded bytes (`SkipDecoding`) and decoded by
`decode.decode`, so tfds data gets the same resize geometry and the same
bad-file handling as image folders. Nothing is ever downloaded here: a
dataset that is not prepared under `data_dir` is an error that says how to
prepare it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np

from tljax.data.decode import decode
from tljax.data.split import Split
from tljax.data.streaming import StreamingSplit

log = logging.getLogger(__name__)


def _not_prepared(name: str, data_dir: str, detail: str) -> ValueError:
  where = data_dir or '~/tensorflow_datasets (the tfds default)'
  return ValueError(
      f'tfds dataset {name!r} is not prepared under {where} ({detail}). tljax never downloads. '
      f'On a connected machine run:\n  python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='{data_dir or '~/tensorflow_datasets'}')"
      '.download_and_prepare()"\nand copy that data_dir here; for datasets whose files must be '
      'fetched by hand, put them in a manual_dir and call download_and_prepare('
      'download_config=tfds.download.DownloadConfig(manual_dir=...)). Then set data.data_dir.')


class MissingExtra(ImportError, ValueError):
  """An optional dependency is not installed; a ValueError too, so the CLIs print it as one line."""


def import_tfds():
  """`tensorflow_datasets`, or one line naming the extra that brings it (and TensorFlow)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MissingExtra(f"the tfds source needs tensorflow-datasets and TensorFlow ({e}); "
                      "install them with: pip install 'tljax[tfds]'") from None
  return tfds


class TfdsSource:
  """One builder, opened once; `split(...)` decodes or streams a split string."""

  def __init__(self, name: str, data_dir: str):
    tfds = import_tfds()
    self._tfds = tfds
    self.name, self.data_dir = name, data_dir
    try:
      self.builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # tfds raises its own DatasetNotFoundError subclasses.
      detail = str(e).split('Available datasets')[0].strip().rstrip('.')
      raise ValueError(f'tfds has no dataset {name!r} ({type(e).__name__}: {detail}). Check the '
                       'name with tfds.list_builders().') from e
    keys = self.builder.info.supervised_keys or ('image', 'label')
    self.image_key, self.label_key = keys[0], keys[1]
    label_feature = self.builder.info.features[self.label_key]
    names = getattr(label_feature, 'names', None)
    self.class_names = list(names) if names else [str(i) for i in range(label_feature.num_classes)]

  def num_examples(self, split: str) -> int | None:
    try:
      return int(self.builder.info.splits[split].num_examples)
    except Exception:
      return None

  def _dataset(self, split: str, shuffle_seed: int | None = None):
    tfds = self._tfds
    try:
      ds = self.builder.as_dataset(
          split=split, shuffle_files=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=shuffle_seed))
    except AssertionError as e:
      raise _not_prepared(self.name, self.data_dir, str(e).split('.')[0]) from e
    except (ValueError, KeyError) as e:
      if 'split' in str(e).lower():
        raise ValueError(f'tfds {self.name!r}: bad split string {split!r} ({e}); available '
                         f'splits: {list(self.builder.info.splits)}') from e
      raise
    return ds

  def decoded(self, split: str, *, load_size: int, geometry: str, threads: int,
              name: str, resample: str = 'bilinear') -> Split:
    ds = self._dataset(split)
    images, labels, ids, skipped, converted = [], [], [], [], []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      chunk: list = []

      def flush():
        results = pool.map(lambda ex: decode(ex[self.image_key], load_size, geometry,
                                             name=ex['tfds_id'].decode(), resample=resample),
                           chunk)
        for ex, result in zip(chunk, results):
          ident = ex['tfds_id'].decode()
          if result.error:
            log.warning('skipping %s: %s', ident, result.error)
            skipped.append((ident, result.error))
            continue
          converted.extend((ident, note) for note in result.notes)
          images.append(result.image)
          labels.append(int(ex[self.label_key]))
          ids.append(ident)
        chunk.clear()

      for ex in self._tfds.as_numpy(ds):
        chunk.append(ex)
        if len(chunk) >= 256:
          flush()
      flush()
    array = (np.stack(images) if images else np.zeros((0, load_size, load_size, 3), np.uint8))
    return Split(array, np.asarray(labels, np.int32), list(self.class_names), ids, skipped,
                 converted, name)

  def streaming(self, split: str, *, load_size: int, geometry: str, threads: int, name: str,
                num_examples: int, resample: str = 'bilinear') -> StreamingSplit:
    """Shuffling uses a 10k-example buffer with a fixed seed (deterministic, not global)."""
    self._dataset(split)  # fail now, not inside the training loop

    def make_source(shuffle_seed):
      ds = self._dataset(split)
      if shuffle_seed is not None:
        ds = ds.shuffle(min(num_examples, 10_000), seed=shuffle_seed,
                        reshuffle_each_iteration=False)
      for ex in self._tfds.as_numpy(ds):
        yield ex[self.image_key], int(ex[self.label_key]), ex['tfds_id'].decode()

    return StreamingSplit(make_source, num_examples, list(self.class_names), load_size, geometry,
                          False, name, threads=threads, resample=resample)


def default_threads(cfg) -> int:
  return cfg.decode_threads or os.cpu_count() or 1
