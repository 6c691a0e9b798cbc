"""Config → (preprocessing, model, initial variables, data splits).

Kept apart from the training loop because evaluation and prediction need
exactly the same resolution of defaults: which preprocessing a backbone
expects, the input and cache sizes, and how pretrained weights are merged
(strictly, reporting every leaf that was not loaded).

The choices it resolves are registries (PRETRAINED, DTYPES, LOSSES, and
`preprocess.PRESETS`) that `tljax.config.validate` checks names against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tljax import models
from tljax.data import preprocess

_KERAS_FAMILIES = ('inception_v3', 'mobilenet_v1', 'mobilenet_v2_keras')


def preprocessing(config, weights_meta: dict | None = None) -> preprocess.Preprocessing:
  """Explicit preset > the pretrained weights' metadata > the model family's convention."""
  if config.preprocessing:
    pp = preprocess.PRESETS[config.preprocessing]
  elif weights_meta is not None:
    pp = preprocess.Preprocessing.from_json(weights_meta['preprocessing'])
  elif config.model.name.startswith('efficientnet_lite'):
    from tljax.porting.efficientnet_lite import preprocessing_for
    name = config.model.name if config.model.name != 'efficientnet_lite_tiny' else 'efficientnet_lite0'
    pp = preprocessing_for(name)
  elif config.model.name in _KERAS_FAMILIES:
    pp = preprocess.KERAS_TF
  else:
    pp = preprocess.TORCHVISION
  if config.input_size and config.input_size != pp.input_size:
    ratio = pp.resize / pp.input_size
    pp = dataclasses.replace(pp, input_size=config.input_size,
                             resize=int(round(config.input_size * ratio)))
  return pp


def load_size(config, pp: preprocess.Preprocessing) -> int:
  """Decoded cache side: the resize side for centre-crop geometries, else the input size."""
  if config.load_size:
    return config.load_size
  return pp.resize if pp.resize_mode == 'shorter' else pp.input_size


# model.dtype → compute dtype (parameters stay float32); validation reads the keys.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config):
  return DTYPES[config.model.dtype]


def create_model(config, num_outputs: int):
  dtype = compute_dtype(config)
  head = config.model.head.to_dict()
  head['hidden'] = tuple(int(h) for h in head['hidden'])
  return models.create(config.model.name, num_outputs, dtype=dtype, head=head,
                       **config.model.arch_kw.to_dict())


def _binary_outputs(num_classes: int) -> int:
  if num_classes != 2:
    raise ValueError(f'loss.kind=sigmoid needs exactly 2 classes, the data has {num_classes}; '
                     "use loss.kind='softmax' or select two classes with data.classes.")
  return 1


# loss.kind → logits the head needs for `num_classes` classes; validation reads the keys.
# (tljax.steps computes each loss from the same names.)
LOSSES = {'softmax': lambda num_classes: num_classes, 'sigmoid': _binary_outputs}


def num_outputs(config, num_classes: int) -> int:
  return LOSSES[config.loss.kind](num_classes)


def check_pretrained_arch(meta: dict, arch: str, path: str) -> None:
  """One-line ValueError when weights were made for another architecture.

  Loading them anyway ends in a Flax/merge error listing hundreds of
  parameter paths, which hides the one-word cause.
  """
  if meta.get('arch') in (None, arch):
    return
  from tljax.porting.weights_io import METADATA_FILE
  raise ValueError(f"pretrained weights in {path} are for arch {meta['arch']!r} (its "
                   f"{METADATA_FILE}) but model.name is {arch!r}; set "
                   f"--config.model.name={meta['arch']}, or point --config.pretrained.path at "
                   f"{arch} weights (`python -m tljax.port --arch={arch} ...`).")


def _no_weights(config):
  return None, None


def _ported_dir(config):
  from tljax.porting import weights_io
  variables, meta = weights_io.load_weights(config.pretrained.path)
  check_pretrained_arch(meta, config.model.name, config.pretrained.path)
  return variables, meta


def _shipped_efficientnet_lite(config):
  from tljax.porting import efficientnet_lite as effnet
  arch = config.model.name
  path = config.pretrained.path or effnet.shipped_weights_path(arch)
  variables = effnet.from_efficientnet_lite(path, arch, num_classes=1000)
  meta = {'arch': arch, 'preprocessing': effnet.preprocessing_for(arch).to_json(),
          'source': path}
  return variables, meta


# pretrained.source → loader of (variables, metadata); validation reads the keys.
PRETRAINED = {'none': _no_weights, 'dir': _ported_dir,
              'efficientnet_lite': _shipped_efficientnet_lite}


def pretrained_weights(config) -> tuple[dict | None, dict | None]:
  """(variables, metadata) of the configured pretrained weights, or (None, None)."""
  return PRETRAINED[config.pretrained.source](config)


def _init_size(config, input_size: int) -> int:
  """Parameter shapes do not depend on the spatial size unless the head flattens: init small."""
  return input_size if config.model.head.pool == 'flatten' else min(input_size, 64)


def init_variables(config, model, rng, input_size: int,
                   pretrained: dict | None) -> tuple[dict, list[str]]:
  """Fresh variables, with every pretrained leaf merged in; returns (variables, not_loaded)."""
  from tljax.porting.merge import check_and_merge
  size = _init_size(config, input_size)
  variables = jax.jit(model.init)(rng, jnp.zeros((1, size, size, 3), jnp.float32))
  variables = jax.tree.map(np.asarray, dict(variables))
  variables.setdefault('batch_stats', {})
  if pretrained is None:
    return variables, []
  merged, not_loaded = check_and_merge(variables, pretrained, dont_load=config.pretrained.dont_load,
                                       what='pretrained weights')
  merged.setdefault('batch_stats', {})
  logging.info('pretrained: %d leaves not loaded (fresh init): %s', len(not_loaded), not_loaded)
  return merged, not_loaded


def zero_variables(config, model, input_size: int) -> dict:
  """Zeros shaped like the model's variables (a restore target; nothing is compiled)."""
  size = _init_size(config, input_size)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
  variables.setdefault('batch_stats', {})
  return variables


def load_data(config, pp: preprocess.Preprocessing) -> dict[str, Any]:
  from tljax.data import load_splits
  return load_splits(config.data, load_size=load_size(config, pp), seed=config.seed,
                     preprocessing=pp)
