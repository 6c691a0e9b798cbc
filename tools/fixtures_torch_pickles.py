"""Small checkpoints written by the real `torch.save`, for the torch-free reader's tests.

Run in the reference venv from the repository root:

  .venv-ref/bin/python -m tools.fixtures_torch_pickles

Writes to `tests/fixtures/torch_pickles/`:
  tensors_zip.pth / tensors_legacy.pth  every dtype and view shape the reader must
                                         handle (fp16, bf16, int64, bool, 0-d, empty,
                                         transposed, offset and strided views sharing a
                                         storage, an nn.Parameter), in both formats;
  tensors.npz                            the same values as numpy (bf16 widened to fp32);
  wrapped_zip.pth                        {'state_dict': {...}, 'epoch': 3};
  resnet_tiny_zip.pth                    the seeded `resnet_tiny` of
                                         `tests/fixtures/torchvision/resnet_tiny.json`.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import torch

from tools import fixtures_torchvision

OUT_DIR = os.path.join(fixtures_torchvision.ROOT, 'tests', 'fixtures', 'torch_pickles')


def tensors() -> collections.OrderedDict:
  g = torch.Generator().manual_seed(0)
  randn = lambda *shape: torch.randn(*shape, generator=g)
  base = torch.arange(10, dtype=torch.float32)
  sd = collections.OrderedDict()
  sd['f32'] = randn(2, 3, 4, 5)
  sd['f16'] = randn(3, 4).half()
  sd['bf16'] = randn(6).bfloat16()
  sd['f64'] = randn(2, 2).double()
  sd['i64'] = torch.arange(-3, 5, dtype=torch.int64)
  sd['i32'] = torch.tensor([-7, 0, 2**31 - 1], dtype=torch.int32)
  sd['i8'] = torch.tensor([-128, 0, 127], dtype=torch.int8)
  sd['u8'] = torch.tensor([0, 1, 255], dtype=torch.uint8)
  sd['bool'] = torch.tensor([True, False, True])
  sd['scalar'] = torch.tensor(3.5)
  sd['num_batches_tracked'] = torch.tensor(7)
  sd['empty'] = torch.zeros(0, 4)
  sd['transposed'] = randn(3, 4).t()
  sd['base'] = base
  sd['offset_view'] = base[2:5]
  sd['strided_view'] = base[1::3]
  sd['param'] = torch.nn.Parameter(randn(2, 2))
  return sd


def as_numpy(t: torch.Tensor) -> np.ndarray:
  t = t.detach()
  return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def main():
  os.makedirs(OUT_DIR, exist_ok=True)
  out = lambda name: os.path.join(OUT_DIR, name)
  sd = tensors()
  assert not sd['transposed'].is_contiguous() and sd['offset_view'].storage_offset() == 2
  torch.save(sd, out('tensors_zip.pth'))
  torch.save(sd, out('tensors_legacy.pth'), _use_new_zipfile_serialization=False)
  np.savez(out('tensors.npz'), **{k: as_numpy(v) for k, v in sd.items()})
  torch.save({'state_dict': {'w': sd['f32'][0, 0]}, 'epoch': 3}, out('wrapped_zip.pth'))
  model, _ = fixtures_torchvision.seeded_model('resnet_tiny', seed=0)
  torch.save(model.state_dict(), out('resnet_tiny_zip.pth'))
  for name in sorted(os.listdir(OUT_DIR)):
    print(f'{name}: {os.path.getsize(out(name))} bytes')


if __name__ == '__main__':
  main()
