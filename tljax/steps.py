"""Pure per-device steps and the one place they are mapped over devices.

`train_step` differentiates only the trainable partition of the parameters:
the frozen part is closed over as a constant, so JAX never builds the
backward pass of a frozen trunk (a head-only step costs about one backbone
forward, see `experiments/bench_train_step.py`). Gradients and, when BN
trains, batch statistics are averaged over the 'batch' axis. Per-step keys
are `fold_in(base, step)`, so a resumed run draws the same augmentation and
dropout as an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax import optim

AXIS = 'batch'
# XLA's RngBitGenerator instead of threefry for every training draw: threefry's unrolled
# rounds make XLA:CPU compile a model init many times slower, and the bits are still a pure
# function of (seed, step) on a given backend.
PRNG_IMPL = 'rbg'


def make_key(seed: int) -> np.ndarray:
  """Raw key data (uint32[4]) to store in `TrainState.rng` and in checkpoints."""
  return np.asarray(jax.random.key_data(jax.random.key(seed, impl=PRNG_IMPL)))


def wrap_key(data):
  return jax.random.wrap_key_data(data, impl=PRNG_IMPL)


@flax.struct.dataclass
class TrainState:
  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array        # global step over all phases
  rng: jax.Array         # base key data (`make_key`); never advanced, only folded


def parallel(fn: Callable, *, donate_state: bool = False, devices=None) -> Callable:
  """`jax.pmap` over local devices along axis 'batch' (the only pmap in tljax)."""
  return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate_state else (),
                  devices=devices)


def device_sharding(devices=None):
  """How `parallel` lays out its inputs and outputs: leading axis over the local devices."""
  devices = jax.local_devices() if devices is None else devices
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree, devices=None):
  """One copy per device, stacked on a leading axis, placed as `parallel` expects."""
  sharding = device_sharding(devices)
  n = len(sharding.mesh.devices.flat)
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), sharding), tree)


def unreplicate(tree):
  """First replica, as host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def per_example_loss(logits, labels, kind: str, label_smoothing: float = 0.0):
  """Softmax CE (optionally smoothed) or binary sigmoid CE for a 1-logit head."""
  targets = (labels.astype(jnp.float32) if kind == 'sigmoid' else
             jax.nn.one_hot(labels, logits.shape[-1]))
  return soft_target_loss(logits, targets, kind, label_smoothing)


def soft_target_loss(logits, targets, kind: str, label_smoothing: float = 0.0):
  """Cross-entropy against (possibly mixed) targets: [b, classes] for softmax, [b] for sigmoid;
  smoothing applies on top of the mix, as it does to one-hot targets."""
  if kind == 'sigmoid':
    if label_smoothing:
      targets = targets * (1 - label_smoothing) + 0.5 * label_smoothing
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], targets)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def example_weights(labels, targets, class_weights, kind: str):
  """Each example's weight under `class_weights` (one per class): its label's weight, or the
  target-weighted mix of weights when its input was mixed."""
  w = jnp.asarray(class_weights, jnp.float32)
  if targets is None:
    return w[labels]
  if kind == 'sigmoid':
    return (1 - targets) * w[0] + targets * w[1]
  return targets @ w


def predict_classes(logits, kind: str):
  if kind == 'sigmoid':
    return (logits[:, 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, -1).astype(jnp.int32)


def top_k_correct(logits, labels, kind: str, k: int = 5):
  """Label among the k highest logits; a sigmoid head ranks its two classes, so top-k = top-1."""
  if kind == 'sigmoid':
    return predict_classes(logits, kind) == labels
  k = min(k, logits.shape[-1])
  return jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)


def step_keys(state: TrainState):
  """(input key, dropout key) for this step and device: same for a given step on every resume."""
  key = jax.random.fold_in(wrap_key(state.rng), state.step)
  device = jax.lax.axis_index(AXIS)
  return (jax.random.fold_in(jax.random.fold_in(key, 0), device),
          jax.random.fold_in(jax.random.fold_in(key, 1), device))


def batch_images(batch, cache):
  """The batch's uint8 images: shipped with it, or gathered on device from `cache` by index.

  `cache` is this device's copy of the whole decoded split
  (`tljax.data.batching.device_cache`); with it the host sends only indices.
  """
  return batch['image'] if cache is None else jnp.take(cache, batch['index'], axis=0)


# An apply function maps (params, batch_stats, batch, image cache, (input key, dropout key),
# train) to (logits, new batch_stats or None when BatchNorm does not train), plus, when it mixed
# its inputs (mixup / cutmix), a third element: the soft targets the loss must use. The steps
# below take one instead of knowing what a batch holds.
ApplyFn = Callable[..., tuple[jax.Array, Any]]


