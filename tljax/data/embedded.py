"""Datasets that need no network: two small real ones shipped inside pip packages, and a
procedural one.

`sklearn`'s digits (1,797 8x8 gray) and `skimage`'s `lfw_subset` (100 faces,
100 non-faces, 25x25 gray) are tiny but real, so the README's offline demo can
show transfer learning actually helping. They are upsampled to the load size
because an ImageNet backbone needs its native resolution to be useful. The
synthetic set exists for tests and benchmarks: class-dependent colour, shape
and stripe texture make it learnable by a tiny CNN in a few steps, at any
size and class count.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from tljax.data.split import Split


def _gray_to_rgb_cache(gray01: np.ndarray, load_size: int) -> np.ndarray:
  """float [N, h, w] in [0, 1] → uint8 [N, S, S, 3], bilinear upsampling."""
  out = np.empty((len(gray01), load_size, load_size, 3), np.uint8)
  for i, g in enumerate(gray01):
    img = Image.fromarray(np.clip(np.round(g * 255.0), 0, 255).astype(np.uint8), 'L')
    out[i] = np.asarray(img.resize((load_size, load_size), Image.BILINEAR))[..., None]
  return out


def digits(load_size: int) -> Split:
  """sklearn's 8x8 handwritten digits (0–16 intensities), ten classes."""
  from sklearn.datasets import load_digits
  data = load_digits()
  images = _gray_to_rgb_cache(data.images / 16.0, load_size)
  return Split(images, data.target.astype(np.int32), [str(d) for d in range(10)],
               [f'digits/{i}' for i in range(len(images))], name='all')


def lfw(load_size: int) -> Split:
  """skimage's LFW subset: the first 100 images are faces, the next 100 are not."""
  try:
    from skimage.data import lfw_subset
  except ImportError:
    raise ValueError(
        "data.source='lfw' needs scikit-image; run: pip install 'tljax[demo]'") from None
  raw = lfw_subset()
  images = _gray_to_rgb_cache(raw, load_size)
  labels = np.repeat(np.arange(2, dtype=np.int32), len(raw) // 2)
  return Split(images, labels, ['face', 'non_face'],
               [f'lfw_subset/{i}' for i in range(len(raw))], name='all')


def _class_style(c: int):
  hue = (c * 0.6180339887) % 1.0
  shape = c % 3
  stripes = 2 + (c // 3) % 4
  angle = np.deg2rad((c * 47) % 180)
  return hue, shape, stripes, angle


def synthetic(num_examples: int, num_classes: int, load_size: int, seed: int, name: str) -> Split:
  """Balanced, shuffled, class-dependent images; same (seed, name) → same bytes."""
  rng = np.random.default_rng([seed, sum(map(ord, name)), num_classes, load_size])
  labels = (np.arange(num_examples) % num_classes)[rng.permutation(num_examples)].astype(np.int32)
  s = load_size
  yy, xx = np.meshgrid((np.arange(s) + 0.5) / s, (np.arange(s) + 0.5) / s, indexing='ij')
  images = np.empty((num_examples, s, s, 3), np.uint8)
  for i, c in enumerate(labels):
    hue, shape, stripes, angle = _class_style(int(c))
    cy, cx = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.18, 0.32)
    dy, dx = yy - cy, xx - cx
    if shape == 0:
      mask = dy ** 2 + dx ** 2 <= r ** 2
    elif shape == 1:
      mask = np.maximum(np.abs(dy), np.abs(dx)) <= r * 0.85
    else:
      mask = (np.abs(dy) + np.abs(dx)) <= r * 1.2
    fg = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.03, 0.03)) % 1.0, 0.8,
                                      rng.uniform(0.75, 1.0))) * 255.0
    bg = rng.uniform(0, 90, 3)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * stripes * (xx * np.cos(angle) + yy * np.sin(angle)) / (2 * r) + phase)
    texture = np.where(wave > 0, 1.0, 0.55)
    img = np.where(mask[..., None], fg * texture[..., None], bg)
    img = img + rng.normal(0.0, 8.0, img.shape)
    images[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
  return Split(images, labels, [f'class_{c}' for c in range(num_classes)],
               [f'synthetic/{name}/{i}' for i in range(num_examples)], name=name)
