"""On-device augmentation and eval geometry, in JAX, run inside the jitted/pmapped step.

The host only ships uint8 crops of the cache; cropping, resizing, flipping,
rotation/zoom and colour jitter happen on the accelerator, so a 2-core host
can feed a GPU. Crop+resize is separable: each example gets two small
interpolation matrices (rows: output pixels, columns: source pixels; a
triangle filter widened when downscaling, i.e. antialiased like PIL) and the
resize is two batched matmuls, which XLA runs fast on CPU, GPU and TPU. A
horizontal flip is the x-matrix with its rows reversed. Rotation and zoom
(Keras `RandomRotation` / `RandomZoom`, reflect fill) need a general affine
map and use a bilinear gather, only when enabled.

Given the PRNG key the output is fully determined. All random parameters
of a batch come from one `jax.random.uniform(rng, (batch, NUM_DRAWS))` call,
a row per example: one threefry invocation instead of a dozen per example
keeps the compiled step small (compile time fell ~3x). Under pmap, fold the
device index into `rng` first or every device augments alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tljax.data.preprocess import Preprocessing


def _interp_matrix(start, length, in_size: int, out_size: int):
  """[out, in] weights resampling source span [start, start+length) onto out_size pixels."""
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centers = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  src = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(centers[:, None] - src[None, :]) / support)
  return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def eval_box(load_size: int, preprocessing: Preprocessing):
  """(top, left, size, size) of the eval crop inside the square cache.

  'shorter': the cache is the shorter-side-resized centre square, so the
  torchvision centre crop is the central `input_size/resize` fraction of it;
  'exact': the cache already is the squashed whole image.
  """
  if preprocessing.resize_mode == 'exact':
    return 0.0, 0.0, float(load_size), float(load_size)
  side = load_size * preprocessing.input_size / preprocessing.resize
  offset = (load_size - side) / 2
  return offset, offset, side, side


def eval_transform(images, out_size: int, preprocessing: Preprocessing, dtype=jnp.float32):
  """uint8 [b, S, S, 3] → normalised [b, out, out, 3] by the backbone's eval geometry."""
  s = images.shape[1]
  top, left, side, _ = eval_box(s, preprocessing)
  x = images.astype(jnp.float32)
  if not (side == s and out_size == s):
    w = _interp_matrix(top, side, s, out_size)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum('oh,bhwc->bowc', w, x, precision=hp)
    x = jnp.einsum('pw,bowc->bopc', w, x, precision=hp)
  return preprocessing.normalize(x).astype(dtype)


NUM_DRAWS = 28
_ATTEMPTS = 10


def _random_box(u, s: int, scale, ratio):
  """torchvision RandomResizedCrop on an s×s image, from 22 uniforms, vectorised over attempts."""
  area = (scale[0] + u[:_ATTEMPTS] * (scale[1] - scale[0])) * s * s
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  log_r = lo + u[_ATTEMPTS:2 * _ATTEMPTS] * (hi - lo)
  aspect = jnp.exp(log_r)
  w = jnp.sqrt(area * aspect)
  h = jnp.sqrt(area / aspect)
  ok = (w <= s) & (h <= s)
  first = jnp.argmax(ok)
  fallback_w = s * ratio[1] if ratio[1] < 1 else float(s)
  fallback_h = s / ratio[0] if ratio[0] > 1 else float(s)
  w = jnp.where(ok.any(), w[first], fallback_w)
  h = jnp.where(ok.any(), h[first], fallback_h)
  top = u[2 * _ATTEMPTS] * (s - h)
  left = u[2 * _ATTEMPTS + 1] * (s - w)
  return top, left, h, w


def _reflect(u, size: int):
  """Half-sample symmetric reflection of pixel-centre coordinates (Keras 'reflect')."""
  period = 2.0 * size
  u = jnp.mod(u + 0.5, period)
  return jnp.where(u >= size, period - u, u) - 0.5


def _bilinear_gather(image, sy, sx):
  """Samples float image [S, S, C] at pixel-centre coordinates sy, sx [H, W] (edge-clamped)."""
  s = image.shape[0]
  y0, x0 = jnp.floor(sy), jnp.floor(sx)
  wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
  y0i, y1i = (jnp.clip(v, 0, s - 1).astype(jnp.int32) for v in (y0, y0 + 1))
  x0i, x1i = (jnp.clip(v, 0, s - 1).astype(jnp.int32) for v in (x0, x0 + 1))
  flat = image.reshape(s * s, -1)

  def tap(yi, xi):
    return jnp.take(flat, (yi * s + xi).reshape(-1), axis=0).reshape(*sy.shape, -1)

  top = tap(y0i, x0i) * (1 - wx) + tap(y0i, x1i) * wx
  bottom = tap(y1i, x0i) * (1 - wx) + tap(y1i, x1i) * wx
  return top * (1 - wy) + bottom * wy


