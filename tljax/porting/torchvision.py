"""torchvision checkpoints → tljax variables, strictly, plus the official weight catalog.

One converter per architecture family moves every tensor of a torchvision
state dict to its Flax path through a `StateDictReader`
(`convert(reader, arch)`; ResNets here, MobileNets in
`torchvision_mobilenet`). The result is then checked against the shapes of
the tljax model itself, and every problem — missing, unexpected or
mis-shaped tensors — is reported in one `PortError`. A checkpoint whose
class count differs from `num_classes` keeps its whole trunk; only
`head/logits` is re-initialised, and the replaced leaves are logged and
returned by `port`.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Mapping

import jax
import numpy as np

from tljax.models import resnet
from tljax.porting import strict, torchvision_mobilenet
from tljax.porting.catalog import (TORCHVISION_RESIZE_232, TORCHVISION_RESIZE_256, WeightSpec,
                                   torchvision_entries)
from tljax.porting.convert import StateDictReader
from tljax.porting.pickle_reader import load_state_dict


def convert_resnet(reader: StateDictReader, arch: str) -> None:
  """torchvision ResNet keys → `tljax.models.resnet` paths (see that module's docstring)."""
  spec = resnet.SPECS[arch]
  reader.conv('conv1', 'backbone/conv1')
  reader.bn('bn1', 'backbone/bn1')
  n_convs = 3 if spec.block == 'bottleneck' else 2
  for s, size in enumerate(spec.stage_sizes):
    for b in range(size):
      src, dst = f'layer{s + 1}.{b}', f'backbone/layer{s + 1}_{b}'
      for i in range(1, n_convs + 1):
        reader.conv(f'{src}.conv{i}', f'{dst}/conv{i}')
        reader.bn(f'{src}.bn{i}', f'{dst}/bn{i}')
      if spec.has_downsample(s, b):
        reader.conv(f'{src}.downsample.0', f'{dst}/downsample_conv')
        reader.bn(f'{src}.downsample.1', f'{dst}/downsample_bn')
  reader.linear('fc', 'head/logits')


# Family modules that bring their own torchvision converters and weight files as
# `TORCHVISION_CONVERTERS: {arch: convert(reader, arch)}` and `TORCHVISION_CATALOG`.
_FAMILY_MODULES: tuple[str, ...] = ('tljax.porting.vit', 'tljax.porting.convnext')
_FAMILIES = tuple(importlib.import_module(m) for m in _FAMILY_MODULES)

CONVERTERS: dict[str, Callable[[StateDictReader, str], None]] = {
    **{arch: convert_resnet for arch in resnet.SPECS},
    **{arch: torchvision_mobilenet.convert for arch in torchvision_mobilenet.ARCHS},
    **{arch: fn for m in _FAMILIES for arch, fn in m.TORCHVISION_CONVERTERS.items()},
}
ARCHS = tuple(CONVERTERS)


def port(path_or_state_dict: str | os.PathLike | Mapping[str, np.ndarray], arch: str,
         num_classes: int = 1000, rng: jax.Array | None = None,
         allow_nonfinite: bool = False) -> tuple[dict, list[str]]:
  """Returns ({'params', 'batch_stats'} as numpy arrays, re-initialised leaf paths).

  NaN/inf in the ported weights are refused unless `allow_nonfinite=True`.
  """
  if arch not in CONVERTERS:
    raise ValueError(f'no torchvision converter for {arch!r}; known: {", ".join(ARCHS)}')
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    what = f'{os.fspath(path_or_state_dict)} (as torchvision {arch})'
    state_dict = load_state_dict(path_or_state_dict)
  else:
    what, state_dict = f'state dict (as torchvision {arch})', path_or_state_dict
  return strict.port_state_dict(state_dict, CONVERTERS[arch], arch, what=what,
                                num_classes=num_classes, rng=rng, allow_nonfinite=allow_nonfinite)


def from_torchvision(path_or_state_dict, arch: str, num_classes: int = 1000,
                     rng: jax.Array | None = None, allow_nonfinite: bool = False) -> dict:
  """`{'params', 'batch_stats'}` for `tljax.models.create(arch, num_classes)`."""
  return port(path_or_state_dict, arch, num_classes=num_classes, rng=rng,
              allow_nonfinite=allow_nonfinite)[0]



# (arch, torchvision enum member, file, full SHA-256, preprocessing). The
# filename carries the first 8 hex digits of the SHA-256, as torch.hub checks.
_RESNET_FILES = (
    ('resnet18', 'IMAGENET1K_V1', 'resnet18-f37072fd.pth',
     'f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec', TORCHVISION_RESIZE_256),
    ('resnet34', 'IMAGENET1K_V1', 'resnet34-b627a593.pth',
     'b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f', TORCHVISION_RESIZE_256),
    ('resnet50', 'IMAGENET1K_V1', 'resnet50-0676ba61.pth',
     '0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a', TORCHVISION_RESIZE_256),
    ('resnet50', 'IMAGENET1K_V2', 'resnet50-11ad3fa6.pth',
     '11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca', TORCHVISION_RESIZE_232),
)
# What a bare `--arch` means: torchvision's `DEFAULT` member.
_DEFAULT_VARIANT = {'resnet18': 'IMAGENET1K_V1', 'resnet34': 'IMAGENET1K_V1',
                    'resnet50': 'IMAGENET1K_V2'}


CATALOG: dict[str, WeightSpec] = {**torchvision_entries(_RESNET_FILES, _DEFAULT_VARIANT),
                                   **torchvision_mobilenet.CATALOG_ENTRIES,
                                   **{k: v for m in _FAMILIES for k, v in m.TORCHVISION_CATALOG.items()}}
