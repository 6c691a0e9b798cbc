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
              phase('finetune', epochs=6, trainable='all', lr=1e-3))
  c.checkpoint.every_steps = 1
  c.log.update(dict(every_steps=3, tensorboard=False, plots=False, progress=False))
  c.lock()
  return c
'''

KILLS = 10


def _progress(workdir):
  """Checkpoint steps (finished or being written) and metric lines so far."""
  d = os.path.join(workdir, 'checkpoints')
  names = os.listdir(d) if os.path.isdir(d) else []
  path = os.path.join(workdir, 'metrics.jsonl')
  lines = sum(1 for _ in open(path)) if os.path.exists(path) else 0
  return len(names), lines


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
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
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
    proc = _launch(config_path, workdir, env)
    before = _progress(workdir)
    deadline = time.time() + 300
    while _progress(workdir) == before and proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)   # wait for this process to make progress of its own
    time.sleep(rng.uniform(0, min(1.0, run_seconds / 12)))
    if proc.poll() is not None:
      out = proc.communicate()[0]
      assert proc.returncode == 0, out
      break            # finished before the kill: start over from a fresh point
    proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    kills += 1
    resumed += 'resuming from step' in out
  if kills < KILLS:
    pytest.fail(f'the run finished after only {kills} kills; make it longer')
  proc = _launch(config_path, workdir, env)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out
  assert resumed >= KILLS // 2, f'only {resumed} of {kills} launches resumed a checkpoint'

  ref_weights, ref_metrics, ref_results = _results(reference)
  weights, metrics, results = _results(workdir)
  assert weights.keys() == ref_weights.keys()
  for key, value in ref_weights.items():
    assert np.asarray(value).tobytes() == np.asarray(weights[key]).tobytes(), key
  assert metrics == ref_metrics
  assert results == ref_results
