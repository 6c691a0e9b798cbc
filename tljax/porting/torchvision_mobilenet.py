"""torchvision MobileNetV2 / V3 state dicts → tljax `mobilenet` variables.

`tljax.porting.torchvision.from_torchvision` dispatches the MobileNet archs
here. The walk follows the same `ArchSpec` the model is built from, so the
key layout can never drift from the module tree: V2 blocks keep their layers
in `features.<i>.conv` (the project conv and its BN are two separate
entries), V3 blocks in `features.<i>.block` (project is one conv+BN pair,
squeeze-excite sits between depthwise and project). The module docstring of
`tljax.models.mobilenet` lists the full name mapping.
"""

from __future__ import annotations

from tljax.models.mobilenet import arch_spec
from tljax.porting.catalog import (TORCHVISION_RESIZE_232, TORCHVISION_RESIZE_256, WeightSpec,
                                   torchvision_entries)
from tljax.porting.convert import StateDictReader

ARCHS = ('mobilenet_v2', 'mobilenet_v3_small', 'mobilenet_v3_large', 'mobilenet_tiny')


def convert(reader: StateDictReader, arch: str, width_mult: float = 1.0) -> None:
  """Moves every tensor of a torchvision MobileNet into `reader.flat` (Flax paths)."""
  if arch not in ARCHS:
    raise ValueError(f'{arch!r} is not a MobileNet; expected one of {", ".join(ARCHS)}')
  spec = arch_spec(arch, width_mult)
  v2 = spec.family == 'v2'

  def conv_bn(torch_prefix: str, flax_path: str):
    reader.conv(f'{torch_prefix}.0', f'{flax_path}/conv')
    reader.bn(f'{torch_prefix}.1', f'{flax_path}/bn')

  conv_bn('features.0', 'backbone/features_0')
  for i, block in enumerate(spec.blocks, start=1):
    seq, path = f'features.{i}.{"conv" if v2 else "block"}', f'backbone/features_{i}'
    j = 0
    if block.expanded != block.inp:
      conv_bn(f'{seq}.{j}', f'{path}/expand')
      j += 1
    conv_bn(f'{seq}.{j}', f'{path}/depthwise')
    j += 1
    if block.se:
      reader.conv(f'{seq}.{j}.fc1', f'{path}/se/fc1', bias=True)
      reader.conv(f'{seq}.{j}.fc2', f'{path}/se/fc2', bias=True)
      j += 1
    if v2:
      reader.conv(f'{seq}.{j}', f'{path}/project/conv')
      reader.bn(f'{seq}.{j + 1}', f'{path}/project/bn')
    else:
      conv_bn(f'{seq}.{j}', f'{path}/project')
  last = len(spec.blocks) + 1
  conv_bn(f'features.{last}', f'backbone/features_{last}')
  if v2:
    reader.linear('classifier.1', 'head/logits')
  else:
    reader.linear('classifier.0', 'head/hidden0')
    reader.linear('classifier.3', 'head/logits')



# Keys: the arch alone is torchvision's DEFAULT weights; `arch:IMAGENET1K_Vn`
# names every official file explicitly (torchvision's enum member names).
# The first 8 hex digits of each SHA-256 are the hash in torchvision's filename.
_FILES = (
    ('mobilenet_v2', 'IMAGENET1K_V1', 'mobilenet_v2-b0353104.pth',
     'b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889', TORCHVISION_RESIZE_256),
    ('mobilenet_v2', 'IMAGENET1K_V2', 'mobilenet_v2-7ebf99e0.pth',
     '7ebf99e03e254b273379b23edca7ec0da9f48273b23a332b93c1c99d49e86e8f', TORCHVISION_RESIZE_232),
    ('mobilenet_v3_large', 'IMAGENET1K_V1', 'mobilenet_v3_large-8738ca79.pth',
     '8738ca797c879b547d18bbd15da5736ff2557b2036a9af72225393ca61759a04', TORCHVISION_RESIZE_256),
    ('mobilenet_v3_large', 'IMAGENET1K_V2', 'mobilenet_v3_large-5c1a4163.pth',
     '5c1a416349c4cf298f2a6a5e2600ed0ee55e604713578f5e74e6bc8bcaef7997', TORCHVISION_RESIZE_232),
    ('mobilenet_v3_small', 'IMAGENET1K_V1', 'mobilenet_v3_small-047dcff4.pth',
     '047dcff4addef86ea5bc2eff13c9614dc11f47ab1160d0a71a25e7db994f4e1f', TORCHVISION_RESIZE_256),
)
_DEFAULT = {'mobilenet_v2': 'IMAGENET1K_V2', 'mobilenet_v3_large': 'IMAGENET1K_V2',
            'mobilenet_v3_small': 'IMAGENET1K_V1'}


CATALOG_ENTRIES: dict[str, WeightSpec] = torchvision_entries(_FILES, _DEFAULT)
