"""Phased transfer learning in one job: head-only, then unfreeze at a low learning rate.

`train_and_evaluate(config, workdir)` runs the config's phases in sequence on
every local device. Switching phase relabels the parameters and rebuilds the
optimizer (fresh state for the new labels) while params and batch statistics
carry over. The position (phase, epoch, step in epoch, the train metrics not
yet logged) is checkpointed with the state, and every random draw is a
function of (seed, step), so a run killed at any point and restarted with the
same command ends with the same bits, and the same `metrics.jsonl`, as one
that never stopped.

Reading order: `_Run.run` → `_run_phase` (setup, then per epoch
`_train_epoch` and `_end_epoch`) → `_finish`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from tljax import components, evaluate, feature_cache, optim, report, steps, workdir_lock
from tljax.checkpoint import Checkpointer
from tljax.preemption import Preempted, Preemption
from tljax.config import validate
from tljax.steps import TrainState


class Diverged(Exception):
  """A step's loss, gradients or new weights were NaN/inf; nothing after the last finite
  checkpoint was saved, evaluated or exported."""


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains every phase and returns the run summary."""
  validate(config)
  with workdir_lock.acquire(workdir, enabled=jax.process_index() == 0), \
      Preemption() as preemption:
    return _Run(config, workdir, preemption).run()


@dataclasses.dataclass
class Position:
  """Where the run stands; saved as JSON with every checkpoint.

  `window` holds the per-step train metrics since the last log line, so a
  resumed run's next log line averages the same steps as an uninterrupted one.
  """
  phase: int = 0
  epoch: int = 0
  step_in_epoch: int = 0
  step: int = 0
  log_lines: int = 0
  best_val: float = -1.0
  phases: dict = dataclasses.field(default_factory=dict)   # phase name → description, results
  window: dict = dataclasses.field(default_factory=dict)   # metric name → float32 values

  def to_json(self) -> dict:
    return report.jsonable(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, meta: dict) -> 'Position':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in meta.items() if k in names})


MAX_CHUNK_STEPS = 256
MAX_CHUNK_BYTES = 64 << 20


class _MetricWindow:
  """Per-step train metrics since the last log line, fetched from devices only when read."""

  def __init__(self, logged: int, pending: dict[str, list[float]] | None = None):
    self.logged = logged
    self._device = []
    self._host = {k: np.asarray(v, np.float32) for k, v in (pending or {}).items()}

  def add(self, metrics, steps_in_call: int) -> None:
    self._device.append((metrics, steps_in_call))

  def _fetch(self) -> None:
    for m, n in jax.device_get(self._device):
      for k, v in m.items():
        new = np.atleast_1d(np.asarray(v)[0])[:n].astype(np.float32)
        self._host[k] = np.concatenate([self._host.get(k, np.zeros(0, np.float32)), new])
    self._device = []

  def first_nonfinite(self) -> int | None:
    """The first step since the last log line whose loss, gradients or weights were not finite."""
    self._fetch()
    bad = np.flatnonzero(self._host.get('finite', np.ones(0)) < 1)
    return self.logged + 1 + int(bad[0]) if bad.size else None

  def take(self, step: int) -> dict[str, float]:
    """Means over the steps up to `step`, which become the logged ones."""
    self._fetch()
    n = step - self.logged
    out = {k: float(np.mean(v[:n])) for k, v in self._host.items() if k != 'finite'}
    self._host = {k: v[n:] for k, v in self._host.items()}
    self.logged = step
    return out

  def pending(self) -> dict[str, list[float]]:
    self._fetch()
    return {k: v.tolist() for k, v in self._host.items()}


@dataclasses.dataclass
class _Phase:
  """What one phase trains with: built once by `_Run._setup_phase`."""
  index: int
  config: Any
  param_labels: dict
  tx: Any
  train_fn: Callable          # one step: (rstate, batch, image cache) → (rstate, metrics)
  chunk_fn: Callable          # K scanned steps: (rstate, stacked batches) → (rstate, metrics)
  eval_fn: Callable           # on the phase's inputs (images, or cached features for val)
  backbone_fns: dict          # 'features' (for the cache) and 'bn_stats' (precise BN)
  record: dict
  start_time: float
  first_step: int             # global step at which the phase started
  data_epoch0: int            # epochs of the data order before this phase
  features: dict | None = None
  chunk_len: int = 0          # cached phases: steps per device call, set from the first batch


