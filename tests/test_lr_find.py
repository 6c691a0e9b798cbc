"""`--mode=lr_find`: the suggestion rule on known curves, the sweep's optimizer, and the command.

The command runs on the tiny monkeys recipe (a small CNN trained from
scratch, image steps); it must write only under W/lr_find/, also when W holds
a finished training run, which stays byte-identical.
"""

import hashlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import lr_find, optim
from tljax.config import phase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '--config=configs/monkeys.py:model=cnn_scratch,tiny'


def _main(*args, timeout=300):
  out = subprocess.run([sys.executable, '-m', 'tljax.main', '--notune_malloc', *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
  return out.returncode, out.stdout, out.stderr


def _log_lrs(n=200):
  return np.logspace(-7, 1, n)


def test_suggestion_on_a_u_shaped_curve_lies_on_the_descent():
  lrs = _log_lrs()
  x = np.log10(lrs)
  loss = (x + 2) ** 2 / 10 + 1           # minimum at lr 1e-2
  s = lr_find.suggest(lrs, loss)
  assert s['rule'] == lr_find.RULE
  assert lrs[0] < s['suggestion'] < 1e-2
  assert s['min_loss_lr'] == pytest.approx(1e-2, rel=0.1)
  assert s['min_loss_lr_over_10'] == pytest.approx(1e-3, rel=0.1)


def test_suggestion_finds_the_steepest_part_of_a_plateau_drop_blowup_curve():
  """Flat, then falling fastest at 1e-3, then bottoming out and diverging past 1e-1."""
  lrs = _log_lrs()
  x = np.log10(lrs)
  loss = 2.5 - 2 / (1 + np.exp(-3 * (x + 3))) + np.exp(4 * (x + 0.5))
  s = lr_find.suggest(lrs, loss)
  assert s['suggestion'] == pytest.approx(1e-3, rel=0.3)
  assert s['suggestion'] < s['min_loss_lr']


def test_a_curve_that_never_falls_suggests_the_minimum_over_ten():
  lrs = _log_lrs(50)
  s = lr_find.suggest(lrs, np.linspace(1.0, 3.0, 50))
  assert s['rule'] == lr_find.FALLBACK_RULE
  assert s['suggestion'] == pytest.approx(lrs[5] / 10)   # the first 10% are not read


def test_too_short_a_curve_is_a_clear_error():
  with pytest.raises(ValueError, match='too few'):
    lr_find.suggest([1e-3], [1.0])


def test_smoothing_is_bias_corrected_and_stops_on_divergence():
  smoothed, kept, why = lr_find.smooth([2.0, 2.0, 2.0], 0.98, 4.0)
  assert smoothed == pytest.approx([2.0, 2.0, 2.0]) and kept == 3 and why is None
  smoothed, kept, why = lr_find.smooth([1.0, 1.0, 100.0, 1.0], 0.5, 4.0)
  assert kept == 3 and '4 × its minimum' in why
  smoothed, kept, why = lr_find.smooth([1.0, 0.5, float('nan'), 1.0], 0.9, 4.0)
  assert kept == 2 and len(smoothed) == 2 and 'step 3' in why and 'not finite' in why
  assert lr_find.smooth([1.0, 5.0], 0.0, 4.0)[1:] == (2, 'at step 2 the smoothed loss 5 exceeded '
                                                      '4 × its minimum 1')


def test_zero_lag_smoothing_does_not_trail_a_ramp():
  ramp = np.linspace(3.0, 1.0, 400)
  causal = lr_find.smooth(ramp, 0.9, None)[0]
  centred = np.asarray(lr_find.zero_lag(causal, 0.9))
  assert causal[200] - ramp[200] > 0.04                  # the EMA trails by ~9 steps
  assert abs(centred[200] - ramp[200]) < 1e-3


def test_sweep_lrs_are_exponential_from_start_to_end():
  lrs = lr_find.sweep_lrs(1e-6, 1.0, 61)
  assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
  assert np.allclose(np.diff(np.log10(lrs)), 0.1)
  schedule = lr_find.exponential_schedule(1e-6, 1.0, 61)
  assert np.allclose([float(schedule(i)) for i in (0, 30, 60)], lrs[[0, 30, 60]], rtol=1e-5)
  accumulated = lr_find.sweep_lrs(1e-6, 1.0, 60, accumulate=3)
  assert accumulated[0] == accumulated[2] and accumulated[-1] == pytest.approx(1.0)


@pytest.mark.parametrize('kw', [dict(optimizer='adam'),
                                dict(optimizer='sgd', weight_decay=1e-2, grad_clip=0.5),
                                dict(optimizer='adamw', weight_decay=1e-2, schedule='cosine',
                                     warmup_epochs=1.0),
                                dict(optimizer='adam', accumulate_steps=2)])
def test_the_sweeps_optimizer_is_the_phases_at_the_sweeps_lr(kw):
  """With the sweep's schedule as `lr` (what `_Run._setup_phase(lr=)` passes on),
  `make_optimizer` gives the phase's own updates at a constant lr of the step's sweep value
  (its schedule and warm-up replaced, nothing else)."""
  params = {'head': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)},
            'backbone': {'kernel': jnp.ones((2, 2))}}
  labels = optim.param_labels(params, 'head')
  p = phase('x', epochs=2, lr=0.3, **kw)
  k = optim.accumulate_steps(p)
  steps = 4
  lrs = lr_find.sweep_lrs(1e-3, 1.0, steps, k)
  tx = optim.make_optimizer(p, labels, 5, lr=lr_find.exponential_schedule(1e-3, 1.0, steps // k))
  at = lambda lr: optim.make_optimizer(phase(**{**p.to_dict(), 'lr': float(lr),
                                                'schedule': 'constant', 'warmup_epochs': 0.0}),
                                       labels, 5)
  refs = [at(lr) for lr in lrs]
  state, ref_states, current = tx.init(params), [r.init(params) for r in refs], params
  for i in range(steps):
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.1 * (i + 1)), params)
    updates, state = tx.update(grads, state, current)
    # Every reference sees the same gradients, so all share the sweep's moment history.
    for j, r in enumerate(refs):
      u, ref_states[j] = r.update(grads, ref_states[j], current)
      if j == i:
        expected = u
    assert jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-5, atol=1e-9),
                                     updates, expected))
    current = jax.tree.map(lambda a, b: a + b, current, updates)


