"""timm CNN state dicts → tljax variables: ResNet, MobileNetV3-Large and EfficientNet-B0.

`TIMM_CONVERTERS[timm_arch](reader, arch)` moves every tensor of a timm
state dict into `reader.flat` (Flax paths); `tljax.porting.timm` reads the
file and its preprocessing config around them. What each family needs:

* ResNet: timm uses torchvision's key names and layout, so it shares
  `tljax.porting.torchvision.convert_resnet`.
* `mobilenetv3_large_100`: torchvision's MobileNetV3-Large network (same
  blocks, widths, SE rounding, activations and padding; only BatchNorm eps
  differs, which the model alias carries) under timm's names. timm's head
  is a 1×1 `conv_head` with bias on the pooled features, i.e. the Dense
  `head/hidden0`.

    conv_stem, bn1               features_0/{conv,bn}
    blocks.0.0 (separable)       features_1: conv_dw,bn1 → depthwise; conv_pw,bn2 → project
    blocks.<s>.<j> (inverted)    features_<i>: conv_pw,bn1 → expand; conv_dw,bn2 → depthwise;
                                 se.conv_{reduce,expand} → se/{fc1,fc2}; conv_pwl,bn3 → project
    blocks.6.0.{conv,bn1}        features_16/{conv,bn}
    conv_head, classifier        head/hidden0, head/logits

* `efficientnet_b0`: `tljax.models.efficientnet` names its modules after
  timm's keys (blocks.<s>.<j> → blocks<s>_<j>), so the walk is a rename.

`port_state_dict` converts and checks a state dict against the tljax
model's own shapes, reporting every missing, unexpected or mis-shaped
tensor in one `PortError`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from tljax import models
from tljax.models import efficientnet, mobilenet
from tljax.porting import strict
from tljax.porting.convert import StateDictReader, linear_kernel
from tljax.porting.merge import PortError
from tljax.porting.torchvision import convert_resnet

# Blocks per stage of timm's mobilenetv3_large_100 before its final 1×1 ConvBnAct stage.
_MNV3_LARGE_STAGES = (1, 2, 3, 4, 2, 3)


def convert_mobilenetv3(reader: StateDictReader, arch: str) -> None:
  """timm `mobilenetv3_large_100` keys → `tljax.models.mobilenet` paths (module docstring)."""
  spec = mobilenet.arch_spec(models.resolve(arch)[0])
  if sum(_MNV3_LARGE_STAGES) != len(spec.blocks):
    raise ValueError(f'{arch}: no timm stage layout for {len(spec.blocks)} blocks')

  def conv_bn(conv: str, bn: str, flax_path: str):
    reader.conv(conv, f'{flax_path}/conv')
    reader.bn(bn, f'{flax_path}/bn')

  conv_bn('conv_stem', 'bn1', 'backbone/features_0')
  stage_of = [(s, j) for s, n in enumerate(_MNV3_LARGE_STAGES) for j in range(n)]
  for i, (block, (s, j)) in enumerate(zip(spec.blocks, stage_of), start=1):
    src, dst = f'blocks.{s}.{j}', f'backbone/features_{i}'
    if block.expanded == block.inp:
      conv_bn(f'{src}.conv_dw', f'{src}.bn1', f'{dst}/depthwise')
      project = (f'{src}.conv_pw', f'{src}.bn2')
    else:
      conv_bn(f'{src}.conv_pw', f'{src}.bn1', f'{dst}/expand')
      conv_bn(f'{src}.conv_dw', f'{src}.bn2', f'{dst}/depthwise')
      project = (f'{src}.conv_pwl', f'{src}.bn3')
    if block.se:
      reader.conv(f'{src}.se.conv_reduce', f'{dst}/se/fc1', bias=True)
      reader.conv(f'{src}.se.conv_expand', f'{dst}/se/fc2', bias=True)
    conv_bn(*project, f'{dst}/project')
  last = len(spec.blocks) + 1
  conv_bn(f'blocks.{len(_MNV3_LARGE_STAGES)}.0.conv', f'blocks.{len(_MNV3_LARGE_STAGES)}.0.bn1',
          f'backbone/features_{last}')
  w = reader.take('conv_head.weight')
  if w is not None:
    if w.ndim != 4 or w.shape[2:] != (1, 1):
      raise PortError(f'conv_head.weight: expected a 1x1 conv weight, got shape {w.shape}')
    reader.flat['params/head/hidden0/kernel'] = linear_kernel(w[:, :, 0, 0])
  b = reader.take('conv_head.bias')
  if b is not None:
    reader.flat['params/head/hidden0/bias'] = b
  reader.linear('classifier', 'head/logits')


def convert_efficientnet(reader: StateDictReader, arch: str) -> None:
  """timm EfficientNet keys → `tljax.models.efficientnet` paths (the same names)."""
  facts = efficientnet.arch_facts(models.resolve(arch)[0])
  reader.conv('conv_stem', 'backbone/conv_stem')
  reader.bn('bn1', 'backbone/bn1')
  for s, stage in enumerate(facts['stages']):
    for j, block in enumerate(stage):
      src, dst = f'blocks.{s}.{j}', f'backbone/blocks{s}_{j}'
      layers = ((('conv_dw', 'bn1'), ('conv_pw', 'bn2')) if block.separable else
                (('conv_pw', 'bn1'), ('conv_dw', 'bn2'), ('conv_pwl', 'bn3')))
      for conv, bn in layers:
        reader.conv(f'{src}.{conv}', f'{dst}/{conv}')
        reader.bn(f'{src}.{bn}', f'{dst}/{bn}')
      for conv in ('conv_reduce', 'conv_expand'):
        reader.conv(f'{src}.se.{conv}', f'{dst}/se/{conv}', bias=True)
  reader.conv('conv_head', 'backbone/conv_head')
  reader.bn('bn2', 'backbone/bn2')
  reader.linear('classifier', 'head/logits')


TIMM_CONVERTERS: dict[str, Callable[[StateDictReader, str], None]] = {
    **{arch: convert_resnet for arch in ('resnet18', 'resnet34', 'resnet50')},
    'mobilenetv3_large_100': convert_mobilenetv3,
    'efficientnet_b0': convert_efficientnet,
}
# Test-sized networks built by timm's own builders (tools/fixtures_timm_cnn.py), ported alike.
_TEST_CONVERTERS = {'efficientnet_tiny': convert_efficientnet}


def port_state_dict(state_dict: Mapping[str, np.ndarray], arch: str) -> dict:
  """{'params', 'batch_stats'} (numpy) for `models.create(arch, classes in the state dict)`.

  Names and shapes are both checked: a file for another scaling can line up
  by name alone, so every mis-shaped tensor joins the missing and unexpected
  ones in the single `PortError`.
  """
  converters = {**TIMM_CONVERTERS, **_TEST_CONVERTERS}
  if arch not in converters:
    raise ValueError(f'no timm converter for {arch!r}; known: {", ".join(converters)}')
  return strict.port_state_dict(state_dict, converters[arch], arch,
                                what=f'state dict (as timm {arch})')[0]
