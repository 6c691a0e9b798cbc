"""The whole job on CPU with 8 fake devices: phases, outputs, eval from a checkpoint, resume.

One uninterrupted run (module fixture) is the reference; the resume test
interrupts the same config three ways (SIGTERM, SIGKILL, a corrupted latest
checkpoint) in subprocesses and requires bit-identical final parameters.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tljax import evaluate, predict, train
from tljax.porting import merge, weights_io

CONFIG_SRC = '''
from tljax.config import base_config, phase


def get_config():
  c = base_config()
  c.model.name = 'simple_cnn_tiny'
  c.model.head.hidden = (8,)
  c.model.head.dropout = 0.25
  c.preprocessing = 'torchvision'
  c.input_size = 32
  c.load_size = 36
  c.data.update(dict(source='synthetic', num_classes=3, num_train=64, num_val=20, num_test=12))
  c.batch_size = 16
  c.eval_batch_size = 24
  c.phases = (phase('head', epochs=2, lr=1e-2, augment=False),
              phase('finetune', epochs=5, trainable='all', lr=1e-3, bn='frozen'))
  c.checkpoint.every_steps = 3
  c.log.every_steps = 2
  c.lock()
  return c
'''


def load_config(tmp_dir):
  path = os.path.join(tmp_dir, 'loop_config.py')
  with open(path, 'w') as f:
    f.write(CONFIG_SRC)
  scope = {}
  exec(compile(CONFIG_SRC, path, 'exec'), scope)  # pylint: disable=exec-used
  return scope['get_config'](), path


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('loop'))
  config, path = load_config(tmp)
  workdir = os.path.join(tmp, 'reference')
  summary = train.train_and_evaluate(config, workdir)
  return config, path, workdir, summary


def exported(workdir):
  return weights_io.load_weights(os.path.join(workdir, 'export'))[0]


def test_phases_run_in_sequence_and_outputs_describe_the_run(reference_run):
  config, _, workdir, summary = reference_run
  assert [p['name'] for p in summary['phases']] == ['head', 'finetune']
  head, finetune = summary['phases']
  assert head['cached'] and not finetune['cached']
  assert head['frozen_params'] > 0 and finetune['frozen_params'] == 0
  for name in ('config.json', 'metrics.jsonl', 'summary.md', 'summary.json',
               'learning_curves.png', 'confusion_val.png', 'confusion_test.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['phase'] for r in records if r['kind'] == 'phase_start'] == ['head', 'finetune']
  assert [r['step'] for r in records if r['kind'] == 'val'] == [4 * e for e in range(1, 8)]
  assert json.load(open(os.path.join(workdir, 'config.json')))['phases'][1]['trainable'] == 'all'
  table = open(os.path.join(workdir, 'summary.md')).read()
  assert '| head | head | 2 |' in table and 'class_2' in table


def test_rerunning_a_finished_workdir_gives_the_same_summary(reference_run, tmp_path):
  """The last checkpoint of a finished run restores to the same summary without training."""
  config, _, workdir, summary = reference_run
  copy = str(tmp_path / 'again')
  shutil.copytree(workdir, copy)
  again = train.train_and_evaluate(config, copy)
  assert again['step'] == summary['step']
  for before, after in zip(summary['phases'], again['phases']):
    assert {k: v for k, v in before.items() if k != 'seconds'} == {
        k: v for k, v in after.items() if k != 'seconds'}
  assert '| head | head | 2 |' in open(os.path.join(copy, 'summary.md')).read()


def test_restore_then_eval_reproduces_final_metrics(reference_run):
  config, _, workdir, summary = reference_run
  for split in ('val', 'test'):
    with config.unlocked():
      config.eval.split = split
    result = evaluate.evaluate(config, workdir)
    final = summary['final'][split]
    assert result['count'] == final['count'] == {'val': 20, 'test': 12}[split]
    assert result['accuracy'] == final['accuracy']
    assert result['confusion'] == final['confusion']
    assert result['loss'] == pytest.approx(final['loss'], rel=1e-5)


def test_export_feeds_the_predict_cli(reference_run, tmp_path):
  _, _, workdir, _ = reference_run
  from PIL import Image
  image = os.path.join(tmp_path, 'x.png')
  Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
  model, variables, meta = predict.load_for_inference(os.path.join(workdir, 'export'))
  results = predict.Predictor(model, variables, meta).predict_files([image], k=2)
  assert [p['label'] for p in results[0]['predictions']][0] in ('class_0', 'class_1', 'class_2')


def _run(config_path, workdir, env):
  return subprocess.Popen(
      [sys.executable, '-m', 'tljax.main', f'--config={config_path}', f'--workdir={workdir}'],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _wait_for_step(proc, workdir, above, timeout=120):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if any(s > above for s in _steps(workdir)) or proc.poll() is not None:
      return
    time.sleep(0.01)
  raise TimeoutError(f'no checkpoint past step {above} after {timeout}s')


def test_resume_after_sigterm_sigkill_and_corruption_is_bit_identical(reference_run, tmp_path):
  _, config_path, reference, _ = reference_run
  workdir = str(tmp_path / 'interrupted')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')

  proc = _run(config_path, workdir, env)
  _wait_for_step(proc, workdir, above=0)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 143, out
  assert 'SIGTERM: saved' in out
  after_term = _steps(workdir)[-1]

  proc = _run(config_path, workdir, env)
  _wait_for_step(proc, workdir, above=after_term)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  killed_at = _steps(workdir)[-1]

  latest = os.path.join(workdir, 'checkpoints', str(killed_at))
  for path in glob.glob(os.path.join(latest, 'train', '**', '*'), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 64:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  proc = _run(config_path, workdir, env)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out
  assert 'resuming from step' in out
  assert f'checkpoints/{killed_at} is unreadable' in out, out

  print('interrupted: SIGTERM at', after_term, 'SIGKILL at', killed_at, 'of', _steps(reference))
  final, ref = exported(workdir), exported(reference)
  flat_final, flat_ref = merge.flatten(final), merge.flatten(ref)
  assert flat_final.keys() == flat_ref.keys()
  for key, value in flat_ref.items():
    assert np.asarray(value).tobytes() == np.asarray(flat_final[key]).tobytes(), key
  ref_lines = [json.loads(l) for l in open(os.path.join(reference, 'metrics.jsonl'))]
  new_lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert new_lines == ref_lines   # the partial metric window is carried by the checkpoint


def test_cached_head_phase_matches_recomputing_backbone(reference_run, tmp_path):
  """Features computed once + scanned head steps == backbone recomputed every step.

  The reference run's head phase trained on cached features; this run repeats
  it recomputing the backbone each step, and the phase-end validation (which
  depends on every head parameter) must agree.
  """
  config, _, _, reference = reference_run
  from tljax.config import phase
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.phases = (phase('head', epochs=2, lr=1e-2, augment=False, cache_features=False),)
    cfg.checkpoint.enabled = False
    cfg.log.update(dict(tensorboard=False, plots=False))
  summary = train.train_and_evaluate(cfg, str(tmp_path / 'uncached'))
  uncached, cached = summary['phases'][0], reference['phases'][0]
  assert cached['cached'] and not uncached['cached']
  assert uncached['val']['loss'] == pytest.approx(cached['val']['loss'], rel=1e-5)
  assert uncached['val']['confusion'] == cached['val']['confusion']
