"""The thread-pool stream: seeded order, bad files, resume, sharding, bounded read-ahead, no TF.

Each image is a solid colour whose green channel is its file index, so a
batch's pixels say exactly which files it holds and in what order.
"""

import logging
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from tljax.data.batching import eval_batches, train_batches
from tljax.data.streaming import StreamingSplit, folder_stream

N, BAD = 23, (5, 17)


@pytest.fixture
def folder(tmp_path):
  paths = []
  for i in range(N):
    path = tmp_path / f'{i:02d}.png'
    if i in BAD:
      path.write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    else:
      Image.new('RGB', (12, 10), (200, i, 7)).save(path)
    paths.append(str(path))
  return paths, np.arange(N, dtype=np.int32) % 3


def _stream(folder, threads=3):
  paths, labels = folder
  return folder_stream(paths, labels, ['a', 'b', 'c'], load_size=8, geometry='shorter',
                       name='train', threads=threads)


def _indices(images):
  assert (images == images[:, :1, :1]).all(), 'decoded images should stay solid'
  return images[:, 0, 0, 1].astype(int).tolist()


def test_order_is_the_seeded_permutation_minus_bad_files(folder, caplog):
  split = _stream(folder)
  order = [int(i) for i in np.random.default_rng(11).permutation(N) if i not in BAD]
  with caplog.at_level(logging.WARNING, logger='tljax.data.streaming'):
    for _ in range(2):
      got = list(split.batches(4, shuffle_seed=11, drop_remainder=False))
      assert [len(l) for _, l in got] == [4, 4, 4, 4, 4, 1]
      assert sum((_indices(im) for im, _ in got), []) == order
      assert np.concatenate([l for _, l in got]).tolist() == [i % 3 for i in order]
  first_met = [f'{i:02d}.png' for i in np.random.default_rng(11).permutation(N) if i in BAD]
  assert [p[-6:] for p, _ in split.skipped] == first_met     # once each, in stream order
  assert [r.getMessage()[:8] for r in caplog.records] == ['skipping'] * 2
  plain = sum((_indices(im) for im, _ in split.batches(4, shuffle_seed=None,
                                                        drop_remainder=True)), [])
  assert plain == [i for i in range(N) if i not in BAD][:20]


def test_thread_count_does_not_change_the_stream(folder):
  one = [_indices(im) for im, _ in _stream(folder, 1).batches(3, shuffle_seed=2,
                                                                drop_remainder=True)]
  many = [_indices(im) for im, _ in _stream(folder, 8).batches(3, shuffle_seed=2,
                                                                 drop_remainder=True)]
  assert one == many and len(one) == 7


def test_resume_position_and_host_slices(folder):
  split = _stream(folder)
  kw = dict(seed=4, epoch=1, num_devices=2)
  full = [b['image'] for b in train_batches(split, 4, process_index=0, process_count=1, **kw)]
  assert len(full) == 5                                      # 21 usable files, remainder dropped
  resumed = [b['image'] for b in train_batches(split, 4, start_step=3, process_index=0,
                                               process_count=1, **kw)]
  assert len(resumed) == 2 and all(np.array_equal(a, b) for a, b in zip(full[3:], resumed))
  hosts = [[b['image'] for b in train_batches(split, 4, process_index=p, process_count=2, **kw)]
           for p in (0, 1)]
  for step, whole in enumerate(full):
    joined = np.concatenate([hosts[0][step].reshape(-1, 8, 8, 3),
                             hosts[1][step].reshape(-1, 8, 8, 3)])
    assert np.array_equal(joined, whole.reshape(-1, 8, 8, 3))


def test_eval_pads_the_last_batch_and_masks_it(folder):
  got = list(eval_batches(_stream(folder), 8, num_devices=2, process_index=0, process_count=1))
  mask = np.concatenate([b['mask'].ravel() for b in got])
  assert len(got) == 3 and mask.sum() == 21 and not mask[21:].any()
  images = np.concatenate([b['image'].reshape(-1, 8, 8, 3) for b in got])
  assert _indices(images[mask]) == [i for i in range(N) if i not in BAD]
  assert _indices(images[~mask]) == [18, 18, 18]             # padded with its batch's first


def test_read_ahead_is_bounded_and_an_early_exit_stops_the_pool(folder):
  paths, labels = folder
  pulled = []

  def source(seed):
    del seed
    for i in range(N):
      pulled.append(i)
      yield paths[i], int(labels[i]), paths[i]

  split = StreamingSplit(source, N, ['a', 'b', 'c'], 8, 'shorter', True, 'train', threads=1,
                         prefetch_batches=2)
  batches = split.batches(2, shuffle_seed=None, drop_remainder=True)
  next(batches)
  assert len(pulled) <= 2 + max(4, 2 * 2)                   # the batch + the window behind it
  batches.close()
  assert not [t for t in threading.enumerate() if t.name.startswith('tljax-stream')]


def test_streaming_never_imports_tensorflow(folder, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)      # any `import tensorflow` now fails
  got = list(_stream(folder).batches(7, shuffle_seed=0, drop_remainder=False))
  assert sum(len(l) for _, l in got) == 21


def test_a_bad_batch_size_is_refused(folder):
  with pytest.raises(ValueError, match='batch_size must be >= 1'):
    next(_stream(folder).batches(0, shuffle_seed=None, drop_remainder=False))