def on_images(model, transform: Callable, *, bn_train: bool = False,
              stochastic_backbone: bool = False, mix: Callable | None = None) -> ApplyFn:
  """The whole model on a batch of uint8 images, after `transform(key, images)`.

  `bn_train`: BatchNorm normalises with (and updates from) batch statistics.
  `stochastic_backbone`: the backbone's drop-connect is on in training steps
  even where its BatchNorm is frozen (otherwise it follows `bn_train`).
  `mix(key, inputs, labels) -> (inputs, soft targets)`: mixup / cutmix of the
  transformed training batch (never in evaluation), drawn from its own fold of
  the input key so the crop and flip draws stay what they were without it.
  """
  def apply(params, batch_stats, batch, cache, keys, train):
    input_key, dropout_key = keys
    inputs = transform(input_key, batch_images(batch, cache))
    targets = None
    if mix is not None and train:
      inputs, targets = mix(jax.random.fold_in(input_key, 2), inputs, batch['label'])
    variables = {'params': params, 'batch_stats': batch_stats}
    rngs = {'dropout': dropout_key} if dropout_key is not None else {}
    stochastic = train if stochastic_backbone else None
    if bn_train:
      logits, updated = model.apply(variables, inputs, train=train, bn_train=True, rngs=rngs,
                                    stochastic=stochastic, mutable=['batch_stats'])
      out = logits, updated.get('batch_stats', batch_stats)
    else:
      out = model.apply(variables, inputs, train=train, bn_train=False, rngs=rngs,
                        stochastic=stochastic), None
    return out if targets is None else out + (targets,)
  return apply


def on_features(model) -> ApplyFn:
  """The head alone on a batch of cached backbone features (`batch['feature']`)."""
  def apply(params, batch_stats, batch, cache, keys, train):
    del batch_stats, cache
    rngs = {'dropout': keys[1]} if keys[1] is not None else {}
    return model.apply({'params': params}, batch['feature'], train=train, method='apply_head',
                       rngs=rngs), None
  return apply


def train_step(state: TrainState, batch, cache=None, *, apply_fn: ApplyFn,
               tx: optax.GradientTransformation, param_labels, loss_kind: str,
               label_smoothing: float, class_weights: tuple[float, ...] | None = None):
  """One optimisation step on one device's shard; call through `parallel`.

  With `class_weights` the loss is the weighted mean sum(w_i l_i) / sum(w_i)
  over the global batch (torch's `CrossEntropyLoss(weight=...)`): the
  denominator is averaged over devices, so the device-averaged gradient is
  that of the global weighted mean whatever each shard's class mix.
  """
  keys = step_keys(state)
  trainable, frozen = optim.split(state.params, param_labels)

  def loss_of(trainable_params):
    params = optim.join(trainable_params, frozen)
    logits, batch_stats, *mixed = apply_fn(params, state.batch_stats, batch, cache, keys, True)
    targets = mixed[0] if mixed else None
    if targets is None:
      losses = per_example_loss(logits, batch['label'], loss_kind, label_smoothing)
    else:
      losses = soft_target_loss(logits, targets, loss_kind, label_smoothing)
    if class_weights is None:
      loss = losses.mean()
    else:
      w = example_weights(batch['label'], targets, class_weights, loss_kind)
      loss = jnp.sum(w * losses) / jnp.maximum(jax.lax.pmean(jnp.sum(w), AXIS), 1e-12)
    return loss, (logits, batch_stats)

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
  grads = jax.lax.pmean(grads, AXIS)
  full_grads = optim.join(grads, jax.tree.map(jnp.zeros_like, frozen))
  updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
  trainable_updates, _ = optim.split(updates, param_labels)
  new_trainable = optax.apply_updates(trainable, trainable_updates)
  if batch_stats is None:
    batch_stats, new_stats = state.batch_stats, ()
  else:
    batch_stats = new_stats = jax.lax.pmean(batch_stats, AXIS)
  accuracy = (predict_classes(logits, loss_kind) == batch['label']).mean()
  metrics = {'loss': jax.lax.pmean(loss, AXIS), 'accuracy': jax.lax.pmean(accuracy, AXIS)}
  metrics['finite'] = all_finite((metrics['loss'], grads, new_trainable, new_stats))
  new_state = state.replace(params=optim.join(new_trainable, frozen), batch_stats=batch_stats,
                            opt_state=opt_state, step=state.step + 1)
  return new_state, metrics


