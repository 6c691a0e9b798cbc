"""The torch side of the suite: torchvision (and efficientnet-lite-pytorch) models.

Same three measurements as `bench_tljax`, done the way a torch user would:
channels_last memory format, Adam, cross-entropy; the head step freezes the
backbone (`requires_grad=False`, eval-mode BN) so autograd never records it.
Modes: 'eager', 'compile' (`torch.compile` of the model; it needs a C++
compiler on CPU and may fail offline — then the result is an error, shown as
n/a). bf16 runs under `torch.autocast` (AMP: fp32 parameters, bf16 compute,
as tljax's `dtype=bfloat16`); fp32 runs as plain fp32.
"""

from __future__ import annotations

import contextlib

import numpy as np

from experiments.timing import guarded, measure

# tljax name → (constructor, attribute holding the classifier head).
TORCH_MODELS = {
    'resnet34': ('torchvision.resnet34', 'fc'),
    'resnet50': ('torchvision.resnet50', 'fc'),
    'mobilenet_v2': ('torchvision.mobilenet_v2', 'classifier'),
    'mobilenet_v3_large': ('torchvision.mobilenet_v3_large', 'classifier'),
    'inception_v3': ('torchvision.inception_v3', 'fc'),
    'efficientnet_lite0': ('efficientnet_lite_pytorch.efficientnet-lite0', '_fc'),
    'vit_b_16': ('torchvision.vit_b_16', 'heads'),
    'convnext_tiny': ('torchvision.convnext_tiny', 'classifier'),
}


def build(name: str):
  import torch
  if name not in TORCH_MODELS:
    raise KeyError(f'no torch counterpart for {name!r}')
  source, head = TORCH_MODELS[name]
  library, arch = source.split('.', 1)
  if library == 'torchvision':
    import torchvision
    kw = dict(aux_logits=False, init_weights=False) if arch == 'inception_v3' else {}
    model = getattr(torchvision.models, arch)(weights=None, **kw)
  else:
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name(arch)
  return model.to(memory_format=torch.channels_last), head


def _sync(device: str):
  import torch
  if device == 'cuda':
    return lambda _: torch.cuda.synchronize()
  return lambda _: None


def run_model(name: str, *, batch: int, size: int, dtype: str, device: str, modes_to_run,
              iters: int, warmup: int, compile_modes=('eager',), threads: int | None = None,
              num_classes: int = 1000, on_result=None) -> dict:
  """{'torch-eager': {mode: timing}, 'torch-compile': {...}} for one model."""
  import torch
  if threads:
    torch.set_num_threads(threads)
  if device == 'cuda':
    torch.backends.cudnn.benchmark = True  # pick the fastest conv algorithms, as users do
  bf16 = dtype == 'bfloat16'
  results = {}
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.standard_normal((batch, 3, size, size), np.float32))
  images = images.to(device).contiguous(memory_format=torch.channels_last)
  labels = torch.from_numpy(rng.integers(0, num_classes, (batch,))).to(device)
  sync = _sync(device)

  def autocast():
    if not bf16:
      return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)

  for compile_mode in compile_modes:
    key = f'torch-{compile_mode}'
    results[key] = {}
    for mode in modes_to_run:
      if mode == 'cached_head_step':
        continue
      print(f'  {key} {mode}', flush=True)

      def one():
        model, head_attr = build(name)
        model = model.to(device)
        head = getattr(model, head_attr)
        fn = _inference if mode == 'inference' else _train_step
        return measure(fn(model, head, mode, images, labels, autocast, compile_mode), sync,
                       iters=iters, warmup=warmup)

      results[key][mode] = guarded(f'{key} {mode}', one)
      if on_result:
        on_result(key, mode, results[key][mode])
  return results


def _maybe_compile(fn, compile_mode: str):
  import torch
  return torch.compile(fn) if compile_mode == 'compile' else fn


def _inference(model, head, mode, images, labels, autocast, compile_mode):
  import torch
  model.eval()
  forward = _maybe_compile(model, compile_mode)
  x = images

  def call():
    with torch.inference_mode(), autocast():
      return forward(x)

  return call


def _train_step(model, head, mode, images, labels, autocast, compile_mode):
  import torch
  full = mode == 'full_step'
  if full:
    model.train()
    params = list(model.parameters())
  else:
    model.eval()  # frozen backbone: running BN statistics, as tljax's head phase
    head.train()
    for p in model.parameters():
      p.requires_grad_(False)
    params = list(head.parameters())
    for p in params:
      p.requires_grad_(True)
  optimizer = torch.optim.Adam(params, lr=1e-3, eps=1e-7)
  forward = _maybe_compile(model, compile_mode)
  loss_fn = torch.nn.CrossEntropyLoss()
  x = images

  def call():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = loss_fn(forward(x).float(), labels)
    loss.backward()
    optimizer.step()
    return loss

  return call
