"""Writes Keras weight files with h5py alone, laid out exactly as Keras writes them.

Used by the Keras port tests to turn a golden fixture (Keras' layer list and
manifest, in Keras' order) plus numpy-rebuilt weights into the two file
layouts real users have, without Keras:
  * legacy HDF5 as in the official downloads: `layer_names` on the root (in
    `model.layers` order, weightless layers included), one group per layer
    with a `weight_names` attribute; names may be Keras-2 style (`:0`) and
    auto-generated names may be renumbered as another session would;
  * Keras 3 `.weights.h5`: `layers/<snake class>[_k]/vars/<i>` numbered per
    class in `model.layers` order, the real layer name in a `name` attribute.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import h5py
import numpy as np

AUTO_NAME = re.compile(r'(conv2d|batch_normalization|activation|max_pooling2d|average_pooling2d|'
                       r'concatenate|dense|depthwise_conv2d|re_lu|global_average_pooling2d)(?:_(\d+))?')


def snake_case(class_name: str) -> str:
  """Keras' class → generic name rule: 'Conv2D' → 'conv2d', 'ReLU' → 're_lu'."""
  s = re.sub(r'(.)([A-Z][a-z]+)', r'\1_\2', class_name)
  return re.sub(r'([a-z])([A-Z])', r'\1_\2', s).lower()


def renumber(name: str, offset: int) -> str:
  """'conv2d' → 'conv2d_<offset>', 'conv2d_5' → 'conv2d_<5+offset>'; explicit names unchanged."""
  m = AUTO_NAME.fullmatch(name)
  if not m or offset == 0:
    return name
  return f'{m.group(1)}_{int(m.group(2) or 0) + offset}'


def _by_layer(manifest: Sequence[dict]) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = {}
  for e in manifest:
    out.setdefault(e['name'].rsplit('/', 1)[0], []).append(e)
  return out


def write_legacy(path, layers: Sequence[Sequence[str]], manifest: Sequence[dict],
                 weights: Mapping[str, np.ndarray], *, offset: int = 0, keras2_names: bool = False,
                 drop: Sequence[str] = (), whole_model: bool = False) -> None:
  """`drop`: layer names left out entirely (e.g. the classifier, as in `*_notop.h5`)."""
  per_layer = _by_layer(manifest)
  with h5py.File(path, 'w') as f:
    root = f.create_group('model_weights') if whole_model else f
    names = [n for n, _ in layers if n not in drop]
    root.attrs['layer_names'] = np.array([renumber(n, offset).encode() for n in names])
    root.attrs['backend'] = b'tensorflow' if keras2_names else b'jax'
    root.attrs['keras_version'] = b'2.1.2' if keras2_names else b'3.15.1'
    for name in names:
      new = renumber(name, offset)
      group = root.create_group(new)
      entries = per_layer.get(name, [])
      wnames = [f'{new}/{e["name"].rsplit("/", 1)[1]}{":0" if keras2_names else ""}' for e in entries]
      if keras2_names and layers_class(layers, name) == 'DepthwiseConv2D':
        wnames = [w.replace('/kernel', '/depthwise_kernel') for w in wnames]
      group.attrs['weight_names'] = np.array([w.encode() for w in wnames])
      for wname, e in zip(wnames, entries):
        group.create_dataset(wname, data=weights[e['name']])


def layers_class(layers: Sequence[Sequence[str]], name: str) -> str:
  return dict((n, c) for n, c in layers)[name]


def write_keras3(path, layers: Sequence[Sequence[str]], manifest: Sequence[dict],
                 weights: Mapping[str, np.ndarray], *, offset: int = 0,
                 drop: Sequence[str] = ()) -> None:
  per_layer = _by_layer(manifest)
  counters: dict[str, int] = {}
  with h5py.File(path, 'w') as f:
    f.create_group('vars')
    group = f.create_group('layers')
    for name, cls in layers:
      if name in drop:
        continue
      base = snake_case(cls)
      k = counters.get(base, 0)
      counters[base] = k + 1
      vars_ = group.create_group(f'{base}_{k}' if k else base).create_group('vars')
      vars_.attrs['name'] = renumber(name, offset)
      for i, e in enumerate(per_layer.get(name, [])):
        vars_.create_dataset(str(i), data=weights[e['name']])
