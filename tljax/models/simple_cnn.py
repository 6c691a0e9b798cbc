"""The from-scratch baseline of seed 000: a small conv net, no pretraining.

Seed 000 reports 45.58% on 10 Monkey Species with it; its role is to show
what transfer learning buys, so it stays deliberately plain: conv-BN-ReLU-pool
stages followed by a flatten + MLP head.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import TORCH_BN, Conv, batch_norm, torch_padding

INPUT_SIZES = {'default': 224, 'simple_cnn_tiny': 32}


class SimpleCNNBackbone(nn.Module):
  widths: Sequence[int] = (32, 64, 128, 256)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.widths):
      x = Conv(width, 3, padding=torch_padding(3), dtype=self.dtype, name=f'conv{i}')(x)
      x = batch_norm(train, dtype=self.dtype, name=f'bn{i}', **TORCH_BN)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    return x


def build(name: str, dtype=jnp.float32, widths: Sequence[int] | None = None):
  if widths is None:
    widths = (8, 16) if name == 'simple_cnn_tiny' else (32, 64, 128, 256)
  head = dict(pool='avg', hidden=(256,) if name == 'simple_cnn' else (16,), activation='relu',
              dropout=0.5)
  return SimpleCNNBackbone(widths=tuple(widths), dtype=dtype), head
