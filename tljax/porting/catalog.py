"""Known official weight files: where they live, their checksum, their preprocessing.

Each source module (`tljax.porting.torchvision`, `.keras`, `.efficientnet_lite`, `.timm`)
owns a `CATALOG: dict[str, WeightSpec]`; this module only looks them up, so a
source's facts stay next to the code that converts its files.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from tljax.data.preprocess import Preprocessing

SOURCES = ('torchvision', 'keras', 'efficientnet_lite', 'timm')


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  source: str
  arch: str
  url: str
  filename: str
  sha256: str | None
  preprocessing: Preprocessing
  num_classes: int = 1000
  labels: str = 'imagenet1k'
  arch_kw: dict[str, Any] = dataclasses.field(default_factory=dict)
  variant: str = ''

  @property
  def key(self) -> str:
    return f'{self.arch}{":" + self.variant if self.variant else ""}'


def source_module(source: str):
  if source not in SOURCES:
    raise ValueError(f'unknown weights source {source!r}; choose one of {", ".join(SOURCES)}')
  return importlib.import_module(f'tljax.porting.{source}')


def lookup(source: str, arch: str, variant: str = '') -> WeightSpec:
  catalog = source_module(source).CATALOG
  key = f'{arch}{":" + variant if variant else ""}'
  if key not in catalog:
    raise ValueError(f'no {source} weights for {key!r}; known: {", ".join(sorted(catalog))}')
  return catalog[key]


TORCHVISION_URL = 'https://download.pytorch.org/models/'
# torchvision's `ImageClassification` eval preset (bilinear resize of the shorter side, centre
# crop 224, ImageNet mean/std); weights trained with the newer (V2) recipe resize to 232.
TORCHVISION_RESIZE_256 = Preprocessing(input_size=224, resize=256)
TORCHVISION_RESIZE_232 = Preprocessing(input_size=224, resize=232)


def torchvision_entries(files, defaults: dict[str, str]) -> dict[str, WeightSpec]:
  """Catalog entries for torchvision files given as (arch, enum member, filename, sha256,
  preprocessing): `arch:MEMBER` for every file, plus bare `arch` for torchvision's DEFAULT."""
  entries = {}
  for arch, variant, filename, sha256, preprocessing in files:
    make = lambda v: WeightSpec(source='torchvision', arch=arch, url=TORCHVISION_URL + filename,
                                filename=filename, sha256=sha256, preprocessing=preprocessing,
                                variant=v)
    entries[f'{arch}:{variant}'] = make(variant)
    if defaults[arch] == variant:
      entries[arch] = make('')
  return entries