def _hashes(root):
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _check_outputs(workdir, out, steps=30):
  result = json.loads((workdir / 'lr_find' / 'lr_find.json').read_text())
  assert (workdir / 'lr_find' / 'lr_find.png').stat().st_size > 1000
  n = result['steps_run']
  assert 2 <= n <= steps and len(result['lrs']) == len(result['losses']) == n
  assert len(result['smoothed']) == len(result['zero_lag']) == n
  assert result['lrs'][0] == pytest.approx(1e-7)
  assert np.allclose(np.diff(np.log(result['lrs'])), math.log(1e8) / (steps - 1))
  assert result['rule'] in (lr_find.RULE, lr_find.FALLBACK_RULE)
  assert f'suggested lr: {result["suggestion"]:.3g}' in out and 'rule:' in out
  return result


def test_lr_find_writes_only_under_lr_find(tmp_path):
  workdir = tmp_path / 'w'
  rc, out, err = _main(TINY, f'--workdir={workdir}', '--mode=lr_find',
                       '--config.lr_find.steps=30')
  assert rc == 0, out + err
  assert sorted(os.listdir(workdir)) == ['lr_find']
  assert not (workdir / 'lr_find' / 'checkpoints').exists()
  assert not (workdir / 'lr_find' / 'metrics.jsonl').exists()
  result = _check_outputs(workdir, out)
  assert result['phase'] == 'scratch' and not result['cached_features']


def test_lr_find_leaves_a_finished_run_byte_identical(tmp_path):
  workdir = tmp_path / 'w'
  rc, out, err = _main(TINY, f'--workdir={workdir}')
  assert rc == 0, out + err
  assert (workdir / 'summary.json').exists()
  before = _hashes(workdir)
  rc, out, err = _main(TINY, f'--workdir={workdir}', '--mode=lr_find',
                       '--config.lr_find.steps=30')
  assert rc == 0, out + err
  after = _hashes(workdir)
  assert {k: v for k, v in after.items() if not k.startswith('lr_find' + os.sep)} == before
  _check_outputs(workdir, out)


def test_bad_lr_find_settings_are_one_line_errors(tmp_path):
  rc, out, err = _main(TINY, f'--workdir={tmp_path}', '--mode=lr_find',
                       '--config.lr_find.phase=nope', timeout=120)
  assert rc == 2, out + err
  assert 'Traceback' not in err and 'lr_find.phase' in err


def test_a_head_phase_sweeps_cached_features(tmp_path):
  """default.py's head_only phase (frozen trunk, no augmentation): scanned steps on features."""
  rc, out, err = _main('--config=configs/default.py:tiny', f'--workdir={tmp_path}',
                       '--mode=lr_find', '--config.lr_find.steps=40')
  assert rc == 0, out + err
  result = _check_outputs(tmp_path, out, steps=40)
  assert result['phase'] == 'head_only' and result['cached_features']
  assert 'features cached once' in out
