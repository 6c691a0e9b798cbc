"""Checkpoint integrity: content digests checked on restore, clean errors, the workdir lock."""

import os
import re
import signal
import subprocess
import sys

import pytest

from tljax.workdir_lock import WorkdirInUse, acquire

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
  with pytest.raises(KeyError):                       # the body's errors pass through and release it
    with acquire(str(tmp_path / 'w')):
      raise KeyError('x')
  with acquire(str(tmp_path / 'w')):
    pass
