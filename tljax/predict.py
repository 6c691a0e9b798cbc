r"""Classify image files with ported or trained weights.

  python -m tljax.predict --weights=DIR --image=cat.jpg [--image=...] [--topk=5] [--json]
      [--tta=none|flip|five_crop|ten_crop]

`--weights` is a ported-weights directory (`python -m tljax.port ...`); the
preprocessing and class names recorded in its metadata are applied, so a
prediction sees exactly the inputs the weights were trained on. Every
readable image is classified; each unreadable one gets a one-line error
naming the file, and the exit status is 1 if any file failed.

`--tta` averages probabilities over views of each image, the views
`--config.eval.tta` evaluates (`tljax.tta`), made from the decoded image at
the default load size: 'shorter' geometries resize the shorter side to
`resize` and take the centre square, whose centre and corner `input_size`
crops are the five crops (torchvision's Resize + FiveCrop); 'exact' ones
squash to `input_size`, which leaves the corners equal to the centre (warned).

A `temperature` in the metadata (fitted by training on the validation split)
divides the logits before the softmax (sigmoid for a 1-logit head); under
TTA it divides the view-averaged log-probabilities, the logits `eval_step`
sees, so probabilities are calibrated as they were measured.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import warnings
from typing import Any, Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageOps

from tljax import labels as labels_lib
from tljax import tta as tta_lib
from tljax.data.decode import size_error, to_rgb
from tljax.data.preprocess import Preprocessing, resize_and_crop
from tljax.porting import weights_io
from tljax.porting.merge import PortError, flatten

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
  check_fits(path, model, variables, meta)
  return model, variables, meta


def _shapes(tree) -> dict[str, tuple]:
  return {k: tuple(np.shape(v)) for k, v in flatten(tree).items()}


def _model_shapes(model, input_size: int) -> dict[str, tuple]:
  """Variable shapes of `model`, traced abstractly (nothing is computed or compiled)."""
  import jax
  import jax.numpy as jnp
  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  return _shapes(jax.eval_shape(model.init, jax.random.key(0), x))


def _fitting_arch(shapes: dict, meta: dict, input_size: int) -> str | None:
  """The registered arch whose variables have exactly `shapes`, if one does.

  Only run once the named arch has failed, to turn "does not fit" into
  "these are X's weights"; a few seconds of abstract tracing at most.
  """
  from tljax import models
  for name in models.NAMES:
    if name == meta['arch']:
      continue
    try:
      candidate = models.create(name, int(meta['num_classes']), head=meta.get('head'))
      if _model_shapes(candidate, input_size) == shapes:
        return name
    except Exception:  # noqa: BLE001 - an arch that cannot take this head or size is no match
      continue
  return None


def check_fits(path: str, model, variables: dict, meta: dict) -> None:
  """Raises a one-line PortError when the weights are not the metadata's arch.

  Without it a wrong `arch` in metadata.json surfaces as a Flax scope
  traceback from inside the first forward pass.
  """
  input_size = Preprocessing.from_json(meta['preprocessing']).input_size
  expected, got = _model_shapes(model, input_size), _shapes(variables)
  if expected == got:
    return
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  reshaped = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
  example = (missing or unexpected or reshaped)[0]
  problem = (f'{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} mis-shaped '
             f'entries, e.g. {example}')
  arch, where = meta['arch'], os.path.join(path, weights_io.METADATA_FILE)
  actual = _fitting_arch(got, meta, input_size)
  if actual:
    raise PortError(f'the weights are {actual!r} weights but {where} says arch {arch!r} '
                    f'({problem}); set "arch": "{actual}" in it, or re-export/re-port the '
                    f'{arch} weights.')
  raise PortError(f'the weights do not fit arch {arch!r} named in {where} ({problem}); fix "arch" '
                  '(and "num_classes", "head", "arch_kw") there, or re-port the weights with '
                  '`python -m tljax.port --arch=...`.')


def decode_image(path: str) -> Image.Image:
  """Decodes fully (so truncation is caught here), applies EXIF rotation, returns RGB.

  Mode conversion is the training pipeline's (`tljax.data.decode`), so a file
  means the same pixels in training and prediction: alpha is composited onto
  white (not dropped), 16-bit images are scaled to 8 bits, CMYK/palette/
  grayscale become RGB. The size limit is the training decoder's too
  (`tljax.data.decode.size_error`), so a file training skips is refused here.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(path) as image:
        too_large = size_error(image)
        if too_large:
          raise ImageError(f'{path}: {too_large} (training skips images this large too)')
        image.load()
        return to_rgb(ImageOps.exif_transpose(image), [])
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError(f'{path}: no such file; check the path') from None
  except IsADirectoryError:
    raise ImageError(f'{path}: is a directory, not an image file; pass image files, one '
                     '--image each') from None
  except PermissionError:
    raise ImageError(f'{path}: permission denied; make the file readable') from None
  except Image.UnidentifiedImageError:
    raise ImageError(f'{path}: not an image file (unrecognised format); pass a JPEG, PNG, '
                     'BMP, GIF, TIFF or WebP file') from None
  except Image.DecompressionBombError as e:
    raise ImageError(f'{path}: too large to decode safely ({e}); downscale the image') from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    detail = ' '.join(str(e).split()) or type(e).__name__
    raise ImageError(f'{path}: corrupt or truncated image ({detail}); re-download or '
                     're-save the file') from None


