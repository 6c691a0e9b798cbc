"""Model registry: `create(name, num_classes, **kw)` → `Classifier(backbone, head)`.

Families are imported lazily so that asking for a ResNet never pays for
building InceptionV3's module tree, and so each family lives in one file.
Each family module exposes `build(name, dtype=..., **arch_kw)` returning
`(backbone_module, head_defaults: dict)` and a dict `INPUT_SIZES`.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp

from tljax.models.layers import Classifier, Head

_FAMILIES = {
    'resnet': ('resnet18', 'resnet34', 'resnet50', 'resnet_tiny'),
    'mobilenet': ('mobilenet_v2', 'mobilenet_v3_small', 'mobilenet_v3_large', 'mobilenet_tiny'),
    'simple_cnn': ('simple_cnn', 'simple_cnn_tiny'),
    'inception': ('inception_v3',),
    'mobilenet_keras': ('mobilenet_v1', 'mobilenet_v2_keras'),
    'efficientnet_lite': tuple(f'efficientnet_lite{i}' for i in range(5)) + ('efficientnet_lite_tiny',),
    'efficientnet': ('efficientnet_b0', 'efficientnet_tiny'),
    'vit': ('vit_s_16', 'vit_b_16', 'vit_tiny'),
    'convnext': ('convnext_tiny', 'convnext_test'),
}
# timm's names for the same networks: name → (tljax name, architecture keywords). The keywords
# carry where timm's network differs from tljax's default (timm's BatchNorm: eps 1e-5, torch
# momentum 0.1 = Flax 0.9). timm's resnet18/34/50, efficientnet_b0 and convnext_tiny already share
# tljax's names.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    'mobilenetv3_large_100': ('mobilenet_v3_large', {'bn_eps': 1e-5, 'bn_momentum': 0.9}),
    'vit_small_patch16_224': ('vit_s_16', {}),
    'vit_base_patch16_224': ('vit_b_16', {}),
}
_NAME_TO_FAMILY = {name: fam for fam, names in _FAMILIES.items() for name in names}
NAMES = tuple(_NAME_TO_FAMILY) + tuple(ALIASES)


def resolve(name: str) -> tuple[str, dict[str, Any]]:
  """(tljax name, architecture keywords) for a tljax or timm model name."""
  if name in ALIASES:
    return ALIASES[name][0], dict(ALIASES[name][1])
  return name, {}


def _family(name: str):
  name = resolve(name)[0]
  if name not in _NAME_TO_FAMILY:
    raise ValueError(f'Unknown model {name!r}. Known models: {", ".join(NAMES)}.')
  return importlib.import_module(f'tljax.models.{_NAME_TO_FAMILY[name]}')


def create(name: str, num_classes: int, *, dtype: Any = jnp.float32,
           head: dict | None = None, **arch_kw) -> Classifier:
  """Builds `name` with a `num_classes`-way head.

  `head` overrides the family's default head (e.g. `pool='flatten'`,
  `hidden=(1024,)`, `dropout=0.2`); `arch_kw` go to the backbone (e.g.
  `alpha=0.5`, `cut='mixed7'`). `dtype` is the compute dtype; parameters stay
  float32.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  family = _family(name)
  name, alias_kw = resolve(name)
  backbone, head_defaults = family.build(name, dtype=dtype, **{**alias_kw, **arch_kw})
  unknown = set(head or {}) - {'pool', 'hidden', 'activation', 'dropout'}
  if unknown:
    raise ValueError(f'Unknown head options {sorted(unknown)}; '
                     "use pool, hidden, activation, dropout.")
  head_kw = {**head_defaults, **(head or {})}
  head_kw['hidden'] = tuple(head_kw.get('hidden', ()))
  return Classifier(backbone=backbone, head=Head(num_classes=num_classes, dtype=dtype, **head_kw))


def input_size(name: str, **arch_kw) -> int:
  """Default square input resolution the model was designed (or ported) for.

  A ViT built with `img_size=S` (its position-embedding grid) was made for S.
  """
  if arch_kw.get('img_size'):
    return int(arch_kw['img_size'])
  sizes = _family(name).INPUT_SIZES
  name = resolve(name)[0]
  return sizes[name] if name in sizes else sizes['default']
