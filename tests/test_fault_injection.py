"""kill -9 at many points of a two-phase run; every resume must end exactly like no kill at all.

The run checkpoints every step and logs every third, so most kills land with
train metrics not yet logged (the checkpoint carries them), some land inside
an orbax write (its temporary directory is left behind), some in evaluation.
Weights, `metrics.jsonl` and the summary's results must match an
uninterrupted run bit for bit.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tljax.porting import merge, weights_io
from tests.test_train_loop import _run as _launch

CONFIG_SRC = '''
from tljax.config import base_config, phase


def get_config():
  c = base_config()
  c.model.name = 'simple_cnn_tiny'
  c.model.head.dropout = 0.25
  c.preprocessing = 'torchvision'
  c.input_size = 24
  c.load_size = 28
  c.data.update(dict(source='synthetic', num_classes=3, num_train=32, num_val=16, num_test=8))
  c.batch_size = 8
  c.phases = (phase('head', epochs=2, lr=1e-2, cache_features=False),
              phase('finetune', epochs=12, trainable='all', lr=1e-3))
  c.checkpoint.every_steps = 1
  c.log.update(dict(every_steps=3, tensorboard=False, plots=False, progress=False))
  c.lock()
  return c
'''

KILLS = 10
MIN_KILLS = 6   # the run may finish first on a fast machine


def _progress(workdir):
  """(newest finished checkpoint step, metric lines); both grow only once a launch trains.

  Temporary directories are left out: a starting launch deletes the one its
  predecessor left, which is not progress of its own.
  """
  steps = [int(s) for s in _finished_steps(workdir)]
  path = os.path.join(workdir, 'metrics.jsonl')
  lines = sum(1 for _ in open(path)) if os.path.exists(path) else 0
  return max(steps, default=-1), lines


def _moved_on(now, before):
  return now[0] > before[0] or now[1] > before[1]


def _finished_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return [s for s in os.listdir(d) if s.isdigit()] if os.path.isdir(d) else []


def _results(workdir):
  weights = merge.flatten(weights_io.load_weights(os.path.join(workdir, 'export'))[0])
  metrics = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  results = [{k: p.get(k) for k in ('name', 'val', 'test')} for p in summary['phases']]
  return weights, metrics, results


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_identical(tmp_path):
  config_path = tmp_path / 'config.py'
  config_path.write_text(CONFIG_SRC)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', PYTHONUNBUFFERED='1')
  reference = str(tmp_path / 'reference')
  t0 = time.time()
  out = subprocess.run([sys.executable, '-m', 'tljax.main', f'--config={config_path}',
                        f'--workdir={reference}'], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  run_seconds = time.time() - t0

  workdir = str(tmp_path / 'killed')
  rng = random.Random(1417)
  kills, resumed = 0, 0
  while kills < KILLS:
    had_checkpoint = bool(_finished_steps(workdir))
    proc = _launch(config_path, workdir, env)
    before = _progress(workdir)
    deadline = time.time() + 300
    while (not _moved_on(_progress(workdir), before) and proc.poll() is None
           and time.time() < deadline):
      time.sleep(0.005)   # wait for this process to make progress of its own
    progressed = _moved_on(_progress(workdir), before)
    time.sleep(rng.uniform(0, min(1.0, run_seconds / 16)))
    if proc.poll() is not None:
      out = proc.communicate()[0]
      assert proc.returncode == 0, out
      break            # finished before this kill
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    kills += 1
    if had_checkpoint and progressed:
      assert 'resuming from step' in out, out
      resumed += 1
  else:
    proc = _launch(config_path, workdir, env)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
  if kills < MIN_KILLS:
    pytest.fail(f'the run finished after only {kills} kills; make it longer')
  assert resumed >= 1, 'no kill landed after a finished checkpoint; the test exercised no resume'

  ref_weights, ref_metrics, ref_results = _results(reference)
  weights, metrics, results = _results(workdir)
  assert weights.keys() == ref_weights.keys()
  for key, value in ref_weights.items():
    assert np.asarray(value).tobytes() == np.asarray(weights[key]).tobytes(), key
  assert metrics == ref_metrics
  assert results == ref_results
