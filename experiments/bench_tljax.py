"""tljax model timings through the real training step (`tljax.steps.train_step`).

Three things a transfer-learning run does, each jitted and timed alone:
  inference    `model.apply(..., train=False)` on a batch;
  head step    head trainable, backbone frozen with BN on running stats (the
               frozen part is a constant to autodiff, so the step should cost
               about one forward pass);
  full step    every parameter trainable, BN in training mode;
plus `cached head step`, the head step on cached pooled features, which is
what a cached-feature head epoch runs per batch. The optimizer is the one
training builds (`tljax.optim.make_optimizer`: Adam, frozen leaves routed to
`set_to_zero`), so its state size is also measured with the backbone frozen
and unfrozen.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import guarded, measure
from tljax import models, ops, optim, steps

# The benchmark's --impls names (kept so old result JSON keys `tljax-fast`/`tljax-xla` still
# mean the same) → `tljax.ops` backends.
BACKENDS = {'fast': 'cpu', 'xla': 'xla', 'auto': 'auto'}

# Fields `tljax.optim.make_optimizer` reads from a phase config (tljax.config.phase defaults),
# spelled out so the suite runs where ml_collections is not installed (the GPU image).
PHASE = types.SimpleNamespace(optimizer='adam', lr=1e-3, b1=0.9, b2=0.999, eps=1e-7, momentum=0.9,
                              weight_decay=0.0, schedule='constant', warmup_epochs=0.0,
                              end_lr_factor=0.0, grad_clip=0.0, epochs=1, rmsprop_decay=0.9)


def tree_bytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, 'dtype')))


def _flops(stage) -> float | None:
  try:
    cost = stage.cost_analysis()
  except Exception:  # noqa: BLE001 — not every backend/version reports costs.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and cost.get('flops') else None


class Setup:
  """A model, its variables and a fixed synthetic batch, placed on one device."""

  def __init__(self, name: str, *, batch: int, dtype, device, num_classes: int = 1000,
               size: int | None = None):
    self.name, self.batch, self.device = name, batch, device
    self.size = size or models.input_size(name)
    self.model = models.create(name, num_classes, dtype=dtype)
    shape = (1, self.size, self.size, 3)
    with jax.default_device(device):
      variables = jax.jit(self.model.init)(jax.random.key(0), jnp.zeros(shape, jnp.float32))
    self.params, self.batch_stats = variables['params'], variables.get('batch_stats', {})
    rng = np.random.default_rng(0)
    self.images = rng.standard_normal((batch, self.size, self.size, 3), np.float32)
    self.labels = rng.integers(0, num_classes, (batch,)).astype(np.int32)

  def inference(self):
    """(compiled forward, its arguments, lowered forward). FLOPs are counted on the lowered
    HLO: after GPU compilation convolutions are cuDNN custom calls that XLA's cost analysis
    does not count (it reported 0.03 GFLOP/img for ResNet34 on an H100)."""
    lowered, args = self.lower_inference()
    return lowered.compile(), args, lowered

  def lower_inference(self):
    apply = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
    variables = jax.device_put({'params': self.params, 'batch_stats': self.batch_stats},
                               self.device)
    x = jax.device_put(self.images, self.device)
    return apply.lower(variables, x), (variables, x)

  def optimizer(self, rule: str):
    labels = optim.param_labels(self.params, rule)
    return optim.make_optimizer(PHASE, labels, steps_per_epoch=100), labels

  def train(self, rule: str, *, bn_train: bool, cached: bool = False):
    """A no-argument step that keeps its (donated) train state between calls."""
    tx, labels = self.optimizer(rule)
    state = steps.TrainState(params=self.params, batch_stats=self.batch_stats,
                             opt_state=tx.init(self.params), step=np.int32(0),
                             rng=steps.make_key(0))
    apply_fn = (steps.on_features(self.model) if cached else
                steps.on_images(self.model, lambda key, x: x, bn_train=bn_train))
    step_fn = steps.build_steps(train_apply=apply_fn, tx=tx, param_labels=labels,
                                loss_kind='softmax', devices=[self.device])['train']
    batch = {'label': self.labels[None]}
    if cached:
      feats = self._pooled_features()
      batch['feature'] = feats[None]
    else:
      batch['image'] = self.images[None]
    holder = {'state': steps.replicate(state, devices=[self.device]),
              'batch': jax.device_put(batch, steps.device_sharding([self.device]))}

    def call():
      holder['state'], metrics = step_fn(holder['state'], holder['batch'])
      return metrics

    return call

  def _pooled_features(self):
    def features(module, x):
      return module.head.pool_features(module.features(x, train=False, bn_train=False))
    fn = jax.jit(lambda v, x: self.model.apply(v, x, method=features))
    return np.asarray(fn({'params': self.params, 'batch_stats': self.batch_stats}, self.images))


MODES = ('inference', 'head_step', 'full_step', 'cached_head_step')


def run_model(name: str, *, batch: int, dtype: str, impls, iters: int, warmup: int,
              device=None, size: int | None = None, modes=MODES, on_result=None) -> dict:
  """All timings of one model; `on_result(framework, mode, timing)` hears each as it lands."""
  device = device or jax.devices()[0]
  setup = Setup(name, batch=batch, dtype=jnp.dtype(dtype), device=device, size=size)
  row = {'model': name, 'input_size': setup.size, 'batch': batch, 'dtype': dtype,
         'params': int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(setup.params)))}
  # Counted on plain lax ops: the CPU backend's C++ kernels are custom calls XLA's cost
  # analysis does not see (ResNet34 would count 0.04 GFLOP/img).
  with ops.use_backend('xla'):
    count = _flops(setup.lower_inference()[0])
  row['flops'] = {'inference': count} if count else {}
  results = {}
  sync = jax.block_until_ready
  for impl in impls:
    key = f'tljax-{impl}'
    results[key] = {}
    with ops.use_backend(BACKENDS[impl]):
      for mode in modes:
        print(f'  {key} {mode}', flush=True)
        if mode == 'inference':
          fn = lambda: _time_inference(setup, sync, iters, warmup)
        else:
          rule = 'all' if mode == 'full_step' else 'head'
          fn = lambda: measure(setup.train(rule, bn_train=mode == 'full_step',
                                           cached=mode == 'cached_head_step'), sync,
                               iters=iters, warmup=warmup)
        results[key][mode] = guarded(f'{key} {mode}', fn)
        if on_result:
          on_result(key, mode, results[key][mode])
  row['results'] = results
  row['opt_state_bytes'] = guarded('opt state', lambda: {
      'head_only': tree_bytes(setup.optimizer('head')[0].init(setup.params)),
      'full': tree_bytes(setup.optimizer('all')[0].init(setup.params))})
  return row


def _time_inference(setup: Setup, sync, iters: int, warmup: int) -> dict:
  compiled, args, _ = setup.inference()
  return measure(lambda: compiled(*args), sync, iters=iters, warmup=warmup)
