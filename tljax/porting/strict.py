"""One strict port for every torch-layout source: a state dict + a converter → tljax variables.

torchvision, timm and the family modules (ViT, ConvNeXt, timm's CNNs) differ
only in how keys map to Flax paths (their converters); the checks are the
same everywhere and live here once: every tensor taken and none missing
(`StateDictReader.finish`), every shape equal to the tljax model's, the
variables merged against the model's own tree, a head of another class count
replaced by a fresh one (the trunk kept), and NaN/inf refused. A problem is
one `PortError` listing everything wrong, never a half-ported model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tljax import models
from tljax.porting.convert import StateDictReader
from tljax.porting.merge import PortError, check_and_merge, check_finite, flatten, unflatten

Converter = Callable[[StateDictReader, str], None]


@functools.lru_cache(maxsize=32)
def model_shapes(arch: str, num_classes: int, arch_kw: tuple = ()):
  """(variable shapes, backbone feature shape) of `models.create(arch, num_classes, **arch_kw)`.

  `arch_kw` is a sorted tuple of items (hashable for the cache); an
  `img_size` in it (a ViT's position-embedding grid) is also the input size.
  """
  kw = dict(arch_kw)
  model = models.create(arch, num_classes, **kw)
  size = kw.get('img_size') or models.input_size(arch)
  x = jnp.zeros((1, size, size, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  features = jax.eval_shape(lambda v: model.apply(v, x, method=model.features), shapes)
  return shapes, features.shape


def zeros_like(shapes) -> dict:
  """`jax.eval_shape` output as numpy zeros (allocated lazily by the OS), for `check_and_merge`."""
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def with_new_logits(variables: dict, arch: str, num_classes: int, rng: jax.Array | None,
                    arch_kw: tuple = ()) -> tuple[dict, list[str]]:
  """Replaces `head/logits` by a fresh `num_classes` layer; everything else is kept as is.

  Only the head is initialised (`method=apply_head` on pooled features), so
  this costs a Dense init, not a full-model compile like `merge.with_new_head`.
  """
  model = models.create(arch, num_classes, **dict(arch_kw))
  shapes, features = model_shapes(arch, num_classes, arch_kw)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  init_head = lambda r: model.init(r, jnp.zeros((1, features[-1])), method=model.apply_head)
  head = jax.jit(init_head)(rng)
  fresh = {k: v for k, v in flatten(head).items() if '/head/logits/' in k}
  kept = {k: v for k, v in flatten(variables).items() if '/head/logits/' not in k}
  merged, _ = check_and_merge(zeros_like(shapes), unflatten({**kept, **fresh}),
                              what=f'{arch} with a new {num_classes}-class head')
  return merged, sorted(fresh)


def port_state_dict(state_dict: Mapping[str, np.ndarray], convert: Converter, arch: str, *,
                    what: str, num_classes: int | None = None, rng: jax.Array | None = None,
                    allow_nonfinite: bool = False,
                    arch_kw: Mapping[str, Any] | None = None) -> tuple[dict, list[str]]:
  """Returns ({'params'[, 'batch_stats']} as numpy arrays, re-initialised leaf paths).

  The model is `models.create(arch, <the checkpoint's classes>, **arch_kw)`;
  `num_classes` (None: the checkpoint's own) different from the checkpoint's
  re-initialises only `head/logits`. `what` names the input in every error.
  """
  kw = tuple(sorted((arch_kw or {}).items()))
  reader = StateDictReader(state_dict, what=what)
  convert(reader, arch)
  logits = reader.flat.get('params/head/logits/kernel')
  ckpt_classes = logits.shape[-1] if logits is not None and logits.ndim == 2 else 1000
  shapes, _ = model_shapes(arch, ckpt_classes, kw)
  expected = {k: tuple(v.shape) for k, v in flatten(shapes).items()}
  mismatched = [f'    {k}: checkpoint {tuple(v.shape)} vs model {expected[k]}'
                for k, v in sorted(reader.flat.items())
                if k in expected and tuple(v.shape) != expected[k]]
  try:
    variables = reader.finish()
  except PortError as e:
    if mismatched:
      raise PortError('\n'.join([str(e), f'  shape mismatch ({len(mismatched)}):',
                                 *mismatched])) from None
    raise
  if mismatched:
    raise PortError('\n'.join([f'{what} does not match the architecture:',
                               f'  shape mismatch ({len(mismatched)}):', *mismatched]))
  variables, _ = check_and_merge(zeros_like(shapes), variables, what=what)
  replaced: list[str] = []
  num_classes = ckpt_classes if num_classes is None else num_classes
  if num_classes != ckpt_classes:
    variables, replaced = with_new_logits(variables, arch, num_classes, rng, kw)
    logging.info('%s: %d-class head replaced by a freshly initialised %d-class head: %s', what,
                 ckpt_classes, num_classes, ', '.join(replaced))
  variables = jax.tree_util.tree_map(np.asarray, variables)
  check_finite(variables, what, allow_nonfinite=allow_nonfinite)
  return variables, replaced
