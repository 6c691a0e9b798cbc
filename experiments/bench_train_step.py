r"""What freezing buys per step, and what caching features buys per head-only epoch.

  python -m experiments.bench_train_step --model=resnet34 --size=224 --batch=32
  python -m experiments.bench_train_step --model=efficientnet_lite0 --size=128 --batch=16 --examples=128

Times, through the training code (`tljax.steps`, pmapped over all local devices):
  forward        the eval step (backbone + head, inference mode)
  head step      head trainable, backbone frozen with BN on running statistics
  top-1 step     head + the last backbone block trainable
  full step      every parameter trainable (BN frozen, then BN training)
  cached step    the head step on cached pooled features
and one head-only epoch over `--examples` images both ways: recomputing the
backbone every step, versus extracting features once and training the head on
them (extraction time counted; the cached epoch is one scanned device call,
as the training loop runs it). Each timing is the median of `--iters` calls
after a warm-up call (compilation excluded, reported separately). Runs without
ml_collections (the GPU image lacks it): phases are plain namespaces.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from tljax import models, optim, steps


def phase(**kw):
  base = dict(optimizer='adam', lr=1e-3, b1=0.9, b2=0.999, eps=1e-7, momentum=0.9, weight_decay=0.0,
              schedule='constant', warmup_epochs=0.0, end_lr_factor=0.0, grad_clip=0.0, epochs=1,
              rmsprop_decay=0.9)
  return types.SimpleNamespace(**{**base, **kw})


def normalize(key, images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def timed(call, iters: int) -> dict:
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  first = time.perf_counter() - t0
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    samples.append(time.perf_counter() - t0)
  return {'median_s': statistics.median(samples), 'min_s': min(samples), 'first_call_s': first}


class Bench:

  def __init__(self, name: str, size: int, batch: int, dtype, num_classes: int = 10):
    self.n_dev = jax.local_device_count()
    if batch % self.n_dev:
      raise ValueError(f'--batch={batch} must be divisible by {self.n_dev} devices')
    self.model = models.create(name, num_classes, dtype=dtype)
    shape = (1, size, size, 3)
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros(shape))
    rng = np.random.default_rng(0)
    fill = lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
    variables = jax.tree.map(fill, dict(shapes))
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: np.abs(x) + 0.5 if p[-1].key in ('var', 'scale') else x, variables)
    self.params, self.stats = variables['params'], variables.get('batch_stats', {})
    self.blocks = optim.backbone_blocks(self.model, self.params, shape)
    self.batch, self.size, self.num_classes = batch, size, num_classes
    per = batch // self.n_dev
    self.images = rng.integers(0, 255, (self.n_dev, per, size, size, 3), dtype=np.uint8)
    self.labels = rng.integers(0, num_classes, (self.n_dev, per)).astype(np.int32)

  def state(self, tx):
    opt = tx.init(self.params) if tx is not None else None
    return steps.replicate(steps.TrainState(self.params, self.stats, opt, np.zeros((), np.int32),
                                            steps.make_key(0)))

  def train_fn(self, rule: str, bn_train: bool = False, cached: bool = False):
    labels = optim.param_labels(self.params, rule, self.blocks)
    tx = optim.make_optimizer(phase(), labels, steps_per_epoch=100)
    if cached:
      train_apply = eval_apply = steps.on_features(self.model)
    else:
      train_apply = steps.on_images(self.model, normalize, bn_train=bn_train)
      eval_apply = steps.on_images(self.model, normalize)
    fns = steps.build_steps(train_apply=train_apply, eval_apply=eval_apply, tx=tx,
                            param_labels=labels)
    if not cached:
      fns.update(steps.build_backbone_steps(self.model, normalize, pool=True))
    return fns, self.state(tx)

  def step_timings(self, iters: int) -> dict:
    out = {}
    fns, state = self.train_fn('head')
    batch = {'image': self.images, 'label': self.labels}
    out['forward'] = timed(lambda: fns['eval'](state, batch)['pred'], iters)
    for label, rule, bn in (('head step', 'head', False), ('top-1 step', 'head+top:1', False),
                            ('full step, BN frozen', 'all', False),
                            ('full step, BN training', 'all', True)):
      fns, state = self.train_fn(rule, bn_train=bn)
      holder = {'s': state}

      def call(fn=fns['train'], holder=holder):
        holder['s'], m = fn(holder['s'], batch)
        return m
      out[label] = timed(call, iters)
    fns, state = self.train_fn('head')
    feats = self.features(fns['features'], state, self.images)
    cfns, cstate = self.train_fn('head', cached=True)
    holder = {'s': cstate}
    fbatch = {'feature': feats, 'label': self.labels}

    def cached_call():
      holder['s'], m = cfns['train'](holder['s'], fbatch)
      return m
    out['cached step'] = timed(cached_call, iters)
    return out

  def features(self, fn, state, images):
    key = np.zeros((self.n_dev,) + steps.make_key(0).shape, np.uint32)
    return fn(state, {'image': images}, key)

  def epoch_timings(self, examples: int) -> dict:
    """One head-only epoch over `examples` images: recomputing vs cached features."""
    n_steps = max(1, examples // self.batch)
    batch = {'image': self.images, 'label': self.labels}
    fns, state = self.train_fn('head')
    state, m = fns['train'](state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(n_steps):
      state, m = fns['train'](state, batch)
    jax.block_until_ready(m)
    recompute = time.perf_counter() - t0
    feat_state = self.state(None)
    jax.block_until_ready(self.features(fns['features'], feat_state, self.images))
    t0 = time.perf_counter()
    feats = [np.asarray(self.features(fns['features'], feat_state, self.images))
             for _ in range(n_steps)]
    extract = time.perf_counter() - t0
    cfns, cstate = self.train_fn('head', cached=True)
    chunk = {'feature': np.stack(feats, axis=1),
             'label': np.stack([self.labels] * n_steps, axis=1),
             'valid': np.ones((self.n_dev, n_steps), bool)}
    cstate, m = cfns['train_chunk'](cstate, chunk)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    cstate, m = cfns['train_chunk'](cstate, chunk)
    jax.block_until_ready(m)
    cached = time.perf_counter() - t0
    return {'steps': n_steps, 'recompute_epoch_s': recompute, 'extract_once_s': extract,
            'cached_epoch_s': cached}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='resnet34')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--examples', type=int, default=1024)
  parser.add_argument('--epochs', type=int, default=10, help='head-only epochs for the totals')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  bench = Bench(args.model, args.size, args.batch, dtype)
  device = f'{jax.local_device_count()} x {jax.devices()[0].device_kind}'
  print(f'{args.model} {args.size}px, global batch {args.batch}, {args.dtype}, {device}')
  result = {'model': args.model, 'size': args.size, 'batch': args.batch, 'dtype': args.dtype,
            'device': device, 'steps': bench.step_timings(args.iters)}
  fwd = result['steps']['forward']['median_s']
  print(f'{"":24s} {"ms/step":>9s} {"x forward":>10s} {"compile s":>10s}')
  for label, t in result['steps'].items():
    print(f'{label:24s} {1e3 * t["median_s"]:9.2f} {t["median_s"] / fwd:10.2f} '
          f'{t["first_call_s"]:10.1f}')
  ep = bench.epoch_timings(args.examples)
  result['epoch'] = ep
  e = args.epochs
  total_recompute = e * ep['recompute_epoch_s']
  total_cached = ep['extract_once_s'] + e * ep['cached_epoch_s']
  print(f'head-only epoch over {ep["steps"] * args.batch} images: recomputing the backbone '
        f'{ep["recompute_epoch_s"]:.3f}s; cached {ep["cached_epoch_s"]:.4f}s '
        f'(+{ep["extract_once_s"]:.3f}s once to extract)')
  print(f'{e} head-only epochs: {total_recompute:.2f}s recomputing vs {total_cached:.2f}s cached '
        f'-> {total_recompute / total_cached:.1f}x faster '
        f'(per epoch after extraction: {ep["recompute_epoch_s"] / ep["cached_epoch_s"]:.0f}x)')
  result['totals'] = {'epochs': e, 'recompute_s': total_recompute, 'cached_s': total_cached}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
