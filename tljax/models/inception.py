"""InceptionV3 laid out exactly as `keras.applications.InceptionV3` builds it.

The seeds use Keras' ImageNet InceptionV3 (whole, or cut at `mixed7` with a
new head), so every detail follows Keras rather than the paper or
torchvision: 'valid' padding where Keras asks for it, TF 'same' padding
elsewhere (only ever at stride 1 here, hence symmetric for the odd kernels),
branch average pools that exclude the padding from the count (Keras
`AveragePooling2D(padding='same')`), convolutions without bias and
BatchNormalization without scale (eps 1e-3, momentum 0.99).

The architecture is data (`STEM`, `BLOCKS`) so the Keras port can derive the
order in which Keras stores these layers from the same description the
module runs.

Module names (under `backbone`), each a conv+BN unit holding `conv` and `bn`:

  conv2d_1a_3x3, conv2d_2a_3x3, conv2d_2b_3x3, conv2d_3b_1x1, conv2d_4a_3x3   stem
  mixed<k>/<branch unit>            e.g. mixed7/branch7x7dbl_3, mixed9/branch3x3_2a

The end points are the blocks `mixed0` … `mixed10`; `cut='mixed7'` ends the
backbone there (17x17x768 at 299). Any end point of an uncut model can also
be read with `apply(..., capture_intermediates=lambda m, _: (m.name or '').startswith('mixed'))`.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import KERAS_BN, Conv, avg_pool_torch, batch_norm, max_pool_torch

INPUT_SIZES = {'default': 299}
MIN_INPUT_SIZE = 75


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One Keras `conv2d_bn`: Conv2D (no bias) → BatchNormalization (no scale) → ReLU."""

  name: str
  filters: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: str = 'same'


AVG_POOL = 'avg_pool'   # 3x3, stride 1, 'same', padding excluded from the average.
MAX_POOL = 'max_pool'   # 3x3, stride 2, 'valid'.


@dataclasses.dataclass(frozen=True)
class Split:
  """The branch forks; the forks' outputs are concatenated (mixed9/mixed10's 1x3 | 3x1 pairs)."""

  forks: tuple[tuple[ConvSpec, ...], ...]


Unit = Union[ConvSpec, str, Split]
Branch = tuple[Unit, ...]


def _c(name: str, filters: int, kernel, stride: int = 1, padding: str = 'same') -> ConvSpec:
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  return ConvSpec(name, filters, kernel, stride, padding)


STEM: tuple[Unit, ...] = (
    _c('conv2d_1a_3x3', 32, 3, 2, 'valid'),
    _c('conv2d_2a_3x3', 32, 3, 1, 'valid'),
    _c('conv2d_2b_3x3', 64, 3),
    MAX_POOL,
    _c('conv2d_3b_1x1', 80, 1, 1, 'valid'),
    _c('conv2d_4a_3x3', 192, 3, 1, 'valid'),
    MAX_POOL,
)


def _block_a(pool_filters: int) -> tuple[Branch, ...]:
  return (
      (_c('branch1x1', 64, 1),),
      (_c('branch5x5_1', 48, 1), _c('branch5x5_2', 64, 5)),
      (_c('branch3x3dbl_1', 64, 1), _c('branch3x3dbl_2', 96, 3), _c('branch3x3dbl_3', 96, 3)),
      (AVG_POOL, _c('branch_pool', pool_filters, 1)),
  )


def _block_c(c7: int) -> tuple[Branch, ...]:
  return (
      (_c('branch1x1', 192, 1),),
      (_c('branch7x7_1', c7, 1), _c('branch7x7_2', c7, (1, 7)), _c('branch7x7_3', 192, (7, 1))),
      (_c('branch7x7dbl_1', c7, 1), _c('branch7x7dbl_2', c7, (7, 1)),
       _c('branch7x7dbl_3', c7, (1, 7)), _c('branch7x7dbl_4', c7, (7, 1)),
       _c('branch7x7dbl_5', 192, (1, 7))),
      (AVG_POOL, _c('branch_pool', 192, 1)),
  )


def _block_e() -> tuple[Branch, ...]:
  return (
      (_c('branch1x1', 320, 1),),
      (_c('branch3x3_1', 384, 1),
       Split(((_c('branch3x3_2a', 384, (1, 3)),), (_c('branch3x3_2b', 384, (3, 1)),)))),
      (_c('branch3x3dbl_1', 448, 1), _c('branch3x3dbl_2', 384, 3),
       Split(((_c('branch3x3dbl_3a', 384, (1, 3)),), (_c('branch3x3dbl_3b', 384, (3, 1)),)))),
      (AVG_POOL, _c('branch_pool', 192, 1)),
  )


