"""Splits too large for the decoded cache, decoded on the fly by a thread pool.

Only the source changes: examples are decoded with the same `decode.decode`
(so bad files get the same treatment: skipped, recorded in `skipped`, warned
about), and `batching` consumes them with the same interface as a cached
`Split`. Every process reads the whole stream and keeps its slice of each
global batch, so a file that fails to decode shifts every host identically
and multi-host steps stay in lockstep.

Decoding runs in plain threads: PIL releases the GIL while it decodes and
resizes, so threads scale like tf.data's map did without pulling TensorFlow
into the base install. Results are taken in submission order, so a seed
gives the same batches whatever the thread timing, and at most
`prefetch_batches` batches are decoded ahead of the consumer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
from typing import Callable, Iterable, Iterator

import numpy as np

from tljax.data.decode import decode

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StreamingSplit:
  """`make_source(shuffle_seed)` → iterable of (path or encoded bytes, label, id).

  The iterable's order is the stream's order (the source shuffles for a
  seed; `None` means file order). `num_examples` counts files/records before
  decoding; unreadable ones are dropped from the stream and appended to
  `skipped` as they are met, in stream order. `from_path` says whether the
  first item is a path (str) or encoded bytes.
  """

  make_source: Callable[[int | None], Iterable]
  num_examples: int
  class_names: list[str]
  load_size: int
  geometry: str
  from_path: bool
  name: str = ''
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  threads: int = 8
  resample: str = 'bilinear'
  prefetch_batches: int = 2

  def __len__(self) -> int:
    return self.num_examples

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def _decode(self, data, ident: str):
    source = str(data) if self.from_path else bytes(data)
    return decode(source, self.load_size, self.geometry, name=ident, resample=self.resample)

  def _record(self, ident: str, result) -> bool:
    """Notes a skip or conversion once per (file, reason); True if the image is usable."""
    if result.error:
      if (ident, result.error) not in self.skipped:
        log.warning('skipping %s: %s', ident, result.error)
        self.skipped.append((ident, result.error))
      return False
    for note in result.notes:
      if (ident, note) not in self.converted:
        self.converted.append((ident, note))
    return True

  def examples(self, shuffle_seed: int | None = None, *,
               window: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """Decoded (image uint8 [S, S, 3], label) pairs in the source's order, bad files dropped.

    `window` bounds the decodes in flight (default: 4 per thread). Leaving
    the loop early cancels what has not started and waits for the rest.
    """
    window = max(1, window or 4 * max(1, self.threads))
    pending: collections.deque = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(max(1, self.threads),
                                                 thread_name_prefix='tljax-stream')
    try:
      source = iter(self.make_source(shuffle_seed))
      exhausted = False
      while True:
        while not exhausted and len(pending) < window:
          item = next(source, None)
          if item is None:
            exhausted = True
            break
          data, label, ident = item
          ident = ident.decode('utf-8', 'replace') if isinstance(ident, bytes) else str(ident)
          pending.append((pool.submit(self._decode, data, ident), int(label), ident))
        if not pending:
          return
        future, label, ident = pending.popleft()
        result = future.result()
        if self._record(ident, result):
          yield result.image, label
    finally:
      for future, _, _ in pending:
        future.cancel()
      pool.shutdown(wait=True)

  def batches(self, batch_size: int, *, shuffle_seed: int | None, drop_remainder: bool,
              skip_batches: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Numpy (images, labels) global batches; the last one may be short unless dropped.

    Skipped batches are still decoded: which files fail decides where each
    later batch starts, so resuming at step k yields exactly the k-th batch.
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    window = max(4 * max(1, self.threads), self.prefetch_batches * batch_size)
    images, labels, index = [], [], 0
    for image, label in self.examples(shuffle_seed, window=window):
      images.append(image)
      labels.append(label)
      if len(images) == batch_size:
        if index >= skip_batches:
          yield np.stack(images), np.asarray(labels, np.int32)
        images, labels, index = [], [], index + 1
    if images and not drop_remainder and index >= skip_batches:
      yield np.stack(images), np.asarray(labels, np.int32)


def folder_stream(paths: list[str], labels: np.ndarray, class_names: list[str], *, load_size: int,
                  geometry: str, name: str, threads: int,
                  resample: str = 'bilinear') -> StreamingSplit:
  """Streams files; shuffling is an exact global permutation of the file list."""
  paths, labels = [str(p) for p in paths], np.asarray(labels, np.int32)

  def make_source(shuffle_seed):
    order = (np.arange(len(paths)) if shuffle_seed is None
             else np.random.default_rng(shuffle_seed).permutation(len(paths)))
    return ((paths[i], int(labels[i]), paths[i]) for i in order)

  return StreamingSplit(make_source, len(paths), class_names, load_size, geometry, True, name,
                        threads=threads, resample=resample)
