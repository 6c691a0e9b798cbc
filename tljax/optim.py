"""Phase config → which parameters train → one optax transformation.

Freezing is a labelling of parameter paths, not a property of modules: each
phase's `trainable` rule labels every leaf 'trainable' or 'frozen', and
`optax.multi_transform` sends frozen leaves to `set_to_zero()`, which keeps
no optimizer state (unlike `scale(0)`), so a frozen ResNet backbone costs no
Adam moments. Weight decay gets its own mask (trainable kernels only): an
optax mask stops updates but would otherwise still decay BN scales and
biases.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

TRAINABLE, FROZEN = 'trainable', 'frozen'


def backbone_blocks(model: nn.Module, params: Mapping, input_shape: tuple[int, ...]) -> list[list[str]]:
  """Top-level backbone submodules grouped into blocks, in execution order.

  Flax sorts parameter dicts by name ('stage10' before 'stage2'), so order
  is recorded by intercepting calls during an abstract `init`. A submodule
  without a kernel (a BatchNorm) joins the block before it, so `top:1` of a
  conv-BN-ReLU stem-and-stages network unfreezes the last conv *and* its BN.
  """
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    path = context.module.path
    if len(path) == 2 and path[0] == 'backbone' and path[1] not in order:
      order.append(path[1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
  backbone = params.get('backbone', {})
  unseen = sorted(set(backbone) - set(order))
  if unseen:
    raise RuntimeError(f'backbone parameters {unseen} were not created by a direct child call; '
                       'give every backbone submodule an explicit name.')
  blocks: list[list[str]] = []
  for name in order:
    if name not in backbone:
      continue
    has_kernel = any(k[-1] == 'kernel' for k in traverse_util.flatten_dict(dict(backbone[name])))
    if blocks and not has_kernel:
      blocks[-1].append(name)
    else:
      blocks.append([name])
  return blocks


def _stages(blocks: list[list[str]]) -> list[list[str]]:
  """Consecutive blocks sharing a name prefix (text before the first '_')."""
  stages: list[list[str]] = []
  prefix = None
  for block in blocks:
    p = block[0].split('_')[0]
    if stages and p == prefix:
      stages[-1].extend(block)
    else:
      stages.append(list(block))
    prefix = p
  return stages


def param_labels(params: Mapping, rule: str, blocks: list[list[str]] | None = None) -> dict:
  """Labels every leaf of `params` by `rule` ('+'-joined terms, see `tljax.config.phase`).

  Raises if a term selects nothing (a typo in a regex must not silently
  freeze the whole model) or if the rule leaves nothing trainable.
  """
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}
  selected: set[str] = set()
  for term in rule.split('+'):
    if term == 'all':
      hit = set(flat)
    elif term == 'head':
      hit = {k for k in flat if k.startswith('head/')}
    elif term.startswith(('top:', 'stages:')):
      if blocks is None:
        raise ValueError(f'{term!r} needs the backbone block order; pass blocks=backbone_blocks(...)')
      n = int(term.split(':')[1])
      groups = blocks if term.startswith('top:') else _stages(blocks)
      if not 1 <= n <= len(groups):
        raise ValueError(f'{term!r}: the backbone has {len(groups)} '
                         f'{"blocks" if term.startswith("top:") else "stages"}: '
                         f'{[g[0] for g in groups]}')
      names = {name for g in groups[-n:] for name in g}
      hit = {k for k in flat if k.startswith('backbone/') and k.split('/')[1] in names}
    elif term.startswith('re:'):
      pattern = re.compile(term[3:])
      hit = {k for k in flat if pattern.search(k)}
      if not hit:
        tops = sorted({'/'.join(k.split('/')[:2]) for k in flat})
        raise ValueError(f'trainable term {term!r} matches no parameter; paths look like '
                         f'"backbone/<module>/.../kernel". Top-level modules: {tops}')
    else:
      raise ValueError(f'unknown trainable term {term!r}; use head, all, top:N, stages:N, re:<regex>')
    selected |= hit
  if not selected:
    raise ValueError(f'trainable rule {rule!r} selects no parameter')
  labels = {k: TRAINABLE if k in selected else FROZEN for k in flat}
  assert len(labels) == len(flat) and set(labels.values()) <= {TRAINABLE, FROZEN}
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in labels.items()})


def split(tree: Mapping, labels: Mapping) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts keyed by '/'-joined path."""
  flat = traverse_util.flatten_dict(dict(tree), sep='/')
  lab = traverse_util.flatten_dict(dict(labels), sep='/')
  return ({k: v for k, v in flat.items() if lab[k] == TRAINABLE},
          {k: v for k, v in flat.items() if lab[k] == FROZEN})


