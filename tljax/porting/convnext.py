"""torchvision and timm ConvNeXt state dicts → `tljax.models.convnext` variables, strictly.

The two libraries hold the same tensors under different names (see the
model module's docstring for the layout); the only layout changes are
torch's OIHW convs and (out, in) linears, and torchvision's layer scale,
stored (C, 1, 1) for broadcasting where timm and tljax keep (C,).
`tljax.porting.torchvision` picks up `TORCHVISION_CONVERTERS` and
`TORCHVISION_CATALOG`, `tljax.porting.timm` picks up `TIMM_CONVERTERS`;
`port_state_dict` applies either converter with the same strictness as
`tljax.porting.torchvision.port` (every missing, unexpected or mis-shaped
tensor in one `PortError`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from tljax.data.preprocess import Preprocessing
from tljax.models import convnext
from tljax.porting.catalog import WeightSpec, torchvision_entries
from tljax.porting import strict
from tljax.porting.convert import StateDictReader

Converter = Callable[[StateDictReader, str], None]


def _put(reader: StateDictReader, path: str, value: np.ndarray | None) -> None:
  if value is not None:  # absent: `reader` already lists it as missing
    reader.flat[path] = value


def _layer_norm(reader: StateDictReader, prefix: str, path: str) -> None:
  _put(reader, f'params/{path}/scale', reader.take(f'{prefix}.weight'))
  _put(reader, f'params/{path}/bias', reader.take(f'{prefix}.bias'))


def _layer_scale(reader: StateDictReader, key: str, path: str) -> None:
  """(C, 1, 1) or (C,) → (C,); any other shape is kept so the shape check names it."""
  gamma = reader.take(key)
  if gamma is not None and gamma.ndim == 3 and gamma.shape[1:] == (1, 1):
    gamma = gamma.reshape(-1)
  _put(reader, f'params/{path}/gamma', gamma)


def _block(reader: StateDictReader, dwconv: str, norm: str, fc1: str, fc2: str, gamma: str,
           path: str) -> None:
  reader.conv(dwconv, f'{path}/conv_dw', bias=True)
  _layer_norm(reader, norm, f'{path}/norm')
  reader.linear(fc1, f'{path}/fc1')
  reader.linear(fc2, f'{path}/fc2')
  _layer_scale(reader, gamma, path)


def convert_torchvision(reader: StateDictReader, arch: str) -> None:
  """torchvision keys: features.0 stem, features.{1,3,5,7} stages, features.{2,4,6}
  downsampling, classifier.0 norm and classifier.2 linear."""
  spec = convnext.SPECS[arch]
  reader.conv('features.0.0', 'backbone/stem/conv', bias=True)
  _layer_norm(reader, 'features.0.1', 'backbone/stem/norm')
  for s, depth in enumerate(spec.depths, start=1):
    if s > 1:
      down = f'features.{2 * s - 2}'
      _layer_norm(reader, f'{down}.0', f'backbone/stage{s}_down/norm')
      reader.conv(f'{down}.1', f'backbone/stage{s}_down/conv', bias=True)
    for j in range(depth):
      src = f'features.{2 * s - 1}.{j}'
      _block(reader, f'{src}.block.0', f'{src}.block.2', f'{src}.block.3', f'{src}.block.5',
             f'{src}.layer_scale', f'backbone/stage{s}_{j}')
  _layer_norm(reader, 'classifier.0', 'backbone/norm')
  reader.linear('classifier.2', 'head/logits')


def convert_timm(reader: StateDictReader, arch: str) -> None:
  """timm keys: stem.{0,1}, stages.i.downsample.{0,1} (i >= 1), stages.i.blocks.j.*, head.norm,
  head.fc."""
  spec = convnext.SPECS[arch]
  reader.conv('stem.0', 'backbone/stem/conv', bias=True)
  _layer_norm(reader, 'stem.1', 'backbone/stem/norm')
  for s, depth in enumerate(spec.depths, start=1):
    stage = f'stages.{s - 1}'
    if s > 1:
      _layer_norm(reader, f'{stage}.downsample.0', f'backbone/stage{s}_down/norm')
      reader.conv(f'{stage}.downsample.1', f'backbone/stage{s}_down/conv', bias=True)
    for j in range(depth):
      src = f'{stage}.blocks.{j}'
      _block(reader, f'{src}.conv_dw', f'{src}.norm', f'{src}.mlp.fc1', f'{src}.mlp.fc2',
             f'{src}.gamma', f'backbone/stage{s}_{j}')
  _layer_norm(reader, 'head.norm', 'backbone/norm')
  reader.linear('head.fc', 'head/logits')


TORCHVISION_CONVERTERS: dict[str, Converter] = {
    arch: convert_torchvision for arch in convnext.SPECS}
# Keyed by timm's architecture name; `port_state_dict` also takes `convnext_test` for tests.
TIMM_CONVERTERS: dict[str, Converter] = {'convnext_tiny': convert_timm}
_CONVERTERS = {'torchvision': TORCHVISION_CONVERTERS,
               'timm': {arch: convert_timm for arch in convnext.SPECS}}

# torchvision's ConvNeXt_Tiny_Weights.IMAGENET1K_V1: bilinear resize to 236, centre crop 224.
_TORCHVISION_FILES = (
    ('convnext_tiny', 'IMAGENET1K_V1', 'convnext_tiny-983f1562.pth',
     '983f1562536e84ff750a1576fb08e54de751dbf2e17c0d8a4a13704341fdcd3d',
     Preprocessing(input_size=224, resize=236)),
)
TORCHVISION_CATALOG: dict[str, WeightSpec] = torchvision_entries(
    _TORCHVISION_FILES, {'convnext_tiny': 'IMAGENET1K_V1'})


def port_state_dict(state_dict: Mapping[str, np.ndarray], arch: str, source: str) -> dict:
  """`{'params'}` for `tljax.models.create(arch, classes in the file)` from a torchvision or
  timm state dict, refusing any missing, unexpected or mis-shaped tensor."""
  if source not in _CONVERTERS:
    raise ValueError(f'unknown ConvNeXt source {source!r}; use one of {", ".join(_CONVERTERS)}')
  if arch not in _CONVERTERS[source]:
    raise ValueError(f'no {source} ConvNeXt converter for {arch!r}; known: '
                     f'{", ".join(_CONVERTERS[source])}')
  return strict.port_state_dict(state_dict, _CONVERTERS[source][arch], arch,
                                what=f'state dict (as {source} {arch})')[0]
