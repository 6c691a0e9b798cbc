"""Golden parity fixtures from real torchvision: `tests/fixtures/torchvision/<arch>.json`.

Run in the reference venv from the repository root:

  .venv-ref/bin/python -m tools.fixtures_torchvision [--archs=resnet18,resnet34,...]

For each arch: build the torchvision model, fill it with the seeded weights
of `tests/reference_weights.build(manifest, seed)` (BatchNorm statistics and
affine randomized), run it in eval mode on seeded random inputs at 224x224
and 193x257, and store manifest + seeds + logits. No weights or inputs are
stored: CI rebuilds both with numpy and ports the weights through tljax.
`resnet_tiny` is tljax's test-sized ResNet, assembled here from torchvision's
own `BasicBlock` so it too is checked against torchvision code.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import reference_weights  # noqa: E402

OUT_DIR = os.path.join(ROOT, 'tests', 'fixtures', 'torchvision')
DEFAULT_ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet_tiny')
SIZES = ((224, 224), (193, 257))
BATCH = 2
TINY_CLASSES = 10


class TinyResNet(nn.Module):
  """tljax's `resnet_tiny` (stem 8, stages (1, 1) of widths (8, 16)) from torchvision parts."""

  def __init__(self, num_classes: int = TINY_CLASSES):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(8)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = nn.Sequential(tv_resnet.BasicBlock(8, 8))
    down = nn.Sequential(tv_resnet.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    self.layer2 = nn.Sequential(tv_resnet.BasicBlock(8, 16, 2, downsample=down))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(16, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.avgpool(self.layer2(self.layer1(x)))
    return self.fc(torch.flatten(x, 1))


def torch_model(arch: str) -> nn.Module:
  if arch == 'resnet_tiny':
    return TinyResNet()
  return torchvision.models.get_model(arch, weights=None)


def manifest_of(model: nn.Module) -> list[dict]:
  """Role of every state-dict entry from its owning module's type; fan_in from the shape."""
  owners = dict(model.named_modules())
  manifest = []
  for name, tensor in model.state_dict().items():
    module_name, _, leaf = name.rpartition('.')
    owner = owners[module_name]
    shape = list(tensor.shape)
    entry = {'name': name, 'shape': shape}
    if leaf == 'num_batches_tracked':
      entry['role'] = 'int'
    elif isinstance(owner, nn.modules.batchnorm._BatchNorm):
      entry['role'] = {'weight': 'bn_scale', 'bias': 'bn_bias', 'running_mean': 'bn_mean',
                       'running_var': 'bn_var'}[leaf]
    elif isinstance(owner, (nn.Conv2d, nn.Linear)):
      entry['role'] = 'kernel' if leaf == 'weight' else 'bias'
      if leaf == 'weight':
        entry['fan_in'] = int(np.prod(shape[1:]))
    else:
      raise ValueError(f'{name}: no role for {type(owner).__name__}.{leaf}')
    manifest.append(entry)
  return manifest


def seeded_model(arch: str, seed: int) -> tuple[nn.Module, list[dict]]:
  """The torch model holding `reference_weights.build(manifest, seed)`, in eval mode."""
  model = torch_model(arch).eval()
  manifest = manifest_of(model)
  weights = reference_weights.build(manifest, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  return model, manifest


def make_fixture(arch: str, seed: int) -> dict:
  model, manifest = seeded_model(arch, seed)
  sizes = ((32, 32), (29, 37)) if arch == 'resnet_tiny' else SIZES
  inputs, logits = [], []
  for i, (h, w) in enumerate(sizes):
    input_seed = seed * 100 + i
    shape = [BATCH, h, w, 3]
    x = reference_weights.random_inputs(input_seed, shape)
    with torch.no_grad():
      y = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    inputs.append({'seed': input_seed, 'shape': shape})
    logits.append([[round(float(v), 6) for v in row] for row in y])
    print(f'{arch} {h}x{w}: max|logits| = {np.abs(y).max():.4f}')
  return {'arch': arch, 'seed': seed, 'torch': torch.__version__,
          'torchvision': torchvision.__version__, 'manifest': manifest, 'inputs': inputs,
          'logits': logits}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--archs', default=','.join(DEFAULT_ARCHS))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  os.makedirs(OUT_DIR, exist_ok=True)
  for arch in filter(None, args.archs.split(',')):
    path = os.path.join(OUT_DIR, f'{arch}.json')
    reference_weights.save_fixture(path, **make_fixture(arch, args.seed))
    print(f'wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KiB)')


if __name__ == '__main__':
  main()
