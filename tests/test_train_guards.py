"""What a hostile or unlucky launch gets: one line naming the problem and the fix, nothing lost.

Divergence stops the run before anything non-finite is saved, evaluated or
exported; workdir files are strict JSON; bad config files and values, a full
or read-only disk and an early SIGTERM end with one line, not a traceback.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tljax import report
from tljax.config import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, env=None, timeout=300):
  out = subprocess.run([sys.executable, '-m', 'tljax.main', *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
  return out.returncode, out.stdout, out.stderr


def _strict_lines(path):
  def refuse(name):
    raise ValueError(f'{path}: non-standard JSON constant {name}')
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def _one_line_error(stderr):
  assert 'Traceback' not in stderr, stderr
  errors = [l for l in stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, stderr
  return errors[0]


def test_divergence_stops_before_saving_evaluating_or_exporting(tmp_path):
  workdir = tmp_path / 'w'
  rc, out, err = _main('--config=configs/monkeys.py:model=cnn_scratch,tiny', f'--workdir={workdir}',
                       '--config.phases[0].optimizer=sgd', '--config.phases[0].lr=1e6')
  assert rc == 1, out + err
  line = _one_line_error(err)
  assert "diverged in phase 'scratch' at step" in line and 'phases[0].lr' in line, line
  assert not (workdir / 'export').exists()
  assert not any((workdir / 'best').glob('*')) if (workdir / 'best').exists() else True
  assert not (workdir / 'summary.json').exists()
  records = _strict_lines(workdir / 'metrics.jsonl')
  bad = [r for r in records if r.get('nonfinite')]
  assert bad and bad[0]['loss'] is None and 'loss' in bad[0]['nonfinite']
  assert not any(r['kind'] == 'val' for r in records)


def test_strict_json_turns_non_finite_values_into_null_and_flags_them():
  record = report.strict_record({'loss': float('nan'), 'accuracy': 0.5, 'x': [float('inf')]})
  assert record == {'loss': None, 'accuracy': 0.5, 'x': [None], 'nonfinite': ['loss']}
  assert json.loads(report.dumps({'a': float('-inf')})) == {'a': None}


@pytest.mark.parametrize('field,value', [('lr', float('inf')), ('lr', float('nan')),
                                         ('weight_decay', float('inf')), ('eps', float('nan'))])
def test_non_finite_optimizer_values_are_config_errors(field, value):
  from tljax.config import base_config, phase
  c = base_config()
  c.phases = (phase('head', **{field: value}),)
  with pytest.raises(ValueError, match=rf'phases\[0\]\.{field}=.*finite'):
    validate(c)


def test_every_phase_with_zero_epochs_is_a_config_error():
  from tljax.config import base_config, phase
  c = base_config()
  c.phases = (phase('head', epochs=0), phase('all', epochs=0, trainable='all'))
  with pytest.raises(ValueError, match='at least one phase must train'):
    validate(c)
  c.phases = (phase('head', epochs=0), phase('all', epochs=1, trainable='all'))
  validate(c)


@pytest.mark.parametrize('args,expected', [
    (('--config=configs/no_such_recipe.py',), "config file 'configs/no_such_recipe.py' does not exist"),
    (('--config=configs/default.py:tiny', '--config.phases[5].lr=1'), 'indexes past the end'),
    (('--config=configs/default.py:bogus',), "unknown config argument 'bogus'"),
    (('--config=configs/default.py:tiny', '--config.phases[0].lr=inf'), 'expected a finite number'),
])
def test_bad_launches_are_one_line_usage_errors(tmp_path, args, expected):
  rc, out, err = _main(*args, f'--workdir={tmp_path}', timeout=120)
  assert rc == 2, out + err
  assert expected in _one_line_error(err)


@pytest.mark.parametrize('delay', [0.6, 1.0, 2.5, 6.0])
def test_sigterm_at_any_point_of_setup_exits_143_with_a_message(tmp_path, delay):
  proc = subprocess.Popen([sys.executable, '-m', 'tljax.main', '--config=configs/default.py:tiny',
                           f'--workdir={tmp_path}'], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(delay)   # start-up, data, init, compilation, or the first steps
  assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, out + err
  assert 'SIGTERM' in err and 're-run the same command' in err, err
  assert 'Traceback' not in err


@pytest.fixture
def small_mount(tmp_path):
  """A tiny tmpfs (120 KiB): a disk that fills up during the first checkpoints (needs root)."""
  mnt = tmp_path / 'mnt'
  mnt.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=120k', 'tmpfs', str(mnt)],
                    capture_output=True).returncode:
    pytest.skip('cannot mount a tmpfs here (needs root)')
  yield mnt
  subprocess.run(['umount', '-l', str(mnt)], check=False)


def test_full_disk_is_one_line(small_mount):
  rc, out, err = _main('--config=configs/monkeys.py:model=cnn_scratch,tiny',
                       f'--workdir={small_mount}/w', '--config.checkpoint.every_steps=1')
  assert rc == 1, out + err
  assert 'no space left' in _one_line_error(err)
  assert 'Event loop is closed' not in err


def test_read_only_workdir_is_one_line(small_mount):
  (small_mount / 'w').mkdir()
  subprocess.run(['mount', '-o', 'remount,ro', str(small_mount)], check=True)
  rc, out, err = _main('--config=configs/monkeys.py:model=cnn_scratch,tiny', f'--workdir={small_mount}/w')
  assert rc == 1, out + err
  assert 'choose a writable --workdir' in _one_line_error(err)


def test_a_second_run_on_a_busy_workdir_exits_at_once_naming_the_holder(tmp_path):
  from tljax import workdir_lock
  with workdir_lock.acquire(str(tmp_path / 'w')):
    rc, out, err = _main('--config=configs/monkeys.py:model=cnn_scratch,tiny', f'--workdir={tmp_path}/w')
  assert rc == 1, out + err
  line = _one_line_error(err)
  assert f'in use by pid {os.getpid()}' in line and 'another --workdir' in line, line


def test_every_checkpoint_corrupt_is_one_line_in_train_and_eval(tmp_path):
  workdir = tmp_path / 'w'
  args = ('--config=configs/monkeys.py:model=cnn_scratch,tiny', f'--workdir={workdir}')
  rc, out, err = _main(*args)
  assert rc == 0, out + err
  for path in (workdir / 'checkpoints').rglob('*'):
    if path.is_file() and path.stat().st_size > 64:
      data = bytearray(path.read_bytes())
      data[len(data) // 2] ^= 0xFF
      path.write_bytes(bytes(data))
  for extra in ((), ('--mode=eval', '--config.eval.checkpoint=latest')):
    rc, out, err = _main(*args, *extra)
    assert rc == 1, out + err
    assert 'checkpoint' in _one_line_error(err)
