"""Backbone features computed once for a head-only phase.

With the trunk frozen, its BatchNorm on running statistics and the inputs
deterministic (no augmentation, or K augmented views drawn in advance), the
trunk's output for an image never changes during the phase. Computing it once
turns every later epoch into a few matrix products on cached features (see
`experiments/bench_train_step.py` for the speed-up); the head sees exactly the
numbers it would have seen, so results match the recomputing path within
float tolerance (tested).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tljax import optim, steps

BACKBONE_TRAINS = 'backbone parameters train'


def eligible(phase, params: Mapping, labels: Mapping, splits: Mapping, *,
             augment_cfg=None) -> str | None:
  """None if the phase can train on cached features, else the reason it cannot.

  `augment_cfg` (the run's augment config), when given, also rules out an
  augmenting phase whose op policy or batch mixing is on: mixing acts on the
  images of each step's batch, and pre-drawn views would freeze a policy's
  per-step draws, so the features could not be the ones the phase trains on.
  """
  from tljax.data import Split
  if not phase.cache_features:
    return 'disabled (cache_features=False)'
  trainable, _ = optim.split(params, labels)
  if not all(k.startswith('head/') for k in trainable):
    return BACKBONE_TRAINS
  if phase.bn != 'frozen':
    return "BatchNorm trains (bn='train')"
  if phase.augment and not phase.cache_views:
    return 'online augmentation (set cache_views=K to cache K augmented views)'
  if phase.augment and augment_cfg is not None:
    from tljax.data.augment import mixing_enabled
    policy = augment_cfg.get('policy', 'none')
    if policy != 'none':
      return f"augment.policy={policy!r} draws new ops every step (set augment.policy='none')"
    if mixing_enabled(augment_cfg):
      return 'batch mixing (augment.mixup_alpha/cutmix_alpha > 0) mixes images every step'
  if not all(isinstance(s, Split) for s in splits.values()):
    return 'a split is streamed, not cached in memory'
  if jax.process_count() > 1:
    # `extract` fills only this process's rows of each batch; gathering them is not worth it.
    return f'multi-process run ({jax.process_count()} processes): features recomputed each step'
  return None


def feature_nbytes(model, variables: Mapping, input_size: int, pool: bool) -> int:
  """Bytes of one example's cached feature (nothing is computed)."""
  def features(module, x):
    f = module.features(x, train=False, bn_train=False)
    return module.head.pool_features(f) if pool else f
  out = jax.eval_shape(lambda v, x: model.apply(v, x, method=features), dict(variables),
                       jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32))
  return int(np.prod(out.shape)) * np.dtype(out.dtype).itemsize


def extract(fn: Callable, rstate, split, key, batching, eval_batch: int) -> np.ndarray:
  """`fn` (a pmapped `steps.feature_step`) over every example of `split`, in split order."""
  n_dev = jax.local_device_count()
  outs = []
  for j, batch in enumerate(batching.eval_batches(split, eval_batch)):
    k = np.asarray(jax.random.key_data(jax.random.fold_in(key, j)))
    outs.append((fn(rstate, {'image': batch['image']}, np.broadcast_to(k, (n_dev,) + k.shape)),
                 batch['mask'].reshape(-1), batch['index'].reshape(-1)))
  feats = None
  for out, mask, index in outs:
    out = np.asarray(out).reshape((-1,) + out.shape[2:])
    if feats is None:
      feats = np.zeros((len(split),) + out.shape[1:], out.dtype)
    feats[index[mask]] = out[mask]
  return feats


def views_key(seed: int):
  return jax.random.fold_in(steps.wrap_key(steps.make_key(seed)), 0xFEA7)


def with_features(batches: Iterator[dict], features: np.ndarray) -> Iterator[dict]:
  """Swaps each train batch's images for the cached features of the same examples."""
  for b in batches:
    yield {'feature': features[b['index']], 'label': b['label']}


def eval_batches(features: np.ndarray, labels: np.ndarray, eval_batch: int) -> Iterator[dict]:
  """Cached features in order, padded and masked like `batching.eval_batches`."""
  n_dev = jax.local_device_count()
  per = eval_batch // n_dev
  for start in range(0, len(labels), eval_batch):
    f, lab = features[start:start + eval_batch], labels[start:start + eval_batch]
    pad = eval_batch - len(lab)
    mask = np.arange(eval_batch) < len(lab)
    f = np.concatenate([f, np.zeros((pad,) + f.shape[1:], f.dtype)])
    lab = np.concatenate([lab, np.zeros(pad, lab.dtype)])
    yield {'feature': f.reshape((n_dev, per) + f.shape[1:]), 'label': lab.reshape(n_dev, per),
           'mask': mask.reshape(n_dev, per)}