def _affine_crop(image, box, out_size: int, flip, angle, zoom, reflect: bool):
  """One bilinear pass: crop `box`, resize to out_size, flip, then rotate/zoom about the centre.

  Rotation and zoom act on the resized output (as Keras layers after a
  resize do), with reflect fill at the output border; composing them with
  the crop means the image is interpolated once, not three times.
  """
  top, left, height, width = box
  c = (out_size - 1) / 2.0
  grid = jnp.arange(out_size, dtype=jnp.float32) - c
  yy, xx = jnp.meshgrid(grid, grid, indexing='ij')
  xx = jnp.where(flip, -xx, xx)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  qy = zoom * (cos * yy - sin * xx) + c
  qx = zoom * (sin * yy + cos * xx) + c
  if reflect:
    qy, qx = _reflect(qy, out_size), _reflect(qx, out_size)
  sy = top + (qy + 0.5) * (height / out_size) - 0.5
  sx = left + (qx + 0.5) * (width / out_size) - 0.5
  return _bilinear_gather(image, sy, sx)


def _colour_affine(u, mean_gray, brightness: float, contrast: float, saturation: float):
  """ColorJitter (brightness → contrast → saturation) folded into one affine colour map.

  Each factor is drawn as in torchvision, but the three steps compose to
  `y = M x + o` with a 3x3 `M`, applied in one pass with a single clip at the
  end (torchvision clips after each step; the difference only shows on
  saturated pixels). Contrast blends toward the mean gray of the cached
  image rather than of the crop, so no reduction over the sampled output is
  needed, which keeps XLA from recomputing the gather (measured 4x slower).
  """
  fb = 1 + brightness * (2 * u[0] - 1)
  fc = 1 + contrast * (2 * u[1] - 1)
  fs = 1 + saturation * (2 * u[2] - 1)
  gray_w = jnp.asarray([0.299, 0.587, 0.114], jnp.float32)
  sat = fs * jnp.eye(3) + (1 - fs) * jnp.broadcast_to(gray_w, (3, 3))
  matrix = fb * fc * sat
  offset = jnp.full((3,), (1 - fc) * fb * mean_gray)
  return matrix, offset


def _apply_colour(x, matrix, offset):
  y = x[..., 0:1] * matrix[:, 0] + x[..., 1:2] * matrix[:, 1] + x[..., 2:3] * matrix[:, 2]
  return jnp.clip(y + offset, 0.0, 255.0)


def _one(u, image, aug_cfg, out_size: int, preprocessing: Preprocessing):
  """One example from its row `u` of NUM_DRAWS uniforms (layout: box 0–21, flip 22,
  rotation 23, zoom 24, colour 25–27)."""
  s = image.shape[0]
  if aug_cfg.get('random_resized_crop', True):
    box = _random_box(u, s, tuple(aug_cfg.get('scale', (0.08, 1.0))),
                      tuple(aug_cfg.get('ratio', (3 / 4, 4 / 3))))
  else:
    box = eval_box(s, preprocessing)
  flip = (u[22] < 0.5) if aug_cfg.get('flip', True) else False
  rotation, zoom = float(aug_cfg.get('rotation', 0.0)), float(aug_cfg.get('zoom', 0.0))
  angle = (2 * u[23] - 1) * math.radians(rotation)
  scale = 1.0 + (2 * u[24] - 1) * zoom
  x = _affine_crop(image.astype(jnp.float32), box, out_size, flip, angle, scale,
                   reflect=bool(rotation or zoom))
  b, c, sat = (float(aug_cfg.get(k, 0.0)) for k in ('brightness', 'contrast', 'saturation'))
  if b or c or sat:
    channel_means = jnp.mean(image.astype(jnp.float32), axis=(0, 1))
    mean_gray = jnp.dot(channel_means, jnp.asarray([0.299, 0.587, 0.114], jnp.float32))
    x = _apply_colour(x, *_colour_affine(u[25:28], mean_gray, b, c, sat))
  return x


def train_transform(rng, images, aug_cfg, out_size: int, preprocessing: Preprocessing,
                    dtype=jnp.float32):
  """uint8 [b, S, S, 3] → augmented, normalised [b, out, out, 3]; deterministic given `rng`."""
  draws = jax.random.uniform(rng, (images.shape[0], NUM_DRAWS))
  x = jax.vmap(lambda u, im: _one(u, im, aug_cfg, out_size, preprocessing))(draws, images)
  return preprocessing.normalize(x).astype(dtype)
