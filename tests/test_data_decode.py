import io

import numpy as np
from PIL import Image

from tljax.data.decode import decode


def _jpeg(array: np.ndarray, orientation: int | None = None) -> bytes:
  img = Image.fromarray(array)
  buf = io.BytesIO()
  exif = Image.Exif()
  if orientation is not None:
    exif[0x0112] = orientation
  img.save(buf, 'JPEG', quality=95, exif=exif.tobytes())
  return buf.getvalue()


def test_exif_orientation_is_applied_like_a_viewer_would():
  # Left half black, right half white, stored sideways with "rotate 90 CW to view" (6).
  stored = np.zeros((64, 32, 3), np.uint8)
  stored[32:] = 255           # bottom half white in storage → left half white when viewed
  d = decode(_jpeg(stored, orientation=6), 32, 'exact', name='x.jpg')
  assert d.error is None and 'rotated by its EXIF orientation' in d.notes
  left, right = d.image[:, :12].mean(), d.image[:, -12:].mean()
  assert left > 200 and right < 50


def test_no_orientation_means_no_rotation_note():
  stored = np.zeros((32, 32, 3), np.uint8)
  d = decode(_jpeg(stored), 16, 'exact', name='x.jpg')
  assert d.error is None and not any('EXIF' in n for n in d.notes)
