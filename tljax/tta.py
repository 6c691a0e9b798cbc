"""Test-time augmentation: several deterministic views of each image, softmax averaged.

A view is a fixed crop/flip of the cached uint8 image, made with the same
separable resize as the eval transform, so every view sees the object at
the scale the model was validated at. The model runs once per view in
inference mode and the apply function returns log(mean probability) over
views as its "logits": `steps.eval_step` then reads accuracy, loss and
confidence off the averaged probabilities without knowing TTA exists
(softmax(log p̄) = p̄; for a 1-logit head sigmoid(logit(p̄)) = p̄).

Modes (torchvision's FiveCrop/TenCrop on the cache):
  'none'       the eval view, exactly `augment.eval_transform`;
  'flip'       the eval view and its horizontal mirror;
  'five_crop'  crops at the top-left, top-right, bottom-left and bottom-right
               corners and the centre, each of `crop_side` cache pixels;
  'ten_crop'   the five crops and their mirrors.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from tljax.data import augment
from tljax.data.preprocess import Preprocessing

# eval.tta → the number of views it evaluates ('none' is the plain eval transform).
MODES = {'none': 1, 'flip': 2, 'five_crop': 5, 'ten_crop': 10}

# A 1-logit head's averaged logit is finite for finite view logits; the clip keeps an
# infinite view (p̄ of exactly 0 or 1) finite too.
LOGIT_CLIP = 1e4

_warned: set[str] = set()


def check_mode(mode: str) -> int:
  """The number of views of `mode`; a clear error for an unknown one."""
  if mode not in MODES:
    raise ValueError(f'unknown TTA mode {mode!r}; choose one of {", ".join(MODES)}')
  return MODES[mode]


def crop_side(load_size: int, preprocessing: Preprocessing) -> float:
  """Side, in cache pixels, of each five_crop crop.

  'shorter': the cache is the centre square of the shorter-side resize at
  scale load_size/resize, so torchvision's `input_size` crop of the resized
  image is the eval box's side, and the centre crop is the eval view.
  'exact': the cache is the whole squashed image; the crops are `input_size`
  cache pixels (at the default load size that is the whole image).
  """
  if preprocessing.resize_mode == 'shorter':
    return augment.eval_box(load_size, preprocessing)[2]
  return float(min(load_size, preprocessing.input_size))


def warn_if_degenerate(mode: str, load_size: int, side: float) -> bool:
  """Says (once per geometry) when the corner crops are the centre crop; True if they are.

  That happens when the crop covers the whole cache, e.g. a cache at the
  input size: five_crop then averages five copies of one view.
  """
  if mode not in ('five_crop', 'ten_crop') or side < load_size - 1e-6:
    return False
  message = (f'tta={mode!r}: the {side:g}-pixel crops cover the whole {load_size}-pixel image, so '
             'the corner crops equal the centre crop; load images larger (config.load_size, or '
             'a preprocessing with resize > input_size) or use tta=flip.')
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=3)
  return True


def _crop(images, top: float, left: float, side: float, out_size: int,
          preprocessing: Preprocessing, dtype):
  """uint8 [b, S, S, 3] → the normalised [b, out, out, 3] resize of one square box."""
  s = images.shape[1]
  hp = jax.lax.Precision.HIGHEST
  wy = augment._interp_matrix(top, side, s, out_size)
  wx = augment._interp_matrix(left, side, s, out_size)
  x = jnp.einsum('oh,bhwc->bowc', wy, images.astype(jnp.float32), precision=hp)
  x = jnp.einsum('pw,bowc->bopc', wx, x, precision=hp)
  return preprocessing.normalize(x).astype(dtype)


def _mirror(view: Callable) -> Callable:
  return lambda images: jnp.flip(view(images), axis=2)


def _five(index: int, out_size: int, preprocessing: Preprocessing, dtype, mode: str) -> Callable:
  """Crop `index` of (top-left, top-right, bottom-left, bottom-right, centre), torchvision's order."""
  def view(images):
    s = images.shape[1]
    side = crop_side(s, preprocessing)
    warn_if_degenerate(mode, s, side)
    if index == 4 and preprocessing.resize_mode == 'shorter':
      return augment.eval_transform(images, out_size, preprocessing, dtype=dtype)
    far = s - side
    top, left = ((0.0, 0.0), (0.0, far), (far, 0.0), (far, far), (far / 2, far / 2))[index]
    return _crop(images, top, left, side, out_size, preprocessing, dtype)
  return view


def view_transforms(mode: str, out_size: int, preprocessing: Preprocessing,
                    dtype=jnp.float32) -> list[Callable]:
  """One function per view, uint8 [b, S, S, 3] → normalised [b, out, out, 3], in MODES order.

  Mirrors follow their unmirrored views ('flip': eval, mirror; 'ten_crop':
  the five crops, then their five mirrors, as torchvision's TenCrop).
  """
  check_mode(mode)
  if mode in ('none', 'flip'):
    views = [lambda images: augment.eval_transform(images, out_size, preprocessing, dtype=dtype)]
  else:
    views = [_five(i, out_size, preprocessing, dtype, mode) for i in range(5)]
  if mode in ('flip', 'ten_crop'):
    views += [_mirror(v) for v in views]
  return views


def average_logits(view_logits, loss_kind: str):
  """[views, b, C] logits → [b, C] log of the mean probability over views (float32).

  Softmax: logsumexp over views of log_softmax, minus log(views). Sigmoid
  (C = 1): logit(p̄) = log p̄ - log(1 - p̄), each term a logsumexp of
  log-sigmoids, so it stays finite where p̄ rounds to 0 or 1.
  """
  logits = view_logits.astype(jnp.float32)
  if loss_kind == 'sigmoid':
    pos = jax.nn.logsumexp(jax.nn.log_sigmoid(logits), axis=0)
    neg = jax.nn.logsumexp(jax.nn.log_sigmoid(-logits), axis=0)
    return jnp.clip(pos - neg, -LOGIT_CLIP, LOGIT_CLIP)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jax.nn.logsumexp(log_probs, axis=0) - math.log(logits.shape[0])


def on_images(model, mode: str, out_size: int, preprocessing: Preprocessing, loss_kind: str,
              dtype=jnp.float32):
  """An eval `steps.ApplyFn` averaging the model's probabilities over the views of `mode`.

  'none' is `steps.on_images` on the eval transform, the same computation
  as without TTA. Otherwise the views are stacked and the model runs on one
  view at a time (`lax.map`: one compiled forward, eval-batch memory) with
  BatchNorm on its running statistics and no dropout. For evaluation only:
  a training step would have to differentiate through every view.
  """
  from tljax import steps
  views = view_transforms(mode, out_size, preprocessing, dtype)
  if mode == 'none':
    return steps.on_images(model, lambda key, images: views[0](images))

  def apply(params, batch_stats, batch, cache, keys, train):
    del keys
    if train:
      raise ValueError(f'tta={mode!r} is for evaluation; training steps take the train transform')
    images = steps.batch_images(batch, cache)
    inputs = jnp.stack([view(images) for view in views])
    variables = {'params': params, 'batch_stats': batch_stats}
    view_logits = jax.lax.map(
        lambda x: model.apply(variables, x, train=False, bn_train=False, stochastic=None), inputs)
    return average_logits(view_logits, loss_kind), None
  return apply
