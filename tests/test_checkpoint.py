"""Checkpoint round trips, best-by-validation, and falling back past damaged files."""

import glob
import os

import numpy as np
import optax
import pytest

from tljax.checkpoint import CheckpointError, Checkpointer


def make_state(seed):
  rng = np.random.default_rng(seed)
  params = {'backbone': {'conv': {'kernel': rng.standard_normal((3, 3, 3, 4)).astype(np.float32)}},
            'head': {'logits': {'kernel': rng.standard_normal((4, 2)).astype(np.float32),
                                'bias': np.zeros(2, np.float32)}}}
  labels = {'backbone': {'conv': {'kernel': 'frozen'}},
            'head': {'logits': {'kernel': 'trainable', 'bias': 'trainable'}}}
  tx = optax.multi_transform({'trainable': optax.adam(1e-3), 'frozen': optax.set_to_zero()}, labels)
  opt_state = tx.init(params)
  stats = {'backbone': {'bn': {'mean': rng.standard_normal(4).astype(np.float32)}}}
  return {'model': {'params': params, 'batch_stats': stats}, 'opt_state': opt_state,
          'step': np.asarray(seed, np.int32), 'rng': np.arange(4, dtype=np.uint32) + seed}


def target(_meta):
  s = make_state(0)
  return {'model': s['model'], 'train': {k: s[k] for k in ('opt_state', 'step', 'rng')}}


def assert_same(a, b):
  import jax
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _damage(directory, how):
  files = [p for p in glob.glob(os.path.join(directory, '**', '*'), recursive=True)
           if os.path.isfile(p) and os.path.getsize(p) > 64]
  assert files
  for path in files:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      if how == 'truncate':
        f.truncate(size // 3)
      else:
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


@pytest.mark.parametrize('how', ['truncate', 'garble'])
def test_damaged_latest_falls_back_to_previous_with_warning(tmp_path, capsys, how):
  ckpt = Checkpointer(str(tmp_path), keep=3)
  for step in (3, 6):
    ckpt.save(step, make_state(step), {'step': step, 'phase': 0})
  ckpt.wait()
  _damage(os.path.join(tmp_path, 'checkpoints', '6'), how)
  state, meta = ckpt.restore_latest(target)
  assert meta['step'] == 3
  assert_same(state['model'], make_state(3)['model'])
  assert_same(state['opt_state'], make_state(3)['opt_state'])
  assert 'checkpoints/6 is unreadable' in capsys.readouterr().out
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '6.corrupt'))
  ckpt.save(6, make_state(6), {'step': 6, 'phase': 0})   # the resumed run can write step 6 again
  ckpt.wait()
  assert ckpt.restore_latest(target)[1]['step'] == 6
  ckpt.close()


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, make_state(1), {'step': 1})
  ckpt.wait()
  _damage(os.path.join(tmp_path, 'checkpoints', '1'), 'truncate')
  with pytest.raises(CheckpointError, match='no usable checkpoint.*delete that directory'):
    ckpt.restore_latest(target)
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '1'))   # nothing moved or deleted
  ckpt.close()


def test_best_and_latest_model_restore(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=1)
  assert ckpt.restore_latest(target) is None
  with pytest.raises(FileNotFoundError, match='train first'):
    ckpt.restore_model('best', target({})['model'])
  ckpt.save_best(2, make_state(2)['model'], {'step': 2, 'val': 0.5})
  ckpt.save_best(5, make_state(5)['model'], {'step': 5, 'val': 0.7})
  for step in (4, 8):
    ckpt.save(step, make_state(step), {'step': step})
  ckpt.wait()
  assert sorted(os.listdir(os.path.join(tmp_path, 'best'))) == ['5']
  assert sorted(s for s in os.listdir(os.path.join(tmp_path, 'checkpoints')) if s.isdigit()) == ['8']
  model, meta = ckpt.restore_model('best', target({})['model'])
  assert meta == {'step': 5, 'val': 0.7}
  assert_same(model, make_state(5)['model'])
  model, meta = ckpt.restore_model('latest', target({})['model'])
  assert meta['step'] == 8 and ckpt.best_meta()['val'] == 0.7
  ckpt.close()
