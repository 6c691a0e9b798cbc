r"""Learning-rate range test (Smith 2017, as in fastai's `lr_find`): `--mode=lr_find`.

  python -m tljax.main --config=configs/default.py --workdir=W --mode=lr_find
  python -m tljax.main --config=... --workdir=W --mode=lr_find --config.lr_find.phase=fine_tuned

Trains `lr_find.steps` steps of one phase from the run's initial weights
(pretrained trunk + fresh head: what training starts from) while the learning
rate grows exponentially from `start_lr` to `end_lr`, and records the loss of
every step. The loss of one batch is noisy, so the curve kept is its
bias-corrected exponential moving average (`smoothing`); the sweep stops once
that exceeds `stop_factor` × its minimum, or a step is non-finite, because
past that point training has diverged and the rest of the curve says nothing.
The suggestion (`suggest`) reads the same average without its delay
(`zero_lag`) and is printed with the rule that chose it.

The steps are the train loop's own (`tljax.train._Run`): the same data order,
augmentation, loss, trainable parameters, BatchNorm policy and optimizer, and
for a head-only phase on a frozen trunk the same cached backbone features, so
a head sweep takes seconds. Only the learning rate differs. A later phase
normally starts from the weights the earlier ones leave; the sweep does not
train those, so its curve is that of the phase started from the initial
weights.

Everything is written under `<workdir>/lr_find/` (lr_find.json, lr_find.png,
config.json, the lock): no checkpoint, metrics or config of the workdir's own
run is touched, so a sweep can be run before, during or after training.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Sequence

import numpy as np

SUBDIR = 'lr_find'
JSON_FILE = 'lr_find.json'
PLOT_FILE = 'lr_find.png'
# Slopes are read over this span of log10(lr): one step's slope on a smoothed but still noisy
# curve can point anywhere, a fifth of a decade averages a few steps of the default sweep.
SLOPE_DECADES = 0.2
# The first steps' smoothed loss averages only a few batches (the bias correction makes step 0
# the raw loss of one batch), so one lucky batch there could pass for the minimum; the rule
# reads the curve from this fraction of the steps on (fastai's plot skips 10 of 100).
SKIP_START = 0.1
RULE = ('steepest descent of the zero-lag smoothed loss (largest drop per decade of lr, over '
        f'{SLOPE_DECADES:g} decades) before its minimum')
FALLBACK_RULE = ('the lr of the zero-lag smoothed loss minimum / 10 (the loss never fell before '
                 'its minimum, so there is no descent to read)')


def exponential_schedule(start_lr: float, end_lr: float, updates: int):
  """lr(u) = start_lr · (end_lr / start_lr)^(u / (updates - 1)): start_lr at update 0, end_lr at
  the last; an optax schedule (a function of the update count, numpy or traced)."""
  ratio = math.log(end_lr / start_lr) / max(updates - 1, 1)

  def lr(count):
    import jax.numpy as jnp
    return start_lr * jnp.exp(ratio * jnp.minimum(count, updates - 1))
  return lr


def sweep_lrs(start_lr: float, end_lr: float, steps: int, accumulate: int = 1) -> np.ndarray:
  """The lr of each of `steps` steps; with gradient accumulation one update spans `accumulate`
  steps, and the sweep still reaches end_lr at its last update."""
  updates = -(-steps // accumulate)
  ratio = math.log(end_lr / start_lr) / max(updates - 1, 1)
  return start_lr * np.exp(ratio * (np.arange(steps) // accumulate))


class Smoother:
  """The bias-corrected EMA of the losses added so far, and whether the sweep must stop.

  EMA a_i = β a_{i-1} + (1 - β) l_i from a_{-1} = 0, read as a_i / (1 - β^{i+1})
  (Adam's bias correction) so the first steps are not pulled toward zero.
  A non-finite loss ends the curve before that step; a smoothed loss above
  `stop_factor` × the smallest so far ends it after (never with None).
  """

  def __init__(self, smoothing: float, stop_factor: float | None):
    self.smoothing, self.stop_factor = smoothing, stop_factor
    self.values: list[float] = []
    self.stopped: str | None = None
    self._avg, self._best = 0.0, math.inf

  def add(self, loss: float) -> bool:
    """Takes the next step's loss; False once the curve has ended (this step or before)."""
    if self.stopped is not None:
      return False
    loss, step = float(loss), len(self.values) + 1
    if not math.isfinite(loss):
      self.stopped = f'the loss of step {step} is not finite'
      return False
    beta = self.smoothing
    self._avg = beta * self._avg + (1 - beta) * loss
    value = self._avg / (1 - beta ** step)
    self.values.append(value)
    self._best = min(self._best, value)
    if self.stop_factor is not None and value > self.stop_factor * self._best:
      self.stopped = (f'at step {step} the smoothed loss {value:.4g} exceeded '
                      f'{self.stop_factor:g} × its minimum {self._best:.4g}')
      return False
    return True


def smooth(losses: Sequence[float], smoothing: float, stop_factor: float | None
           ) -> tuple[list[float], int, str | None]:
  """(smoothed, kept, why stopped) of `Smoother` over `losses`: kept is how many steps the
  curve has (all, or up to the step that diverged), why is None when none did."""
  s = Smoother(smoothing, stop_factor)
  for loss in losses:
    if not s.add(loss):
      break
  return s.values, len(s.values), s.stopped


def zero_lag(smoothed: Sequence[float], smoothing: float) -> list[float]:
  """The causal smoothed loss smoothed again backward in time: a curve without delay.

  An EMA trails the loss it averages by about β / (1 - β) steps (49 at
  β = 0.98, two decades of lr in the default 200-step sweep), so on the causal
  curve the loss seems to fall, and bottom out, at higher lrs than it did.
  Running the same bias-corrected EMA from the last step back cancels that
  delay (forward-backward filtering); the stop rule, which must not look
  ahead, keeps the causal curve.
  """
  return smooth(list(smoothed)[::-1], smoothing, None)[0][::-1]


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> dict[str, Any]:
  """The suggested lr and the rule that chose it, plus the minimum-loss lr / 10 figure.

  Steepest descent: the secant slope of the smoothed loss against log10(lr)
  over `SLOPE_DECADES`, most negative among windows that end at or before the
  loss minimum; the suggestion is the window's (geometric) middle. Past the
  minimum the loss only rises, and before the descent the curve is flat, so
  this is the lr at which the loss was falling fastest: high enough to learn
  quickly, short of where it stops falling. The first `SKIP_START` of the
  steps are not read.
  """
  lrs = np.asarray(lrs, np.float64)
  y = np.asarray(smoothed, np.float64)
  if len(y) < 2:
    raise ValueError(f'lr_find: {len(y)} step(s) of loss, too few to suggest a learning rate; '
                     'lower lr_find.start_lr or raise lr_find.stop_factor.')
  x = np.log10(lrs)
  skip = min(int(SKIP_START * len(y)), len(y) - 2)
  lowest = skip + int(np.argmin(y[skip:]))
  out = {'min_loss_lr': float(lrs[lowest]), 'min_loss': float(y[lowest]),
         'min_loss_lr_over_10': float(lrs[lowest] / 10)}
  per_decade = (len(x) - 1) / max(x[-1] - x[0], 1e-12)
  w = max(1, int(round(SLOPE_DECADES * per_decade)))
  ends = np.arange(skip + w, lowest + 1)
  dx = x[ends] - x[ends - w]     # 0 inside one update of an accumulating phase
  slopes = np.where(dx > 0, (y[ends] - y[ends - w]) / np.where(dx > 0, dx, 1.0), np.inf)
  if not len(ends) or slopes.min() >= 0:
    return {'suggestion': out['min_loss_lr_over_10'], 'rule': FALLBACK_RULE, **out}
  end = int(ends[np.argmin(slopes)])
  return {'suggestion': float(10 ** ((x[end - w] + x[end]) / 2)), 'rule': RULE,
          'steepest_slope_per_decade': float(slopes.min()), **out}


def find(config, workdir: str) -> dict[str, Any]:
  """Runs the sweep of `config.lr_find` for `config`'s run in `workdir`; writes and returns it."""
  import jax
  from tljax import workdir_lock
  from tljax.config import validate
  validate(config)
  out_dir = os.path.join(workdir, SUBDIR)
  with workdir_lock.acquire(out_dir, enabled=jax.process_index() == 0):
    return _Sweep(config, out_dir).run()


def sweep_config(config):
  """The run's config with every output of its own off: no checkpoints, TensorBoard, plots or
  progress bars (the sweep writes its own files only)."""
  c = copy.deepcopy(config)
  c.checkpoint.enabled = False
  c.log.tensorboard = False
  c.log.plots = False
  c.log.progress = False
  return c


def sweep_phase(config) -> tuple[int, Any]:
  """(index, phase) of `lr_find.phase`; '' is the first phase that trains."""
  name = config.lr_find.phase
  for i, p in enumerate(config.phases):
    if (p.name == name) if name else p.epochs > 0:
      return i, p
  raise ValueError(f'lr_find.phase={name!r} names no phase of the config')


class _Sweep:
  """One sweep: the run's `_Run` (data, model, initial weights) in `out_dir`, one phase."""

  def __init__(self, config, out_dir: str):
    import jax
    from tljax import report, train
    self.config = sweep_config(config)
    self.out_dir = out_dir
    self.index, self.phase = sweep_phase(self.config)
    self.primary = jax.process_index() == 0
    self.run_ = train._Run(self.config, out_dir)
    # The sweep's record is lr_find.json; the phase_start line would be a metrics.jsonl alone.
    self.run_.reporter = report.Reporter(out_dir, tensorboard=False, progress=False, write=False)

  def run(self) -> dict[str, Any]:
    import jax
    from tljax import optim, steps, train
    f, run, phase = self.config.lr_find, self.run_, self.phase
    t0 = time.time()
    accumulate = optim.accumulate_steps(phase)
    schedule = exponential_schedule(f.start_lr, f.end_lr, -(-f.steps // accumulate))
    state = steps.TrainState(params=run.variables['params'],
                             batch_stats=run.variables['batch_stats'], opt_state=None,
                             step=np.zeros((), np.int32), rng=steps.make_key(self.config.seed))
    pos = train.Position()
    ph = run._setup_phase(self.index, phase, state, pos, resuming=False, lr=schedule)
    # The phase's first step as training numbers it: the same data order and random draws.
    pos.step = ph.first_step
    state = state.replace(opt_state=ph.tx.init(state.params),
                          step=np.asarray(ph.first_step, np.int32))
    rstate = steps.replicate(state)
    if ph.features is not None:
      ph.features = run._cache_features(ph.backbone_fns['features'], rstate, phase)
    curve = Smoother(f.smoothing, f.stop_factor)
    losses: list[float] = []
    epoch = 0
    while len(losses) < f.steps and curve.stopped is None:
      pos.step_in_epoch = 0
      batches, cache = run._epoch_batches(ph, ph.data_epoch0 + epoch, 0)
      try:
        for chunk in run._chunks(ph, batches, pos):
          chunk = chunk[:f.steps - len(losses)]
          if ph.features is None:
            rstate, metrics = ph.train_fn(rstate, chunk[0], cache)
          else:
            rstate, metrics = ph.chunk_fn(rstate, train._stack(chunk, ph.chunk_len))
          pos.step += len(chunk)
          pos.step_in_epoch += len(chunk)
          # A step that left the weights non-finite shows as the next step's loss.
          loss = np.atleast_1d(np.asarray(jax.device_get(metrics['loss']))[0])[:len(chunk)]
          losses.extend(loss.astype(np.float64).tolist())
          if not all([curve.add(v) for v in loss]) or len(losses) >= f.steps:
            break
      finally:
        batches.close()
      epoch += 1
    kept, stopped = len(curve.values), curve.stopped
    lrs = sweep_lrs(f.start_lr, f.end_lr, f.steps, accumulate)[:kept].tolist()
    smoothed = curve.values
    centred = zero_lag(smoothed, f.smoothing)
    result = {'phase': phase.name, 'phase_lr': float(phase.lr), 'optimizer': phase.optimizer,
              'trainable': phase.trainable, 'cached_features': ph.features is not None,
              'start_lr': float(f.start_lr), 'end_lr': float(f.end_lr), 'steps': int(f.steps),
              'steps_run': kept, 'smoothing': float(f.smoothing),
              'stop_factor': float(f.stop_factor), 'stopped': stopped,
              **suggest(lrs, centred), 'seconds': time.time() - t0,
              'lrs': lrs, 'losses': losses[:kept], 'smoothed': smoothed, 'zero_lag': centred}
    if self.primary:
      self._write(result)
    return result

  def _write(self, result: dict[str, Any]) -> None:
    from tljax import report
    json_path = os.path.join(self.out_dir, JSON_FILE)
    with open(json_path, 'w') as fh:
      fh.write(report.dumps(result, indent=2))
    png_path = plot(self.out_dir, result)
    notes = [n for n in self.run_.notes if 'cached' in n]
    end = (f'stopped: {result["stopped"]}' if result['stopped']
           else f'no divergence up to lr {result["end_lr"]:g}')
    print(f'lr_find [{result["phase"]}]: {result["steps_run"]} of {result["steps"]} steps, lr '
          f'{result["start_lr"]:g} → {result["lrs"][-1]:.3g} ({end}); {result["seconds"]:.1f}s'
          + ''.join(f'\n  {n}' for n in notes), flush=True)
    print(f'suggested lr: {result["suggestion"]:.3g}  (rule: {result["rule"]})\n'
          f'minimum zero-lag smoothed loss {result["min_loss"]:.4g} at lr '
          f'{result["min_loss_lr"]:.3g}; '
          f'that lr / 10: {result["min_loss_lr_over_10"]:.3g}\n'
          f'phase {result["phase"]!r} is configured with lr {result["phase_lr"]:g}\n'
          f'wrote {json_path} and {png_path}', flush=True)


def plot(out_dir: str, result: dict[str, Any]) -> str:
  """lr_find.png: raw and smoothed loss against lr on a log axis, the suggestion marked."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  lrs = result['lrs']
  ax.plot(lrs, result['losses'], color='tab:blue', alpha=0.3, linewidth=1, label='loss')
  ax.plot(lrs, result['smoothed'], color='tab:blue', linewidth=1.2, linestyle='--',
          label='smoothed loss (EMA: lags)')
  ax.plot(lrs, result['zero_lag'], color='tab:blue', linewidth=2,
          label='zero-lag smoothed loss (the rule reads this)')
  s = result['suggestion']
  ax.axvline(s, color='tab:red', linestyle='--', linewidth=1.2, label=f'suggested {s:.3g}')
  ax.plot([s], [np.interp(np.log10(s), np.log10(lrs), result['zero_lag'])], 'o',
          color='tab:red')
  m = result['min_loss_lr_over_10']
  if not math.isclose(m, s):
    ax.axvline(m, color='tab:gray', linestyle=':', linewidth=1.2, label=f'min-loss lr / 10 {m:.3g}')
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel('training loss')
  ax.set_title(f'lr range test: phase {result["phase"]} ({result["steps_run"]} steps)')
  low = min(result['zero_lag'] + result['smoothed'])
  high = max(result['zero_lag'] + result['smoothed'])
  ax.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.1 * (high - low + 1e-12))
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, PLOT_FILE)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