BLOCKS: tuple[tuple[str, tuple[Branch, ...]], ...] = (
    ('mixed0', _block_a(32)),
    ('mixed1', _block_a(64)),
    ('mixed2', _block_a(64)),
    ('mixed3', (
        (_c('branch3x3', 384, 3, 2, 'valid'),),
        (_c('branch3x3dbl_1', 64, 1), _c('branch3x3dbl_2', 96, 3),
         _c('branch3x3dbl_3', 96, 3, 2, 'valid')),
        (MAX_POOL,),
    )),
    ('mixed4', _block_c(128)),
    ('mixed5', _block_c(160)),
    ('mixed6', _block_c(160)),
    ('mixed7', _block_c(192)),
    ('mixed8', (
        (_c('branch3x3_1', 192, 1), _c('branch3x3_2', 320, 3, 2, 'valid')),
        (_c('branch7x7x3_1', 192, 1), _c('branch7x7x3_2', 192, (1, 7)),
         _c('branch7x7x3_3', 192, (7, 1)), _c('branch7x7x3_4', 192, 3, 2, 'valid')),
        (MAX_POOL,),
    )),
    ('mixed9', _block_e()),
    ('mixed10', _block_e()),
)
END_POINTS = tuple(name for name, _ in BLOCKS)


def keras_pads(spec: ConvSpec) -> tuple[tuple[int, int], tuple[int, int]]:
  """Keras 'valid' → none; 'same' at stride 1 → k-1 split as TF does (symmetric for odd k)."""
  if spec.padding == 'valid':
    return ((0, 0), (0, 0))
  if spec.stride != 1:
    raise ValueError(f"{spec.name}: 'same' padding is only used at stride 1 in InceptionV3")
  return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in spec.kernel)


class ConvBN(nn.Module):
  spec: ConvSpec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = self.spec
    x = Conv(s.filters, s.kernel, strides=s.stride, padding=keras_pads(s), dtype=self.dtype,
             name='conv')(x)
    x = batch_norm(train, dtype=self.dtype, name='bn', use_scale=False, **KERAS_BN)(x)
    return nn.relu(x)


def _run_units(units, x, train: bool, dtype):
  """Applies a sequence of units; conv units become `ConvBN` submodules named by their spec."""
  for unit in units:
    if unit == AVG_POOL:
      x = avg_pool_torch(x, 3, 1, padding=1, count_include_pad=False)
    elif unit == MAX_POOL:
      x = max_pool_torch(x, 3, 2)
    elif isinstance(unit, Split):
      x = jnp.concatenate([_run_units(f, x, train, dtype) for f in unit.forks], axis=-1)
    else:
      x = ConvBN(unit, dtype=dtype, name=unit.name)(x, train)
  return x


class InceptionBlock(nn.Module):
  """Parallel branches concatenated along channels, in Keras' order."""

  branches: tuple[Branch, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    return jnp.concatenate([_run_units(b, x, train, self.dtype) for b in self.branches], axis=-1)


class InceptionV3Backbone(nn.Module):
  """Image (>= 75x75) → feature map at end point `cut` (default: `mixed10`, 8x8x2048 at 299)."""

  cut: str = 'mixed10'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f'InceptionV3 needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, '
                       f'got {x.shape[1]}x{x.shape[2]}')
    x = _run_units(STEM, x, train, self.dtype)
    for name, branches in BLOCKS:
      x = InceptionBlock(branches, dtype=self.dtype, name=name)(x, train)
      if name == self.cut:
        break
    return x


def blocks_until(cut: str | None) -> tuple[tuple[str, tuple[Branch, ...]], ...]:
  """The blocks a backbone cut at `cut` contains (all for None)."""
  cut = cut or END_POINTS[-1]
  if cut not in END_POINTS:
    raise ValueError(f'unknown InceptionV3 end point {cut!r}; '
                     f'choose one of {", ".join(END_POINTS)}')
  return BLOCKS[:END_POINTS.index(cut) + 1]


def build(name: str, dtype=jnp.float32, cut: str | None = None):
  """`cut`: end point the backbone stops at ('mixed0' … 'mixed10'; None = the full network).

  The head default is Keras' top: global average pool → Dense (`predictions`).
  """
  if name != 'inception_v3':
    raise ValueError(f'unknown Inception model {name!r}; only inception_v3 is defined')
  cut = blocks_until(cut)[-1][0]
  return InceptionV3Backbone(cut=cut, dtype=dtype), dict(pool='avg', hidden=(), dropout=0.0)
