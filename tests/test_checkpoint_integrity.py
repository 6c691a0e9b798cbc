"""Checkpoint integrity: content digests checked on restore, clean errors, the workdir lock."""

import glob
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tljax import checkpoint
from tljax.checkpoint import CheckpointError, Checkpointer
from tljax.workdir_lock import WorkdirInUse, acquire


def make_state(seed):
  """Arrays big enough that orbax stores them out of line, where no checksum covers them."""
  rng = np.random.default_rng(seed)
  params = {'conv': {'kernel': rng.standard_normal((3, 3, 32, 64)).astype(np.float32)},
            'head': {'kernel': rng.standard_normal((64, 8)).astype(np.float32),
                     'bias': np.zeros(8, np.float32)}}
  labels = {'conv': {'kernel': 'frozen'}, 'head': {'kernel': 'trainable', 'bias': 'trainable'}}
  tx = optax.multi_transform({'trainable': optax.adam(1e-3), 'frozen': optax.set_to_zero()}, labels)
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(p.dtype), params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  opt_state = jax.tree.map(np.asarray, opt_state)
  stats = {'bn': {'mean': rng.standard_normal(64).astype(np.float32)}}
  return {'model': {'params': params, 'batch_stats': stats}, 'opt_state': opt_state,
          'step': np.asarray(seed, np.int32), 'rng': np.arange(4, dtype=np.uint32) + seed}


def target(_meta=None):
  s = make_state(0)
  return {'model': s['model'], 'train': {k: s[k] for k in ('opt_state', 'step', 'rng')}}


def same(a, b):
  return all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def flip_bit_in_largest_data_file(step_dir, item='*'):
  """One bit in the middle of the biggest array data file (not a JSON item) of the step."""
  files = [p for p in glob.glob(os.path.join(step_dir, item, '**', 'd', '*'), recursive=True)
           if os.path.isfile(p)]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0x04
    f.seek(0)
    f.write(data)
  return path


def saved(tmp_path, steps=(3, 6), keep=3):
  ckpt = Checkpointer(str(tmp_path), keep=keep)
  for step in steps:
    ckpt.save(step, make_state(step), {'step': step, 'phase': 0})
  ckpt.wait()
  return ckpt


@pytest.mark.parametrize('item', ['model', 'train'])
def test_flipped_bit_in_latest_falls_back_and_quarantines(tmp_path, capsys, item):
  ckpt = saved(tmp_path)
  flip_bit_in_largest_data_file(os.path.join(tmp_path, 'checkpoints', '6'), item)
  state, meta = ckpt.restore_latest(target)
  assert meta['step'] == 3
  assert same(state['model'], make_state(3)['model'])
  assert same(state['opt_state'], make_state(3)['opt_state'])
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '6.corrupt'))
  out = capsys.readouterr()
  warnings = [l for l in out.out.splitlines() if 'WARNING' in l]
  assert len(warnings) == 1 and 'checkpoints/6 is unreadable' in warnings[0], out
  assert 'differ from the digest' in warnings[0] and 'using step 3' in warnings[0]
  ckpt.save(6, make_state(6), {'step': 6, 'phase': 0})   # the resumed run writes step 6 again
  ckpt.wait()
  state, meta = ckpt.restore_latest(target)
  assert meta['step'] == 6 and same(state['model'], make_state(6)['model'])
  flip_bit_in_largest_data_file(os.path.join(tmp_path, 'checkpoints', '6'), item)
  assert ckpt.restore_latest(target)[1]['step'] == 3
  assert {'6.corrupt', '6.corrupt.1'} <= set(os.listdir(tmp_path / 'checkpoints'))  # none deleted
  ckpt.close()


def test_flipped_bit_in_a_model_restore_falls_back(tmp_path):
  ckpt = saved(tmp_path)
  flip_bit_in_largest_data_file(os.path.join(tmp_path, 'checkpoints', '6'), 'model')
  model, meta = ckpt.restore_model('latest', target()['model'])
  assert meta['step'] == 3 and same(model, make_state(3)['model'])
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '6.corrupt'))
  ckpt.close()


