"""Single-convolution microbenchmarks: XLA's conv vs tljax's CPU backend vs torch.

These are the shapes the performance issue quotes (a MobileNetV2 depthwise
layer, a 1x1 expansion, a ResNet 3x3) plus the stride-2 and 5x5 depthwise
variants EfficientNet-Lite needs. Forward alone and forward + backward
(gradients for input and kernel, as training needs) are timed separately,
because the CPU backend's depthwise conv has a hand-written backward pass. The
'fast' columns are `tljax.ops.use_backend('cpu')`, the 'xla' ones plain lax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import guarded, measure
from experiments.bench_tljax import BACKENDS
from tljax import ops


@dataclasses.dataclass(frozen=True)
class ConvCase:
  name: str
  batch: int
  size: int
  cin: int
  cout: int
  kernel: int
  stride: int
  groups: int

  @property
  def out_size(self) -> int:
    p = (self.kernel - 1) // 2
    return (self.size + 2 * p - self.kernel) // self.stride + 1

  @property
  def flops(self) -> int:
    return (2 * self.batch * self.out_size ** 2 * self.cout * self.kernel ** 2 *
            (self.cin // self.groups))


def cases(batch: int) -> list[ConvCase]:
  return [
      ConvCase('depthwise 3x3 s1 56x56x144', batch, 56, 144, 144, 3, 1, 144),
      ConvCase('depthwise 3x3 s2 112x112x96', batch, 112, 96, 96, 3, 2, 96),
      ConvCase('depthwise 5x5 s1 28x28x240', batch, 28, 240, 240, 5, 1, 240),
      ConvCase('1x1 28x28 32->192', batch, 28, 32, 192, 1, 1, 1),
      ConvCase('1x1 56x56 24->144', batch, 56, 24, 144, 1, 1, 1),
      ConvCase('3x3 56x56 64->64 (ResNet)', batch, 56, 64, 64, 3, 1, 1),
  ]


def _jax_fns(case: ConvCase, impl: str, dtype):
  p = (case.kernel - 1) // 2
  pads = ((p, p), (p, p))

  def f(x, k):
    return ops.conv2d(x, k, strides=case.stride, padding=pads, groups=case.groups)

  def loss(x, k, ct):
    return jnp.sum(f(x, k).astype(jnp.float32) * ct)

  x, k, ct = _jax_args(case, dtype)
  with ops.use_backend(BACKENDS[impl]):
    fwd = jax.jit(f).lower(x, k).compile()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, k, ct).compile()
  return fwd, grad


def _jax_args(case: ConvCase, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((case.batch, case.size, case.size, case.cin)), dtype)
  k = jnp.asarray(rng.standard_normal((case.kernel, case.kernel, case.cin // case.groups,
                                       case.cout)), dtype)
  ct = jnp.asarray(rng.standard_normal((case.batch, case.out_size, case.out_size, case.cout)),
                   jnp.float32)
  return x, k, ct


def _time_jax(case, impl, dtype, iters, warmup):
  fwd, grad = _jax_fns(case, impl, dtype)
  x, k, ct = _jax_args(case, dtype)
  sync = jax.block_until_ready
  return {'forward': measure(lambda: fwd(x, k), sync, iters=iters, warmup=warmup),
          'forward_backward': measure(lambda: grad(x, k, ct), sync, iters=iters, warmup=warmup)}


def _time_torch(case, dtype, iters, warmup):
  import torch
  tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
  p = (case.kernel - 1) // 2
  conv = torch.nn.Conv2d(case.cin, case.cout, case.kernel, case.stride, p, groups=case.groups,
                         bias=False).to(dtype=tdtype, memory_format=torch.channels_last)
  x = torch.randn(case.batch, case.cin, case.size, case.size, dtype=tdtype)
  x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
  ct = torch.randn(case.batch, case.cout, case.out_size, case.out_size, dtype=tdtype)
  ct = ct.contiguous(memory_format=torch.channels_last)

  def forward():
    with torch.no_grad():
      return conv(x)

  def forward_backward():
    x.grad = None
    conv.weight.grad = None
    conv(x).backward(ct)

  noop = lambda _: None
  return {'forward': measure(forward, noop, iters=iters, warmup=warmup),
          'forward_backward': measure(forward_backward, noop, iters=iters, warmup=warmup)}


def run(*, batch: int, iters: int, warmup: int, dtypes, impls=('xla', 'fast'),
        with_torch: bool = True, names: tuple[str, ...] = ()) -> list[dict]:
  """One row per (case, dtype); `impls` may be empty to time torch alone (own process)."""
  rows = []
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    for case in cases(batch):
      if names and not any(n in case.name for n in names):
        continue
      print(f'micro: {case.name} {dtype_name}', flush=True)
      results = {}
      for impl in impls:
        results[f'jax-{impl}'] = guarded(f'jax-{impl}', lambda: _time_jax(case, impl, dtype, iters,
                                                                          warmup))
      if with_torch:
        results['torch'] = guarded('torch', lambda: _time_torch(case, dtype, iters, warmup))
      rows.append({'case': case.name, 'dtype': dtype_name, 'shape': dataclasses.asdict(case),
                   'flops': {'forward': case.flops, 'forward_backward': 3 * case.flops},
                   'results': results})
  return rows


def gflops(row: dict, framework: str, mode: str) -> float | None:
  timing = row['results'].get(framework, {}).get(mode)
  if not timing or 'median_s' not in timing:
    return None
  return row['flops'][mode] / timing['median_s'] / 1e9

