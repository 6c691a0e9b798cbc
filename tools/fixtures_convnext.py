"""Golden ConvNeXt parity fixtures from real torchvision and timm: `tests/fixtures/convnext/`.

Run in the reference venv from the repository root:

  .venv-ref/bin/python -m tools.fixtures_convnext [--cases=torchvision:convnext_tiny,...]

For each (source, arch): build the reference library's model, fill it with
the seeded weights of `tests/reference_weights.build(manifest, seed)`
(LayerNorm affines and layer scales randomized, so a swapped or skipped
tensor shows in the logits), run it in eval mode on seeded random inputs at
two sizes, one of them non-square and not a multiple of the network's
stride, and store manifest + seeds + logits in `<source>_<arch>.json`.
`convnext_test` is tljax's test-sized ConvNeXt built with each library's own
ConvNeXt class (depths 1,1,2,1; widths 8,16,24,32).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import timm
import torch
import torchvision
from timm.models import convnext as timm_convnext
from torch import nn
from torchvision.models import convnext as tv_convnext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import reference_weights  # noqa: E402

OUT_DIR = os.path.join(ROOT, 'tests', 'fixtures', 'convnext')
CASES = ('torchvision:convnext_tiny', 'timm:convnext_tiny', 'torchvision:convnext_test',
         'timm:convnext_test')
SIZES = {'convnext_tiny': ((224, 224), (193, 257)), 'convnext_test': ((32, 32), (45, 37))}
BATCH = 2
TEST_CLASSES = 10
TEST_DEPTHS, TEST_DIMS = (1, 1, 2, 1), (8, 16, 24, 32)


def torch_model(source: str, arch: str) -> nn.Module:
  if source == 'torchvision':
    if arch == 'convnext_test':
      widths = TEST_DIMS[1:] + (None,)
      setting = [tv_convnext.CNBlockConfig(c, out, d)
                 for c, out, d in zip(TEST_DIMS, widths, TEST_DEPTHS)]
      return tv_convnext.ConvNeXt(setting, num_classes=TEST_CLASSES)
    return torchvision.models.get_model(arch, weights=None)
  if source == 'timm':
    if arch == 'convnext_test':
      return timm_convnext.ConvNeXt(depths=TEST_DEPTHS, dims=TEST_DIMS, num_classes=TEST_CLASSES)
    return timm.create_model(arch, pretrained=False)
  raise ValueError(f'unknown source {source!r}')


def manifest_of(model: nn.Module) -> list[dict]:
  """Role of every state-dict entry from its owning module's type; fan_in from the shape."""
  owners = dict(model.named_modules())
  manifest = []
  for name, tensor in model.state_dict().items():
    module_name, _, leaf = name.rpartition('.')
    owner = owners[module_name]
    shape = list(tensor.shape)
    entry = {'name': name, 'shape': shape}
    if leaf in ('layer_scale', 'gamma'):
      entry['role'] = 'layer_scale'
    elif isinstance(owner, nn.LayerNorm):
      entry['role'] = {'weight': 'ln_scale', 'bias': 'ln_bias'}[leaf]
    elif isinstance(owner, (nn.Conv2d, nn.Linear)):
      entry['role'] = 'kernel' if leaf == 'weight' else 'bias'
      if leaf == 'weight':
        entry['fan_in'] = int(np.prod(shape[1:]))
    else:
      raise ValueError(f'{name}: no role for {type(owner).__name__}.{leaf}')
    manifest.append(entry)
  return manifest


def seeded_model(source: str, arch: str, seed: int) -> tuple[nn.Module, list[dict]]:
  """The reference model holding `reference_weights.build(manifest, seed)`, in eval mode."""
  model = torch_model(source, arch).eval()
  manifest = manifest_of(model)
  weights = reference_weights.build(manifest, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  return model, manifest


def reference_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
  """Logits of NHWC inputs `x` (the reference models take NCHW)."""
  with torch.no_grad():
    return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


def make_fixture(source: str, arch: str, seed: int) -> dict:
  model, manifest = seeded_model(source, arch, seed)
  inputs, logits = [], []
  for i, (h, w) in enumerate(SIZES[arch]):
    input_seed = seed * 100 + i
    shape = [BATCH, h, w, 3]
    y = reference_logits(model, reference_weights.random_inputs(input_seed, shape))
    inputs.append({'seed': input_seed, 'shape': shape})
    logits.append([[round(float(v), 6) for v in row] for row in y])
    print(f'{source} {arch} {h}x{w}: max|logits| = {np.abs(y).max():.4f}')
  return {'source': source, 'arch': arch, 'seed': seed, 'torch': torch.__version__,
          'library': f'{source} {(torchvision if source == "torchvision" else timm).__version__}',
          'manifest': manifest, 'inputs': inputs, 'logits': logits}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  os.makedirs(OUT_DIR, exist_ok=True)
  for case in filter(None, args.cases.split(',')):
    source, _, arch = case.partition(':')
    path = os.path.join(OUT_DIR, f'{source}_{arch}.json')
    reference_weights.save_fixture(path, **make_fixture(source, arch, args.seed))
    print(f'wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KiB)')


if __name__ == '__main__':
  main()
