r"""Classify image files with ported or trained weights.

  python -m tljax.predict --weights=DIR --image=cat.jpg [--image=...] [--topk=5] [--json]

`--weights` is a ported-weights directory (`python -m tljax.port ...`); the
preprocessing and class names recorded in its metadata are applied, so a
prediction sees exactly the inputs the weights were trained on. Every
readable image is classified; each unreadable one gets a one-line error
naming the file, and the exit status is 1 if any file failed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageOps

from tljax import labels as labels_lib
from tljax.data.decode import to_rgb
from tljax.data.preprocess import Preprocessing, resize_and_crop
from tljax.porting import weights_io
from tljax.porting.merge import PortError

BATCH = 16


class ImageError(ValueError):
  """A file that cannot be decoded as an image; the message names the file."""


def load_for_inference(path: str):
  """`(model, variables, metadata)` from a ported-weights directory.

  This is the one place that knows weight formats: training checkpoints
  (`tljax.checkpoint`) are to be recognised here, returning metadata with
  the same keys (arch, num_classes, preprocessing, labels, optional
  arch_kw and head).
  """
  from tljax import models
  if os.path.isfile(os.path.join(path, weights_io.METADATA_FILE)):
    variables, meta = weights_io.load_weights(path)
  else:
    raise PortError(f'{path} is not a ported-weights directory (no {weights_io.METADATA_FILE}); '
                    'create one with `python -m tljax.port --source=... --arch=... --output=DIR`.')
  model = models.create(meta['arch'], int(meta['num_classes']), head=meta.get('head'),
                        **meta.get('arch_kw', {}))
  return model, variables, meta


def decode_image(path: str) -> Image.Image:
  """Decodes fully (so truncation is caught here), applies EXIF rotation, returns RGB.

  Mode conversion is the training pipeline's (`tljax.data.decode`), so a file
  means the same pixels in training and prediction: alpha is composited onto
  white (not dropped), 16-bit images are scaled to 8 bits, CMYK/palette/
  grayscale become RGB.
  """
  try:
    with Image.open(path) as image:
      image.load()
      return to_rgb(ImageOps.exif_transpose(image), [])
  except FileNotFoundError:
    raise ImageError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise ImageError(f'{path}: is a directory, not an image file') from None
  except Image.UnidentifiedImageError:
    raise ImageError(f'{path}: not an image file (unrecognised format)') from None
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    detail = ' '.join(str(e).split()) or type(e).__name__
    raise ImageError(f'{path}: corrupt or truncated image ({detail})') from None


def prepare(image: Image.Image, spec: Preprocessing) -> np.ndarray:
  """RGB image → normalised float32 [size, size, 3] model input."""
  return np.asarray(spec.normalize(resize_and_crop(image, spec)), np.float32)


def probabilities(logits: np.ndarray) -> np.ndarray:
  """Softmax over classes; a single logit is a binary head: [P(neg), P(pos)] by sigmoid."""
  logits = np.asarray(logits, np.float64)
  if logits.shape[-1] == 1:
    p = 1 / (1 + np.exp(-logits))
    return np.concatenate([1 - p, p], axis=-1)
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


@functools.cache
def _forward():
  """One jitted forward for the process; equal Flax modules share its compiled executables."""
  import jax
  return jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)


class Predictor:
  """A model, its variables and metadata; batches are padded to powers of two (few compiles)."""

  def __init__(self, model, variables, metadata: dict):
    import jax
    self.metadata = metadata
    self.spec = Preprocessing.from_json(metadata['preprocessing'])
    self.names = labels_lib.resolve(metadata.get('labels'), int(metadata['num_classes']))
    self._model = model
    self._variables = jax.device_put(variables)

  def logits(self, inputs: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(inputs), BATCH):
      chunk = inputs[start:start + BATCH]
      padded = np.zeros((1 << (len(chunk) - 1).bit_length(),) + chunk.shape[1:], np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(_forward()(self._model, self._variables, padded))[:len(chunk)])
    return np.concatenate(out)

  def top_k(self, logits: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    probs = probabilities(logits)
    k = min(k, probs.shape[-1])
    return [[{'index': int(j), 'label': self.names[j], 'probability': float(row[j])}
             for j in np.argsort(-row, kind='stable')[:k]] for row in probs]

  def predict_files(self, paths: Sequence[str], k: int = 5) -> list[dict[str, Any]]:
    """One result per path, in order: {'image', 'predictions'} or {'image', 'error'}."""
    results, inputs, slots = [], [], []
    for path in paths:
      try:
        inputs.append(prepare(decode_image(path), self.spec))
        slots.append(len(results))
        results.append({'image': path})
      except ImageError as e:
        results.append({'image': path, 'error': str(e)})
    if inputs:
      for slot, preds in zip(slots, self.top_k(self.logits(np.stack(inputs)), k)):
        results[slot]['predictions'] = preds
    return results


def format_text(results: list[dict[str, Any]]) -> str:
  lines = []
  for r in results:
    if 'predictions' in r:
      lines.append(r['image'])
      lines.extend(f'  {p["probability"]:8.4f}  {p["label"]} ({p["index"]})'
                   for p in r['predictions'])
  return '\n'.join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_string('weights', None, 'Ported-weights directory (from `python -m tljax.port`).')
flags.DEFINE_multi_string('image', None, 'Image file to classify; repeat for several.')
flags.DEFINE_integer('topk', 5, 'How many classes to print per image.')
flags.DEFINE_bool('json', False, 'Print one JSON document instead of text.')


def run(weights: str, images: Sequence[str], topk: int = 5, as_json: bool = False) -> int:
  """Prints predictions; returns the exit status (1 if any image or the weights failed)."""
  try:
    predictor = Predictor(*load_for_inference(weights))
  except (PortError, ValueError, OSError) as e:
    print(f'error: cannot load weights {weights}: {e}', file=sys.stderr)
    return 1
  results = predictor.predict_files(images, topk)
  for r in results:
    if 'error' in r:
      print(f'error: {r["error"]}', file=sys.stderr)
  if as_json:
    print(json.dumps({'weights': weights, 'arch': predictor.metadata['arch'], 'results': results},
                     indent=2))
  else:
    print(format_text(results))
  return 1 if any('error' in r for r in results) else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; images go in --image=PATH.')
  if not FLAGS.weights or not FLAGS.image:
    raise app.UsageError('need --weights=DIR and at least one --image=PATH.')
  if FLAGS.topk < 1:
    raise app.UsageError('--topk must be >= 1.')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # keep stderr to one line per failed file
  sys.exit(run(FLAGS.weights, FLAGS.image, FLAGS.topk, FLAGS.json))


if __name__ == '__main__':
  app.run(main)
