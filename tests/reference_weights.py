"""Seeded random weights that both a reference library and tljax can rebuild.

Golden parity fixtures store only a manifest (names, shapes, roles) and a
seed; the committed generator loads these arrays into the real reference
model (torchvision, Keras, efficientnet-lite-pytorch) to produce reference
logits, and CI rebuilds the very same arrays with numpy alone to port them.
BatchNorm statistics and affine parameters are randomized on purpose:
default init (mean 0, var 1, scale 1, bias 0) hides BN mapping bugs.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

ROLES = ('kernel', 'bias', 'bn_scale', 'bn_bias', 'bn_mean', 'bn_var', 'int', 'ln_scale', 'ln_bias',
         'embedding', 'layer_scale')


def random_array(rng: np.random.Generator, shape: Sequence[int], role: str,
                 fan_in: int | None = None) -> np.ndarray:
  shape = tuple(int(s) for s in shape)
  if role == 'kernel':
    if not fan_in:
      raise ValueError('kernel role needs fan_in')
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  if role in ('bias', 'bn_bias', 'bn_mean', 'ln_bias'):
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)
  if role in ('bn_scale', 'bn_var', 'ln_scale', 'layer_scale'):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if role == 'embedding':
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)
  if role == 'int':
    return np.zeros(shape, np.int64)
  raise ValueError(f'unknown role {role!r}; expected one of {ROLES}')


def build(manifest: list[dict], seed: int) -> dict[str, np.ndarray]:
  """manifest: [{'name', 'shape', 'role', 'fan_in'?}, ...] in a fixed order."""
  rng = np.random.default_rng(seed)
  return {e['name']: random_array(rng, e['shape'], e['role'], e.get('fan_in')) for e in manifest}


def random_inputs(seed: int, shape: Sequence[int]) -> np.ndarray:
  """Model inputs (already normalized), NHWC float32."""
  return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def save_fixture(path: str, **content) -> None:
  with open(path, 'w') as f:
    json.dump(content, f)


def load_fixture(path: str) -> dict:
  with open(path) as f:
    return json.load(f)
