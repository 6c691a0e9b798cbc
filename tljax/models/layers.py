"""Building blocks shared by every model family.

Ports are only exact when padding, BatchNorm epsilon and parameter layout
match the reference framework, so these layers make each of those explicit
instead of relying on Flax defaults ('SAME' pads differently from torch on
even inputs, and BatchNorm's default epsilon matches neither torch nor Keras).
"""

from __future__ import annotations

import inspect

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax import ops

Dtype = Any
Padding = str | Sequence[tuple[int, int]]


def torch_padding(kernel: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding torch uses for `padding=(k-1)//2 * dilation`."""
  p = (kernel - 1) // 2 * dilation
  return ((p, p), (p, p))


class Conv(nn.Module):
  """2-D convolution, NHWC, kernel stored HWIO as in `flax.linen.Conv`.

  The parameter names and shapes are those of `nn.Conv` (so checkpoints and
  freezing rules are interchangeable); explicit padding pairs allow torch's
  and Keras' exact pads. Depthwise convolutions set `groups == in_channels`.
  """

  features: int
  kernel_size: int | tuple[int, int]
  strides: int = 1
  padding: Padding = 'VALID'
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kh, kw = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else self.kernel_size
    cin = x.shape[-1]
    if cin % self.groups:
      raise ValueError(f'{self.name}: {cin} input channels not divisible by groups={self.groups}')
    kernel = self.param('kernel', self.kernel_init, (kh, kw, cin // self.groups, self.features),
                        self.param_dtype)
    y = ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), strides=self.strides,
                   padding=self.padding, groups=self.groups)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` (same variables, statistics and outputs) over the last axis,
  with the reference framework's epsilon made explicit."""

  use_running_average: bool
  epsilon: float
  momentum: float
  dtype: Dtype = None
  use_scale: bool = True

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    scale = (self.param('scale', nn.initializers.ones, (c,), jnp.float32) if self.use_scale
             else jnp.ones((c,), jnp.float32))
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    dtype = self.dtype or jnp.result_type(x, jnp.float32)
    if self.use_running_average:
      y = ops.batch_norm_eval(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
      return y.astype(dtype)
    y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    return y.astype(dtype)


def batch_norm(train: bool, *, eps: float, momentum: float, dtype: Dtype, name: str,
               use_scale: bool = True) -> BatchNorm:
  """BatchNorm with the reference framework's epsilon.

  `momentum` is Flax's (weight of the old running value): torch's 0.1 is 0.9
  here, Keras' 0.99 stays 0.99.
  """
  return BatchNorm(use_running_average=not train, epsilon=eps, momentum=momentum,
                   dtype=dtype, use_scale=use_scale, name=name)


TORCH_BN = dict(eps=1e-5, momentum=0.9)
KERAS_BN = dict(eps=1e-3, momentum=0.99)


def relu6(x):
  return jnp.clip(x, 0.0, 6.0)


def hard_sigmoid(x):
  """torch's Hardsigmoid: relu6(x + 3) / 6."""
  return relu6(x + 3.0) / 6.0


def hard_swish(x):
  return x * hard_sigmoid(x)


ACTIVATIONS: dict[str, Callable] = {
    'relu': nn.relu,
    'relu6': relu6,
    'hard_swish': hard_swish,
    'swish': nn.swish,
    'gelu': nn.gelu,
    'linear': lambda x: x,
}


# Head pool: feature map [N, h, w, C] → [N, features]; `tljax.config.validate` reads the keys.
POOLS = {
    'avg': lambda x: jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype),
    'max': lambda x: jnp.max(x, axis=(1, 2)),
    'flatten': lambda x: x.reshape(x.shape[0], -1),
}


class Head(nn.Module):
  """Pool → optional hidden Dense layers → dropout → `logits` Dense.

  This covers every head the seeds and the reference models use: torchvision
  ResNet (`fc`), MobileNetV2 (dropout + linear), MobileNetV3 (linear +
  hard-swish + dropout + linear), Keras top layers and the seeds' custom
  `Dense(relu) + Dropout + Dense(sigmoid)` heads. `num_classes == 1` is a
  binary (sigmoid) head; the loss decides how logits are read.
  """

  num_classes: int
  pool: str = 'avg'
  hidden: Sequence[int] = ()
  activation: str = 'relu'
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False, return_pre_logits: bool = False):
    x = self.pool_features(features)
    act = ACTIVATIONS[self.activation]
    for i, width in enumerate(self.hidden):
      x = act(nn.Dense(width, dtype=self.dtype, name=f'hidden{i}')(x))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    pre_logits = x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x).astype(jnp.float32)
    return (logits, pre_logits) if return_pre_logits else logits

  def pool_features(self, features):
    if features.ndim == 2:
      return features
    if self.pool not in POOLS:
      raise ValueError(f'head pool must be one of {", ".join(map(repr, POOLS))}, got {self.pool!r}')
    return POOLS[self.pool](features)


class Classifier(nn.Module):
  """`backbone` (image → feature map) followed by `head` (feature map → logits).

  The two fixed submodule names make freezing a path rule
  (`params['backbone']` vs `params['head']`). `train` drives dropout;
  `bn_train` (default: `train`) drives BatchNorm and anything else stochastic
  in the backbone, so a frozen backbone can run on running statistics while
  the head trains with dropout. `stochastic`, where not None, drives the
  backbone's stochastic layers (drop-connect) apart from its BatchNorm, for
  backbones that have any; the others ignore it.
  """

  backbone: nn.Module
  head: Head

  def __call__(self, x, train: bool = False, bn_train: bool | None = None,
               stochastic: bool | None = None):
    return self.head(self.features(x, train=train, bn_train=bn_train, stochastic=stochastic),
                     train=train)

  def features(self, x, train: bool = False, bn_train: bool | None = None,
               stochastic: bool | None = None):
    """Backbone output (usually a spatial map [N, h, w, C]) before the head."""
    kw = {}
    if stochastic is not None and 'stochastic' in inspect.signature(
        type(self.backbone).__call__).parameters:
      kw['stochastic'] = stochastic
    return self.backbone(x, train=train if bn_train is None else bn_train, **kw)

  def apply_head(self, features, train: bool = False):
    return self.head(features, train=train)

  def pre_logits(self, x, train: bool = False, bn_train: bool | None = None):
    """Pooled (and hidden-layer) features that feed the final `logits` Dense."""
    return self.head(self.features(x, train=train, bn_train=bn_train), train=train,
                     return_pre_logits=True)[1]


def avg_pool_torch(x, window: int, strides: int, padding: int = 0, count_include_pad: bool = True):
  """`torch.nn.AvgPool2d` / Keras average pooling with explicit padding."""
  pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, window, 1), (1, strides, strides, 1),
                                 pads)
  if count_include_pad or padding == 0:
    return summed / (window * window)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, window, window, 1),
                                 (1, strides, strides, 1), pads)
  return summed / counts


def max_pool_torch(x, window: int, strides: int, padding: int = 0):
  """`torch.nn.MaxPool2d` with explicit padding (padded cells never win)."""
  return ops.max_pool(x, window, strides, padding)

