"""The eval geometry (`Preprocessing`, resize_mode='shorter') is torchvision's Resize + CenterCrop.

Ported weights are judged on inputs made the way their library makes them;
a crop one pixel off changes logits by far more than a port error. The
hand-worked cases pin the two rules (long side truncated, offsets rounded);
the reference test compares pixels with torchvision's transforms.
"""

import numpy as np
import pytest
from PIL import Image

from tljax.data.preprocess import Preprocessing, resize_and_crop, shorter_side_geometry


@pytest.mark.parametrize('w, h, resize, size, expected', [
    (300, 451, 256, 224, (256, 384, 16, 80)),   # 256 * 451 / 300 = 384.85: truncated, not 385
    (451, 300, 256, 224, (384, 256, 80, 16)),
    (235, 235, 235, 224, (235, 235, 6, 6)),     # (235 - 224) / 2 = 5.5 rounds to 6, not 5
    (500, 375, 236, 224, (314, 236, 45, 6)),    # 236 * 500 / 375 = 314.67 → 314; 45.0, 6.0
    (640, 480, 232, 224, (309, 232, 42, 4)),    # 309.33 → 309; (309 - 224) / 2 = 42.5 → 42
])
def test_geometry_by_hand(w, h, resize, size, expected):
  assert shorter_side_geometry(w, h, resize, size) == expected


@pytest.mark.reference
@pytest.mark.parametrize('w, h, resize', [(300, 451, 256), (235, 235, 235), (640, 480, 232),
                                          (500, 375, 236), (257, 193, 248)])
def test_pixels_equal_torchvision_transforms(w, h, resize):
  from torchvision import transforms
  rng = np.random.default_rng(w * h)
  image = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
  for interpolation, mode in (('bilinear', transforms.InterpolationMode.BILINEAR),
                              ('bicubic', transforms.InterpolationMode.BICUBIC)):
    reference = transforms.Compose([transforms.Resize(resize, interpolation=mode),
                                    transforms.CenterCrop(224)])(image)
    ours = resize_and_crop(image, Preprocessing(input_size=224, resize=resize,
                                                interpolation=interpolation))
    np.testing.assert_array_equal(ours, np.asarray(reference), err_msg=f'{interpolation}')
