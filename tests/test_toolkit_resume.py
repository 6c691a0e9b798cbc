"""Every small-data tool resumes bit-identically and does what it says inside the real loop.

Each case runs a two-phase job three ways in one process: uninterrupted, and
stopped mid-epoch (the loop saves as it does on SIGTERM) then resumed from
that checkpoint. Exported weights, `metrics.jsonl` and the phase results must
match bit for bit: class weights with the balanced sampler, early stopping
with its restore, the weight EMA, TrivialAugment with mixup/cutmix, and
gradient accumulation stopped between two updates.
"""

import json
import os

import numpy as np
import pytest

from tljax import train
from tljax.config import base_config, phase
from tljax.porting import merge, weights_io
from tljax.preemption import Preempted, Preemption


def config(**changes):
  c = base_config()
  c.model.name = 'simple_cnn_tiny'
  c.preprocessing = 'torchvision'
  c.input_size, c.load_size = 24, 28
  c.data.update(dict(source='synthetic', num_classes=3, num_train=48, num_val=24, num_test=16))
  c.batch_size = 8
  c.phases = (phase('head', epochs=2, lr=1e-2, cache_features=False),
              phase('tune', epochs=5, trainable='all', lr=3e-3))
  c.log.update(dict(every_steps=2, tensorboard=False, plots=False, progress=False))
  for path, value in changes.items():
    target, *rest = path.split('.')
    if target.startswith('phases'):
      i = int(target[len('phases['):-1])
      c.phases[i][rest[0]] = value
    else:
      node = c
      for key in [target] + rest[:-1]:
        node = node[key]
      node[rest[-1]] = value
  return c


class StopAt(Preemption):
  """A SIGTERM that arrives at a chosen step, without signals."""

  def __init__(self, step):
    super().__init__()
    self.step, self.stop = step, False

  @property
  def requested(self):
    return self.stop

  def reached(self, step):
    self.stop = self.stop or step >= self.step
    return self.stop


def results(workdir):
  weights = merge.flatten(weights_io.load_weights(os.path.join(workdir, 'export'))[0])
  metrics = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  return weights, metrics, summary


CASES = {
    'class_weights+balanced_sampler': dict(**{'loss.class_weights': 'balanced',
                                              'data.sampler': 'balanced'}),
    'early_stop': {'phases[1].early_stop_patience': 1},
    'ema': {'phases[0].ema_decay': 0.8, 'phases[1].ema_decay': 0.9},
    'trivialaugment+mixup/cutmix': {'augment.policy': 'trivialaugment', 'augment.mixup_alpha': 0.4,
                                    'augment.cutmix_alpha': 1.0},
    'accumulate': {'phases[1].accumulate_steps': 4},
}
STOP = 12 + 9   # phase 2, epoch 2, mid-epoch; not a multiple of 4 (between two accumulated updates)


@pytest.mark.parametrize('case', sorted(CASES))
def test_stop_and_resume_is_bit_identical(case, tmp_path):
  c = config(**CASES[case])
  reference, interrupted = str(tmp_path / 'ref'), str(tmp_path / 'int')
  train._Run(c, reference).run()
  with pytest.raises(Preempted):
    train._Run(c, interrupted, StopAt(STOP)).run()
  train._Run(c, interrupted).run()
  ref_w, ref_m, ref_s = results(reference)
  got_w, got_m, got_s = results(interrupted)
  assert ref_w.keys() == got_w.keys()
  for key, value in ref_w.items():
    assert np.asarray(value).tobytes() == np.asarray(got_w[key]).tobytes(), key
  assert got_m == ref_m
  strip = lambda s: [{k: p.get(k) for k in ('name', 'val', 'test', 'early_stop')}
                     for p in s['phases']]
  assert strip(got_s) == strip(ref_s)
  if case == 'early_stop':
    kinds = [m['kind'] for m in ref_m]
    assert 'early_stop' in kinds and 'restore_best' in kinds, kinds
    stop = next(m for m in ref_m if m['kind'] == 'early_stop')
    assert stop['step'] > STOP > stop['best_step'], (stop, STOP)   # the restore read the disk
