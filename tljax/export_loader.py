r"""Run a model exported by `python -m tljax.export`, without tljax.

  python export_loader.py DIR image.jpg [image2.png ...] [--topk=5] [--json]

  import export_loader
  model = export_loader.load(DIR)
  logits = model(model.preprocess('cat.jpg')[None])   # float32 [n, num_classes]

This file is copied into every export directory and needs only jax, numpy
and (for images) Pillow: it must keep working after tljax is gone, so it
imports nothing from tljax and repeats the few lines of preprocessing it
needs. Those lines are tljax's prediction pipeline (`tljax.predict`):
decoding with EXIF rotation and alpha over white, the resize/crop geometry
and normalisation recorded in export.json; tests hold the two equal.

`model.jax` is checked against the sha256 in export.json before it is
deserialized, so a truncated or swapped file is refused by name instead of
failing inside XLA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

SPEC_FILE = 'export.json'
SUPPORTED_SPEC_VERSION = 1


class ExportLoadError(ValueError):
  """An export directory or input that cannot be used; the message names the fix."""


def read_spec(directory: str) -> dict:
  path = os.path.join(directory, SPEC_FILE)
  if not os.path.isfile(path):
    raise ExportLoadError(f'{path} not found: {directory} is not a tljax export directory; '
                          'create one with `python -m tljax.export --workdir=W --output=DIR`.')
  try:
    with open(path) as f:
      spec = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportLoadError(f'{path} is not valid JSON ({e}); re-export the model.') from None
  if spec.get('spec_version') != SUPPORTED_SPEC_VERSION:
    raise ExportLoadError(f'{path} has spec_version {spec.get("spec_version")!r}, this loader '
                          f'reads {SUPPORTED_SPEC_VERSION}; use the export_loader.py written '
                          'beside it.')
  return spec


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


_RESAMPLE_NAMES = {'bilinear': 'BILINEAR', 'bicubic': 'BICUBIC', 'nearest': 'NEAREST'}


def decode(path: str):
  """Image file → 8-bit RGB PIL image, as tljax decodes it for prediction."""
  from PIL import Image, ImageOps
  try:
    with Image.open(path) as image:
      image.load()
      return _to_rgb(ImageOps.exif_transpose(image))
  except FileNotFoundError:
    raise ExportLoadError(f'{path}: no such file; check the path') from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    detail = ' '.join(str(e).split()) or type(e).__name__
    raise ExportLoadError(f'{path}: not a readable image ({detail}); pass a JPEG, PNG, BMP, '
                          'GIF, TIFF or WebP file') from None


def _to_rgb(image):
  """Any PIL mode → 8-bit RGB: high bit depths scaled, alpha composited over white."""
  from PIL import Image
  mode = image.mode
  if mode == 'RGB':
    return image
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
    arr = np.asarray(image).astype(np.float64)
    top = 65535.0 if mode.startswith('I;16') or arr.max() > 255 else 255.0
    if mode == 'F':
      top = 1.0 if arr.max() <= 1.0 else 255.0
    arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, 'L').convert('RGB')
  if mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return image.convert('RGB')


def preprocess_image(image, preprocessing: dict) -> np.ndarray:
  """RGB PIL image → normalised float32 [size, size, 3] per export.json's `preprocessing`."""
  from PIL import Image
  resample = getattr(Image, _RESAMPLE_NAMES[preprocessing['interpolation']])
  size = int(preprocessing['input_size'])
  image = image.convert('RGB')
  if preprocessing['resize_mode'] == 'exact':
    pixels = np.asarray(image.resize((size, size), resample), np.uint8)
  else:
    # torchvision's Resize(resize) + CenterCrop(size): long side truncated, offsets rounded
    # (tljax.data.preprocess.shorter_side_geometry; this file must not import tljax).
    w, h = image.size
    resize = int(preprocessing['resize'])
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    image = image.resize((nw, nh), resample)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
  mean = np.asarray(preprocessing['mean'], np.float32)
  std = np.asarray(preprocessing['std'], np.float32)
  return ((pixels.astype(np.float32) - mean) / std).astype(np.float32)


