"""Splits too large for the decoded cache, streamed through tf.data.

Only the source changes: examples are decoded on the fly with the same
`decode.decode` (so bad files get the same treatment: skipped, recorded in
`skipped`, warned about), and `batching` consumes them with the same
interface as a cached `Split`. Every process reads the whole stream and
keeps its slice of each global batch, so a file that fails to decode shifts
every host identically and multi-host steps stay in lockstep.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from tljax.data.decode import decode

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StreamingSplit:
  """`make_source(shuffle_seed)` → tf.data.Dataset of (encoded bytes or path, label, id).

  `num_examples` counts files/records before decoding; unreadable ones are
  dropped from the stream and appended to `skipped` as they are met.
  """

  make_source: Callable
  num_examples: int
  class_names: list[str]
  load_size: int
  geometry: str
  from_path: bool
  name: str = ''
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  parallel_calls: int = 8
  resample: str = 'bilinear'

  def __len__(self) -> int:
    return self.num_examples

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def _decode_np(self, data, ident):
    ident = ident.decode('utf-8', 'replace')
    source = data.decode('utf-8') if self.from_path else data
    result = decode(source, self.load_size, self.geometry, name=ident, resample=self.resample)
    if result.error:
      if (ident, result.error) not in self.skipped:
        log.warning('skipping %s: %s', ident, result.error)
        self.skipped.append((ident, result.error))
      return np.zeros((self.load_size, self.load_size, 3), np.uint8), False
    for note in result.notes:
      if (ident, note) not in self.converted:
        self.converted.append((ident, note))
    return result.image, True

  def dataset(self, shuffle_seed: int | None = None):
    """Decoded (image uint8 [S, S, 3], label int32) pairs; deterministic order for a seed."""
    import tensorflow as tf
    s = self.load_size

    def decode_one(data, label, ident):
      image, ok = tf.numpy_function(self._decode_np, [data, ident], [tf.uint8, tf.bool],
                                    stateful=False)
      image.set_shape((s, s, 3))
      ok.set_shape(())
      return image, tf.cast(label, tf.int32), ok

    options = tf.data.Options()
    options.deterministic = True
    ds = self.make_source(shuffle_seed).with_options(options)
    ds = ds.map(decode_one, num_parallel_calls=self.parallel_calls, deterministic=True)
    ds = ds.filter(_is_ok).map(_drop_flag)
    return ds

  def batches(self, batch_size: int, *, shuffle_seed: int | None, drop_remainder: bool,
              skip_batches: int = 0):
    """Numpy (images, labels) global batches; the last one may be short unless dropped."""
    ds = self.dataset(shuffle_seed).batch(batch_size, drop_remainder=drop_remainder)
    if skip_batches:
      ds = ds.skip(skip_batches)
    return ds.prefetch(2).as_numpy_iterator()


def _is_ok(image, label, ok):
  del image, label
  return ok


def _drop_flag(image, label, ok):
  del ok
  return image, label


def folder_stream(paths: list[str], labels: np.ndarray, class_names: list[str], *, load_size: int,
                  geometry: str, name: str, threads: int,
                  resample: str = 'bilinear') -> StreamingSplit:
  """Streams files; shuffling is an exact global permutation of the file list."""
  paths, labels = list(paths), np.asarray(labels, np.int32)

  def make_source(shuffle_seed):
    import tensorflow as tf
    order = (np.arange(len(paths)) if shuffle_seed is None
             else np.random.default_rng(shuffle_seed).permutation(len(paths)))
    p = np.asarray(paths, dtype=object)[order].astype(str)
    return tf.data.Dataset.from_tensor_slices((p, labels[order], p))

  return StreamingSplit(make_source, len(paths), class_names, load_size, geometry, True, name,
                        parallel_calls=threads, resample=resample)