def all_finite(tree) -> jax.Array:
  """1.0 when every value of every floating leaf is finite, else 0.0 (one reduction per leaf).

  The loop reads this flag before it saves, evaluates or exports anything, so
  a diverged step never becomes a checkpoint, a best model or an export.
  """
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  return jnp.all(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.float32(1)


def train_chunk(state: TrainState, batches, cache=None, **kw):
  """`train_step` over a leading axis of K batches in one device call (`lax.scan`).

  For cached-feature head steps the work per step is tiny and dispatching
  the full state K times would dominate; one call per chunk removes that.
  Chunks have one fixed length per phase (one compilation): padding steps
  carry `valid=False` and leave the state exactly as it was.
  """
  def body(s, b):
    valid = b.pop('valid')
    new, metrics = train_step(s, b, cache, **kw)
    return jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, s), metrics

  return jax.lax.scan(body, state, dict(batches))


def predicted_probability(logits, kind: str):
  """The probability given to the class `predict_classes` picks, the confidence that
  calibration (ECE) compares with accuracy.

  A 1-logit sigmoid head predicts class 1 when p = sigmoid(logit) > 1/2, so
  its confidence is max(p, 1 - p), which is sigmoid(|logit|).
  """
  logits = logits.astype(jnp.float32)
  if kind == 'sigmoid':
    return jax.nn.sigmoid(jnp.abs(logits[:, 0]))
  return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def eval_step(state: TrainState, batch, *, apply_fn: ApplyFn, loss_kind: str):
  """Per-example outputs; the host masks padding so each example counts once."""
  logits = apply_fn(state.params, state.batch_stats, batch, None, (None, None), False)[0]
  return {'pred': predict_classes(logits, loss_kind),
          'top5': top_k_correct(logits, batch['label'], loss_kind),
          'loss': per_example_loss(logits, batch['label'], loss_kind),
          'confidence': predicted_probability(logits, loss_kind),
          'logits': logits}


def feature_step(state: TrainState, batch, key, *, model, transform: Callable, pool: bool):
  """Backbone features in inference mode (pooled when the head would pool them first)."""
  key = jax.random.fold_in(wrap_key(key), jax.lax.axis_index(AXIS))
  inputs = transform(key, batch['image'])

  def features(module, x):
    f = module.features(x, train=False, bn_train=False)
    return module.head.pool_features(f) if pool else f

  return model.apply({'params': state.params, 'batch_stats': state.batch_stats}, inputs,
                     method=features)


def bn_stats_step(state: TrainState, batch, *, model, transform: Callable):
  """This batch's BatchNorm statistics for every layer, averaged over devices.

  Read through the layers' own running-average update `r' = m r + (1 - m) b`:
  one pass from r = 0 and one from r = 1 give `m = r'_1 - r'_0` and
  `b = r'_0 / (1 - m)`, whatever momentum each family's BN uses.
  """
  input_key, dropout_key = step_keys(state)
  inputs = transform(input_key, batch['image'])

  def updated(fill):
    stats = jax.tree.map(lambda x: jnp.full_like(x, fill), state.batch_stats)
    _, new = model.apply({'params': state.params, 'batch_stats': stats}, inputs, train=False,
                         bn_train=True, rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    return new['batch_stats']

  from_zero, from_one = updated(0.0), updated(1.0)
  stats = jax.tree.map(lambda r0, r1: r0 / (1.0 - (r1 - r0)), from_zero, from_one)
  return jax.lax.pmean(stats, AXIS)


def build_steps(*, train_apply: ApplyFn | None = None, eval_apply: ApplyFn | None = None,
                tx=None, param_labels=None, loss_kind='softmax', label_smoothing=0.0,
                class_weights=None, donate=True, devices=None) -> dict[str, Callable]:
  """'train' and 'train_chunk' (with `train_apply`), 'eval' (with `eval_apply`), device-parallel."""
  fns = {}
  if train_apply is not None:
    kw = dict(apply_fn=train_apply, tx=tx, param_labels=param_labels, loss_kind=loss_kind,
              label_smoothing=label_smoothing,
              class_weights=None if class_weights is None else tuple(map(float, class_weights)))
    fns['train'] = parallel(functools.partial(train_step, **kw), donate_state=donate,
                            devices=devices)
    fns['train_chunk'] = parallel(functools.partial(train_chunk, **kw), donate_state=donate,
                                  devices=devices)
  if eval_apply is not None:
    fns['eval'] = parallel(functools.partial(eval_step, apply_fn=eval_apply, loss_kind=loss_kind),
                           devices=devices)
  return fns


def build_backbone_steps(model, transform: Callable, *, pool: bool,
                         devices=None) -> dict[str, Callable]:
  """'features' (backbone outputs, for the feature cache) and 'bn_stats' (precise BatchNorm)."""
  return {
      'features': parallel(functools.partial(feature_step, model=model, transform=transform,
                                             pool=pool), devices=devices),
      'bn_stats': parallel(functools.partial(bn_stats_step, model=model, transform=transform),
                           devices=devices),
  }
