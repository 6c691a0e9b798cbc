"""Phased transfer learning in one job: head-only, then unfreeze at a low learning rate.

`train_and_evaluate(config, workdir)` runs the config's phases in sequence on
every local device. Switching phase relabels the parameters and rebuilds the
optimizer (fresh state for the new labels) while params and batch statistics
carry over. The position (phase, epoch, step in epoch) is checkpointed with
the state, and every random draw is a function of (seed, step), so a run
killed at any point and restarted with the same command ends with the same
bits as one that never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from tljax import components, evaluate, feature_cache, optim, report, steps
from tljax.checkpoint import Checkpointer
from tljax.config import apply_variant, validate
from tljax.steps import TrainState


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was written. Re-run the same command to resume."""


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains every phase (or every variant) and returns the run summary."""
  validate(config)
  if config.variants:
    return run_variants(config, workdir)
  return _Run(config, workdir).run()


def run_variants(config, workdir: str) -> dict[str, Any]:
  """Runs each variant under `workdir/<name>`; prints and writes the comparison table."""
  summaries = {}
  for variant in config.variants:
    print(f'=== variant {variant.name} ===', flush=True)
    summaries[variant.name] = train_and_evaluate(apply_variant(config, variant),
                                                 os.path.join(workdir, variant.name))
  if jax.process_index() != 0:   # summaries are process 0's files
    return {'variants': summaries, 'table': ''}
  table = report.comparison_markdown(workdir, [v.name for v in config.variants])
  print('\n' + table, flush=True)
  return {'variants': summaries, 'table': table}


def _stack(chunk: list[dict], length: int) -> dict:
  """[D, K, ...] batches for `steps.train_chunk`, padded to `length` with invalid steps."""
  pad = [chunk[-1]] * (length - len(chunk))
  out = {k: np.stack([b[k] for b in chunk + pad], axis=1) for k in chunk[0]}
  n_dev = out['label'].shape[0]
  out['valid'] = np.broadcast_to(np.arange(length) < len(chunk), (n_dev, length))
  return out


MAX_CHUNK_STEPS = 256
MAX_CHUNK_BYTES = 64 << 20


class _MetricWindow:
  """Per-step training metrics since the last log line, fetched from devices only when logged."""

  def __init__(self, step: int):
    self.device, self.host, self.logged = [], {}, step

  def add(self, metrics, steps: int) -> None:
    self.device.append((metrics, steps))

  def take(self, n: int) -> dict[str, float]:
    for m, steps_in_call in jax.device_get(self.device):
      for k, v in m.items():
        self.host.setdefault(k, []).append(np.atleast_1d(np.asarray(v)[0])[:steps_in_call])
    self.device = []
    out = {}
    for k, parts in self.host.items():
      values = np.concatenate(parts)
      out[k] = float(np.mean(values[:n]))
      self.host[k] = [values[n:]]
    return out


class _Run:

  def __init__(self, config, workdir: str):
    from tljax.data import augment, batching
    self.config, self.workdir, self.batching = config, workdir, batching
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
    self.train_split = self.splits['train']
    self.class_names = list(self.train_split.class_names)
    self.model = components.create_model(
        config, components.num_outputs(config, len(self.class_names)))
    init_key = jax.random.fold_in(steps.wrap_key(steps.make_key(config.seed)), 0x1417)
    self.variables, self.not_loaded = components.init_variables(config, self.model, init_key,
                                                                pp.input_size, pretrained)
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
    self.ckpt = (Checkpointer(workdir, keep=config.checkpoint.keep, best=config.checkpoint.best)
                 if config.checkpoint.enabled else None)
    self._sigterm = False
    self.notes = []
    if self.not_loaded:
      self.notes.append(f'pretrained: {len(self.not_loaded)} leaves not loaded (fresh init): '
                        + ', '.join(self.not_loaded))
    skipped = sum(len(getattr(s, 'skipped', [])) for s in self.splits.values())
    if skipped:
      self.notes.append(f'data: {skipped} unreadable files skipped (see the log for each)')

  # ---- the job ----

  def run(self) -> dict[str, Any]:
    config = self.config
    state = TrainState(params=self.variables['params'], batch_stats=self.variables['batch_stats'],
                       opt_state=None, step=np.zeros((), np.int32),
                       rng=steps.make_key(config.seed))
    meta = {'phase': 0, 'epoch': 0, 'step_in_epoch': 0, 'step': 0, 'log_lines': 0,
            'phases': {}, 'best_val': -1.0}
    restored = self.ckpt.restore_latest(self._target) if self.ckpt else None
    if restored:
      saved, meta = restored
      state = TrainState(params=saved['model']['params'], batch_stats=saved['model']['batch_stats'],
                         opt_state=saved['opt_state'], step=saved['step'], rng=saved['rng'])
      print(f'resuming from step {meta["step"]} (phase {config.phases[meta["phase"]].name}, '
            f'epoch {meta["epoch"]}, step {meta["step_in_epoch"]} of the epoch)', flush=True)
    self.reporter.truncate(meta['log_lines'])
    try:
      previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:  # not the main thread: preemption is the caller's business
      previous = None
    try:
      for index, phase in enumerate(config.phases):
        if index < meta['phase'] or phase.epochs == 0:
          continue
        resuming = restored is not None and index == meta['phase']
        if resuming and meta['epoch'] >= phase.epochs:
          continue
        state = self._run_phase(index, phase, state, meta, resuming)
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
      if self.ckpt:
        self.ckpt.wait()
    summary = self._finish(state, meta)
    if self.ckpt:
      self.ckpt.close()
    self.reporter.close()
    return summary

  def _on_sigterm(self, signum, frame):
    self._sigterm = True

  def _target(self, meta) -> dict:
    """Example trees for restoring a checkpoint written during phase `meta['phase']`."""
    phase = self.config.phases[meta['phase']]
    labels = optim.param_labels(self.variables['params'], phase.trainable, self.blocks)
    tx = optim.make_optimizer(phase, labels, self.spe)
    return {'model': {'params': self.variables['params'],
                      'batch_stats': self.variables['batch_stats']},
            'train': {'opt_state': jax.tree.map(np.asarray, tx.init(self.variables['params'])),
                      'step': np.zeros((), np.int32), 'rng': steps.make_key(0)}}

  def _train_transform(self, phase):
    return self.aug_tf if phase.augment else (lambda key, x: self.eval_tf(x))

  def _can_cache(self, phase, labels) -> bool:
    reason = feature_cache.eligible(phase, self.variables['params'], labels, self.splits)
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

  def _run_phase(self, index: int, phase, state: TrainState, meta: dict, resuming: bool):
    config, batching = self.config, self.batching
    labels = optim.param_labels(state.params, phase.trainable, self.blocks)
    tx = optim.make_optimizer(phase, labels, self.spe)
    counts = optim.count(state.params, labels)
    if not resuming:
      state = state.replace(opt_state=tx.init(state.params))
      meta.update(phase=index, epoch=0, step_in_epoch=0)
      self.reporter.log({'kind': 'phase_start', 'step': meta['step'], 'phase': phase.name,
                         'trainable_params': counts['trainable'], 'frozen_params': counts['frozen']})
    record = meta['phases'].setdefault(phase.name, {'seconds': 0.0})
    start_time = time.time() - record['seconds']
    cached = self._can_cache(phase, labels)
    # Before any checkpoint of the phase: a finished run re-run from its last one needs it.
    record.update(trainable=phase.trainable, epochs=phase.epochs, cached=cached,
                  trainable_params=counts['trainable'], frozen_params=counts['frozen'])
    fns = steps.build_steps(self.model, tx=tx, labels=labels,
                            train_transform=self._train_transform(phase),
                            eval_transform=self.eval_tf, loss_kind=config.loss.kind,
                            label_smoothing=config.loss.label_smoothing,
                            bn_train=phase.bn == 'train',
                            pool=config.model.head.pool in ('avg', 'max'))
    rstate = steps.replicate(state)
    features = None
    if cached:
      features = self._cache_features(fns['features'], rstate, phase)
      cached_fns = steps.build_steps(self.model, tx=tx, labels=labels, train_transform=None,
                                     eval_transform=lambda x: x, loss_kind=config.loss.kind,
                                     label_smoothing=config.loss.label_smoothing, cached=True)
      train_fn, chunk_fn, eval_fn = cached_fns['train'], cached_fns['train_chunk'], cached_fns['eval']
    else:
      train_fn, chunk_fn, eval_fn = fns['train'], fns['train_chunk'], fns['eval']
    epoch_offset = sum(p.epochs for p in config.phases[:index])
    every = config.checkpoint.every_steps
    for epoch in range(meta['epoch'], phase.epochs):
      start = meta['step_in_epoch']
      data_epoch = epoch_offset + epoch
      on_device = features is None and self._device_cache() is not None
      batches = batching.train_batches(self.train_split, config.batch_size, seed=config.seed,
                                       epoch=data_epoch, start_step=start,
                                       with_images=not on_device)
      if features is not None:
        views = features['train']
        batches = feature_cache.with_features(batches, views[data_epoch % len(views)])
      elif on_device:
        batches = ({'index': b['index'], 'label': b['label']} for b in batches)
      else:
        batches = ({'image': b['image'], 'label': b['label']} for b in batches)
      cache = self._device_cache() if on_device else None
      batches = batching.prefetch(batches, buffer_size=2)
      label = f'[{phase.name}] epoch {epoch + 1}/{phase.epochs}'
      self.reporter.start_epoch()
      window = _MetricWindow(meta['step'])
      # Long phases (a cached head trains 100 epochs in seconds) show about ten bars.
      show_epoch = (epoch + 1) % max(1, phase.epochs // 10) == 0 or epoch == 0 \
          or epoch + 1 == phase.epochs
      try:
        for chunk in self._chunks(batches, meta, cached):
          if len(chunk) == 1 and not cached:
            rstate, m = train_fn(rstate, chunk[0], cache)
          else:
            rstate, m = chunk_fn(rstate, _stack(chunk, self._chunk_len))
          window.add(m, len(chunk))
          first = meta['step'] + 1
          meta['step'] += len(chunk)
          meta['step_in_epoch'] += len(chunk)
          epoch_start = meta['step'] - meta['step_in_epoch']
          for s in range(first, meta['step'] + 1):
            if s % config.log.every_steps == 0 or s - epoch_start == self.spe:
              shown = window.take(s - window.logged)
              window.logged = s
              self.reporter.log({'kind': 'train', 'step': s, 'phase': phase.name,
                                 'epoch': data_epoch + (s - epoch_start) / self.spe,
                                 'lr': float(optim.schedule(phase, self.spe)(
                                     s - self._phase_start_step(index))), **shown})
              if show_epoch:
                self.reporter.progress(label, s - epoch_start - start, self.spe - start, shown,
                                       (s - epoch_start - start) * config.batch_size)
          if (every and meta['step'] % every == 0) or self._sigterm:
            record['seconds'] = time.time() - start_time
            self._save(rstate, meta)
            if self._sigterm:
              raise Preempted(f'SIGTERM: saved the checkpoint of step {meta["step"]} in '
                              f'{self.workdir}; re-run the same command to resume.')
      finally:
        batches.close()
      meta['epoch'], meta['step_in_epoch'] = epoch + 1, 0
      if phase.bn == 'train' and phase.precise_bn:
        rstate = self._precise_bn(fns['bn_stats'], rstate, phase.precise_bn, data_epoch)
      last = epoch + 1 == phase.epochs
      if last or (epoch + 1) % config.eval.every_epochs == 0:
        val = self._evaluate(eval_fn, rstate, 'val', features)
        self.reporter.log({'kind': 'val', 'step': meta['step'], 'phase': phase.name,
                           'epoch': data_epoch + 1, **evaluate.scalars(val)})
        if val['accuracy'] > meta['best_val'] and self.ckpt:
          meta['best_val'] = val['accuracy']
          self.ckpt.save_best(meta['step'], _model_vars(rstate), {**meta, 'val': val['accuracy']})
        if last:
          record['val'] = val
          if 'test' in self.splits:
            record['test'] = self._evaluate(fns['eval'], rstate, 'test', None)
            self.reporter.log({'kind': 'test', 'step': meta['step'], 'phase': phase.name,
                               **evaluate.scalars(record['test'])})
      record['seconds'] = time.time() - start_time
      self._save(rstate, meta)
      if self._sigterm:
        raise Preempted(f'SIGTERM: saved step {meta["step"]}; re-run the same command to resume.')
    return _unreplicate_state(rstate)

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

  def _chunks(self, batches, meta: dict, cached: bool):
    """Groups an epoch's batches into device calls: one step each, or scanned chunks when cached.

    Chunk ends depend only on the position (checkpoint steps, a size cap from the
    epoch start), so a resumed run groups, hence computes, exactly as the original.
    """
    every = self.config.checkpoint.every_steps
    step, in_epoch, chunk = meta['step'], meta['step_in_epoch'], []
    cap = 1
    for batch in batches:
      if cached and cap == 1:
        per_step = sum(np.asarray(v).nbytes for v in batch.values())
        cap = int(max(1, min(MAX_CHUNK_STEPS, self.spe, MAX_CHUNK_BYTES // max(per_step, 1))))
        self._chunk_len = cap
      chunk.append(batch)
      step, in_epoch = step + 1, in_epoch + 1
      if not cached or (every and step % every == 0) or in_epoch % cap == 0:
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  def _phase_start_step(self, index: int) -> int:
    done = sum(p.epochs for p in self.config.phases[:index])
    return done * self.spe

  def _save(self, rstate, meta: dict) -> None:
    if not self.ckpt:
      return
    meta['log_lines'] = self.reporter.lines
    host = _unreplicate_state(rstate)
    self.ckpt.save(meta['step'], {'model': {'params': host.params, 'batch_stats': host.batch_stats},
                                  'opt_state': host.opt_state, 'step': host.step, 'rng': host.rng},
                   _meta_json(meta))

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
      fn = steps.build_steps(self.model, train_transform=lambda key, x: self.eval_tf(x),
                             pool=self.config.model.head.pool in ('avg', 'max'))['features']
    val = extract(fn, self.splits['val'], base)
    megabytes = (sum(t.nbytes for t in train) + val.nbytes) / 2**20
    self.notes.append(f'phase {phase.name}: backbone features cached once ({n_views} view(s), '
                      f'{megabytes:.1f} MB) in {time.time() - t0:.1f}s')
    return {'train': train, 'val': [val]}

  def _evaluate(self, eval_fn, rstate, split_name: str, features) -> dict[str, Any]:
    split = self.splits[split_name]
    if features is not None and split_name in features:
      batches = feature_cache.eval_batches(features[split_name][0], split.labels, self.eval_bs)
    else:
      batches = self.batching.eval_batches(split, self.eval_bs)
    return evaluate.metrics(evaluate.collect(eval_fn, rstate, batches), self.class_names)

  # ---- outputs ----

  def _finish(self, state: TrainState, meta: dict) -> dict[str, Any]:
    config = self.config
    phases = []
    for p in config.phases:
      if p.name in meta['phases']:   # config values for checkpoints written before they were kept
        phases.append({'name': p.name, 'trainable': p.trainable, 'epochs': p.epochs,
                       **meta['phases'][p.name]})
    last = phases[-1] if phases else {}
    final = {s: last[s] for s in ('val', 'test') if s in last}
    summary = {'title': f'{config.model.name} on {config.data.source} {config.data.name}'.strip(),
               'workdir': self.workdir, 'step': meta['step'], 'devices': jax.device_count(),
               'processes': jax.process_count(), 'phases': phases, 'final': final,
               'notes': self.notes}
    if not self.primary:   # every process has the same summary; process 0 writes the files
      return summary
    text = report.write_summary(self.workdir, summary)
    print('\n' + text, flush=True)
    if config.log.plots:
      report.plot_curves(self.workdir)
      for split, m in final.items():
        report.plot_confusion(self.workdir, split, np.asarray(m['confusion']), self.class_names)
    self._export(state)
    return summary

  def _export(self, state: TrainState) -> None:
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
         'arch_kw': self.config.model.arch_kw.to_dict()})


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


def _model_vars(rstate) -> dict:
  host = _unreplicate_state(rstate)
  return {'params': host.params, 'batch_stats': host.batch_stats}


def _unreplicate_state(rstate) -> TrainState:
  return steps.unreplicate(rstate)


def _meta_json(meta: dict) -> dict:
  return report.jsonable(meta)