def test_flipped_bit_in_best_is_a_clean_error(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save_best(5, make_state(5)['model'], {'step': 5, 'val': 0.7})
  ckpt.wait()
  model, meta = ckpt.restore_model('best', target()['model'])
  assert meta == {'step': 5, 'val': 0.7} and same(model, make_state(5)['model'])
  flip_bit_in_largest_data_file(os.path.join(tmp_path, 'best', '5'))
  with pytest.raises(CheckpointError) as e:
    ckpt.restore_model('best', target()['model'])
  msg = str(e.value)
  assert '\n' not in msg and f'{tmp_path}/best' in msg, msg
  assert 'differ from the digest' in msg and '--config.eval.checkpoint=latest' in msg
  assert 'fresh --workdir' in msg
  assert os.path.isdir(os.path.join(tmp_path, 'best', '5'))   # nothing to use instead: not moved
  ckpt.close()


def test_all_checkpoints_corrupt_is_one_clean_error(tmp_path, capsys):
  ckpt = saved(tmp_path)
  for step in (3, 6):
    flip_bit_in_largest_data_file(os.path.join(tmp_path, 'checkpoints', str(step)))
  with pytest.raises(CheckpointError) as e:
    ckpt.restore_latest(target)
  msg = str(e.value)
  assert isinstance(e.value, RuntimeError) and '\n' not in msg
  assert msg.startswith(f'no usable checkpoint under {tmp_path}/checkpoints (step 6: '), msg
  assert 'step 3: ' in msg and msg.endswith('delete that directory to start over, or use a fresh '
                                            '--workdir.')
  assert sorted(os.listdir(os.path.join(tmp_path, 'checkpoints'))) == ['3', '6']
  assert 'WARNING' not in capsys.readouterr().out
  ckpt.close()


def test_checkpoint_without_digest_still_restores(tmp_path):
  """Workdirs written before digests existed: the same items as the old save wrote, no digest."""
  old = ocp.CheckpointManager(str(tmp_path / 'checkpoints'),
                              options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  s = make_state(4)
  old.save(4, args=ocp.args.Composite(
      model=ocp.args.StandardSave(s['model']),
      train=ocp.args.StandardSave({k: s[k] for k in ('opt_state', 'step', 'rng')}),
      meta=ocp.args.JsonSave({'step': 4, 'phase': 0})))
  old.wait_until_finished()
  old.close()
  assert not os.path.exists(tmp_path / 'checkpoints' / '4' / checkpoint.DIGEST)
  ckpt = Checkpointer(str(tmp_path), keep=2)
  state, meta = ckpt.restore_latest(target)
  assert meta['step'] == 4 and same(state['model'], s['model'])
  assert same(state['opt_state'], s['opt_state'])
  model, _ = ckpt.restore_model('latest', target()['model'])
  assert same(model, s['model'])
  ckpt.save(8, make_state(8), {'step': 8, 'phase': 0})    # new saves next to old ones carry digests
  ckpt.wait()
  assert os.path.isdir(tmp_path / 'checkpoints' / '8' / checkpoint.DIGEST)
  assert ckpt.restore_latest(target)[1]['step'] == 8
  ckpt.close()


def test_digest_checks_every_leaf_and_itself(tmp_path):
  ckpt = saved(tmp_path, steps=(6,))
  state, meta = ckpt.restore_latest(target)
  ckpt.close()
  items = {'model': state['model'], 'train': {k: state[k] for k in ('opt_state', 'step', 'rng')}}
  digest = checkpoint._digest(items, meta)
  n_leaves = len(jax.tree.leaves(items))
  assert checkpoint._verify(digest, meta, items) == (n_leaves + 1, 0)   # every array and the meta
  with pytest.raises(checkpoint._DigestMismatch, match='meta'):
    checkpoint._verify(digest, {**meta, 'step': 7}, items)
  damaged = {**digest, 'arrays': {**digest['arrays'], 'model': {}}}  # would skip every model leaf
  with pytest.raises(checkpoint._DigestMismatch, match='digest item is damaged'):
    checkpoint._verify(damaged, meta, items)


NOISE = """
import glob, os, sys
import numpy as np
from tljax.checkpoint import Checkpointer
w = sys.argv[1]
def state(s):
  rng = np.random.default_rng(s)
  params = {f'layer{i}': {'kernel': rng.standard_normal((16, 16)).astype(np.float32),
                          'bias': np.full(16, s, np.float32)} for i in range(12)}
  return {'model': {'params': params, 'batch_stats': {}}, 'opt_state': {'mu': params},
          'step': np.asarray(s), 'rng': np.zeros(4, np.uint32)}
ckpt = Checkpointer(w, keep=6)
for s in range(1, 6):
  ckpt.save(s, state(s), {'step': s})
ckpt.wait()
for s in range(2, 6):   # a bit in each item's b-tree file: many reads in flight when one fails
  for path in glob.glob(f'{w}/checkpoints/{s}/*/d/*'):
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2] ^= 0x04
    open(path, 'wb').write(data)
tgt = state(0)
train = {k: tgt[k] for k in ('opt_state', 'step', 'rng')}
_, meta = ckpt.restore_latest(lambda m: {'model': tgt['model'], 'train': train})
print('restored', meta['step'])
ckpt.close()
"""


def test_fallback_prints_no_event_loop_noise(tmp_path):
  """Abandoned orbax reads used to print "Event loop is closed" tracebacks after a failed restore"""
  cmd, kw = _python(NOISE, str(tmp_path))
  proc = subprocess.run(cmd, capture_output=True, timeout=300, **kw)
  assert proc.returncode == 0, proc.stderr
  assert 'restored 1' in proc.stdout
  assert proc.stdout.count('WARNING: checkpoint') == 4
  for noise in ('Event loop is closed', 'never retrieved', 'Traceback', 'checkpoints/'):
    assert noise not in proc.stderr, proc.stderr   # the warnings went to stdout, once each



LATE_CALLBACK = """
import asyncio, sys, types
from tljax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], async_save=False)
loop = asyncio.new_event_loop()
loop.close()
try:
  loop.call_soon_threadsafe(print)
except RuntimeError as e:
  sys.unraisablehook(types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                           exc_traceback=e.__traceback__, err_msg=None, object=None))
class Other:
  def __del__(self):
    raise KeyError('other')
Other()
print('done')
"""


def test_a_failed_write_s_late_callbacks_are_quiet_from_the_first_checkpointer(tmp_path):
  """A full disk fails a save; tensorstore's sibling writes then call back into orbax's closed
  loop before any restore has failed, so the quieting must not wait for a failed restore."""
  cmd, kw = _python(LATE_CALLBACK, str(tmp_path))
  proc = subprocess.run(cmd, capture_output=True, timeout=120, **kw)
  assert proc.returncode == 0 and 'done' in proc.stdout, proc.stderr
  assert 'Event loop is closed' not in proc.stderr, proc.stderr
  assert "KeyError: 'other'" in proc.stderr, proc.stderr   # anything else still reaches stderr

HOLD = """
import sys, time
from tljax.workdir_lock import acquire
with acquire(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
"""

TRY = """
import sys
from tljax.workdir_lock import WorkdirInUse, acquire
try:
  with acquire(sys.argv[1]):
    print('acquired')
except WorkdirInUse as e:
  print(e)
  sys.exit(3)
"""


def _python(code, *args, **kw):
  path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get('PYTHONPATH')]))
  env = {**os.environ, 'PYTHONPATH': path}
  return [sys.executable, '-c', code, *args], dict(env=env, text=True, **kw)


