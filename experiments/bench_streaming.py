"""Streamed-folder decode throughput: the thread-pool stream vs the tf.data pipeline it replaced.

  python -m experiments.bench_streaming                         # 2000 JPEGs 256x256 → 224
  python -m experiments.bench_streaming --images=500 --threads=2 --rounds=1

Writes a folder of random-texture JPEGs once, then times full epochs of
`StreamingSplit.batches` (tljax's stream: a ThreadPoolExecutor decoding with
PIL, a bounded window of batches ahead) and of the tf.data pipeline tljax
used before (the same `decode.decode` under `tf.numpy_function`, deterministic
parallel map, filter, batch, prefetch 2; rebuilt here because tljax no longer
ships it; needs the `tljax[tfds]` extra). Both read the same files in the same
seeded order at the same thread count, and the batches are checked equal. The
rounds alternate the two so a noisy neighbour lands on both; the best epoch of
each is reported.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from tljax.data.decode import decode
from tljax.data.streaming import folder_stream


def write_folder(root: str, count: int, size: int) -> list[str]:
  """`count` JPEGs of smooth noise (JPEG-realistic sizes) under two class folders."""
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    folder = os.path.join(root, 'ab'[i % 2])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'{i:05d}.jpg')
    paths.append(path)
    if os.path.exists(path):
      continue
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    noise = rng.integers(-12, 13, (size, size, 3))
    image = Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))
    image.save(path, quality=90)
  return paths


def _is_ok(image, label, ok):
  del image, label
  return ok


def _drop_flag(image, label, ok):
  del ok
  return image, label


def tf_data_batches(paths, labels, *, load_size, threads, batch, shuffle_seed):
  """The pre-lean pipeline, step for step."""
  import tensorflow as tf

  def decode_np(path):
    result = decode(path.decode(), load_size, 'shorter', name=path.decode())
    if result.error:
      return np.zeros((load_size, load_size, 3), np.uint8), False
    return result.image, True

  def decode_one(path, label):
    image, ok = tf.numpy_function(decode_np, [path], [tf.uint8, tf.bool], stateful=False)
    image.set_shape((load_size, load_size, 3))
    ok.set_shape(())
    return image, tf.cast(label, tf.int32), ok

  order = np.random.default_rng(shuffle_seed).permutation(len(paths))
  options = tf.data.Options()
  options.deterministic = True
  ds = tf.data.Dataset.from_tensor_slices(
      (np.asarray(paths, dtype=object)[order].astype(str), labels[order])).with_options(options)
  ds = ds.map(decode_one, num_parallel_calls=threads, deterministic=True)
  ds = ds.filter(_is_ok).map(_drop_flag)
  return ds.batch(batch).prefetch(2).as_numpy_iterator()


def _epoch(batches) -> tuple[float, float, int, list]:
  """(wall s, process CPU s over all threads, images, a checksum per batch)."""
  start, cpu, count, firsts = time.perf_counter(), time.process_time(), 0, []
  for images, labels in batches:
    count += len(labels)
    firsts.append(int(images[:, 0, 0, 0].sum()))
  return time.perf_counter() - start, time.process_time() - cpu, count, firsts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--size', type=int, default=256, help='JPEG side')
  parser.add_argument('--load_size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--root', default=os.path.join(tempfile.gettempdir(), 'tljax_bench_stream'))
  args = parser.parse_args()
  paths = write_folder(args.root, args.images, args.size)
  labels = np.arange(len(paths), dtype=np.int32) % 2
  split = folder_stream(paths, labels, ['a', 'b'], load_size=args.load_size, geometry='shorter',
                        name='train', threads=args.threads)
  wall = {'thread pool': float('inf'), 'tf.data': float('inf')}
  cpu = dict(wall)
  for _ in range(args.rounds):
    pool_s, pool_cpu, n, pool_firsts = _epoch(split.batches(args.batch, shuffle_seed=1,
                                                            drop_remainder=False))
    tf_s, tf_cpu, m, tf_firsts = _epoch(tf_data_batches(
        paths, labels, load_size=args.load_size, threads=args.threads, batch=args.batch,
        shuffle_seed=1))
    assert n == m == len(paths) and pool_firsts == tf_firsts, 'the two streams differ'
    for name, w, c in (('thread pool', pool_s, pool_cpu), ('tf.data', tf_s, tf_cpu)):
      wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
  print(f'{args.images} JPEGs {args.size}px → {args.load_size}px, batch {args.batch}, '
        f'{args.threads} threads, best of {args.rounds} epochs (load average now '
        f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):')
  for name in wall:
    print(f'  {name:12s} {len(paths) / wall[name]:8.0f} images/s   '
          f'{len(paths) / cpu[name]:8.0f} images per CPU-second')
  print(f'  ratio (thread pool / tf.data): {wall["tf.data"] / wall["thread pool"]:.2f} wall, '
        f'{cpu["tf.data"] / cpu["thread pool"]:.2f} CPU')


if __name__ == '__main__':
  main()
