"""Host-side batching shaped for `jax.pmap`: `[local_devices, per_device, ...]`.

Batches carry uint8 crops of the cache (4x less to copy than float32);
augmentation and normalisation happen on the device. The training order is
a pure function of (seed, epoch, step), so a resumed run reads exactly the
batches an uninterrupted one would. Evaluation pads the final global batch
and masks the padding, so every example is counted exactly once whatever
the dataset size, device count and process count, and all processes run the
same number of steps (pmap collectives would hang otherwise).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import queue
import threading
from typing import Iterator

import numpy as np

from tljax.data.config import SAMPLERS
from tljax.data.split import Split
from tljax.data.streaming import StreamingSplit


def _layout(global_batch: int, num_devices, process_index, process_count) -> tuple[int, int, int]:
  """→ (devices, this process index, local batch); raises when shapes cannot divide evenly."""
  import jax
  d = jax.local_device_count() if num_devices is None else num_devices
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if d < 1 or count < 1 or not 0 <= p < count:
    raise ValueError(f'bad device/process layout: devices={d}, process {p} of {count}')
  if global_batch < 1 or global_batch % (d * count):
    raise ValueError(
        f'global batch {global_batch} is not divisible by process_count*local_devices = '
        f'{count}*{d} = {count * d}. Use a multiple of {count * d}, e.g. '
        f'{max(1, round(global_batch / (count * d))) * count * d}.')
  return d, p, global_batch // count


def steps_per_epoch(n: int, global_batch: int) -> int:
  """Training steps per epoch (the remainder is dropped; the next epoch reshuffles)."""
  return n // global_batch


def eval_steps(n: int, global_batch: int) -> int:
  """Evaluation steps covering all `n` examples (the last batch padded and masked)."""
  return math.ceil(n / global_batch)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The training permutation of epoch `epoch`; a pure function of its arguments."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def balanced_order(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
  """`len(labels)` indices drawn with replacement, P(i) ∝ 1/count(label_i); pure as `epoch_order`.

  Every class present is drawn equally often in expectation, so a 90/10
  split trains on about 50/50 batches; rare examples repeat within an epoch
  and common ones are skipped. Seeded apart from `epoch_order`'s stream.
  """
  labels = np.asarray(labels)
  _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
  p = 1.0 / (len(counts) * counts[inverse])
  rng = np.random.default_rng([seed, epoch, 1])
  return rng.choice(len(labels), size=len(labels), p=p / p.sum())


_POOL: list = []


def _gather(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """`images[idx]`, split across threads for big batches (np.take releases the GIL).

  A 256-image batch of 256px crops is 50 MB; one thread copies it at a
  few GB/s, which capped the host path below an H100's ResNet34 step.
  """
  nbytes = len(idx) * images[0].nbytes if len(images) else 0
  threads = min(8, os.cpu_count() or 1)
  if nbytes < (8 << 20) or threads < 2:
    return images[idx]
  if not _POOL:
    _POOL.append(concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix='gather'))
  out = np.empty((len(idx), *images.shape[1:]), images.dtype)
  bounds = np.linspace(0, len(idx), threads + 1).astype(int)
  list(_POOL[0].map(lambda i: np.take(images, idx[bounds[i]:bounds[i + 1]], axis=0,
                                      out=out[bounds[i]:bounds[i + 1]]), range(threads)))
  return out


def device_cache(split: Split, devices=None):
  """The whole uint8 cache on every local device: jax.Array [D, N, S, S, 3].

  For small datasets (the point of this library) the cache fits in
  accelerator memory many times over; then batches need only indices
  (`train_batches(..., with_images=False)`) and the pmapped step gathers
  `jnp.take(cache, batch['index'], axis=0)` on device, so host memory
  bandwidth and host-to-device copies drop out of the loop entirely.
  """
  import jax
  devices = list(devices) if devices is not None else jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  return jax.device_put(np.broadcast_to(split.images, (len(devices), *split.images.shape)),
                        sharding)


def _shape(images, labels, d: int, extra: dict | None = None) -> dict:
  per = len(labels) // d
  out = {'label': np.asarray(labels, np.int32).reshape(d, per)}
  if images is not None:
    out['image'] = images.reshape(d, per, *images.shape[1:])
  for key, value in (extra or {}).items():
    out[key] = value.reshape(d, per)
  return out


def train_batches(split: Split | StreamingSplit, global_batch: int, *, seed: int, epoch: int,
                  start_step: int = 0, num_devices: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  with_images: bool = True, sampler: str = 'uniform') -> Iterator[dict]:
  """One epoch of `{'image': uint8 [D, b, S, S, 3], 'label': int32 [D, b]}` (+ 'index').

  `index` (cached splits only) is each example's position in `split`, for
  callers that cache per-example features or gather from `device_cache`
  (then pass `with_images=False` to skip the host copy). Steps before
  `start_step` are not materialised for a cached split (a streamed one must
  decode through them). `sampler='balanced'` draws the epoch by
  `balanced_order` instead of `epoch_order` (cached splits only).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler={sampler!r} is unknown; use one of {", ".join(SAMPLERS)}')
  d, p, local = _layout(global_batch, num_devices, process_index, process_count)
  n = len(split)
  steps = steps_per_epoch(n, global_batch)
  if steps == 0:
    raise ValueError(f'split {split.name!r} has {n} examples, fewer than one global batch of '
                     f'{global_batch}; lower the batch size.')
  if not 0 <= start_step <= steps:
    raise ValueError(f'start_step {start_step} outside epoch of {steps} steps')
  if isinstance(split, StreamingSplit):
    if not with_images:
      raise ValueError('a streamed split has no cache to index; use with_images=True')
    if sampler == 'balanced':
      raise ValueError(f"data.sampler='balanced' needs an in-memory split, but {split.name!r} is "
                       'streamed (over data.cache_budget_mb); raise data.cache_budget_mb until it '
                       "fits, or use data.sampler='uniform'.")
    shuffle_seed = int(np.random.default_rng([seed, epoch]).integers(2 ** 31 - 1))
    for images, labels in split.batches(global_batch, shuffle_seed=shuffle_seed,
                                        drop_remainder=True, skip_batches=start_step):
      sl = slice(p * local, (p + 1) * local)
      yield _shape(images[sl], labels[sl], d)
    return
  if sampler == 'balanced':
    order = balanced_order(split.labels, seed, epoch)
  else:
    order = epoch_order(n, seed, epoch)
  for step in range(start_step, steps):
    idx = order[step * global_batch:(step + 1) * global_batch][p * local:(p + 1) * local]
    images = _gather(split.images, idx) if with_images else None
    yield _shape(images, split.labels[idx], d, {'index': idx.astype(np.int32)})


