"""Strict merging of converted checkpoints into a model's variables.

A silent partial load is the worst failure of a port: the model runs, and
accuracy is quietly worse. Every function here either merges everything or
raises an error that lists every missing, unexpected and mis-shaped entry.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import flax
import jax
import numpy as np


class PortError(ValueError):
  """A checkpoint does not fit the model it is loaded into."""


def flatten(tree: Mapping) -> dict[str, Any]:
  """{'params': {'backbone': {'conv1': {'kernel': x}}}} → {'params/backbone/conv1/kernel': x}."""
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def check_and_merge(target: Mapping, source: Mapping, *, dont_load: Iterable[str] = (),
                    what: str = 'checkpoint') -> tuple[dict, list[str]]:
  """Returns `target` with every leaf replaced by `source`'s, and the paths not loaded.

  Leaves whose '/'-joined path matches a `dont_load` regex keep the target's
  (freshly initialised) value and are reported. Anything else that does not
  line up raises `PortError` listing all problems at once.
  """
  patterns = [re.compile(p) for p in dont_load]
  skip = lambda path: any(p.search(path) for p in patterns)
  tgt, src = flatten(target), flatten(source)
  missing = sorted(k for k in tgt if k not in src and not skip(k))
  unexpected = sorted(k for k in src if k not in tgt and not skip(k))
  mismatched = sorted(
      f'{k}: {what} {tuple(np.shape(src[k]))} vs model {tuple(np.shape(tgt[k]))}'
      for k in tgt if k in src and not skip(k) and np.shape(src[k]) != np.shape(tgt[k]))
  if missing or unexpected or mismatched:
    lines = [f'{what} does not match the model:']
    for title, items in (('missing from the ' + what, missing), ('unexpected in the ' + what, unexpected),
                         ('shape mismatch', mismatched)):
      if items:
        lines.append(f'  {title} ({len(items)}):')
        lines.extend(f'    {item}' for item in items)
    raise PortError('\n'.join(lines))
  not_loaded = sorted(k for k in tgt if skip(k))
  dtype = lambda x: x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype
  merged = {k: (tgt[k] if skip(k) else np.asarray(src[k], dtype=dtype(tgt[k]))) for k in tgt}
  return unflatten(merged), not_loaded


def check_finite(variables: Mapping, what: str, *, allow_nonfinite: bool = False,
                 opt_in: str = 'allow_nonfinite=True (python -m tljax.port: --allow_nonfinite)'
                 ) -> None:
  """Refuses NaN/inf in any float leaf unless `allow_nonfinite`.

  A model built from such weights outputs NaN for every input, and nothing
  points back at the file; the refusal names the first bad leaf and its
  count of non-finite values.
  """
  if allow_nonfinite:
    return
  bad = []
  for key, value in flatten(variables).items():
    a = np.asarray(value)
    if a.dtype.kind in 'fc':
      count = a.size - int(np.count_nonzero(np.isfinite(a)))
      if count:
        bad.append((key, count, a.size))
  if bad:
    key, count, size = bad[0]
    more = f' ({len(bad) - 1} more tensors also)' if len(bad) > 1 else ''
    raise PortError(f'{what}: {key} holds {count} non-finite values (NaN/inf) of {size}{more}; '
                    f'such weights make every prediction NaN. Pass {opt_in} to accept them.')


def with_new_head(variables: Mapping, model, rng: jax.Array, input_shape: tuple[int, ...],
                  *, head_pattern: str = r'^(params|batch_stats)/head/logits/') -> tuple[dict, list[str]]:
  """Keeps every pretrained leaf except the final classifier, which is re-initialised.

  `model` is the target model (with the new `num_classes`); the report lists
  the re-initialised leaves so callers can log them.
  """
  fresh = jax.jit(model.init)(rng, np.zeros(input_shape, np.float32))
  return check_and_merge(fresh, variables, dont_load=[head_pattern], what='pretrained weights')
