"""Decoding one image file (or encoded bytes) into the uint8 RGB cache geometry.

Real folders hold zero-byte files, truncated JPEGs, CMYK scans, palette and
16-bit PNGs, alpha channels and PNGs named `.jpg`. Everything PIL can decode
is converted to RGB (and the conversion noted); everything else comes back
as a reason string instead of an exception, so callers can skip it loudly
rather than crash or drop it silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

GEOMETRIES = ('shorter', 'exact')

_EXTENSION_FORMATS = {
    '.jpg': 'JPEG', '.jpeg': 'JPEG', '.jpe': 'JPEG', '.png': 'PNG', '.gif': 'GIF', '.bmp': 'BMP',
    '.webp': 'WEBP', '.tif': 'TIFF', '.tiff': 'TIFF', '.ppm': 'PPM', '.pgm': 'PPM',
}


@dataclasses.dataclass
class Decoded:
  """Either `image` (uint8 [S, S, 3]) or `error` is set; `notes` list conversions."""

  image: np.ndarray | None = None
  error: str | None = None
  notes: list[str] = dataclasses.field(default_factory=list)
  pixel_hash: str | None = None


_EXIF_ORIENTATION = 0x0112

# PIL's decompression-bomb warning threshold (about 89.5 megapixels), fixed here
# so that changing PIL's global cannot make training and prediction disagree.
MAX_PIXELS = 89_478_485


def size_error(img: Image.Image) -> str | None:
  """Why an opened (not yet loaded) image is refused for its size, or None.

  Training skips such files and `tljax.predict` refuses them with this same
  check, so a file means the same thing to both; the header alone decides,
  so a 144-megapixel file costs nothing to reject.
  """
  w, h = img.size
  if w * h <= MAX_PIXELS:
    return None
  return (f'too large to decode safely: {w}x{h} = {w * h / 1e6:.0f} megapixels, over the '
          f'{MAX_PIXELS / 1e6:.1f}-megapixel limit (tljax.data.decode.MAX_PIXELS); '
          'downscale the image')


def to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
  """Any PIL mode → 8-bit RGB, compositing alpha over white."""
  mode = img.mode
  if mode == 'RGB':
    return img
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
    arr = np.asarray(img).astype(np.float64)
    top = 65535.0 if mode.startswith('I;16') or arr.max() > 255 else 255.0
    if mode == 'F':
      top = 1.0 if arr.max() <= 1.0 else 255.0
    arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
    notes.append(f'{mode} (high bit depth) scaled to 8-bit RGB')
    return Image.fromarray(arr, 'L').convert('RGB')
  if mode == 'P' and 'transparency' in img.info:
    img = img.convert('RGBA')
    mode = 'P+transparency'
  if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    notes.append(f'{mode} alpha composited over white')
    return Image.alpha_composite(background, rgba).convert('RGB')
  notes.append(f'{mode} converted to RGB')
  return img.convert('RGB')


_RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST}


def _fit(img: Image.Image, size: int, geometry: str, resample: str) -> Image.Image:
  """'shorter': shorter side → size, centre square crop; 'exact': squash to size×size."""
  w, h = img.size
  if geometry == 'exact':
    return img.resize((size, size), _RESAMPLE[resample])
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  left, top = (nw - size) / 2 / scale, (nh - size) / 2 / scale
  box = (left, top, left + size / scale, top + size / scale)
  return img.resize((size, size), _RESAMPLE[resample], box=box)


def decode(source: str | bytes, size: int, geometry: str = 'shorter', *,
           name: str = '', want_hash: bool = False, resample: str = 'bilinear') -> Decoded:
  """Decodes a path or encoded bytes; never raises for bad content.

  `resample` is the backbone's `Preprocessing.interpolation` (PIL filters,
  antialiased when shrinking), so the cache matches its eval resize.

  `want_hash` returns the sha1 of the decoded full-resolution RGB pixels
  (shape included) for exact-duplicate detection; it disables JPEG draft
  decoding so the hash does not depend on `size`.
  """
  if geometry not in GEOMETRIES:
    raise ValueError(f'geometry must be one of {GEOMETRIES}, got {geometry!r}')
  if resample not in _RESAMPLE:
    raise ValueError(f'resample must be one of {sorted(_RESAMPLE)}, got {resample!r}')
  notes: list[str] = []
  name = name or (source if isinstance(source, str) else '')
  try:
    if isinstance(source, str):
      if os.path.getsize(source) == 0:
        return Decoded(error='empty file (0 bytes)')
      fh = open(source, 'rb')
    else:
      if len(source) == 0:
        return Decoded(error='empty file (0 bytes)')
      fh = io.BytesIO(source)
    with fh, warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      img = Image.open(fh)
      too_large = size_error(img)
      if too_large:
        return Decoded(error=too_large)
      expected = _EXTENSION_FORMATS.get(os.path.splitext(name)[1].lower())
      if expected and img.format and img.format != expected and not (
          expected == 'PPM' and img.format in ('PPM', 'PGM')):
        notes.append(f'content is {img.format}, extension says {expected}')
      if getattr(img, 'n_frames', 1) > 1:
        notes.append(f'{img.n_frames} frames, first used')
      if img.format == 'JPEG' and not want_hash:
        img.draft('RGB', (size, size))
      img.load()
      if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
        notes.append('rotated by its EXIF orientation')
      rgb = to_rgb(img, notes)
      pixel_hash = None
      if want_hash:
        arr = np.asarray(rgb, np.uint8)
        pixel_hash = hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
      out = np.asarray(_fit(rgb, size, geometry, resample), np.uint8)
  except FileNotFoundError as e:
    return Decoded(error=f'file vanished: {e}')
  except Image.UnidentifiedImageError:
    return Decoded(error='not a decodable image (unknown or corrupt format)')
  except Image.DecompressionBombError as e:
    return Decoded(error=f'too large to decode safely: {e}')
  except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
    reason = 'truncated' if 'truncated' in str(e).lower() else 'corrupt'
    return Decoded(error=f'{reason}: {type(e).__name__}: {e}')
  if out.shape != (size, size, 3):
    return Decoded(error=f'decoded to unexpected shape {out.shape}')
  return Decoded(image=out, notes=notes, pixel_hash=pixel_hash)