@pytest.fixture
def holder(tmp_path):
  cmd, kw = _python(HOLD, str(tmp_path))
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, **kw)
  assert proc.stdout.readline().strip() == 'held'
  yield proc
  proc.kill()
  proc.wait()


def test_second_run_is_refused_with_the_holders_pid(tmp_path, holder):
  expected = re.escape(f'{tmp_path} is in use by pid {holder.pid} on host ') + '.*another --workdir'
  with pytest.raises(WorkdirInUse, match=expected):
    with acquire(str(tmp_path)):
      pass
  cmd, kw = _python(TRY, str(tmp_path))
  other = subprocess.run(cmd, capture_output=True, timeout=60, **kw)
  assert other.returncode == 3, other.stderr
  assert f'pid {holder.pid}' in other.stdout


def test_kill_9_of_the_holder_frees_the_lock(tmp_path, holder):
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert 'pid' in (tmp_path / '.lock').read_text()   # what the dead holder left behind
  with acquire(str(tmp_path)) as path:
    assert f'"pid": {os.getpid()}' in open(path).read()
  assert (tmp_path / '.lock').read_text() == ''      # released: nothing claims it


def test_disabled_and_sequential_use(tmp_path):
  with acquire(str(tmp_path / 'w'), enabled=False) as path:
    assert path is None and not (tmp_path / 'w').exists()
  for _ in range(2):
    with acquire(str(tmp_path / 'w')):
      pass
  with pytest.raises(KeyError):             # the body's errors pass through and release it
    with acquire(str(tmp_path / 'w')):
      raise KeyError('x')
  with acquire(str(tmp_path / 'w')):
    pass
