"""Golden parity fixtures from real timm CNNs: `tests/fixtures/timm_cnn/<arch>.json`.

Run in the reference venv from the repository root:

  .venv-ref/bin/python -m tools.fixtures_timm_cnn [--archs=mobilenetv3_large_100,...]

For each arch: `timm.create_model(arch)` (or, for `efficientnet_tiny`, timm's
own EfficientNet builder at tljax's tiny scaling), filled with the seeded
weights of `tests/reference_weights.build(manifest, seed)` (BatchNorm
statistics and affines randomized), run in eval mode on seeded random inputs
at the default size and a non-square one; manifest + seeds + logits are
stored, as in tools/fixtures_torchvision.py.

As in tools/fixtures_torchvision_mobilenet.py, the 1x1 projection conv that
closes each block (no activation after it: `conv_pwl`, or `conv_pw` in a
depthwise-separable block) is drawn with std sqrt(1/fan_in) (manifest
`fan_in` doubled, `init: 'linear'`). With He's std there too,
mobilenetv3_large_100's activations grow until timm's own float32 logits
differ from its float64 logits by more than the parity tolerance; the
generator prints that float32-vs-float64 gap for every fixture.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import timm
import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import _gen_efficientnet
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import reference_weights  # noqa: E402
from tools.fixtures_torchvision import manifest_of  # noqa: E402

OUT_DIR = os.path.join(ROOT, 'tests', 'fixtures', 'timm_cnn')
DEFAULT_ARCHS = ('mobilenetv3_large_100', 'efficientnet_b0', 'efficientnet_tiny')
SIZES = {'efficientnet_tiny': ((64, 64), (49, 71))}
DEFAULT_SIZES = ((224, 224), (193, 257))
BATCH = 2
TINY_CLASSES = 10


def torch_model(arch: str) -> nn.Module:
  if arch == 'efficientnet_tiny':
    # tljax.models.efficientnet.SCALING['efficientnet_tiny'], built by timm's B0 generator.
    return _gen_efficientnet('efficientnet_b0', channel_multiplier=0.25, depth_multiplier=0.5,
                             num_classes=TINY_CLASSES)
  return timm.create_model(arch, pretrained=False)


def projection_kernels(model: nn.Module) -> set[str]:
  """Weight names of every block's closing linear 1x1 conv."""
  last = {InvertedResidual: 'conv_pwl', DepthwiseSeparableConv: 'conv_pw'}
  return {f'{name}.{last[type(m)]}.weight' for name, m in model.named_modules()
          if type(m) in last}


def seeded_model(arch: str, seed: int) -> tuple[nn.Module, list[dict]]:
  """The timm model holding `reference_weights.build(manifest, seed)`, in eval mode."""
  model = torch_model(arch).eval()
  manifest, linear = manifest_of(model), projection_kernels(model)
  for entry in manifest:
    if entry['name'] in linear:
      entry.update(fan_in=2 * entry['fan_in'], init='linear')
  weights = reference_weights.build(manifest, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  return model, manifest


def sizes_of(arch: str) -> tuple[tuple[int, int], ...]:
  return SIZES.get(arch, DEFAULT_SIZES)


def reference_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
  """timm's logits for an NHWC float32 batch."""
  with torch.no_grad():
    return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


def make_fixture(arch: str, seed: int) -> dict:
  model, manifest = seeded_model(arch, seed)
  inputs, logits = [], []
  for i, (h, w) in enumerate(sizes_of(arch)):
    input_seed = seed * 100 + i
    shape = [BATCH, h, w, 3]
    x = reference_weights.random_inputs(input_seed, shape)
    y = reference_logits(model, x)
    with torch.no_grad():
      y64 = model.double()(torch.from_numpy(x).double().permute(0, 3, 1, 2)).numpy()
    model.float()
    inputs.append({'seed': input_seed, 'shape': shape})
    logits.append([[round(float(v), 7) for v in row] for row in y])
    scale = float(np.abs(y).max())
    print(f'{arch} {h}x{w}: max|logits| = {scale:.4f}, timm float32 vs float64: '
          f'{np.abs(y - y64).max() / max(1.0, scale):.2g} of max(1, max|logits|)')
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