class _Run:
  """One training job on one workdir: built from the config, then `run()` once.

  Holds what every phase shares (data splits, model, initial variables,
  checkpointer, reporter); the mutable progress lives in a `Position`.
  """

  def __init__(self, config, workdir: str, preemption: Preemption | None = None):
    from tljax.data import augment, batching
    self.config, self.workdir, self.batching, self.augment = config, workdir, batching, augment
    self.preemption = preemption or Preemption()
    n_dev = jax.local_device_count() * jax.process_count()
    self.eval_bs = config.eval_batch_size or config.batch_size
    for field, size in (('batch_size', config.batch_size), ('eval_batch_size', self.eval_bs)):
      if size % n_dev:
        raise ValueError(f'{field}={size} is not divisible by the {n_dev} devices of all '
                         f'processes; use a multiple of {n_dev}.')
    self.primary = jax.process_index() == 0
    self.reporter = report.Reporter(workdir, tensorboard=config.log.tensorboard,
                                    progress=config.log.progress, write=self.primary)
    _warn_if_config_changed(config, workdir)
    self.reporter.write_config(config)
    pretrained, weights_meta = components.pretrained_weights(config)
    self.pp = pp = components.preprocessing(config, weights_meta)
    self.splits = components.load_data(config, pp)
    self.preemption.check()
    self.train_split = self.splits['train']
    self.class_names = list(self.train_split.class_names)
    self.num_outputs = components.num_outputs(config, len(self.class_names))
    self.model = components.create_model(config, self.num_outputs)
    self.class_weights = class_weights(config.loss.class_weights, self.train_split)
    init_key = jax.random.fold_in(steps.wrap_key(steps.make_key(config.seed)), 0x1417)
    self.variables, self.not_loaded = components.init_variables(config, self.model, init_key,
                                                                pp.input_size, pretrained)
    self.preemption.check()
    size = pp.input_size
    self.blocks = optim.backbone_blocks(self.model, self.variables['params'], (1, size, size, 3))
    self.spe = batching.steps_per_epoch(len(self.train_split), config.batch_size)
    if self.spe < 1:
      raise ValueError(f'{len(self.train_split)} training examples make no batch of '
                       f'{config.batch_size}; lower batch_size.')
    dtype = components.compute_dtype(config)
    self.eval_tf = lambda x: augment.eval_transform(x, size, pp, dtype=dtype)
    self.aug_tf = lambda key, x: augment.train_transform(key, x, config.augment, size, pp,
                                                         dtype=dtype)
    self.image_eval_fn = steps.build_steps(
        eval_apply=steps.on_images(self.model, lambda key, x: self.eval_tf(x)),
        loss_kind=config.loss.kind)['eval']
    self.ckpt = (Checkpointer(workdir, keep=config.checkpoint.keep, best=config.checkpoint.best)
                 if config.checkpoint.enabled else None)
    self.last_saved = None
    self._phase_best = None     # (step, host variables) of the phase's best evaluation
    self.notes = []
    if self.not_loaded:
      self.notes.append(f'pretrained: {len(self.not_loaded)} leaves not loaded (fresh init): '
                        + ', '.join(self.not_loaded))
    skipped = sum(len(getattr(s, 'skipped', [])) for s in self.splits.values())
    if skipped:
      self.notes.append(f'data: {skipped} unreadable files skipped (see the log for each)')

  # ---- the job ----

  def run(self) -> dict[str, Any]:
    state, pos, restored = self._initial_state()
    self.reporter.truncate(pos.log_lines)
    self.preemption.start_loop()
    try:
      for index, phase in enumerate(self.config.phases):
        if index < pos.phase or phase.epochs == 0:
          continue
        resuming = restored and index == pos.phase
        if resuming and pos.epoch >= phase.epochs:
          continue
        state = self._run_phase(index, phase, state, pos, resuming)
    finally:
      if self.ckpt:
        self.ckpt.wait()
    summary = self._finish(state, pos)
    if self.ckpt:
      self.ckpt.close()
    self.reporter.close()
    return summary

  def _initial_state(self) -> tuple[TrainState, Position, bool]:
    state = TrainState(params=self.variables['params'], batch_stats=self.variables['batch_stats'],
                       opt_state=None, step=np.zeros((), np.int32),
                       rng=steps.make_key(self.config.seed))
    restored = self.ckpt.restore_latest(self._target) if self.ckpt else None
    if not restored:
      return state, Position(), False
    saved, meta = restored
    pos = Position.from_json(meta)
    self.last_saved = pos.step
    state = TrainState(params=saved['model']['params'], batch_stats=saved['model']['batch_stats'],
                       opt_state=saved['opt_state'], step=saved['step'], rng=saved['rng'])
    print(f'resuming from step {pos.step} (phase {self.config.phases[pos.phase].name}, '
          f'epoch {pos.epoch}, step {pos.step_in_epoch} of the epoch)', flush=True)
    return state, pos, True

  def _target(self, meta) -> dict:
    """Example trees for restoring a checkpoint written during phase `meta['phase']`."""
    phase = self.config.phases[meta['phase']]
    param_labels = optim.param_labels(self.variables['params'], phase.trainable, self.blocks)
    tx = optim.make_optimizer(phase, param_labels, self.spe, blocks=self.blocks)
    return {'model': {'params': self.variables['params'],
                      'batch_stats': self.variables['batch_stats']},
            'train': {'opt_state': jax.tree.map(np.asarray, tx.init(self.variables['params'])),
                      'step': np.zeros((), np.int32), 'rng': steps.make_key(0)}}

  # ---- one phase ----

  def _run_phase(self, index: int, phase, state: TrainState, pos: Position, resuming: bool):
    ph = self._setup_phase(index, phase, state, pos, resuming)
    if not resuming:
      state = state.replace(opt_state=ph.tx.init(state.params))
    rstate = steps.replicate(state)
    if ph.features is not None:
      ph.features = self._cache_features(ph.backbone_fns['features'], rstate, phase)
    for epoch in range(pos.epoch, phase.epochs):
      rstate = self._train_epoch(ph, rstate, pos, epoch)
      rstate = self._end_epoch(ph, rstate, pos, epoch)
      if pos.epoch >= phase.epochs:   # early stopping ends the phase by moving pos.epoch there
        break
    return steps.unreplicate(rstate)

  def _setup_phase(self, index: int, phase, state: TrainState, pos: Position,
                   resuming: bool, lr=None) -> _Phase:
    """`lr`: a schedule over updates replacing the phase's own (the LR finder's sweep)."""
    config = self.config
    param_labels = optim.param_labels(state.params, phase.trainable, self.blocks)
    tx = optim.make_optimizer(phase, param_labels, self.spe, lr=lr, blocks=self.blocks)
    counts = optim.count(state.params, param_labels)
    if not resuming:
      pos.phase, pos.epoch, pos.step_in_epoch, pos.window = index, 0, 0, {}
      self.reporter.log({'kind': 'phase_start', 'step': pos.step, 'phase': phase.name,
                         'trainable_params': counts['trainable'], 'frozen_params': counts['frozen']})
    record = pos.phases.setdefault(phase.name, {'seconds': 0.0})
    cached = self._can_cache(phase, param_labels)
    # Before any checkpoint of the phase: a finished run re-run from its last one needs it.
    record.update(trainable=phase.trainable, epochs=phase.epochs, cached=cached,
                  trainable_params=counts['trainable'], frozen_params=counts['frozen'])
    if cached:
      train_apply = eval_apply = steps.on_features(self.model)
    else:
      train_apply = steps.on_images(
          self.model, self._train_transform(phase), bn_train=optim.bn_train(phase),
          stochastic_backbone=optim.stochastic_backbone(phase, param_labels),
          mix=self._mix if phase.augment and self.augment.mixing_enabled(config.augment) else None)
      eval_apply = None
    fns = steps.build_steps(train_apply=train_apply, eval_apply=eval_apply, tx=tx,
                            param_labels=param_labels, loss_kind=config.loss.kind,
                            label_smoothing=config.loss.label_smoothing,
                            class_weights=self.class_weights)
    backbone_fns = steps.build_backbone_steps(self.model, self._train_transform(phase),
                                              pool=config.model.head.pool in ('avg', 'max'))
    done_epochs = sum(p.epochs for p in config.phases[:index])
    return _Phase(index=index, config=phase, param_labels=param_labels, tx=tx,
                  train_fn=fns['train'], chunk_fn=fns['train_chunk'],
                  eval_fn=fns.get('eval', self.image_eval_fn), backbone_fns=backbone_fns,
                  record=record, start_time=time.time() - record['seconds'],
                  first_step=done_epochs * self.spe, data_epoch0=done_epochs,
                  features={} if cached else None)

  def _mix(self, key, inputs, labels):
    """Mixup / CutMix of a transformed training batch; soft targets for the loss."""
    return self.augment.mix_batch(key, inputs, labels, self.num_outputs, self.config.augment)

  def _train_transform(self, phase):
    return self.aug_tf if phase.augment else (lambda key, x: self.eval_tf(x))

  def _can_cache(self, phase, param_labels) -> bool:
    reason = feature_cache.eligible(phase, self.variables['params'], param_labels, self.splits,
                                    augment_cfg=self.config.augment)
    if reason is None:
      pool = self.config.model.head.pool in ('avg', 'max')
      views = max(1, phase.cache_views) if phase.augment else 1
      per = feature_cache.feature_nbytes(self.model, self.variables, self.pp.input_size, pool)
      need = per * (views * len(self.train_split) + len(self.splits['val'])) / 2**20
      if need > self.config.data.cache_budget_mb:
        reason = f'{need:.0f} MB of features exceed data.cache_budget_mb'
    if reason and phase.cache_features and reason != feature_cache.BACKBONE_TRAINS:
      self.notes.append(f'phase {phase.name}: features not cached: {reason}')
      logging.info('phase %s: features not cached: %s', phase.name, reason)
    return reason is None

  # ---- one epoch ----

  def _epoch_batches(self, ph: _Phase, data_epoch: int, start: int):
    """The epoch's inputs from `start` on, and the on-device image cache they index (or None).

    Three input paths: cached backbone features, indices into a train split
    held on every device, or the images themselves.
    """
    config = self.config
    on_device = ph.features is None and self._device_cache() is not None
    batches = self.batching.train_batches(self.train_split, config.batch_size, seed=config.seed,
                                          epoch=data_epoch, start_step=start,
                                          with_images=not on_device, sampler=config.data.sampler)
    if ph.features is not None:
      views = ph.features['train']
      batches = feature_cache.with_features(batches, views[data_epoch % len(views)])
    elif on_device:
      batches = ({'index': b['index'], 'label': b['label']} for b in batches)
    else:
      batches = ({'image': b['image'], 'label': b['label']} for b in batches)
    return self.batching.prefetch(batches, buffer_size=2), \
        (self._device_cache() if on_device else None)

  def _chunks(self, ph: _Phase, batches, pos: Position):
    """Groups an epoch's batches into device calls: one step each, or scanned chunks when cached.

    Chunk ends depend only on the position (checkpoint steps, a size cap from the
    epoch start), so a resumed run groups, hence computes, exactly as the original.
    """
    every = self.config.checkpoint.every_steps
    step, in_epoch, chunk = pos.step, pos.step_in_epoch, []
    for batch in batches:
      if ph.features is not None and ph.chunk_len == 0:
        per_step = sum(np.asarray(v).nbytes for v in batch.values())
        ph.chunk_len = int(max(1, min(MAX_CHUNK_STEPS, self.spe,
                                      MAX_CHUNK_BYTES // max(per_step, 1))))
      chunk.append(batch)
      step, in_epoch = step + 1, in_epoch + 1
      if (ph.features is None or (every and step % every == 0) or in_epoch % ph.chunk_len == 0):
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  def _train_epoch(self, ph: _Phase, rstate, pos: Position, epoch: int):
    config, phase = self.config, ph.config
    start = pos.step_in_epoch
    data_epoch = ph.data_epoch0 + epoch
    epoch_start = pos.step - start
    window = _MetricWindow(pos.step - len(pos.window.get('loss', [])), pos.window)
    pos.window = {}
    # Long phases (a cached head trains 100 epochs in seconds) show about ten bars.
    show = (epoch + 1) % max(1, phase.epochs // 10) == 0 or epoch == 0 or epoch + 1 == phase.epochs
    label = f'[{phase.name}] epoch {epoch + 1}/{phase.epochs}'
    every = config.checkpoint.every_steps
    self.reporter.start_epoch()
    batches, image_cache = self._epoch_batches(ph, data_epoch, start)
    try:
      for chunk in self._chunks(ph, batches, pos):
        if ph.features is None:
          rstate, metrics = ph.train_fn(rstate, chunk[0], image_cache)
        else:
          rstate, metrics = ph.chunk_fn(rstate, _stack(chunk, ph.chunk_len))
        window.add(metrics, len(chunk))
        first = pos.step + 1
        pos.step += len(chunk)
        pos.step_in_epoch += len(chunk)
        for s in range(first, pos.step + 1):
          if s % config.log.every_steps == 0 or s - epoch_start == self.spe:
            shown = self._log_train(ph, window, s, epoch_start, data_epoch)
            if show:
              self.reporter.progress(label, s - epoch_start - start, self.spe - start, shown,
                                     (s - epoch_start - start) * config.batch_size)
          self.preemption.reached(s)
        if (every and pos.step % every == 0) or self.preemption.requested:
          ph.record['seconds'] = time.time() - ph.start_time
          self._save(ph, rstate, pos, window)
          if self.preemption.requested:
            raise Preempted(f'SIGTERM: saved the checkpoint of step {pos.step} in '
                            f'{self.workdir}; re-run the same command to resume.')
    finally:
      batches.close()
    return rstate

  def _log_train(self, ph: _Phase, window: _MetricWindow, step: int, epoch_start: int,
                 data_epoch: int) -> dict[str, float]:
    bad = window.first_nonfinite()
    shown = window.take(step)
    self.reporter.log({'kind': 'train', 'step': step, 'phase': ph.config.name,
                       'epoch': data_epoch + (step - epoch_start) / self.spe,
                       'lr': optim.lr_at(ph.config, self.spe, step - ph.first_step),
                       **shown})
    if bad is not None and bad <= step:
      self._diverged(ph, bad)
    return shown

  def _diverged(self, ph: _Phase, step: int):
    phase, i = ph.config, ph.index
    resume = (f'the last checkpoint (step {self.last_saved}) is the resume point'
              if self.last_saved is not None else 'no checkpoint was written')
    raise Diverged(f"training diverged in phase '{phase.name}' at step {step}: non-finite loss, "
                   f'gradients or weights; nothing after it was saved ({resume}). Lower '
                   f'phases[{i}].lr (now {phase.lr:g}), set phases[{i}].grad_clip, or check the '
                   'inputs, then re-run in a fresh --workdir.')

  def _end_epoch(self, ph: _Phase, rstate, pos: Position, epoch: int):
    """Precise BN, evaluation, the best model, the end-of-epoch checkpoint."""
    config, phase = self.config, ph.config
    data_epoch = ph.data_epoch0 + epoch
    pos.epoch, pos.step_in_epoch = epoch + 1, 0
    if optim.bn_train(phase) and phase.precise_bn:
      rstate = self._precise_bn(ph.backbone_fns['bn_stats'], rstate, phase.precise_bn,
                                data_epoch)
    last = epoch + 1 == phase.epochs
    if last or (epoch + 1) % config.eval.every_epochs == 0:
      evaluated = _ema_view(phase, rstate)
      val = self._evaluate(ph.eval_fn, evaluated, 'val', ph.features)
      self.reporter.log({'kind': 'val', 'step': pos.step, 'phase': phase.name,
                         'epoch': data_epoch + 1, **evaluate.scalars(val)})
      if val['accuracy'] > pos.best_val and self.ckpt:
        pos.best_val = val['accuracy']
        self.ckpt.save_best(pos.step, _model_vars(evaluated),
                            {**pos.to_json(), 'val': val['accuracy']})
      if self._early_stop(ph, evaluated, pos, val):
        last = True
      if last:
        if phase.ema_decay:   # the phase hands on (and exports) the weights it evaluated
          rstate = evaluated
        stopping = ph.record.get('early_stop')
        if stopping and phase.restore_best and stopping['best_step'] != pos.step:
          rstate = self._restore_phase_best(ph, rstate, pos)
          val = self._evaluate(ph.eval_fn, rstate, 'val', ph.features)
        ph.record['val'] = val
        if 'test' in self.splits:
          ph.record['test'] = self._evaluate(self.image_eval_fn, rstate, 'test', None)
          self.reporter.log({'kind': 'test', 'step': pos.step, 'phase': phase.name,
                             **evaluate.scalars(ph.record['test'])})
    ph.record['seconds'] = time.time() - ph.start_time
    self._save(ph, rstate, pos)
    if self.preemption.requested:
      raise Preempted(f'SIGTERM: saved step {pos.step}; re-run the same command to resume.')
    return rstate

  def _early_stop(self, ph: _Phase, rstate, pos: Position, val: dict) -> bool:
    """Counts evaluations without improvement; True when the phase's patience ran out.

    The count, the best value and its step live in the phase record, which is
    saved with every checkpoint, so a killed run stops where it would have.
    The best weights go to `phase_best/` (and memory) for `restore_best`, which
    applies when the phase ends on weights other than its best, stopped early or not.
    """
    from tljax.config import EARLY_STOP_METRICS
    phase = ph.config
    if not phase.early_stop_patience:
      return False
    state = ph.record.setdefault('early_stop', {'metric': phase.early_stop_metric, 'best': None,
                                                'best_step': None, 'since': 0, 'stopped': False})
    value, higher = val[phase.early_stop_metric], EARLY_STOP_METRICS[phase.early_stop_metric]
    if state['best'] is None or (value > state['best'] if higher else value < state['best']):
      state.update(best=value, best_step=pos.step, since=0)
      if phase.restore_best:
        self._phase_best = (pos.step, _model_vars(rstate))
        if self.ckpt:
          self.ckpt.save_best(pos.step, self._phase_best[1], pos.to_json(), phase=True)
      return False
    state['since'] += 1
    if state['since'] < phase.early_stop_patience:
      return False
    state['stopped'] = True
    pos.epoch = phase.epochs
    msg = (f'[{phase.name}] early stop at step {pos.step}: validation {phase.early_stop_metric} '
           f'did not improve on {state["best"]:.4f} (step {state["best_step"]}) in '
           f'{state["since"]} evaluations')
    self.reporter.log({'kind': 'early_stop', 'step': pos.step, 'phase': phase.name,
                       'metric': phase.early_stop_metric, 'best': state['best'],
                       'best_step': state['best_step']})
    logging.info(msg)
    print(msg, flush=True)
    return True

  def _restore_phase_best(self, ph: _Phase, rstate, pos: Position):
    """The phase's best evaluated weights, from memory or (after a restart) `phase_best/`."""
    step = ph.record['early_stop']['best_step']
    saved = self._phase_best
    if saved is not None and saved[0] == step:
      model = saved[1]
    else:
      self.ckpt.wait()
      model, meta = self.ckpt.restore_model('phase_best', _model_vars(rstate))
      if meta.get('step') != step:
        raise ValueError(f'{self.workdir}/phase_best holds step {meta.get("step")}, not the '
                         f'best step {step} of phase {ph.config.name!r}; re-run in a fresh '
                         '--workdir or set restore_best=False.')
    msg = f'[{ph.config.name}] restored the weights of step {step} (the phase\'s best)'
    self.reporter.log({'kind': 'restore_best', 'step': pos.step, 'phase': ph.config.name,
                       'restored_step': step})
    print(msg, flush=True)
    return rstate.replace(params=steps.replicate(model['params']),
                          batch_stats=steps.replicate(model['batch_stats']))

  def _precise_bn(self, fn, rstate, n_batches: int, data_epoch: int):
    """Replaces the running BN statistics by their average over `n_batches` train batches.

    Short runs from scratch with Keras-style momentum 0.99 leave running
    statistics near their initial values, so evaluation sees a different
    network than training did ("precise BN", Wu & Johnson 2021).
    """
    batches = self.batching.train_batches(self.train_split, self.config.batch_size,
                                          seed=self.config.seed + 7919, epoch=data_epoch)
    total, count = None, 0
    for i, batch in zip(range(n_batches), batches):
      probe = rstate.replace(step=rstate.step + (1 << 30) + i)
      stats = fn(probe, {'image': batch['image'], 'label': batch['label']})
      total = stats if total is None else jax.tree.map(lambda a, b: a + b, total, stats)
      count += 1
    return rstate.replace(batch_stats=jax.tree.map(lambda t: t / count, total))

  def _device_cache(self):
    """The train split's uint8 cache on every device, if it fits `device_cache_mb` (else None)."""
    from tljax.data import Split
    if not hasattr(self, '_cache'):
      split, budget = self.train_split, self.config.device_cache_mb
      fits = isinstance(split, Split) and split.images.nbytes / 2**20 <= budget
      self._cache = self.batching.device_cache(split) if fits else None
    return self._cache

  def _save(self, ph: _Phase, rstate, pos: Position, window: _MetricWindow | None = None) -> None:
    """The resumable checkpoint of `pos.step`, never of a state that saw a non-finite step."""
    if window is not None:
      bad = window.first_nonfinite()
      if bad is not None:
        self._diverged(ph, bad)
      pos.window = window.pending()
    if not self.ckpt:
      return
    pos.log_lines = self.reporter.lines
    host = steps.unreplicate(rstate)
    self.ckpt.save(pos.step, {'model': {'params': host.params, 'batch_stats': host.batch_stats},
                              'opt_state': host.opt_state, 'step': host.step, 'rng': host.rng},
                   pos.to_json())
    self.last_saved = pos.step

  # ---- features and evaluation ----

  def _cache_features(self, fn, rstate, phase) -> dict[str, list[np.ndarray]]:
    """Backbone outputs of train (K views) and val, computed once for a head-only phase."""
    t0 = time.time()
    n_views = max(1, phase.cache_views) if phase.augment else 1
    base = feature_cache.views_key(self.config.seed)
    extract = lambda f, split, key: feature_cache.extract(f, rstate, split, key, self.batching,
                                                          self.eval_bs)
    train = [extract(fn, self.train_split, jax.random.fold_in(base, v)) for v in range(n_views)]
    if phase.augment:
      fn = steps.build_backbone_steps(self.model, lambda key, x: self.eval_tf(x),
                                      pool=self.config.model.head.pool in ('avg', 'max'))['features']
    val = extract(fn, self.splits['val'], base)
    megabytes = (sum(t.nbytes for t in train) + val.nbytes) / 2**20
    self.notes.append(f'phase {phase.name}: backbone features cached once ({n_views} view(s), '
                      f'{megabytes:.1f} MB) in {time.time() - t0:.1f}s')
    return {'train': train, 'val': [val]}

  def _evaluate(self, eval_fn, rstate, split_name: str, features) -> dict[str, Any]:
    split = self.splits[split_name]
    if features and split_name in features:
      batches = feature_cache.eval_batches(features[split_name][0], split.labels, self.eval_bs)
    else:
      batches = self.batching.eval_batches(split, self.eval_bs)
    return evaluate.metrics(evaluate.collect(eval_fn, rstate, batches), self.class_names)

  # ---- outputs ----

  def _finish(self, state: TrainState, pos: Position) -> dict[str, Any]:
    config = self.config
    phases = []
    for p in config.phases:
      if p.name in pos.phases:   # config values for checkpoints written before they were kept
        phases.append({'name': p.name, 'trainable': p.trainable, 'epochs': p.epochs,
                       **pos.phases[p.name]})
    last = phases[-1] if phases else {}
    final = {s: last[s] for s in ('val', 'test') if s in last}
    summary = {'title': f'{config.model.name} on {config.data.source} {config.data.name}'.strip(),
               'workdir': self.workdir, 'step': pos.step, 'devices': jax.device_count(),
               'processes': jax.process_count(), 'phases': phases, 'final': final,
               'notes': self.notes}
    temperature = self._final_evaluation(state, summary)
    if not self.primary:   # every process has the same summary; process 0 writes the files
      return summary
    text = report.write_summary(self.workdir, summary)
    print('\n' + text, flush=True)
    if config.log.plots:
      report.plot_curves(self.workdir)
      for split, m in final.items():
        report.plot_confusion(self.workdir, split, np.asarray(m['confusion']), self.class_names)
    self._export(state, temperature)
    return summary

  def _final_evaluation(self, state: TrainState, summary: dict) -> float | None:
    """Test-time augmentation and temperature scaling of the final model; returns the temperature.

    With `eval.tta` the final val/test results are those of the averaged views
    (the single-view accuracy stays in `summary['tta']`, so a run reports its
    own gain on the same weights). The temperature is fitted on the validation
    logits and judged on the test split, which it never saw.
    """
    config = self.config
    mode, fit = config.eval.tta, config.eval.temperature_scaling
    splits = [s for s in ('val', 'test') if s in self.splits and len(self.splits[s])]
    if not summary['final'] or (mode == 'none' and not fit) or 'val' not in splits:
      return None
    rstate = steps.replicate(state)
    eval_fn = self.image_eval_fn
    if mode != 'none':
      from tljax import tta
      eval_fn = steps.build_steps(
          eval_apply=tta.on_images(self.model, mode, self.pp.input_size, self.pp, config.loss.kind,
                                   components.compute_dtype(config)),
          loss_kind=config.loss.kind)['eval']
    outputs = {s: evaluate.collect(eval_fn, rstate, self.batching.eval_batches(self.splits[s],
                                                                              self.eval_bs))
               for s in splits}
    if mode != 'none':
      single = summary['final']
      summary['final'] = {s: evaluate.metrics(outputs[s], self.class_names) for s in splits}
      summary['tta'] = {'mode': mode, **{
          s: {'accuracy_single_view': single[s]['accuracy'],
              'accuracy': summary['final'][s]['accuracy']} for s in splits if s in single}}
      self.reporter.log({'kind': 'tta', 'step': summary['step'], 'mode': mode,
                         **{f'{s}_accuracy': summary['final'][s]['accuracy'] for s in splits}})
    if not fit:
      return None
    summary['calibration'] = calibration_summary(outputs, config.loss.kind)
    self.reporter.log({'kind': 'calibration', 'step': summary['step'],
                       'temperature': summary['calibration']['temperature'],
                       **{f'{s}_ece_{w}': summary['calibration'][s][f'ece_{w}']
                          for s in splits for w in ('before', 'after')}})
    return summary['calibration']['temperature']

  def _export(self, state: TrainState, temperature: float | None = None) -> None:
    """A ported-weights directory of the final model, readable by `python -m tljax.predict`."""
    from tljax.porting import weights_io
    head = self.config.model.head.to_dict()
    head['hidden'] = [int(h) for h in head['hidden']]
    weights_io.save_weights(
        os.path.join(self.workdir, 'export'),
        {'params': state.params, 'batch_stats': state.batch_stats},
        {'arch': self.config.model.name, 'source': f'tljax.train {self.workdir}',
         'num_classes': components.num_outputs(self.config, len(self.class_names)),
         'preprocessing': self.pp.to_json(), 'labels': self.class_names, 'head': head,
         'arch_kw': self.config.model.arch_kw.to_dict(),
         **({'temperature': temperature} if temperature is not None else {})})


def _stack(chunk: list[dict], length: int) -> dict:
  """[D, K, ...] batches for `steps.train_chunk`, padded to `length` with invalid steps."""
  pad = [chunk[-1]] * (length - len(chunk))
  out = {k: np.stack([b[k] for b in chunk + pad], axis=1) for k in chunk[0]}
  n_dev = out['label'].shape[0]
  out['valid'] = np.broadcast_to(np.arange(length) < len(chunk), (n_dev, length))
  return out


def _warn_if_config_changed(config, workdir: str) -> None:
  """Resuming a workdir with a different config is allowed, but never silently."""
  path = os.path.join(workdir, 'config.json')
  if not (os.path.exists(path) and os.path.isdir(os.path.join(workdir, 'checkpoints'))):
    return
  with open(path) as f:
    before = json.load(f)
  now = json.loads(config.to_json_best_effort())
  changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
  if changed:
    msg = (f'{workdir} holds checkpoints of a run whose config differs in {changed}; resuming '
           'it with the new config (use a fresh --workdir to start over).')
    logging.warning(msg)
    print('WARNING: ' + msg, flush=True)


def class_weights(setting: str, split) -> tuple[float, ...] | None:
  """`loss.class_weights` as one weight per class ('balanced': n / (k · count), sklearn's rule)."""
  from tljax.config import parse_class_weights
  setting = parse_class_weights(setting)
  if setting == 'none':
    return None
  names = list(split.class_names)
  if setting == 'balanced':
    if not hasattr(split, 'class_counts'):
      raise ValueError("loss.class_weights='balanced' needs class counts, which a streamed split "
                       'does not have; give explicit weights, one per class.')
    counts = np.asarray(split.class_counts(), np.float64)
    present = counts > 0
    w = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    return tuple(float(x) for x in w)
  if len(setting) != len(names):
    raise ValueError(f'loss.class_weights has {len(setting)} weights for {len(names)} classes '
                     f'({", ".join(names)}); give one per class, in that order.')
  return tuple(float(x) for x in setting)


def calibration_summary(outputs: dict, kind: str) -> dict:
  """Temperature fitted on `outputs['val']`; ECE and NLL before/after on every split given."""
  from tljax import calibration
  reports = {'val': calibration.calibration_report(outputs['val']['logits'],
                                                   outputs['val']['label'], kind)}
  t = reports['val']['temperature']
  for split, o in outputs.items():
    if split != 'val':
      reports[split] = calibration.calibration_report(o['logits'], o['label'], kind,
                                                      temperature=t)
  keys = ('ece_before', 'ece_after', 'nll_before', 'nll_after')
  return {'temperature': float(t), 'fitted_on': 'val', 'kept_1_because': reports['val']['reason'],
          **{split: {k: r[k] for k in keys} for split, r in reports.items()}}


def _ema_view(phase, rstate):
  """The state to evaluate: with `ema_decay`, its weights are the optimizer's moving average."""
  if not phase.ema_decay:
    return rstate
  return rstate.replace(params=optim.ema_params(rstate.opt_state))


def _model_vars(rstate) -> dict:
  host = steps.unreplicate(rstate)
  return {'params': host.params, 'batch_stats': host.batch_stats}