def prepare(image: Image.Image, spec: Preprocessing) -> np.ndarray:
  """RGB image → normalised float32 [size, size, 3] model input."""
  return np.asarray(spec.normalize(resize_and_crop(image, spec)), np.float32)


def views(image: Image.Image, spec: Preprocessing, mode: str = 'none') -> np.ndarray:
  """RGB image → normalised float32 [views, size, size, 3] in `tljax.tta.view_transforms` order.

  View 0 of 'none' and 'flip' is `prepare`'s input; the five crops come from
  the square the training cache would hold at the default load size
  (`components.load_size`), the centre one being `prepare`'s again.
  """
  tta_lib.check_mode(mode)
  centre = resize_and_crop(image, spec)
  crops = [centre]
  if mode in ('five_crop', 'ten_crop'):
    if spec.resize_mode == 'shorter':
      load = spec.resize
      square = resize_and_crop(image, dataclasses.replace(spec, input_size=load))
    else:
      load, square = spec.input_size, centre
    side = round(tta_lib.crop_side(load, spec))
    tta_lib.warn_if_degenerate(mode, load, side)
    far = load - side
    crops = [square[top:top + side, left:left + side]
             for top, left in ((0, 0), (0, far), (far, 0), (far, far))] + [centre]
  if mode in ('flip', 'ten_crop'):
    crops += [c[:, ::-1] for c in crops]
  return np.stack([np.asarray(spec.normalize(c), np.float32) for c in crops])


