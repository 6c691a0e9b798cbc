"""What a backbone expects its input to look like, and host-side preprocessing.

A ported backbone is only as good as the match between its inputs at
training time and ours. The spec travels in every weights' metadata JSON, so
prediction, evaluation and training all apply the same transform.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Resize/crop geometry and normalisation, in 0–255 RGB units.

  `resize_mode='shorter'` resizes the shorter side to `resize` then centre
  crops `input_size` (torchvision eval); `'exact'` resizes straight to
  `input_size` (Keras applications). Normalisation is `(x - mean) / std`.
  """

  input_size: int = 224
  resize: int = 256
  resize_mode: str = 'shorter'
  mean: Sequence[float] = (123.675, 116.28, 103.53)
  std: Sequence[float] = (58.395, 57.12, 57.375)
  interpolation: str = 'bilinear'

  def __post_init__(self):
    if self.resize_mode not in ('shorter', 'exact'):
      raise ValueError(f"resize_mode must be 'shorter' or 'exact', got {self.resize_mode!r}")
    if self.input_size < 1 or self.resize < self.input_size and self.resize_mode == 'shorter':
      raise ValueError(f'need 1 <= input_size <= resize, got {self.input_size}, {self.resize}')

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d['mean'], d['std'] = list(map(float, self.mean)), list(map(float, self.std))
    return d

  @classmethod
  def from_json(cls, d: dict) -> 'Preprocessing':
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f'unknown preprocessing keys {sorted(unknown)}; expected {sorted(fields)}')
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

  def normalize(self, x):
    """uint8/float 0–255 RGB → model input (works on numpy and jax arrays)."""
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return (x.astype(np.float32) - mean) / std


TORCHVISION = Preprocessing()
KERAS_TF = Preprocessing(resize=299, resize_mode='exact', input_size=299, mean=(127.5,) * 3,
                         std=(127.5,) * 3)
EFFICIENTNET_LITE = Preprocessing(mean=(127.0,) * 3, std=(128.0,) * 3, interpolation='bicubic')

# The named presets a config may ask for (`config.preprocessing`); validation reads the keys.
PRESETS = {'torchvision': TORCHVISION, 'keras_tf': KERAS_TF, 'efficientnet_lite': EFFICIENTNET_LITE}

_RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST}


def resize_and_crop(image: Image.Image, spec: Preprocessing) -> np.ndarray:
  """PIL RGB image → uint8 [input_size, input_size, 3] by the spec's geometry."""
  resample = _RESAMPLE[spec.interpolation]
  size = spec.input_size
  if spec.resize_mode == 'exact':
    return np.asarray(image.convert('RGB').resize((size, size), resample), np.uint8)
  nw, nh, left, top = shorter_side_geometry(*image.size, spec.resize, size)
  image = image.convert('RGB').resize((nw, nh), resample)
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def shorter_side_geometry(w: int, h: int, resize: int, size: int) -> tuple[int, int, int, int]:
  """(resized w, h, crop left, top) exactly as torchvision's `Resize(resize)` + `CenterCrop(size)`.

  The long side is truncated (`int`) and the crop offsets rounded (Python's
  `round`), as torchvision and timm's eval transforms do; rounding the long
  side or flooring the offset instead moves the crop by a pixel for some
  sizes (timm's 235 → 224 crop), which parity with their transforms notices.
  """
  if w <= h:
    nw, nh = resize, int(resize * h / w)
  else:
    nw, nh = int(resize * w / h), resize
  return nw, nh, int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
