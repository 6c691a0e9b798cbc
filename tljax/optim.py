"""Phase config → which parameters train → one optax transformation.

Freezing is a labelling of parameter paths, not a property of modules: each
phase's `trainable` rule labels every leaf 'trainable' or 'frozen', and
`optax.multi_transform` sends frozen leaves to `set_to_zero()`, which keeps
no optimizer state (unlike `scale(0)`), so a frozen ResNet backbone costs no
Adam moments. Weight decay gets its own mask (trainable kernels only): an
optax mask stops updates but would otherwise still decay BN scales and
biases.

Every name a phase may give (`optimizer`, `schedule`, `bn`, the `trainable`
terms) is a key of one registry here (OPTIMIZERS, SCHEDULES, BN_POLICIES,
TERMS); `tljax.config.validate` checks names against the same dicts, so a
new choice is added in one place.

Gradient accumulation and the weight EMA live inside the transformation,
so their state is checkpointed with the optimizer's and a run resumed
mid-accumulation continues bit-identically; the schedule then counts
updates, and `lr_at` converts a batch step for logging.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

TRAINABLE, FROZEN = 'trainable', 'frozen'


def _lookup(registry: Mapping, field: str, name: str):
  if name not in registry:
    raise ValueError(f'unknown {field} {name!r}; use one of {", ".join(map(repr, registry))}')
  return registry[name]


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


TRAINABLE_GRAMMAR = ("'+'-joined terms: head | all | top:N (last N backbone blocks) | "
                     "stages:N (last N name-prefix groups) | "
                     "re:<regex on 'backbone/.../kernel' paths>")


@dataclasses.dataclass(frozen=True)
class Term:
  """One parsed `trainable` term: `kind` is a key of `TERMS`, `arg` its N or regex (else None)."""

  kind: str
  arg: int | str | None = None

  def __str__(self) -> str:
    return self.kind if self.arg is None else f'{self.kind}:{self.arg}'


def _select_all(flat, term, blocks):
  return set(flat)


def _select_head(flat, term, blocks):
  return {k for k in flat if k.startswith('head/')}


def _select_groups(flat, term, blocks):
  if blocks is None:
    raise ValueError(f"'{term}' needs the backbone block order; pass blocks=backbone_blocks(...)")
  groups = blocks if term.kind == 'top' else _stages(blocks)
  if not 1 <= term.arg <= len(groups):
    raise ValueError(f"'{term}': the backbone has {len(groups)} "
                     f'{"blocks" if term.kind == "top" else "stages"}: {[g[0] for g in groups]}')
  names = {name for g in groups[-term.arg:] for name in g}
  return {k for k in flat if k.startswith('backbone/') and k.split('/')[1] in names}


def _select_regex(flat, term, blocks):
  pattern = re.compile(term.arg)
  hit = {k for k in flat if pattern.search(k)}
  if not hit:
    tops = sorted({'/'.join(k.split('/')[:2]) for k in flat})
    raise ValueError(f"trainable term '{term}' matches no parameter; paths look like "
                     f'"backbone/<module>/.../kernel". Top-level modules: {tops}')
  return hit


# kind → (argument type: None, 'int' or 'regex'; selector of '/'-joined parameter paths).
TERMS = {
    'head': (None, _select_head),
    'all': (None, _select_all),
    'top': ('int', _select_groups),
    'stages': ('int', _select_groups),
    're': ('regex', _select_regex),
}
# Inside a regex term, only a '+' before a term's keyword starts the next term, so a regex may
# use '+' as a quantifier ('re:layer4_\d+/+head').
_REGEX_END = re.compile(r'\+(?=(?:head|all)(?:\+|$)|(?:top|stages|re):)')


def _split_terms(rule: str) -> list[str]:
  texts, pos = [], 0
  while True:
    if rule.startswith('re:', pos):
      match = _REGEX_END.search(rule, pos)
      end = match.start() if match else -1
    else:
      end = rule.find('+', pos)
    if end < 0:
      return texts + [rule[pos:]]
    texts.append(rule[pos:end])
    pos = end + 1


def parse_trainable(rule: str) -> tuple[Term, ...]:
  """The one parser of the `trainable` grammar (see TRAINABLE_GRAMMAR).

  Config validation calls it before anything is loaded, and `param_labels`
  applies its result, so the two can never disagree on what a rule means.
  Raises ValueError naming the bad term and the grammar.
  """
  terms = []
  for text in _split_terms(str(rule)):
    kind, colon, arg = text.partition(':')
    if kind not in TERMS:
      raise ValueError(f'unknown trainable term {text!r}; use {TRAINABLE_GRAMMAR}')
    arg_type = TERMS[kind][0]
    if arg_type is None:
      if colon:
        raise ValueError(f'trainable term {text!r} takes no argument; use {TRAINABLE_GRAMMAR}')
      terms.append(Term(kind))
    elif arg_type == 'int':
      if not (arg.isdigit() and int(arg) >= 1):
        raise ValueError(f'trainable term {text!r} needs a count N >= 1; use {TRAINABLE_GRAMMAR}')
      terms.append(Term(kind, int(arg)))
    else:
      if not arg:
        raise ValueError(f'trainable term {text!r} needs a regex; use {TRAINABLE_GRAMMAR}')
      try:
        re.compile(arg)
      except re.error as e:
        raise ValueError(f'trainable term {text!r} has a bad regex ({e})') from None
      terms.append(Term(kind, arg))
  return tuple(terms)


def param_labels(params: Mapping, rule: str | Sequence[Term],
                 blocks: list[list[str]] | None = None) -> dict:
  """Labels every leaf of `params` by `rule` (a `trainable` string or `parse_trainable`'s terms).

  Raises if a term selects nothing (a typo in a regex must not silently
  freeze the whole model) or if the rule leaves nothing trainable.
  """
  terms = parse_trainable(rule) if isinstance(rule, str) else tuple(rule)
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}
  selected: set[str] = set()
  for term in terms:
    selected |= TERMS[term.kind][1](flat, term, blocks)
  if not selected:
    raise ValueError(f"trainable rule {'+'.join(map(str, terms))!r} selects no parameter")
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


def _constant(phase, total: int, warmup: int) -> optax.Schedule:
  if not warmup:
    return optax.constant_schedule(phase.lr)
  return optax.join_schedules([optax.linear_schedule(0.0, phase.lr, warmup),
                               optax.constant_schedule(phase.lr)], [warmup])


def _cosine(phase, total: int, warmup: int) -> optax.Schedule:
  """Cosine decay to `lr * end_lr_factor` over the phase, after the linear warm-up."""
  if not warmup:
    return optax.cosine_decay_schedule(phase.lr, total, alpha=phase.end_lr_factor)
  return optax.warmup_cosine_decay_schedule(0.0, phase.lr, warmup, max(total, warmup + 1),
                                            phase.lr * phase.end_lr_factor)


# phase.schedule → (phase, total steps, warm-up steps) → optax schedule; validation reads the
# keys.
SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {'constant': _constant, 'cosine': _cosine}


def schedule(phase, steps_per_epoch: float) -> optax.Schedule:
  """Per-phase learning rate as a function of the phase's own step count.

  `steps_per_epoch` may be fractional: with gradient accumulation the
  schedule counts updates, `steps_per_epoch / accumulate_steps` per epoch.
  """
  total = max(1, int(phase.epochs * steps_per_epoch))
  warmup = int(round(phase.warmup_epochs * steps_per_epoch))
  return _lookup(SCHEDULES, 'schedule', phase.schedule)(phase, total, warmup)


def accumulate_steps(phase) -> int:
  """Batches whose gradients are averaged into one update (1: every batch updates)."""
  return max(1, int(getattr(phase, 'accumulate_steps', 1) or 1))


def updates_per_epoch(phase, steps_per_epoch: int) -> float:
  """What the phase's schedule counts per epoch: updates, which are batches unless accumulating."""
  k = accumulate_steps(phase)
  return steps_per_epoch if k == 1 else steps_per_epoch / k


def lr_at(phase, steps_per_epoch: int, step_in_phase: int) -> float:
  """The learning rate of the update that batch `step_in_phase` of the phase contributes to.

  The optimizer's schedule is indexed by update count, so the loop cannot
  read it at the batch step once batches are accumulated; this is the one
  conversion (for accumulate_steps=1 it is `schedule(phase, spe)(step)`).
  """
  update = int(step_in_phase) // accumulate_steps(phase)
  return float(schedule(phase, updates_per_epoch(phase, steps_per_epoch))(update))


def _adam(phase, lr):
  return optax.adam(lr, b1=phase.b1, b2=phase.b2, eps=phase.eps)


def _adamw(phase, lr):
  return optax.adamw(lr, b1=phase.b1, b2=phase.b2, eps=phase.eps,
                     weight_decay=phase.weight_decay, mask=_kernel_mask)


def _sgd(phase, lr):
  return optax.sgd(lr, momentum=phase.momentum or None)


def _rmsprop(phase, lr):
  return optax.rmsprop(lr, decay=phase.rmsprop_decay, eps=phase.eps,
                       momentum=phase.momentum or None)


# phase.optimizer → (phase, lr schedule) → optax transformation; validation reads the keys.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    'adam': _adam, 'adamw': _adamw, 'sgd': _sgd, 'rmsprop': _rmsprop}
# Optimizers whose own update applies `weight_decay` (decoupled); the rest get L2 on the gradient.
DECOUPLED_DECAY = ('adamw',)

# phase.bn → whether the backbone's BatchNorm runs in training mode (batch statistics, running
# averages updated); 'frozen' uses and keeps the running averages.
BN_POLICIES = {'frozen': False, 'train': True}

# phase.drop_connect → when the backbone's drop-connect (stochastic depth) is active in training
# steps: 'follow_bn' only with bn='train' (Keras' `base_model(training=False)`); 'when_trained'
# whenever backbone weights train (PyTorch's model.train() with BatchNorm modules in eval).
DROP_CONNECT_POLICIES = {'follow_bn': False, 'when_trained': True}


def stochastic_backbone(phase, labels: Mapping) -> bool:
  """Whether the phase's training steps turn the backbone's drop-connect on apart from BN."""
  return _lookup(DROP_CONNECT_POLICIES, 'drop_connect', phase.drop_connect) and any(
      v == TRAINABLE for k, v in traverse_util.flatten_dict(dict(labels), sep='/').items()
      if k.startswith('backbone/'))


def bn_train(phase) -> bool:
  """Whether the phase runs the backbone's BatchNorm in training mode (its `bn` policy)."""
  return _lookup(BN_POLICIES, 'bn', phase.bn)


class EmaState(NamedTuple):
  """`ema_weights`' state: batches into the current update, updates so far, the averaged weights."""

  mini_step: jax.Array
  count: jax.Array
  ema: Any


def ema_weights(decay: float, every_k: int = 1, mask: Any = None) -> optax.GradientTransformation:
  """An exponential moving average of the weights, kept in the optimizer state.

  Placed after the optimizer, it stores the average of `params + updates`
  (the weights the step is about to produce) and passes `updates` through.
  It advances only on the batch that ends each group of `every_k`, the
  batch on which `optax.MultiSteps` with a constant k emits its update (the
  others emit zeros), so the average runs over updates, not batches.

  The decay warms up as TF's ExponentialMovingAverage does with
  `num_updates`: delta = min(decay, (1 + n) / (10 + n)) after n updates.
  With a fixed 0.999 a phase of a few hundred updates would end on an
  average that is still mostly its starting weights.

  `mask` (bools shaped like params, None = all) names the leaves that can
  change; the others keep their initial copy, which is exact for frozen
  leaves and skips their arithmetic.
  """
  def init(params):
    return EmaState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                    jax.tree.map(lambda p: jnp.array(p, copy=True), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('ema_weights needs params: call tx.update(updates, state, params)')
    keep = jax.tree.map(lambda _: True, params) if mask is None else mask
    emit = state.mini_step == every_k - 1

    def advance(ema):
      n = state.count.astype(jnp.float32)
      delta = jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))

      def one(e, p, u, m):
        if not m:
          return e
        return (e + (1.0 - delta) * ((p + u).astype(jnp.float32) - e)).astype(e.dtype)

      return jax.tree.map(one, ema, params, updates, keep)

    ema = jax.lax.cond(emit, advance, lambda e: e, state.ema)
    return updates, EmaState((state.mini_step + 1) % every_k,
                             state.count + emit.astype(jnp.int32), ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state) -> Any | None:
  """The averaged weights held in an optimizer state from `make_optimizer`; None without EMA.

  The tree has the layout of the params the state was made for: with a
  replicated state (leading device axis), unreplicate the result.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  return found[0].ema if found else None


def lr_scales(labels: Mapping, decay: float, blocks: list[list[str]] | None) -> dict:
  """Layer-wise LR multipliers shaped like `labels` (= like params): decay ** depth.

  Depth counts backbone blocks (`backbone_blocks`) down from the head: the
  head is at 0, the last block at 1, the first (stem / patch embedding) at
  len(blocks). Each block's LR is therefore the next one's times `decay`,
  the fine-tuning recipe of BEiT and timm for ViTs, and it means the same for
  CNN blocks. Frozen blocks count too: a block's depth is a property of the
  network, not of the phase's `trainable` rule.
  """
  flat = traverse_util.flatten_dict(dict(labels), sep='/')
  if decay == 1.0:
    return traverse_util.unflatten_dict({k: 1.0 for k in flat}, sep='/')
  if blocks is None:
    raise ValueError('lr_decay needs the backbone block order; pass blocks=backbone_blocks(...)')
  depth = {name: len(blocks) - g for g, block in enumerate(blocks) for name in block}
  scales = {}
  for k in flat:
    top, _, rest = k.partition('/')
    if top == 'head':
      scales[k] = 1.0
    elif top == 'backbone' and rest.split('/')[0] in depth:
      scales[k] = float(decay) ** depth[rest.split('/')[0]]
    else:
      raise ValueError(f'lr_decay: parameter {k!r} belongs to no backbone block or head')
  return traverse_util.unflatten_dict(scales, sep='/')


def _scaled(tx: optax.GradientTransformation, scales: Mapping) -> optax.GradientTransformation:
  """`tx` with each update multiplied by its leaf of `scales` (frozen leaves skipped).

  Scaling after the optimizer scales everything the LR scales (AdamW's
  decoupled decay included), and wrapping rather than chaining keeps `tx`'s
  state as it is, so the optimizer state has the same layout with or without
  `lr_decay`.
  """
  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    scaled = jax.tree.map(
        lambda s, u: u if isinstance(u, optax.MaskedNode) or s == 1.0 else u * s,
        scales, updates)
    return scaled, state

  return optax.GradientTransformation(tx.init, update)


def make_optimizer(phase, labels: Mapping, steps_per_epoch: int,
                   lr: float | optax.Schedule | None = None,
                   blocks: list[list[str]] | None = None) -> optax.GradientTransformation:
  """The phase's transformation: trainable leaves optimised, frozen leaves zeroed and stateless.

  Decoupled AdamW decays inside the optimizer; the others get L2 decay
  added to the gradient first (Keras/torch `weight_decay` semantics), both
  restricted to trainable kernels.

  `accumulate_steps=k > 1` wraps the trainable chain in `optax.MultiSteps`
  inside its partition, so frozen leaves still hold no state (not even an
  accumulator) and the schedule counts updates (`updates_per_epoch`).
  `ema_decay > 0` chains `ema_weights` after everything (`ema_params` reads
  it). `lr`, a float or a schedule over the update count, replaces the
  phase's schedule (the LR finder sweeps it). `lr_decay < 1` multiplies
  each leaf's update by `lr_scales` (needs `blocks`).
  """
  k = accumulate_steps(phase)
  if lr is None:
    lr = schedule(phase, updates_per_epoch(phase, steps_per_epoch))
  chain = []
  if phase.grad_clip:
    chain.append(optax.clip_by_global_norm(phase.grad_clip))
  if phase.weight_decay and phase.optimizer not in DECOUPLED_DECAY:
    chain.append(optax.masked(optax.add_decayed_weights(phase.weight_decay), _kernel_mask))
  chain.append(_lookup(OPTIMIZERS, 'optimizer', phase.optimizer)(phase, lr))
  trainable = optax.chain(*chain)
  decay = float(getattr(phase, 'lr_decay', 1.0))
  if decay != 1.0:
    trainable = _scaled(trainable, lr_scales(labels, decay, blocks))
  if k > 1:
    trainable = optax.MultiSteps(trainable, every_k_schedule=k).gradient_transformation()
  tx = optax.multi_transform({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)
  decay = float(getattr(phase, 'ema_decay', 0.0) or 0.0)
  if decay:
    tx = optax.chain(tx, ema_weights(decay, k, jax.tree.map(lambda l: l == TRAINABLE, labels)))
  return tx
