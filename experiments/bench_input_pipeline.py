"""Input pipeline throughput next to the training step it must feed (a benchmark, not a test).

  python -m experiments.bench_input_pipeline                  # resnet34 @224, this machine
  python -m experiments.bench_input_pipeline --model=resnet18 --batch=16 --steps=3

Prints images/s for, each measured alone:
  1. host batching: permuted uint8 gather from the decoded cache + pmap reshape;
  2. on-device augmentation: random resized crop + flip (+ optional Keras
     rotation/zoom/colour) from the 256px cache to 224, normalised;
  3. the pipeline end to end: host batching → prefetch thread → device → augment;
  3b. the same with the cache resident on the device (`device_cache`): the
     host sends only indices, the device gathers and augments;
  4. the model's training step at 224 (forward + backward + SGD, pmean'ed),
     on a device-resident augmented batch;
  5. the real loop: the pipeline feeding the step (augmentation inside it);
  5b. the same loop with the device-resident cache.
The pipeline (3/3b) must beat the step (4) by a wide margin, and (5/5b) must
be close to (4): then the host never starves the accelerator. On a CPU-only
machine all share the same cores, so (5) is below (4) by about the cost of
(3); that is contention, not starvation.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax.data import augment, default_augment_config, default_data_config, load_splits
from tljax.data.batching import device_cache, prefetch, train_batches
from tljax.data.preprocess import TORCHVISION


def _timed(fn, steps: int, warmup: int) -> float:
  """Seconds per call of `fn` (which must block on its result), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def _on_devices(tree, devices):
  """Places leaves sharded along their leading (pmap) axis, as pmap's outputs are."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  return jax.tree_util.tree_map(lambda v: jax.device_put(v, sharding), tree)


def _batches(split, batch: int, d: int, with_images: bool = True):
  """Endless epochs of pmap-shaped uint8 batches (or index-only ones)."""
  epoch = 0
  while True:
    yield from train_batches(split, batch, seed=0, epoch=epoch, num_devices=d,
                             with_images=with_images)
    epoch += 1


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='resnet34')
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--batch', type=int, default=0, help='global batch (default 32 CPU, 256 GPU)')
  parser.add_argument('--load_size', type=int, default=256)
  parser.add_argument('--input_size', type=int, default=224)
  parser.add_argument('--num_images', type=int, default=0, help='cache size (default 4 batches)')
  parser.add_argument('--steps', type=int, default=0, help='timed steps (default 3 CPU, 20 GPU)')
  parser.add_argument('--keras_augment', action='store_true',
                      help='add rotation 36°, zoom 0.2 and colour jitter 0.2 (seeds 001/002)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  args = parser.parse_args(argv)

  devices = jax.local_devices()
  d = len(devices)
  on_cpu = devices[0].platform == 'cpu'
  batch = args.batch or (32 if on_cpu else 256)
  batch = max(d, batch // d * d)
  steps = args.steps or (3 if on_cpu else 20)
  warmup = 2 if on_cpu else 3
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  print(f'devices: {d} x {devices[0].device_kind} ({devices[0].platform}); global batch {batch}; '
        f'cache {args.load_size}px → {args.input_size}px; {args.model}; {args.dtype}')

  cfg = default_data_config()
  cfg.update(dict(source='synthetic', num_classes=args.num_classes,
                  num_train=args.num_images or 4 * batch, num_val=args.num_classes))
  t0 = time.perf_counter()
  split = load_splits(cfg, load_size=args.load_size, seed=0)['train']
  print(f'synthetic cache: {len(split)} images in {time.perf_counter() - t0:.1f}s '
        f'({split.images.nbytes / 2**20:.0f} MB)')

  aug = default_augment_config()
  if args.keras_augment:
    aug.update(dict(rotation=36.0, zoom=0.2, brightness=0.2, contrast=0.2, saturation=0.2))
  out = args.input_size

  def augment_fn(rng, images):
    rng = jax.random.fold_in(rng, jax.lax.axis_index('batch'))
    return augment.train_transform(rng, images, aug, out, TORCHVISION, dtype=dtype)

  p_augment = jax.pmap(augment_fn, axis_name='batch', in_axes=(None, 0))
  rng = jax.random.key(0)
  results = {}

  host = _batches(split, batch, d)
  results['1. host batching (uint8)'] = batch / _timed(lambda: next(host), 3 * steps, 2)

  resident = _on_devices(next(_batches(split, batch, d))['image'], devices)
  results['2. on-device augment'] = batch / _timed(
      lambda: p_augment(rng, resident).block_until_ready(), steps, warmup)

  with prefetch(_batches(split, batch, d), buffer_size=2, devices=devices) as feed:
    results['3. pipeline end to end'] = batch / _timed(
        lambda: p_augment(rng, next(feed)['image']).block_until_ready(), steps, warmup)

  cache = device_cache(split, devices)
  p_gather_augment = jax.pmap(lambda rng, c, i: augment_fn(rng, jnp.take(c, i, axis=0)),
                              axis_name='batch', in_axes=(None, 0, 0))
  with prefetch(_batches(split, batch, d, False), buffer_size=2, devices=devices) as feed:
    results['3b. pipeline, device-resident cache'] = batch / _timed(
        lambda: p_gather_augment(rng, cache, next(feed)['index']).block_until_ready(), steps,
        warmup)

  try:
    from tljax import models
    model = models.create(args.model, args.num_classes, dtype=dtype)
  except Exception as e:  # noqa: BLE001 - the benchmark still reports the pipeline
    print(f'model {args.model!r} unavailable ({type(e).__name__}: {e}); pipeline figures only')
    model = None
  if model is not None:
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(1), jnp.zeros((1, out, out, 3), dtype))
    tx = optax.sgd(0.01, momentum=0.9)
    state = (variables['params'], variables.get('batch_stats', {}),
             tx.init(variables['params']))
    state = _on_devices(jax.tree_util.tree_map(  # replicated along the pmap axis
        lambda v: np.broadcast_to(np.asarray(v), (d, *np.shape(v))), state), devices)

    def train_step(state, x, labels):
      params, batch_stats, opt_state = state

      def loss_fn(p):
        logits, updates = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                      mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels).mean()
        return loss, updates['batch_stats']

      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      grads = jax.lax.pmean(grads, 'batch')
      new_stats = jax.lax.pmean(new_stats, 'batch')
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    p_step = jax.pmap(train_step, axis_name='batch', donate_argnums=(0,))

    def full_step(state, rng, images, labels):
      rng = jax.random.fold_in(rng, jax.lax.axis_index('batch'))
      x = augment.train_transform(rng, images, aug, out, TORCHVISION, dtype=dtype)
      return train_step(state, x, labels)

    p_full = jax.pmap(full_step, axis_name='batch', in_axes=(0, None, 0, 0), donate_argnums=(0,))
    x = p_augment(rng, resident)
    labels = _on_devices(next(_batches(split, batch, d))['label'], devices)
    holder = [state]

    def model_only():
      holder[0], loss = p_step(holder[0], x, labels)
      loss.block_until_ready()

    results[f'4. {args.model} train step @{out}'] = batch / _timed(model_only, steps, warmup)
    with prefetch(_batches(split, batch, d), buffer_size=2, devices=devices) as feed:
      def loop():
        b = next(feed)
        holder[0], loss = p_full(holder[0], rng, b['image'], b['label'])
        loss.block_until_ready()
      results['5. loop: pipeline feeding the step'] = batch / _timed(loop, steps, warmup)

    p_cached = jax.pmap(lambda st, r, c, i, l: full_step(st, r, jnp.take(c, i, axis=0), l),
                        axis_name='batch', in_axes=(0, None, 0, 0, 0), donate_argnums=(0,))
    with prefetch(_batches(split, batch, d, False), buffer_size=2, devices=devices) as feed:
      def cached_loop():
        b = next(feed)
        holder[0], loss = p_cached(holder[0], rng, cache, b['index'], b['label'])
        loss.block_until_ready()
      results['5b. loop, device-resident cache'] = batch / _timed(cached_loop, steps, warmup)

  width = max(map(len, results))
  for name, value in results.items():
    print(f'{name:<{width}}  {value:10.1f} images/s')
  step_key = next((k for k in results if k.startswith('4.')), None)
  if step_key:
    for key in ('3. pipeline end to end', '3b. pipeline, device-resident cache'):
      print(f'{key} / train step = {results[key] / results[step_key]:.1f}x')


if __name__ == '__main__':
  main()