class ExportedModel:
  """A callable `float32 [n, size, size, 3] -> float32 logits [n, classes]`, plus its spec."""

  def __init__(self, directory: str, exported, spec: dict):
    self.directory = directory
    self.spec = spec
    self.labels = spec['labels']
    self.temperature = float(spec['output'].get('temperature', 1.0))
    self._exported = exported
    self._shape = tuple(spec['input']['shape'])

  def _check(self, x: np.ndarray) -> None:
    want = self._shape
    ok = (x.ndim == len(want) and all(w is None or w == g for w, g in zip(want, x.shape)))
    if not ok:
      shown = 'x'.join('N' if w is None else str(w) for w in want)
      raise ExportLoadError(f'input has shape {tuple(x.shape)}, but this model takes float32 '
                            f'{shown} ({self.spec["input"]["layout"]}) normalised images; make '
                            'them with .preprocess(path) (and stack them into a batch).')

  def __call__(self, x) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
      raise ExportLoadError(f'input has dtype {x.dtype}, but this model takes normalised float32 '
                            'images, not raw pixels; make them with .preprocess(path).')
    x = x.astype(np.float32)
    self._check(x)
    return np.asarray(self._exported.call(x))

  def preprocess(self, path: str) -> np.ndarray:
    return preprocess_image(decode(path), self.spec['preprocessing'])

  def probabilities(self, logits) -> np.ndarray:
    """Softmax of logits / temperature; a single logit is [P(neg), P(pos)] by sigmoid."""
    z = np.asarray(logits, np.float64) / self.temperature
    if z.shape[-1] == 1:
      p = 1 / (1 + np.exp(-z))
      return np.concatenate([1 - p, p], axis=-1)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  def top_k(self, logits, k: int = 5) -> list[list[dict]]:
    probs = self.probabilities(logits)
    k = min(k, probs.shape[-1])
    return [[{'index': int(j), 'label': self.labels[j], 'probability': float(row[j])}
             for j in np.argsort(-row, kind='stable')[:k]] for row in probs]


def load(directory: str) -> ExportedModel:
  """The export in `directory`, verified against its sha256, as a callable."""
  import jax
  spec = read_spec(directory)
  entry = spec['formats']['jax']
  path = os.path.join(directory, entry['file'])
  if not os.path.isfile(path):
    raise ExportLoadError(f'{path} not found; re-export the model with `python -m tljax.export`.')
  digest = _sha256(path)
  if digest != entry['sha256']:
    raise ExportLoadError(f'{path} is corrupt or was changed after export (sha256 '
                          f'{digest[:12]}..., {SPEC_FILE} says {entry["sha256"][:12]}...); '
                          're-export the model with `python -m tljax.export`.')
  with open(path, 'rb') as f:
    blob = f.read()
  try:
    exported = jax.export.deserialize(bytearray(blob))
  except Exception as e:  # noqa: BLE001 - any failure here means an unreadable artifact
    raise ExportLoadError(f'{path} cannot be deserialized by jax {jax.__version__} ({e}); '
                          f'it was exported with jax {spec.get("jax_version")}: install that '
                          'version or re-export.') from None
  platform = jax.default_backend()
  names = {'gpu': ('cuda', 'rocm')}.get(platform, (platform,))  # JAX says 'gpu' for both
  if not set(names) & set(exported.platforms):
    raise ExportLoadError(f'{path} was lowered for {list(exported.platforms)}, not {platform}; '
                          'run it on one of those (e.g. JAX_PLATFORMS=cpu) or re-export.')
  return ExportedModel(directory, exported, spec)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description='Classify images with a tljax export.')
  parser.add_argument('directory', help='the export directory (with export.json, model.jax)')
  parser.add_argument('images', nargs='+', help='image files')
  parser.add_argument('--topk', type=int, default=5)
  parser.add_argument('--json', action='store_true', help='print one JSON document')
  args = parser.parse_args(argv)
  if args.topk < 1:
    parser.error('--topk must be >= 1')
  try:
    model = load(args.directory)
  except ExportLoadError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  results, inputs, slots = [], [], []
  for path in args.images:
    try:
      inputs.append(model.preprocess(path))
      slots.append(len(results))
      results.append({'image': path})
    except ExportLoadError as e:
      print(f'error: {e}', file=sys.stderr)
      results.append({'image': path, 'error': str(e)})
  if inputs:
    batch = model.spec['input']['batch']
    stacked = np.stack(inputs)
    if batch == 'dynamic':
      logits = model(stacked)
    else:
      chunks = []
      for start in range(0, len(stacked), batch):
        chunk = stacked[start:start + batch]
        padded = np.zeros((batch,) + chunk.shape[1:], np.float32)
        padded[:len(chunk)] = chunk
        chunks.append(model(padded)[:len(chunk)])
      logits = np.concatenate(chunks)
    for slot, preds in zip(slots, model.top_k(logits, args.topk)):
      results[slot]['predictions'] = preds
  if args.json:
    print(json.dumps({'export': args.directory, 'arch': model.spec['arch'], 'results': results},
                     indent=2))
  else:
    for r in results:
      if 'predictions' in r:
        print(r['image'])
        for p in r['predictions']:
          print(f'  {p["probability"]:8.4f}  {p["label"]} ({p["index"]})')
  return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
  sys.exit(main())