def eval_batches(split: Split | StreamingSplit, global_batch: int, *,
                 num_devices: int | None = None, process_index: int | None = None,
                 process_count: int | None = None, with_images: bool = True) -> Iterator[dict]:
  """All examples in order, as `{'image', 'label', 'mask': bool [D, b]}` (+ 'index').

  The final global batch is padded with copies of example 0 marked
  `mask=False`; sum metrics with the mask and divide by `mask.sum()`.
  """
  d, p, local = _layout(global_batch, num_devices, process_index, process_count)
  sl = slice(p * local, (p + 1) * local)
  if isinstance(split, StreamingSplit):
    if not with_images:
      raise ValueError('a streamed split has no cache to index; use with_images=True')
    for images, labels in split.batches(global_batch, shuffle_seed=None, drop_remainder=False):
      real = len(labels)
      if real < global_batch:
        pad = global_batch - real
        images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
        labels = np.concatenate([labels, np.repeat(labels[:1], pad)])
      mask = np.arange(global_batch) < real
      yield _shape(images[sl], labels[sl], d, {'mask': mask[sl]})
    return
  n = len(split)
  for step in range(eval_steps(n, global_batch)):
    idx = np.arange(step * global_batch, (step + 1) * global_batch)
    mask = idx < n
    idx = np.where(mask, idx, 0)[sl]
    images = _gather(split.images, idx) if with_images else None
    yield _shape(images, split.labels[idx], d, {'mask': mask[sl], 'index': idx.astype(np.int32)})


_DONE = object()


class prefetch:
  """Runs `iterator` in a daemon thread, `buffer_size` items ahead (bounded, so memory is too).

  With `devices`, each batch leaf is also placed on those devices, sharded
  along the leading axis (what pmap expects), in that thread, so the
  host-to-device copy overlaps the previous step. Exceptions re-raise in the
  consumer; `close()` (or leaving a `with` block) stops the producer.
  """

  def __init__(self, iterator, buffer_size: int = 2, devices=None):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, buffer_size))
    self._stop = threading.Event()
    self._devices = devices
    self._thread = threading.Thread(target=self._run, args=(iter(iterator),), daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, iterator):
    sharding = None
    if self._devices is not None:
      import jax
      mesh = jax.sharding.Mesh(np.asarray(self._devices), ('batch',))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
    try:
      for item in iterator:
        if sharding is not None:
          item = jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), item)
        if not self._put(item):
          return
      self._put(_DONE)
    except BaseException as e:  # handed to the consumer, which re-raises it
      self._put(e)

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is _DONE:
      self._queue.put(_DONE)
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
