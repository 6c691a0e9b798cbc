"""The four array ops whose best formulation depends on the platform: one hook for all layers.

Layers call `conv2d`, `max_pool`, `batch_norm_train` and `batch_norm_eval`;
model files never see how they run. Each does what `lax` does (and what
`flax.linen.BatchNorm` computes) unless the CPU backend (`tljax.cpu_backend`:
C++ kernels, matmul formulations, closed-form BatchNorm gradient) applies:
on a CPU platform, unless switched off. Both give the same results to float32
rounding, so checkpoints, ports and freezing rules never depend on the choice.

The choice is made at trace time (a function already jitted keeps it): by
`use_backend(...)` inside its block, else `TLJAX_OPS` (`auto`, `xla`, `cpu`);
`auto` is `cpu` when `jax.default_backend()` is CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ('auto', 'xla', 'cpu')
Padding = str | Sequence[tuple[int, int]]

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar('tljax_ops', default=None)


def _check(name: str, source: str) -> str:
  if name not in BACKENDS:
    raise ValueError(f'{source}={name!r} is not an ops backend; use one of {", ".join(BACKENDS)} '
                     '(xla: plain lax ops everywhere; cpu: the CPU backend).')
  return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
  """Forces 'xla' or 'cpu' (or 'auto') for the ops traced inside the block."""
  token = _override.set(_check(name, 'use_backend'))
  try:
    yield
  finally:
    _override.reset(token)


def requested(environ=None) -> str:
  """What `TLJAX_OPS` asks for ('auto' when unset); a bad value is an error naming the choices."""
  env = os.environ if environ is None else environ
  return _check(env.get('TLJAX_OPS', 'auto').strip().lower() or 'auto', 'TLJAX_OPS')


def active_backend() -> str:
  """'xla' or 'cpu': what an op traced right now would use."""
  name = _override.get() or requested()
  if name == 'auto':
    name = 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  return name


def _cpu():
  if active_backend() != 'cpu':
    return None
  from tljax import cpu_backend  # noqa: PLC0415 (only CPU runs load it)
  return cpu_backend


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(x, kernel, *, strides: int | Sequence[int] = 1, padding: Padding = 'VALID',
           groups: int = 1):
  """NHWC input, HWIO kernel (I = in_channels // groups) → NHWC output.

  `lax.conv_general_dilated` with those dimension numbers and
  `feature_group_count=groups`; `padding` is 'SAME', 'VALID' or
  ((top, bottom), (left, right)).
  """
  strides = _pair(strides)
  kin, kout = kernel.shape[2:]
  cin = x.shape[-1]
  if kin * groups != cin or kout % groups:
    raise ValueError(f'kernel {kernel.shape} does not fit {cin} input channels with '
                     f'groups={groups}: need kernel[2] * groups == in_channels and '
                     'out_channels divisible by groups.')
  if not isinstance(padding, str):
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    if len(padding) != 2 or any(len(p) != 2 for p in padding):
      raise ValueError(f'padding must be a string or ((top, bottom), (left, right)), got {padding!r}')
  cpu = _cpu()
  if cpu is not None:
    return cpu.conv2d(x, kernel, strides, padding, groups)
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)


def max_pool(x, window: int, strides: int, padding: int = 0):
  """NHWC max pooling with `torch.nn.MaxPool2d` semantics (padded cells never win)."""
  cpu = _cpu()
  if cpu is not None:
    return cpu.max_pool(x, window, strides, padding)
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, strides, strides, 1),
                           ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def batch_norm_train(x, scale, bias, eps: float):
  """(y, batch mean, batch variance) over all axes but the last; y in float32.

  Flax's statistics (`use_fast_variance`): var = E[x^2] - E[x]^2 in float32,
  clipped at 0, so outputs equal `flax.linen.BatchNorm`'s.
  """
  cpu = _cpu()
  if cpu is not None:
    return cpu.batch_norm_train(x, scale, bias, eps)
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(0.0, jnp.mean(x32 * x32, axes) - mean * mean)
  return (x32 - mean) * (lax.rsqrt(var + eps) * scale) + bias, mean, var


def batch_norm_eval(x, mean, var, scale, bias, eps: float):
  """Inference BatchNorm with running statistics, in float32 (Flax's formula; one fused
  elementwise pass on every platform)."""
  return (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + eps) * scale) + bias
