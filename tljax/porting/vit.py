"""timm and torchvision ViT checkpoints → `tljax.models.vit` variables, strictly.

Both libraries store the same network under different names; torchvision's
`nn.MultiheadAttention` keeps q, k, v in one `in_proj_weight` [3C, C] just
as timm's `attn.qkv.weight`, so both become `attn/qkv` unchanged (only
transposed). Converters take every tensor through a `StateDictReader`, so a
missing, unexpected or mis-shaped tensor ends in one `PortError` listing all
of them (`port_state_dict` adds the shape check against the tljax model).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from tljax import models
from tljax.models import vit
from tljax.porting.catalog import TORCHVISION_RESIZE_256, torchvision_entries
from tljax.porting import strict
from tljax.porting.convert import StateDictReader, linear_kernel

TIMM_ARCHS = ('vit_small_patch16_224', 'vit_base_patch16_224')


def _layer_norm(reader: StateDictReader, prefix: str, path: str) -> None:
  reader._put(f'params/{path}/scale', reader.take(f'{prefix}.weight'))
  reader._put(f'params/{path}/bias', reader.take(f'{prefix}.bias'))


def _param(reader: StateDictReader, key: str, path: str) -> None:
  reader._put(f'params/{path}', reader.take(key))


def _has(reader: StateDictReader, key: str) -> bool:
  return key in reader._sd


def _depth(arch: str) -> int:
  return vit.SPECS[models.resolve(arch)[0]].depth


def _linear_weight(reader: StateDictReader, key: str, path: str) -> None:
  w = reader.take(key)
  reader._put(f'params/{path}', None if w is None else linear_kernel(w))


def convert_timm(reader: StateDictReader, arch: str) -> None:
  """timm `VisionTransformer` keys → tljax paths; `fc_norm` (global_pool='avg') or `norm`."""
  reader.conv('patch_embed.proj', 'backbone/embed/proj', bias=True)
  _param(reader, 'cls_token', 'backbone/embed/cls_token')
  _param(reader, 'pos_embed', 'backbone/embed/pos_embed')
  for i in range(_depth(arch)):
    src, dst = f'blocks.{i}', f'backbone/block_{i}'
    _layer_norm(reader, f'{src}.norm1', f'{dst}/norm1')
    reader.linear(f'{src}.attn.qkv', f'{dst}/attn/qkv')
    reader.linear(f'{src}.attn.proj', f'{dst}/attn/proj')
    _layer_norm(reader, f'{src}.norm2', f'{dst}/norm2')
    reader.linear(f'{src}.mlp.fc1', f'{dst}/mlp/fc1')
    reader.linear(f'{src}.mlp.fc2', f'{dst}/mlp/fc2')
  norm = 'fc_norm' if _has(reader, 'fc_norm.weight') else 'norm'
  _layer_norm(reader, norm, f'backbone/{norm}')
  reader.linear('head', 'head/logits')


def convert_torchvision(reader: StateDictReader, arch: str) -> None:
  """torchvision `VisionTransformer` keys → tljax paths (see `tljax.models.vit`)."""
  reader.conv('conv_proj', 'backbone/embed/proj', bias=True)
  _param(reader, 'class_token', 'backbone/embed/cls_token')
  _param(reader, 'encoder.pos_embedding', 'backbone/embed/pos_embed')
  for i in range(_depth(arch)):
    src, dst = f'encoder.layers.encoder_layer_{i}', f'backbone/block_{i}'
    _layer_norm(reader, f'{src}.ln_1', f'{dst}/norm1')
    _linear_weight(reader, f'{src}.self_attention.in_proj_weight', f'{dst}/attn/qkv/kernel')
    _param(reader, f'{src}.self_attention.in_proj_bias', f'{dst}/attn/qkv/bias')
    reader.linear(f'{src}.self_attention.out_proj', f'{dst}/attn/proj')
    _layer_norm(reader, f'{src}.ln_2', f'{dst}/norm2')
    reader.linear(f'{src}.mlp.0', f'{dst}/mlp/fc1')
    reader.linear(f'{src}.mlp.3', f'{dst}/mlp/fc2')
  _layer_norm(reader, 'encoder.ln', 'backbone/norm')
  reader.linear('heads.head', 'head/logits')


TORCHVISION_CONVERTERS: dict[str, Callable[[StateDictReader, str], None]] = {
    'vit_b_16': convert_torchvision}
TIMM_CONVERTERS: dict[str, Callable[[StateDictReader, str], None]] = {
    arch: convert_timm for arch in TIMM_ARCHS}
_CONVERTERS = {'timm': {**TIMM_CONVERTERS, 'vit_tiny': convert_timm},
               'torchvision': {**TORCHVISION_CONVERTERS, 'vit_tiny': convert_torchvision}}

# torchvision's IMAGENET1K_V1 (its DEFAULT): `ImageClassification(crop_size=224)`, i.e. resize
# the shorter side to 256, centre-crop 224, ImageNet mean/std.
_TORCHVISION_FILES = (
    ('vit_b_16', 'IMAGENET1K_V1', 'vit_b_16-c867db91.pth',
     'c867db91d3e12c6cbadabb610d73c24a546bf82d8c03a9fea34f43a712ddb0e9', TORCHVISION_RESIZE_256),
)
TORCHVISION_CATALOG = torchvision_entries(_TORCHVISION_FILES, {'vit_b_16': 'IMAGENET1K_V1'})


def port_state_dict(state_dict: Mapping[str, np.ndarray], arch: str, source: str,
                    **arch_kw: Any) -> dict:
  """`{'params'}` for `models.create(arch, <checkpoint's classes>, **arch_kw)`.

  `arch` is a tljax or timm name; `source` 'timm' or 'torchvision' picks the
  key layout. `arch_kw` must describe the checkpoint (e.g. `pool='avg'` for
  timm's `global_pool='avg'`, `img_size` for its position-embedding grid).
  """
  if source not in _CONVERTERS:
    raise ValueError(f"source must be 'timm' or 'torchvision', got {source!r}")
  if arch not in _CONVERTERS[source]:
    raise ValueError(f'no {source} ViT converter for {arch!r}; known: '
                     f'{", ".join(_CONVERTERS[source])}')
  return strict.port_state_dict(state_dict, _CONVERTERS[source][arch], arch,
                                what=f'state dict (as {source} {arch})', arch_kw=arch_kw)[0]
