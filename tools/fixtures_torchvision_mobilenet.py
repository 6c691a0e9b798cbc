"""Golden parity fixtures for the torchvision MobileNets, produced by torchvision itself.

Run in the reference venv from the repository root:

  .venv-ref/bin/python -m tools.fixtures_torchvision_mobilenet [--archs=mobilenet_v2,...]

Same recipe and file format as `tools.fixtures_torchvision` (whose manifest
roles this reuses): the real torchvision model filled with
`tests/reference_weights.build(manifest, seed)`, eval mode, seeded random
inputs at 224x224 and 193x257, `tests/fixtures/torchvision/<arch>.json`
holding manifest + seeds + logits only. `mobilenet_tiny` is torchvision's
own `MobileNetV3` class given tljax's tiny block table.

One deliberate difference: the 1x1 projection conv that closes each
inverted-residual block has no activation after it, so its kernel is drawn
with the variance-preserving std sqrt(1/fan_in) (manifest `fan_in` doubled,
marked `init: 'linear'`) instead of He's sqrt(2/fan_in). With He everywhere
and BatchNorm statistics that are random rather than calibrated, activations
grow ~500x through MobileNetV3-Large and the network turns chaotic:
torchvision's own float32 logits then differ from its float64 logits by up
to 1.1e-4 of max|logits|, more than the parity tolerance, so such a fixture
could not tell a port bug from rounding. With this choice the gap is ~1e-6.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torchvision
from torchvision.models import mobilenetv2, mobilenetv3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import reference_weights  # noqa: E402
from tljax.models.mobilenet import arch_spec  # noqa: E402
from tools.fixtures_torchvision import BATCH, OUT_DIR, manifest_of  # noqa: E402

ARCHS = ('mobilenet_v2', 'mobilenet_v3_small', 'mobilenet_v3_large', 'mobilenet_tiny')
SIZES = {'default': ((224, 224), (193, 257)), 'mobilenet_tiny': ((64, 64), (37, 53))}
TINY_CLASSES = 10


def tiny_torch_model() -> torch.nn.Module:
  """torchvision's `MobileNetV3` with the `mobilenet_tiny` block table and a 10-class head."""
  spec = arch_spec('mobilenet_tiny')
  acts = {'relu': 'RE', 'hard_swish': 'HS'}
  setting = [mobilenetv3.InvertedResidualConfig(b.inp, b.kernel, b.expanded, b.out, b.se,
                                                acts[b.act], b.stride, 1, 1.0)
             for b in spec.blocks]
  return mobilenetv3.MobileNetV3(setting, last_channel=spec.head['hidden'][0],
                                 num_classes=TINY_CLASSES)


def torch_model(arch: str) -> torch.nn.Module:
  if arch == 'mobilenet_tiny':
    return tiny_torch_model()
  return torchvision.models.get_model(arch, weights=None)


def projection_kernels(model: torch.nn.Module) -> set[str]:
  """Weight names of the last conv of every inverted-residual block (the linear bottleneck)."""
  names = set()
  for block_name, block in model.named_modules():
    if isinstance(block, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)):
      convs = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Conv2d)]
      names.add(f'{block_name}.{convs[-1]}.weight')
  return names


def seeded_model(arch: str, seed: int) -> tuple[torch.nn.Module, list[dict]]:
  """The torch model holding `reference_weights.build(manifest, seed)`, in eval mode."""
  model = torch_model(arch).eval()
  manifest, linear = manifest_of(model), projection_kernels(model)
  for entry in manifest:
    if entry['name'] in linear:
      entry.update(fan_in=2 * entry['fan_in'], init='linear')
  weights = reference_weights.build(manifest, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  return model, manifest


def make_fixture(arch: str, seed: int) -> dict:
  model, manifest = seeded_model(arch, seed)
  inputs, logits = [], []
  for i, (h, w) in enumerate(SIZES.get(arch, SIZES['default'])):
    input_seed = seed * 100 + i
    shape = [BATCH, h, w, 3]
    x = reference_weights.random_inputs(input_seed, shape)
    with torch.no_grad():
      y = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    inputs.append({'seed': input_seed, 'shape': shape})
    logits.append([[round(float(v), 7) for v in row] for row in y])
    print(f'{arch} {h}x{w}: max|logits| = {np.abs(y).max():.4f}')
  return {'arch': arch, 'seed': seed, 'torch': torch.__version__,
          'torchvision': torchvision.__version__, 'manifest': manifest, 'inputs': inputs,
          'logits': logits}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--archs', default=','.join(ARCHS))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  torch.set_num_threads(2)
  os.makedirs(OUT_DIR, exist_ok=True)
  for arch in filter(None, args.archs.split(',')):
    if arch not in ARCHS:
      raise SystemExit(f'unknown arch {arch!r}; choose from {", ".join(ARCHS)}')
    path = os.path.join(OUT_DIR, f'{arch}.json')
    reference_weights.save_fixture(path, **make_fixture(arch, args.seed))
    print(f'wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KiB)')


if __name__ == '__main__':
  main()
