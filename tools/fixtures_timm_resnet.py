"""Golden parity fixtures from real timm ResNets: `tests/fixtures/timm/<arch>.json`.

Run in the reference venv from the repository root:

  .venv-ref/bin/python -m tools.fixtures_timm_resnet [--archs=resnet18,resnet34,resnet50]

For each arch: `timm.create_model(arch, pretrained=False)` filled with the
seeded weights of `tests/reference_weights.build(manifest, seed)` (BatchNorm
statistics and affine randomized), logits in eval mode on seeded random
inputs at 224x224 and 193x257. Before writing, the same weights are loaded
into torchvision's model of that name and its logits must agree (timm's
ResNets keep torchvision's keys and layout; tljax ports both with one
converter, so this is checked, not assumed).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import timm
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import reference_weights  # noqa: E402
from tools.fixtures_torchvision import manifest_of  # noqa: E402

OUT_DIR = os.path.join(ROOT, 'tests', 'fixtures', 'timm')
DEFAULT_ARCHS = ('resnet18', 'resnet34', 'resnet50')
SIZES = ((224, 224), (193, 257))
BATCH = 2


def seeded_model(arch: str, seed: int) -> tuple[torch.nn.Module, list[dict], dict]:
  """timm's `arch` holding `reference_weights.build(manifest, seed)`, in eval mode."""
  model = timm.create_model(arch, pretrained=False).eval()
  manifest = manifest_of(model)
  weights = reference_weights.build(manifest, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  return model, manifest, weights


def logits_of(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


def make_fixture(arch: str, seed: int) -> dict:
  model, manifest, weights = seeded_model(arch, seed)
  tv_model = torchvision.models.get_model(arch, weights=None).eval()
  tv_model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  inputs, logits = [], []
  for i, (h, w) in enumerate(SIZES):
    input_seed = seed * 100 + i
    shape = [BATCH, h, w, 3]
    x = reference_weights.random_inputs(input_seed, shape)
    y, y_tv = logits_of(model, x), logits_of(tv_model, x)
    gap = float(np.abs(y - y_tv).max())
    print(f'{arch} {h}x{w}: max|logits| = {np.abs(y).max():.4f}, |timm - torchvision| = {gap:.3g}')
    assert gap <= 1e-5 * max(1.0, float(np.abs(y).max())), f'{arch}: timm != torchvision'
    inputs.append({'seed': input_seed, 'shape': shape})
    logits.append([[round(float(v), 6) for v in row] for row in y])
  return {'arch': arch, 'seed': seed, 'torch': torch.__version__, 'timm': timm.__version__,
          'manifest': manifest, 'inputs': inputs, 'logits': logits}


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