def average_logits(view_logits: np.ndarray) -> np.ndarray:
  """[n, views, C] → [n, C]: log of the mean probability over views (`tljax.tta.average_logits`).

  One view passes through unchanged, so 'none' predicts exactly as without TTA.
  """
  view_logits = np.asarray(view_logits, np.float64)
  if view_logits.shape[1] == 1:
    return view_logits[:, 0]

  def log_mean_exp(x):
    top = np.max(x, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.log(np.mean(np.exp(x - top), axis=1)) + top[:, 0]

  if view_logits.shape[-1] == 1:
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
    logit = log_mean_exp(log_sigmoid(view_logits)) - log_mean_exp(log_sigmoid(-view_logits))
    return np.clip(logit, -tta_lib.LOGIT_CLIP, tta_lib.LOGIT_CLIP)
  shifted = view_logits - view_logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return log_mean_exp(log_probs)


def temperature_of(metadata: dict) -> float:
  """The metadata's fitted softmax temperature, 1.0 when there is none."""
  t = metadata.get('temperature', 1.0)
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
    raise ValueError(f'metadata "temperature" must be a finite number > 0, got {t!r}; fix or '
                     'delete it in metadata.json (delete it for uncalibrated probabilities), or '
                     're-export the weights.')
  return float(t)


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


def _forward_for(model):
  """The shared forward, or a private one for modules that cannot be hashed (list fields)."""
  try:
    hash(model)
  except TypeError:
    import jax
    return jax.jit(lambda v, x: model.apply(v, x, train=False))
  return functools.partial(_forward(), model)


class Predictor:
  """A model, its variables and metadata; batches are padded to powers of two (few compiles)."""

  def __init__(self, model, variables, metadata: dict, tta: str = 'none'):
    import jax
    self.metadata = metadata
    self.spec = Preprocessing.from_json(metadata['preprocessing'])
    self.tta = tta
    tta_lib.check_mode(tta)
    self.temperature = temperature_of(metadata)
    self.names = labels_lib.resolve(metadata.get('labels'), int(metadata['num_classes']))
    self._apply = _forward_for(model)
    self._variables = jax.device_put(variables)

  def logits(self, inputs: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(inputs), BATCH):
      chunk = inputs[start:start + BATCH]
      padded = np.zeros((1 << (len(chunk) - 1).bit_length(),) + chunk.shape[1:], np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._apply(self._variables, padded))[:len(chunk)])
    return np.concatenate(out)

  def probabilities(self, logits: np.ndarray) -> np.ndarray:
    """Calibrated probabilities of (view-averaged) logits: `probabilities(logits / temperature)`."""
    with np.errstate(all='ignore'):
      return probabilities(np.asarray(logits, np.float64) / self.temperature)

  def top_k(self, logits: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
    """Best k classes per row; a non-finite probability is None (JSON null), sorted last."""
    probs = self.probabilities(logits)
    k = min(k, probs.shape[-1])
    return [[{'index': int(j), 'label': self.names[j],
              'probability': float(row[j]) if np.isfinite(row[j]) else None}
             for j in np.argsort(-row, kind='stable')[:k]] for row in probs]

  def predict_files(self, paths: Sequence[str], k: int = 5) -> list[dict[str, Any]]:
    """One result per path, in order: {'image', 'predictions', 'non_finite'} or {'image', 'error'}.

    `non_finite` is True when any logit (of any view) or probability of the
    image is NaN or infinite: the weights produced garbage, and its
    probabilities are null.
    """
    results, inputs, slots = [], [], []
    for path in paths:
      try:
        inputs.append(views(decode_image(path), self.spec, self.tta))
        slots.append(len(results))
        results.append({'image': path})
      except ImageError as e:
        results.append({'image': path, 'error': str(e)})
    if inputs:
      n_views = tta_lib.MODES[self.tta]
      flat = self.logits(np.concatenate(inputs))
      view_logits = flat.reshape(len(inputs), n_views, flat.shape[-1])
      with np.errstate(all='ignore'):
        logits = average_logits(view_logits)
        finite = (np.isfinite(view_logits).all((1, 2)) & np.isfinite(logits).all(-1) &
                  np.isfinite(self.probabilities(logits)).all(-1))
      for slot, preds, ok in zip(slots, self.top_k(logits, k), finite):
        results[slot]['predictions'] = preds
        results[slot]['non_finite'] = not ok
    return results


def _probability(p: float | None) -> str:
  return f'{p:8.4f}' if p is not None else '     nan'


def settings_line(temperature: float = 1.0, tta: str = 'none') -> str | None:
  """What text output says first when probabilities are not plain single-view softmax."""
  parts = []
  if temperature != 1.0:
    parts.append(f'temperature {temperature:g} (from the metadata)')
  if tta != 'none':
    parts.append(f'tta {tta} ({tta_lib.MODES[tta]} views averaged)')
  return f'# probabilities at {", ".join(parts)}' if parts else None


def format_text(results: list[dict[str, Any]], temperature: float = 1.0,
                tta: str = 'none') -> str:
  header = settings_line(temperature, tta)
  lines = [header] if header else []
  for r in results:
    if 'predictions' in r:
      lines.append(r['image'])
      lines.extend(f'  {_probability(p["probability"])}  {p["label"]} ({p["index"]})'
                   for p in r['predictions'])
  return '\n'.join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_string('weights', None, 'Ported-weights directory (from `python -m tljax.port`).')
flags.DEFINE_multi_string('image', None, 'Image file to classify; repeat for several.')
flags.DEFINE_integer('topk', 5, 'How many classes to print per image.')
flags.DEFINE_bool('json', False, 'Print one JSON document instead of text.')
flags.DEFINE_enum('tta', 'none', list(tta_lib.MODES),
                  'Test-time augmentation: average probabilities over these views.')


def run(weights: str, images: Sequence[str], topk: int = 5, as_json: bool = False,
        tta: str = 'none') -> int:
  """Prints predictions; returns the exit status.

  1 if the weights cannot be loaded, any image failed, or the model's
  output is not finite (each with one `error:` line on stderr). The JSON is
  strict (`allow_nan=False`): non-finite probabilities are already null.
  """
  try:
    predictor = Predictor(*load_for_inference(weights), tta=tta)
  except (PortError, ValueError, TypeError, KeyError, OSError) as e:
    detail = ' '.join(str(e).split()) or type(e).__name__
    print(f'error: cannot load weights {weights}: {detail}', file=sys.stderr)
    return 1
  results = predictor.predict_files(images, topk)
  for r in results:
    if 'error' in r:
      print(f'error: {r["error"]}', file=sys.stderr)
  non_finite = sum(bool(r.get('non_finite')) for r in results)
  if non_finite:
    print(f'error: the weights in {weights} give non-finite (NaN/inf) outputs for {non_finite} of '
          f'{sum("predictions" in r for r in results)} images: they diverged in training or are '
          'corrupt; retrain with a lower learning rate (the training log shows where the loss '
          'became NaN) or re-export/re-port them.', file=sys.stderr)
  if as_json:
    doc = {'weights': weights, 'arch': predictor.metadata['arch']}
    if predictor.temperature != 1.0:
      doc['temperature'] = predictor.temperature
    if tta != 'none':
      doc['tta'] = tta
    print(json.dumps({**doc, 'results': results}, indent=2, allow_nan=False))
  elif any('predictions' in r for r in results):
    print(format_text(results, predictor.temperature, tta))
  return 1 if non_finite or any('error' in r for r in results) else 0


def _usage(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
  """absl parsing with a bad flag reported as one `error:` line and exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _usage(f'{e}; usage: python -m tljax.predict --weights=DIR --image=PATH [--image=...] '
           '[--topk=5] [--json] [--tta=none|flip|five_crop|ten_crop]')
  return []


def main(argv):
  if len(argv) > 1:
    _usage(f'unexpected arguments {argv[1:]}; images go in --image=PATH.')
  if not FLAGS.weights or not FLAGS.image:
    _usage('need --weights=DIR and at least one --image=PATH.')
  if FLAGS.topk < 1:
    _usage('--topk must be >= 1.')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # keep stderr to one line per failed file
  sys.exit(run(FLAGS.weights, FLAGS.image, FLAGS.topk, FLAGS.json, FLAGS.tta))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
