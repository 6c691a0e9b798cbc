"""Golden ViT parity fixtures from real torchvision and timm: `tests/fixtures/vit/<case>.json`.

Run in the reference venv from the repository root:

  .venv-ref/bin/python -m tools.fixtures_vit [--cases=vit_b_16,vit_tiny_timm,...]

Each case builds the reference model at its stored size (224; 32 for the
test-sized `vit_tiny`), fills it with `tests/reference_weights.build(manifest,
seed)` (LayerNorm affines randomized, class/position embeddings role
'embedding') and runs it on seeded inputs. At a second input size the
reference is the library's own way of running stored weights there: timm
builds `create_model(arch, img_size=S)` and loads the same weights through
its `checkpoint_filter_fn` (which resamples `pos_embed`); torchvision builds
`VisionTransformer(image_size=S)` and loads `interpolate_embeddings(S, ...)`.
tljax instead holds the stored weights and resamples at forward time, with
`pos_resample` naming which library's resampling to reproduce. Only
manifest, seeds and logits are stored.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import timm
import torch
import torchvision
from timm.models import vision_transformer as timm_vit
from torch import nn
from torchvision.models import vision_transformer as tv_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests import reference_weights  # noqa: E402

OUT_DIR = os.path.join(ROOT, 'tests', 'fixtures', 'vit')
BATCH = 2
TINY = dict(patch=8, dim=32, depth=3, heads=2, mlp=64, classes=10)

# case: (source, reference arch, tljax arch, tljax arch keywords, sizes (stored size first)).
CASES = {
    'vit_b_16': ('torchvision', 'vit_b_16', 'vit_b_16', {'pos_resample': 'torchvision'},
                 (224, 160)),
    'vit_base_patch16_224': ('timm', 'vit_base_patch16_224', 'vit_base_patch16_224', {},
                             (224, 160)),
    'vit_small_patch16_224': ('timm', 'vit_small_patch16_224', 'vit_small_patch16_224', {},
                              (224, 288)),
    'vit_small_patch16_224_avg': ('timm', 'vit_small_patch16_224', 'vit_small_patch16_224',
                                  {'pool': 'avg'}, (224, 288)),
    'vit_tiny_timm': ('timm', 'vit_tiny', 'vit_tiny', {}, (32, 48, 24)),
    'vit_tiny_timm_avg': ('timm', 'vit_tiny', 'vit_tiny', {'pool': 'avg'}, (32, 48)),
    'vit_tiny_torchvision': ('torchvision', 'vit_tiny', 'vit_tiny',
                             {'pos_resample': 'torchvision'}, (32, 48)),
}


def reference_model(case: str, size: int) -> nn.Module:
  """The reference network of `case` for square inputs of side `size`, in eval mode."""
  source, arch, _, arch_kw, _ = CASES[case]
  pool = arch_kw.get('pool', 'token')
  if source == 'timm':
    if arch == 'vit_tiny':
      t = TINY
      return timm_vit.VisionTransformer(
          img_size=size, patch_size=t['patch'], embed_dim=t['dim'], depth=t['depth'],
          num_heads=t['heads'], mlp_ratio=t['mlp'] / t['dim'], num_classes=t['classes'],
          global_pool=pool).eval()
    return timm.create_model(arch, pretrained=False, img_size=size, global_pool=pool).eval()
  if arch == 'vit_tiny':
    t = TINY
    return tv_vit.VisionTransformer(image_size=size, patch_size=t['patch'], num_layers=t['depth'],
                                    num_heads=t['heads'], hidden_dim=t['dim'], mlp_dim=t['mlp'],
                                    num_classes=t['classes']).eval()
  return tv_vit.vit_b_16(weights=None, image_size=size).eval()


def manifest_of(model: nn.Module) -> list[dict]:
  """Role of every state-dict entry from its owner's type; fan_in from the shape."""
  owners = dict(model.named_modules())
  manifest = []
  for name, tensor in model.state_dict().items():
    module_name, _, leaf = name.rpartition('.')
    owner = owners[module_name]
    shape = list(tensor.shape)
    entry = {'name': name, 'shape': shape}
    if leaf in ('cls_token', 'pos_embed', 'class_token', 'pos_embedding'):
      entry['role'] = 'embedding'
    elif isinstance(owner, nn.LayerNorm):
      entry['role'] = {'weight': 'ln_scale', 'bias': 'ln_bias'}[leaf]
    elif isinstance(owner, (nn.Conv2d, nn.Linear)) or (
        isinstance(owner, nn.MultiheadAttention) and leaf.startswith('in_proj')):
      entry['role'] = 'kernel' if leaf.endswith('weight') else 'bias'
      if entry['role'] == 'kernel':
        entry['fan_in'] = int(np.prod(shape[1:]))
    else:
      raise ValueError(f'{name}: no role for {type(owner).__name__}.{leaf}')
    manifest.append(entry)
  return manifest


def seeded_models(case: str, seed: int) -> tuple[list[nn.Module], list[dict]]:
  """One reference model per size of `case`, all holding the seeded stored-size weights."""
  source, _, _, _, sizes = CASES[case]
  stored = reference_model(case, sizes[0])
  manifest = manifest_of(stored)
  weights = {k: torch.from_numpy(v) for k, v in reference_weights.build(manifest, seed).items()}
  stored.load_state_dict(weights, strict=True)
  models = [stored]
  for size in sizes[1:]:
    model = reference_model(case, size)
    if source == 'timm':
      state = timm_vit.checkpoint_filter_fn(dict(weights), model)
    else:
      state = tv_vit.interpolate_embeddings(size, model.patch_size, dict(weights))
    model.load_state_dict(state, strict=True)
    models.append(model)
  return models, manifest


def reference_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


def make_fixture(case: str, seed: int) -> dict:
  source, arch, tljax_arch, arch_kw, sizes = CASES[case]
  models, manifest = seeded_models(case, seed)
  inputs, logits = [], []
  for i, (size, model) in enumerate(zip(sizes, models)):
    input_seed = seed * 100 + i
    shape = [BATCH, size, size, 3]
    y = reference_logits(model, reference_weights.random_inputs(input_seed, shape))
    inputs.append({'seed': input_seed, 'shape': shape})
    logits.append([[round(float(v), 6) for v in row] for row in y])
    print(f'{case} {size}x{size}: max|logits| = {np.abs(y).max():.4f}')
  return {'case': case, 'source': source, 'reference_arch': arch, 'arch': tljax_arch,
          'arch_kw': arch_kw, 'seed': seed, 'torch': torch.__version__,
          'torchvision': torchvision.__version__, 'timm': timm.__version__,
          'manifest': manifest, 'inputs': inputs, 'logits': logits}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  os.makedirs(OUT_DIR, exist_ok=True)
  for case in filter(None, args.cases.split(',')):
    path = os.path.join(OUT_DIR, f'{case}.json')
    reference_weights.save_fixture(path, **make_fixture(case, args.seed))
    print(f'wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) // 1024} KiB)')


if __name__ == '__main__':
  main()