def join(*parts: Mapping) -> dict:
  merged: dict[str, Any] = {}
  for part in parts:
    merged.update(part)
  return traverse_util.unflatten_dict(merged, sep='/')


def count(params: Mapping, labels: Mapping) -> dict[str, int]:
  trainable, frozen = split(params, labels)
  size = lambda d: int(sum(np.prod(np.shape(v)) for v in d.values()))
  return {TRAINABLE: size(trainable), FROZEN: size(frozen)}


def _kernel_mask(params):
  """True for Conv/Dense kernels: the leaves weight decay should touch."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: getattr(path[-1], 'key', None) == 'kernel' and np.ndim(x) >= 2, params)


def schedule(phase, steps_per_epoch: int) -> optax.Schedule:
  """Per-phase learning rate as a function of the phase's own step count."""
  total = max(1, int(phase.epochs * steps_per_epoch))
  warmup = int(round(phase.warmup_epochs * steps_per_epoch))
  if phase.schedule == 'constant':
    if not warmup:
      return optax.constant_schedule(phase.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, phase.lr, warmup),
                                 optax.constant_schedule(phase.lr)], [warmup])
  if phase.schedule == 'cosine':
    end = phase.lr * phase.end_lr_factor
    if not warmup:
      return optax.cosine_decay_schedule(phase.lr, total, alpha=phase.end_lr_factor)
    return optax.warmup_cosine_decay_schedule(0.0, phase.lr, warmup, max(total, warmup + 1), end)
  raise ValueError(f"schedule must be 'constant' or 'cosine', got {phase.schedule!r}")


def _base_optimizer(phase, lr: optax.Schedule) -> optax.GradientTransformation:
  if phase.optimizer == 'adam':
    return optax.adam(lr, b1=phase.b1, b2=phase.b2, eps=phase.eps)
  if phase.optimizer == 'adamw':
    return optax.adamw(lr, b1=phase.b1, b2=phase.b2, eps=phase.eps,
                       weight_decay=phase.weight_decay, mask=_kernel_mask)
  if phase.optimizer == 'sgd':
    return optax.sgd(lr, momentum=phase.momentum or None)
  if phase.optimizer == 'rmsprop':
    return optax.rmsprop(lr, decay=phase.rmsprop_decay, eps=phase.eps,
                         momentum=phase.momentum or None)
  raise ValueError(f'unknown optimizer {phase.optimizer!r}; use adam, adamw, sgd or rmsprop')


def make_optimizer(phase, labels: Mapping, steps_per_epoch: int) -> optax.GradientTransformation:
  """The phase's transformation: trainable leaves optimised, frozen leaves zeroed and stateless.

  Decoupled AdamW decays inside the optimizer; the others get L2 decay
  added to the gradient first (Keras/torch `weight_decay` semantics), both
  restricted to trainable kernels.
  """
  lr = schedule(phase, steps_per_epoch)
  chain = []
  if phase.grad_clip:
    chain.append(optax.clip_by_global_norm(phase.grad_clip))
  if phase.weight_decay and phase.optimizer != 'adamw':
    chain.append(optax.masked(optax.add_decayed_weights(phase.weight_decay), _kernel_mask))
  chain.append(_base_optimizer(phase, lr))
  return optax.multi_transform({TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()},
                               labels)
