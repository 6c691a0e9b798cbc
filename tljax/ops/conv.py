"""2-D convolution entry point used by every model.

All models call `conv2d`, so a faster formulation for a platform (see the
performance issue: XLA:CPU's grouped convolution is far slower than shifted
multiply-adds) can be swapped in here without touching model code or
checkpoints.
"""

from __future__ import annotations

from typing import Sequence

import jax


def conv2d(x, kernel, *, strides: int | Sequence[int] = 1,
           padding: str | Sequence[tuple[int, int]] = 'VALID', groups: int = 1):
  """NHWC input, HWIO kernel (I = in_channels // groups)."""
  if isinstance(strides, int):
    strides = (strides, strides)
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
